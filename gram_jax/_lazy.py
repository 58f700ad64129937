"""Lazy re-exports: a module ``__getattr__`` that imports a name's home module on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(module: str, homes: Mapping[str, str]) -> Callable[[str], object]:
    """A PEP 562 ``__getattr__`` for ``module``: ``name`` in ``homes`` is read from the module
    ``homes[name]``, imported only when the attribute is first asked for; any other name raises
    ``AttributeError`` as a plain module would."""
    homes = dict(homes)

    def __getattr__(name: str):
        if name in homes:
            return getattr(importlib.import_module(homes[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
