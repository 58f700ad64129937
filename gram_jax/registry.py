"""The one registry type behind every table users extend: losses (``gram_jax.losses.LOSSES``),
retrieval scores (``gram_jax.scores.SCORES``), modality kinds (``gram_jax.modalities.KINDS``)
and datasets (``gram_jax.data.registry.DATASETS``).

A :class:`Registry` is a ``dict`` (``name in R``, ``R[name]``, iteration) with two rules:
looking up a missing name raises :class:`UnknownName`, whose message names what is
registered, and a built-in entry cannot be replaced by a different one (registering the same
entry again, e.g. from a re-imported config file, is allowed).
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["Registry", "UnknownName"]

T = TypeVar("T")


class UnknownName(KeyError, ValueError):
    """A name no entry is registered under (both a ``KeyError`` and a ``ValueError``, so
    ``except`` clauses written for either catch it)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class Registry(dict[str, T], Generic[T]):
    """``name -> entry`` for one kind of thing (``what``: "loss", "score", ...)."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what
        self.builtin: set[str] = set()

    def __missing__(self, name: str) -> T:
        raise UnknownName(f"unknown {self.what} {name!r}; registered: {sorted(self)}")

    def check_free(self, name: str, entry: T) -> None:
        """``ValueError`` if ``name`` is a built-in registered with another entry."""
        if name in self.builtin and self[name] != entry:
            raise ValueError(
                f"{name!r} is a built-in {self.what}; register yours under another name"
            )

    def add(self, name: str, entry: T, *, builtin: bool = False) -> T:
        """Register ``entry`` under ``name`` (``builtin``: the library's own, not replaceable)."""
        self.check_free(name, entry)
        self[name] = entry
        if builtin:
            self.builtin.add(name)
        return entry
