"""Grain input pipelines: one global order read in parts by the processes, augment, batch, mesh.

``make_iterator(source, batch_size=..., ...)`` returns a checkpointable
``grain.DatasetIterator`` (``get_state()`` / ``set_state()``, usable with orbax through
``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``) of batches in this format:

=============================  ====================================================
key                            value (B = global batch size)
=============================  ====================================================
``<image modality>``           float32 (B, H, W, 3) in [0, 1]
``<audio modality>``           float32 (B, T, n_mels) log-mel, standardised per example
``<text modality>``            int32 (B, L) token ids, 0 = pad
``<text modality>_mask``       bool (B, L), True on real tokens
``<features modality>``        float32 (B, F)
``<waveform modality>``        float32 (B, S)
``<video modality>``           float32 (B, T, H, W, 3) in [0, 1]
``<user kind modality>``       what its ``convert`` returns (``gram_jax.modalities``)
``label/<name>``               int32 (B,) for every ``factors/<name>`` / ``label/<name>``
``index``                      int32 (B,) the example's ``index`` field (else its position)
=============================  ====================================================

Modality names are the source's (``image``/``audio``/``text`` for synthetic_trimodal,
``image1``/``image2`` for trifeature, the npz keys for embeddings). With
``two_views=True`` the modality entries (and masks) move into ``{"view1": {...}, "view2":
{...}}``, two independent augmentations of the same examples (CoMM); labels and ``index``
stay at the top level. With a ``mesh`` every leaf is a global ``jax.Array`` sharded as
``NamedSharding(mesh, P(data_axis))`` (leading axis); without one, leaves are NumPy arrays
holding this process's rows.

Pipeline (a ``grain.MapDataset``, so the order does not depend on ``worker_count``): one
global stream ``source -> shuffle(seed), reshuffled per epoch -> repeat(num_epochs)``; global
step ``s`` is the stream positions ``[s * B, (s + 1) * B)`` and each process reads only its
rows of it (``gram_jax.data.order``), so the examples of a step do not depend on the number
of processes or devices; then ``convert + augment -> batch(batch_size / process_count)``. The
augmentation Generator of an example is ``default_rng([seed, epoch, record, view])`` of its
global position, so a restored iterator (on any process count) reproduces the same
augmented batches.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gram_jax import modalities as modality_lib
from gram_jax.data import augment as augment_lib
from gram_jax.data import order as order_lib

LABEL_PREFIXES = ("factors/", "label/")


def infer_modalities(record: Mapping) -> dict[str, str]:
    """``{name: kind}`` from one record's values, by the registered kinds' ``claims``.

    Built-in claims: uint8 (H, W, 3) -> image; uint8 (T, H, W, 3) -> video; integer rank-1
    -> text; float rank-1 -> features. Label keys, ``index``, None values and scalars are not
    modalities. Any other array (e.g. a float (H, W) array: a spectrogram or a depth map?)
    raises ``ValueError`` asking for its kind (see ``gram_jax.modalities.infer_kind``).
    """
    out = {}
    for key, value in record.items():
        if value is None or key == "index" or key.startswith(LABEL_PREFIXES):
            continue
        if np.ndim(value) == 0:
            continue
        out[key] = modality_lib.infer_kind(key, value)
    return out


def record_spec(name: str, **config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Stored ``{field: (shape, dtype)}`` of the records of registered dataset ``name``.

    Read from the TFDS builder's ``info.features`` (tensor fields; scalars included), without
    generating or reading data, so a user-registered dataset needs no shape table. A builder
    whose training records are not its stored features (Trifeature's pair records join two
    images) provides ``record_features() -> {field: tfds feature}``.
    """
    import tempfile

    from gram_jax.data import registry

    cfg = registry.make_config(name, **config)
    builder_cls, _ = registry.DATASETS[name]
    # The builder only describes itself here: an empty private data_dir keeps it from
    # looking at (or locking) prepared data.
    with tempfile.TemporaryDirectory() as tmp:
        builder = builder_cls(config="default" if cfg.name == "default" else cfg, data_dir=tmp)
        hook = getattr(builder, "record_features", None)
        features = dict(hook() if hook is not None else builder.info.features.items())
    out = {}
    for key, feature in features.items():
        shape, dtype = getattr(feature, "shape", None), getattr(feature, "np_dtype", None)
        if shape is not None and dtype is not None and None not in tuple(shape):
            out[key] = (tuple(shape), np.dtype(dtype))
    return out


