"""Orbax checkpoints of the train state, the Grain iterator and the config, with checksums.

Layout: ``<workdir>/checkpoints/<step>/{state,data,config}`` written by an async
``ocp.CheckpointManager`` (keep the newest ``keep`` steps), plus
``<step>/checksums.json``: the SHA-256 of every file of the step, written once the save has
completed (before the next save starts, and at close). Orbax writes each step into a
temporary directory and renames it when complete, so a step directory is not modified after
it exists except for that manifest, and a save interrupted by a kill leaves only a temporary
directory, which is not a checkpoint (it is reported at restore and Orbax removes it).

Restore (:meth:`Checkpointer.restore`) walks the steps from newest to oldest. A step whose
files do not match their checksums, or that fails to restore (truncated or missing files),
cannot be read: it is reported with the step and the file, renamed to
``<step>.corrupt-<n>`` (kept for inspection, never deleted) and the previous step is tried.
A step that is readable but was written with a config that differs in a key that changes
what the checkpoint holds (model, loss, data, optimiser) is NOT touched: restore raises
:class:`ConfigError` listing the keys (see :func:`config_diff`).

:class:`WorkdirLock` makes one process the only writer of a workdir.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import pathlib
import socket
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import multihost

from gram_jax.data.embeddings import sha256_file
from gram_jax.data.order import ElasticDataRestore, ElasticDataSave
from gram_jax.training.config import ConfigError

__all__ = [
    "Checkpointer",
    "CheckpointWriteError",
    "WorkdirBusy",
    "WorkdirLock",
    "RESUMABLE_KEYS",
    "config_diff",
    "flat_config",
]

log = logging.getLogger("gram_jax.training")

MANIFEST = "checksums.json"

# Dotted config keys (or prefixes ending in ".") that may change between the run that wrote
# a checkpoint and the run that resumes it: they change how long training goes on, how it is
# logged, evaluated and saved, or where things live, never what the checkpoint holds. Any
# other key (model, loss, data, optimiser, seed) is structural.
RESUMABLE_KEYS = (
    "name",
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.async_checkpointing",
    "train.save_on_signal",
    "train.progress_bar",
    "train.final_eval",
    "optim.warmup_steps",
    "eval.",
    "data.data_dir",
    "mesh.",
    "distributed.",
)


class WorkdirBusy(RuntimeError):
    """Another live process holds the workdir's lock."""


class _TrainingStopped(RuntimeError):
    """Training stopped at ``step``; ``last_good`` is the newest intact checkpoint's step
    (``None``: none on disk), named at the end of the message after ``reason``."""

    def __init__(self, step: int, last_good: int | None, reason: str, *, none: str = "none"):
        self.step = step
        self.last_good = last_good
        where = f"step {last_good}" if last_good is not None else none
        super().__init__(f"{reason}. Last good checkpoint: {where}.")


