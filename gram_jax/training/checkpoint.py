"""Orbax checkpointing of the train state and the Grain iterator, with fallback on corruption.

Layout: ``<workdir>/checkpoints/<step>/{state,data}`` written by an async
``ocp.CheckpointManager`` (keep the newest ``keep`` steps). Orbax writes each step into a
temporary directory and renames it when complete, so a step directory is never modified after
it exists, and a save interrupted by a kill leaves only a temporary directory, which is not a
checkpoint (it is reported at restore and Orbax removes it).

Restore walks the steps from newest to oldest: a step that fails to restore (truncated or
missing files, wrong shapes) is reported, renamed to ``<step>.corrupt-<n>`` (kept for
inspection, not deleted, so nothing is lost and the step number is free to be written again),
and the previous step is tried.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import multihost

from gram_jax.data.order import ElasticDataRestore, ElasticDataSave

__all__ = ["Checkpointer"]

log = logging.getLogger("gram_jax.training")


class Checkpointer:
    """Save / restore ``{"state": train state, "data": grain iterator}`` under a workdir."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 2, async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.keep = keep
        self.async_save = async_save
        self.messages: list[str] = []
        # Listed before the manager opens the directory (it may clean temporary dirs up).
        self._leftovers = sorted(p.name for p in self.directory.glob("*.orbax-checkpoint-tmp*"))
        self._open()

    def _open(self) -> None:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            enable_async_checkpointing=self.async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def _report(self, msg: str) -> None:
        log.warning(msg)
        self.messages.append(msg)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, iterator=None) -> None:
        """Start saving ``state`` (and the iterator position) as ``step``; returns at once
        when async (device arrays are copied to host before returning, so the state may be
        donated to the next step)."""
        args = {"state": ocp.args.StandardSave(state)}
        if iterator is not None:
            args["data"] = ElasticDataSave(iterator)  # restorable on any process count
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, iterator=None) -> tuple[int, Any] | None:
        """``(step, state)`` of the newest restorable checkpoint (``iterator`` is set to its
        position in place), or None when there is none."""
        if self._leftovers:
            self._report(
                f"ignoring partial checkpoint(s) from an interrupted save: {self._leftovers}"
            )
        for step in sorted(self.manager.all_steps(), reverse=True):
            args = {"state": ocp.args.StandardRestore(abstract_state)}
            if iterator is not None:
                args["data"] = ElasticDataRestore(iterator)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**args))
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                self._quarantine(step, e)
                continue
            return step, restored["state"]
        return None

    def _quarantine(self, step: int, error: Exception) -> None:
        src = self.directory / str(step)
        n = 0
        while (dst := self.directory / f"{step}.corrupt-{n}").exists():
            n += 1
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self._report(
            f"checkpoint step {step} is corrupt or incomplete ({type(error).__name__}: "
            f"{first[:300]}); moved to {dst.name}, trying the previous one"
        )
        self.manager.close()
        if jax.process_index() == 0:  # one host renames; the others wait for it
            os.rename(src, dst)
        multihost.sync_global_processes(f"gram_jax_quarantine_{step}")
        self._open()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