class _Transform:
    """Record -> model-ready example (picklable, so grain workers can run it)."""

    def __init__(self, kinds, aug, seed, shard_len, two_views):
        self.kinds = kinds  # {modality: ModalityKind}
        self.augs = (
            {m: aug.for_modality(m, k) for m, k in kinds.items()} if aug is not None else None
        )
        self.seed = seed
        self.shard_len = shard_len
        self.two_views = two_views

    def _views(self, record, epoch, rec_index, view):
        out = {}
        rng = None
        if self.augs is not None:
            rng = np.random.default_rng([self.seed, epoch, rec_index, view])
        for name, kind in self.kinds.items():
            if name not in record or record[name] is None:
                raise ValueError(
                    f"modality {name!r} missing from the record (keys: "
                    f"{sorted(k for k, v in record.items() if v is not None)})"
                )
            x = kind.convert(name, record[name])
            if rng is not None and self.augs[name] is not None:
                x = self.augs[name](x, rng)
            out[name] = x
            if kind.mask is not None:
                out[f"{name}_mask"] = kind.mask(x)
        return out

    def __call__(self, position, item):
        rec_index, record = item
        epoch = position // self.shard_len
        out = {}
        for key, value in record.items():
            if value is None:
                continue
            for prefix in LABEL_PREFIXES:
                if key.startswith(prefix):
                    out["label/" + key[len(prefix) :]] = np.int32(value)
        out["index"] = np.int32(record.get("index", rec_index))
        if self.two_views:
            out["view1"] = self._views(record, epoch, rec_index, 1)
            out["view2"] = self._views(record, epoch, rec_index, 2)
        else:
            out.update(self._views(record, epoch, rec_index, 0))
        return out


def _with_position(i, record):
    return i, record