class CheckpointWriteError(_TrainingStopped):
    """A checkpoint save failed; ``step`` is the step that was being written."""

    def __init__(self, step: int, last_good: int | None, error: BaseException):
        super().__init__(
            step,
            last_good,
            f"saving checkpoint step {step} failed ({type(error).__name__}: "
            f"{_first_line(error)}); training stopped",
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def flat_config(config: Any) -> dict[str, Any]:
    """``{"a.b.c": value}`` of a ConfigDict / dict as JSON would store it (tuples as lists)."""
    if not isinstance(config, dict):
        config = json.loads(config.to_json_best_effort())
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = node

    walk("", config)
    return out


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def config_diff(saved: Any, current: Any) -> tuple[dict, dict]:
    """``(structural, resumable)``: ``{key: (saved value, current value)}`` of the keys that
    differ, split by whether a checkpoint written under ``saved`` can be resumed under
    ``current`` (:data:`RESUMABLE_KEYS`)."""
    a, b = flat_config(saved), flat_config(current)
    missing = object()
    structural, resumable = {}, {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            pair = tuple("<absent>" if v is missing else v for v in (va, vb))
            (resumable if _resumable(key) else structural)[key] = pair
    return structural, resumable


def _describe(diff: dict) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())


def _step_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


class Checkpointer:
    """Save / restore ``{"state", "data": grain iterator, "config"}`` under a workdir."""

    def __init__(self, workdir: str | os.PathLike, keep: int = 2, async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.keep = keep
        self.async_save = async_save
        self.messages: list[str] = []
        self.last_good: int | None = None
        self._pending: int | None = None  # step being written in the background
        self._unverified: set[int] = set()
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

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # -- saving ------------------------------------------------------------------------------

    def save(self, step: int, state: Any, iterator=None, config: Any = None) -> None:
        """Start saving ``state`` (and the iterator position and the config) as ``step``;
        returns at once when async (device arrays are copied to host before returning, so
        the state may be donated to the next step). The previous save is completed (and its
        checksums written) first; a failed save raises :class:`CheckpointWriteError`."""
        self.finish()
        args = {"state": ocp.args.StandardSave(state)}
        if iterator is not None:
            args["data"] = ElasticDataSave(iterator)  # restorable on any process count
        if config is not None:
            cfg = config if isinstance(config, dict) else json.loads(config.to_json_best_effort())
            args["config"] = ocp.args.JsonSave(cfg)
        self._pending = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**args), force=True)
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - any failure: this step is not saved
            self._pending = None
            raise CheckpointWriteError(step, self.last_good, e) from e
        if not self.async_save:
            self.finish()

    def poll(self) -> None:
        """Cheap per-step check: when the background save has ended, complete it (raise
        :class:`CheckpointWriteError` if it failed, else write its checksums)."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.finish()

    def finish(self) -> None:
        """Wait for the save in flight, raise if it failed, write its checksum manifest."""
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            if step is None:
                raise
            raise CheckpointWriteError(step, self.last_good, e) from e
        if step is None:
            return
        step_dir = self.directory / str(step)
        if not step_dir.is_dir():
            raise CheckpointWriteError(step, self.last_good, FileNotFoundError(str(step_dir)))
        if jax.process_index() == 0:
            try:
                self._write_manifest(step_dir)
            except OSError as e:
                raise CheckpointWriteError(step, self.last_good, e) from e
        self.last_good = step

    @staticmethod
    def _write_manifest(step_dir: pathlib.Path) -> None:
        sums = {str(p.relative_to(step_dir)): sha256_file(p) for p in _step_files(step_dir)}
        tmp = step_dir / f".{MANIFEST}.tmp"
        with tmp.open("w") as fh:
            json.dump({"sha256": sums}, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, step_dir / MANIFEST)

    def wait(self) -> None:
        self.finish()

    # -- restoring ---------------------------------------------------------------------------

    def verify(self, step: int) -> str | None:
        """None if step ``step``'s files match its manifest, else what is wrong (naming the
        file). A step without a manifest (saved before checksums existed, or killed between
        the save and the manifest) is accepted with a warning."""
        step_dir = self.directory / str(step)
        manifest = step_dir / MANIFEST
        if not manifest.is_file():
            if step not in self._unverified:
                self._unverified.add(step)
                self._report(f"checkpoint step {step} has no {MANIFEST}: using it unverified")
            return None
        try:
            sums = json.loads(manifest.read_text())["sha256"]
        except (OSError, ValueError, KeyError) as e:
            return f"{MANIFEST} is unreadable ({_first_line(e)})"
        for rel, digest in sorted(sums.items()):
            path = step_dir / rel
            if not path.is_file():
                return f"file {rel} is missing"
            if sha256_file(path) != digest:
                return f"file {rel} does not match its SHA-256 checksum"
        return None

    def saved_config(self, step: int) -> dict | None:
        """The config step ``step`` was written with (None for checkpoints saved without
        one); raises if the step's config item exists but cannot be read."""
        if not (self.directory / str(step) / "config").exists():
            return None
        r = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(r["config"])

    def check_config(self, config: Any, fallback_config: Any = None) -> dict:
        """Compare ``config`` with the config the newest readable step was written with.

        Raises :class:`ConfigError` listing the keys when they differ structurally (the
        checkpoints are not touched); returns ``{key: (saved, current)}`` of the resumable
        differences (``{}`` when there is no checkpoint). Steps whose files fail their
        checksums or whose config cannot be read are quarantined on the way.
        ``fallback_config``: what to compare with for steps saved without their config
        (the workdir's ``config.json``).
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem = self.verify(step)
            if problem is not None:
                self._quarantine(step, problem)
                continue
            try:
                saved = self.saved_config(step)
            except Exception as e:  # noqa: BLE001 - an unreadable config item
                self._quarantine(step, f"its config cannot be read ({_first_line(e)})")
                continue
            saved = saved if saved is not None else fallback_config
            if saved is None:
                return {}
            structural, changes = config_diff(saved, config)
            if structural:
                raise ConfigError(
                    f"{self.directory.parent} holds a run whose checkpoint step {step} was "
                    f"written with a different config: {_describe(structural)}. These keys "
                    "change what the checkpoint holds, so it cannot be resumed. To start a new "
                    "run use another --workdir; to continue this one, undo the change. The "
                    "checkpoints were not modified."
                )
            return changes
        return {}

    def restore(self, abstract_state: Any, iterator=None) -> tuple[int, Any] | None:
        """``(step, state)`` of the newest readable checkpoint (``iterator`` is set to its
        position in place), or None when there is none; unreadable steps are quarantined."""
        if self._leftovers:
            self._report(
                f"ignoring partial checkpoint(s) from an interrupted save: {self._leftovers}"
            )
            self._leftovers = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem = self.verify(step)
            if problem is not None:
                self._quarantine(step, problem)
                continue
            args = {"state": ocp.args.StandardRestore(abstract_state)}
            if iterator is not None:
                args["data"] = ElasticDataRestore(iterator)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**args))
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                self._quarantine(step, f"{type(e).__name__}: {_first_line(e)}")
                continue
            self.last_good = step
            return step, restored["state"]
        return None

    def _quarantine(self, step: int, problem: str) -> None:
        src = self.directory / str(step)
        n = 0
        while (dst := self.directory / f"{step}.corrupt-{n}").exists():
            n += 1
        self._report(
            f"checkpoint step {step} is corrupt or cannot be read: {problem}; moved to "
            f"{self.directory / dst.name}, trying the previous one"
        )
        self.manager.close()
        if jax.process_index() == 0:  # one host renames; the others wait for it
            os.rename(src, dst)
        multihost.sync_global_processes(f"gram_jax_quarantine_{step}")
        self._open()

    def close(self) -> None:
        """Complete the save in flight (raising if it failed) and release the manager."""
        try:
            self.finish()
        finally:
            self.manager.close()

    def exit(self, exc_type, exc, tb) -> bool:
        """``ExitStack.push`` hook: close on every exit path. While another error is
        propagating, a failure of the save in flight is reported, not raised over it."""
        try:
            self.close()
        except Exception as e:  # noqa: BLE001
            if exc_type is None:
                raise
            self._report(f"while stopping: {e}")
            print(f"WARNING: while stopping: {e}", flush=True)
        return False


class WorkdirLock:
    """An exclusive ``flock`` on ``<workdir>/lock``, whose content names the holder.

    The kernel drops the lock when its holder exits however it exits (kill -9 included), so
    a stale lock file is simply reclaimed by the next run. Taken by process 0 only (the
    other hosts of a multi-host run write through it). Use as a context manager.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = pathlib.Path(workdir).absolute() / "lock"
        self._fh = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "an unknown process"
            fh.close()
            raise WorkdirBusy(
                f"workdir {self.path.parent} is in use by {holder} (lock {self.path}). Wait "
                "for that run to end, stop it, or use another --workdir."
            ) from None
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        fh.seek(0)
        fh.truncate()
        fh.write(f"host {socket.gethostname()} pid {os.getpid()} since {now}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.seek(0)
                self._fh.truncate()
            self._fh.close()  # closing drops the flock
            self._fh = None

    def __enter__(self) -> WorkdirLock:
        if jax.process_index() == 0:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
