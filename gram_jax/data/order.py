"""One global, seeded, epoch-aware example order, read in parts by many processes.

The order does not depend on the topology (processes x devices), so a run on 1 x 8, 2 x 4,
4 x 2 or 8 x 1 sees the same examples, with the same augmentations, at every step, and a
checkpoint written by one layout resumes on another.

* **Global stream.** Global position ``g = 0, 1, ...`` holds record ``order(g)``: epoch
  ``e = g // N`` is a permutation of the ``N`` records seeded by ``(seed, e)`` (grain's
  ``MapDataset.shuffle``, a new permutation per epoch; identity without shuffling). With
  ``num_epochs = E`` the stream has ``E * N`` positions; ``None`` repeats forever.
* **Global batches.** Global step ``s`` (0-based) is the global positions
  ``[s * B, (s + 1) * B)``; a batch may span an epoch boundary.
* **Process parts.** Process ``p`` reads only the rows of each global batch that its devices
  hold: ``s * B + rows_p`` with ``rows_p`` the batch rows of its addressable shards
  (``process_rows``), i.e. ``[p * L, (p + 1) * L)``, ``L = B / process_count``, for the
  usual device order. Its local stream position ``t`` is global position
  ``(t // L) * B + rows_p[t % L]``, so its ``k``-th local batch is its part of global step
  ``k``.
* **Augmentation** of an example is seeded by ``(seed, epoch, record, view)`` of its global
  position, never by a process-local position.
* **Iterator state.** Local batch ``k`` is global step ``k`` on every process, so the grain
  iterator's state (``{"next_index": k}`` without worker processes) is the number of global
  steps consumed, the same on every process and for every layout: ``ElasticDataSave`` /
  ``ElasticDataRestore`` checkpoint it so that any process count restores it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import grain
import numpy as np

__all__ = [
    "global_order",
    "process_rows",
    "num_global_steps",
    "local_positions",
    "PaddedSource",
    "ElasticDataSave",
    "ElasticDataRestore",
]


def global_order(dataset: grain.MapDataset, *, seed: int, shuffle: bool, num_epochs: int | None):
    """``dataset`` reordered into the global stream: element ``g`` is ``dataset[order(g)]``
    (module docstring); ``len`` is ``num_epochs * len(dataset)`` (``sys.maxsize`` if None)."""
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    return dataset.repeat(num_epochs)


def process_rows(
    batch_size: int, process_index: int, process_count: int, sharding=None
) -> np.ndarray:
    """Rows of a global batch of ``batch_size`` that process ``process_index`` reads, sorted.

    With ``sharding`` (the batch's ``NamedSharding``, leading axis split): the rows held by
    this process's addressable devices, which is where ``jax.make_array_from_process_local_data``
    puts its local rows; else the block ``[p * L, (p + 1) * L)``, ``L = B / process_count``.
    """
    if batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the process count {process_count}"
        )
    local = batch_size // process_count
    if sharding is None:
        return np.arange(process_index * local, (process_index + 1) * local)
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(batch_size)[index[0]])
    out = np.array(sorted(rows), dtype=np.int64)
    if len(out) != local:
        raise ValueError(
            f"process {process_index} holds {len(out)} rows of the global batch of {batch_size}, "
            f"expected {local} (batch_size / process_count): the mesh's data axes must split "
            "the batch evenly over the processes"
        )
    return out


def num_global_steps(total: int, batch_size: int, drop_remainder: bool) -> int:
    """Global batches in a stream of ``total`` positions (``sys.maxsize`` = forever)."""
    if drop_remainder or total >= sys.maxsize:
        return total // batch_size
    return -(-total // batch_size)


class _GlobalPosition:
    """Local stream position ``t`` -> ``(g, stream[g])`` (picklable for grain workers)."""

    def __init__(self, stream: grain.MapDataset, batch_size: int, rows: np.ndarray):
        self.stream = stream
        self.batch_size = batch_size
        self.rows = [int(r) for r in rows]

    def __call__(self, t: int):
        step, j = divmod(int(t), len(self.rows))
        g = step * self.batch_size + self.rows[j]
        return g, self.stream[g]


def local_positions(
    stream: grain.MapDataset, *, batch_size: int, rows: np.ndarray, drop_remainder: bool
) -> grain.MapDataset:
    """This process's part of ``stream`` as a ``MapDataset`` of ``(g, stream[g])``, in local
    order: ``len(rows)`` consecutive elements per global step (fewer in a final partial step
    without ``drop_remainder``), so ``.batch(len(rows))`` yields global step ``k`` as batch ``k``.
    """
    total = len(stream)
    local = len(rows)
    full = total // batch_size
    n = full * local
    if not drop_remainder and total < sys.maxsize:
        n += int(np.sum(np.asarray(rows) < total - full * batch_size))
    return grain.MapDataset.range(n).map(_GlobalPosition(stream, batch_size, rows))


class PaddedSource:
    """The first ``n`` records of ``source`` followed by copies of record ``n - 1`` up to a
    multiple of ``batch_size``: a split read in parts by many processes as whole global
    batches (every process runs every batch; the copies are cut from the outputs)."""

    def __init__(self, source, n: int, batch_size: int):
        if not 0 < n <= len(source):
            raise ValueError(f"n must be in [1, {len(source)}], got {n}")
        self.source = source
        self.n = n
        self.length = -(-n // batch_size) * batch_size
        self.modalities = getattr(source, "modalities", None)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        return self.source[min(int(i), self.n - 1)]


# ---------------------------------------------------------------------------------------------
# Checkpointing the position so that any process count restores it
# ---------------------------------------------------------------------------------------------


def _state_files(directory) -> list:
    return sorted(directory.glob("process_*-of-*.json"))


class ElasticDataHandler(grain.checkpoint.CheckpointHandler):
    """grain's iterator handler (same files: ``process_<i>-of-<n>.json``, so existing
    checkpoints restore) whose restore accepts a checkpoint written by another process count.

    Every process's state is the number of global steps consumed (module docstring), so when
    this process's own file is absent (the count changed) it reads the others', checks that
    they agree and uses that state. States that differ (e.g. a state of grain worker
    processes, whose layout depends on the worker count) raise a ``ValueError`` naming them.
    """

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        from grain._src.core import sharding

        p, count = sharding.get_process_index_and_count()
        own = directory / f"process_{p}-of-{count}.json"
        if own.exists():
            return super().restore(directory, item=item)
        files = _state_files(directory)
        if not files:
            raise ValueError(f"no data iterator state (process_*-of-*.json) in {directory}")
        states = {f.name: json.loads(f.read_text()) for f in files}
        first = next(iter(states.values()))
        differ = sorted(k for k, s in states.items() if s != first)
        if differ:
            raise ValueError(
                f"the data iterator states in {directory} differ between processes "
                f"({sorted(states)}), so they cannot be restored with {count} process(es): "
                f"{ {k: states[k] for k in sorted(states)} }"
            )
        item.set_state(first)
        item.start_prefetch()
        return item


try:
    import orbax.checkpoint as ocp

    @ocp.args.register_with_handler(ElasticDataHandler, for_save=True)
    @dataclasses.dataclass
    class ElasticDataSave(ocp.args.CheckpointArgs):
        """Save args of a grain ``DatasetIterator`` (see ``ElasticDataHandler``)."""

        item: Any

    @ocp.args.register_with_handler(ElasticDataHandler, for_restore=True)
    @dataclasses.dataclass
    class ElasticDataRestore(ocp.args.CheckpointArgs):
        """Restore args of a grain ``DatasetIterator``, from any process count."""

        item: Any

except ImportError:  # orbax is a dependency of the trainer, not of the data pipeline
    pass