class _AtGlobalPosition:
    """``(g, item) -> transform(g, item)``: the transform's position is the global one."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, item):
        return self.transform(*item)


def _data_size(mesh, data_axis) -> int:
    axes = (data_axis,) if isinstance(data_axis, str) else tuple(data_axis)
    for a in axes:
        if a not in mesh.axis_names:
            raise ValueError(f"data axis {a!r} is not an axis of the mesh {mesh.axis_names}")
    return int(np.prod([mesh.shape[a] for a in axes]))


class _ToGlobal:
    """Host batch -> global jax.Arrays sharded along ``data_axis`` (leading axis)."""

    def __init__(self, mesh, data_axis, global_batch):
        self.sharding = NamedSharding(mesh, PartitionSpec(data_axis))
        self.global_batch = global_batch

    def __call__(self, batch):
        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_process_local_data(
                self.sharding, x, (self.global_batch, *x.shape[1:])
            )

        return jax.tree.map(put, batch)


def make_dataset(
    source,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    mesh=None,
    data_axis="data",
    augment=None,
    two_views: bool = False,
    worker_count: int = 0,
    drop_remainder: bool = True,
    modalities: Mapping[str, str] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    read_threads: int = 2,
    prefetch: int = 4,
) -> grain.IterDataset:
    """The ``grain.IterDataset`` of batches of ``source`` (format: module docstring).

    ``make_iterator`` is ``iter`` of it: a checkpointable ``grain.DatasetIterator``.

    Args:
      source: random-access source (``len``, ``[i]`` -> dict), e.g. ``load_source(...)``.
      batch_size: *global* batch size; must divide by the process count and by the size
        of the mesh's data axis (or axes).
      seed: shuffling and augmentation seed.
      shuffle: shuffle the examples, with a new permutation each epoch.
      num_epochs: number of passes; ``None`` repeats forever.
      mesh, data_axis: place batches as global ``jax.Array`` on ``mesh`` sharded along
        ``data_axis`` (a name or a tuple of names); ``None`` yields NumPy arrays.
      augment: ``None``, a preset (``"default"``, ``"light"``, ``"simclr"``, ``"none"``), an
        ``augment.Augment``, or ``{modality: callable(x, rng)}``.
      two_views: yield ``{"view1": ..., "view2": ...}`` independent augmentations (CoMM).
      worker_count: grain worker processes (``mp_prefetch``); 0 = in-process. The order is
        the same for any count, but a state saved with one count restores only with the
        same count (grain's state layouts differ).
      drop_remainder: drop the last incomplete batch.
      modalities: ``{name: kind}`` (registered kinds, ``gram_jax.modalities``) to select /
        override the modalities; default: the kinds the source declares (its ``modalities``
        attribute or TFDS metadata ``modalities``), else ``infer_modalities`` of its first
        record, which raises on an array of ambiguous kind.
      process_index, process_count: override ``jax.process_index()/process_count()``.
      read_threads, prefetch: grain ``ReadOptions`` (threads, batches read ahead).

    Raises:
      ValueError: empty source, batch larger than the split, batch size not
        divisible by the process count or the mesh's data size, unknown modality / kind /
        augmentation preset, data axis not in the mesh.
    """
    if process_index is None:
        process_index = jax.process_index()
    if process_count is None:
        process_count = jax.process_count()
    n = len(source)
    if n == 0:
        raise ValueError("the source (split) is empty")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the process count {process_count}"
        )
    if mesh is not None:
        size = _data_size(mesh, data_axis)
        if batch_size % size:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by the mesh's data axis size {size}"
            )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (repeat forever), got {num_epochs}")
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")
    local_batch = batch_size // process_count
    if drop_remainder and batch_size > n:
        raise ValueError(
            f"batch of {batch_size} ({local_batch} per process) is larger than "
            f"the split ({n} examples)"
        )

    first = source[0]
    if modalities is None:
        modalities = modality_lib.declared_kinds(source) or infer_modalities(first)
    modalities = dict(modalities)
    if not modalities:
        raise ValueError(f"no modality found in the source's records (keys: {sorted(first)})")
    kinds = {}
    for name, kind in modalities.items():
        if kind not in modality_lib.KINDS:
            raise ValueError(
                f"unknown kind {kind!r} for modality {name!r}; expected one of "
                f"{sorted(modality_lib.KINDS)}"
            )
        kinds[name] = modality_lib.KINDS[kind]
        if first.get(name) is None:
            raise ValueError(
                f"unknown modality {name!r}: not in the source's records "
                f"(keys: {sorted(k for k, v in first.items() if v is not None)})"
            )
    aug = augment_lib.resolve(augment)
    if aug is not None:
        unknown = set(dict(aug.overrides)) - set(modalities)
        if unknown:
            raise ValueError(
                f"augmentation for unknown modality {sorted(unknown)}; "
                f"modalities are {sorted(modalities)}"
            )

    # One global order for every topology; this process reads its rows of each global batch
    # (gram_jax/data/order.py). The transform sees global positions: epoch = g // n.
    stream = order_lib.global_order(
        grain.MapDataset.source(source).map_with_index(_with_position),
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
    )
    real = process_index == jax.process_index() and process_count == jax.process_count()
    sharding = NamedSharding(mesh, PartitionSpec(data_axis)) if mesh is not None and real else None
    rows = order_lib.process_rows(batch_size, process_index, process_count, sharding)
    ds = order_lib.local_positions(
        stream, batch_size=batch_size, rows=rows, drop_remainder=drop_remainder
    )
    ds = ds.map(_AtGlobalPosition(_Transform(kinds, aug, seed, n, two_views)))
    ds = ds.batch(local_batch, drop_remainder=drop_remainder)
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    )
    if worker_count > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    if mesh is not None:
        it_ds = it_ds.map(_ToGlobal(mesh, data_axis, batch_size))
    return it_ds


def make_iterator(source, **kwargs) -> grain.DatasetIterator:
    """Checkpointable iterator of batches of ``source``: ``iter(make_dataset(source, ...))``.

    The arguments, their checks and the batch format are ``make_dataset``'s (documented
    there once; ``inspect.signature(make_iterator)`` shows them).
    """
    return iter(make_dataset(source, **kwargs))


# One signature for both entry points: help() and IDEs show make_dataset's keyword arguments.
make_iterator.__signature__ = inspect.signature(make_dataset).replace(
    return_annotation=grain.DatasetIterator
)


def steps_per_epoch(source, batch_size: int, *, process_count: int | None = None) -> int:
    """Full global batches per epoch for ``make_iterator(source, batch_size, ...)``.

    Batches are cut from the global stream of repeated epochs, so a batch may span an epoch
    boundary; ``k`` epochs give ``floor(k * N / batch_size)`` batches in total, for any number
    of processes (``process_count`` is only checked to divide ``batch_size``).
    """
    if process_count is None:
        process_count = jax.process_count()
    if batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the process count {process_count}"
        )
    return len(source) // batch_size
