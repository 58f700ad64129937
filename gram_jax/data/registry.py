"""Generate-once / load-many entry points for the local TFDS datasets.

``prepare(name, data_dir, **config)`` builds the dataset (ArrayRecord files, no download, no
TensorFlow) unless it already exists and returns its directory
``<data_dir>/<name>/<config name>/<version>``. The config name is ``default`` for the
default configuration, otherwise ``c`` + a hash of the configuration, so different sizes or
seeds never share files. Generation happens in a private temporary directory under
``data_dir`` that is renamed into place only when complete, so an interrupted run leaves
no half-written dataset behind and concurrent preparers are safe (the first rename wins).

``load_source(name, split, data_dir, **config)`` returns a random-access source for grain:
the ``tfds.data_source`` (``ArrayRecordDataSource``) of the split, except for Trifeature
pair splits, which come joined with their images (``TrifeaturePairSource``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import uuid

import tensorflow_datasets as tfds

from gram_jax.data import embeddings, synthetic, trifeature
from gram_jax.data._tfds import check_bounds
from gram_jax.registry import Registry

DATASETS: Registry[tuple[type, type]] = Registry("dataset")
for _name, _entry in {
    "synthetic_trimodal": (synthetic.SyntheticTrimodal, synthetic.SyntheticTrimodalConfig),
    "trifeature": (trifeature.Trifeature, trifeature.TrifeatureConfig),
    "embeddings": (embeddings.Embeddings, embeddings.EmbeddingsConfig),
}.items():
    DATASETS.add(_name, _entry, builtin=True)
log = logging.getLogger("gram_jax.data")
_BASE_FIELDS = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}


def register_dataset(name: str, builder_cls: type, config_cls: type) -> None:
    """Make a user's own TFDS builder available as ``config.data.name = name``.

    ``builder_cls`` subclasses :class:`gram_jax.data.LocalBuilder` (a
    ``tfds.core.GeneratorBasedBuilder``) and yields records ``{<modality>: array, ...,
    "index": int}`` in the formats of ``gram_jax.data.pipeline`` (image ``(H, W, 3) uint8``,
    audio ``(T, n_mels) float32``, text ``(L,) int32`` ids with 0 as padding, features
    ``(D,) float32``); ``config_cls`` is its ``tfds.core.BuilderConfig`` dataclass, whose
    fields are what ``config.data.builder`` may set (those declared with
    :func:`gram_jax.data.bounded` are range-checked, the rest by its ``validate()`` if it
    has one). Call it at the top of your config file so ``train.py --config my_config.py``
    knows the dataset. Re-registering a name replaces it; the built-in names cannot be
    replaced.
    """
    DATASETS.check_free(name, (builder_cls, config_cls))  # a built-in name is the first error
    if not (isinstance(builder_cls, type) and issubclass(builder_cls, tfds.core.DatasetBuilder)):
        raise TypeError(f"builder_cls must be a TFDS DatasetBuilder class, got {builder_cls!r}")
    if not (isinstance(config_cls, type) and issubclass(config_cls, tfds.core.BuilderConfig)):
        raise TypeError(f"config_cls must be a tfds.core.BuilderConfig class, got {config_cls!r}")
    DATASETS.add(name, (builder_cls, config_cls))


def default_data_dir() -> pathlib.Path:
    """``$GRAM_JAX_DATA_DIR`` or ``~/.cache/gram_jax/datasets``."""
    env = os.environ.get("GRAM_JAX_DATA_DIR")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "gram_jax" / "datasets"


def make_config(name: str, **config) -> tfds.core.BuilderConfig:
    """The validated builder config of dataset ``name`` with its derived config name."""
    builder_cls, config_cls = DATASETS[name]
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    params = sorted(set(fields) - _BASE_FIELDS)
    unknown = set(config) - set(params)
    if unknown:
        raise ValueError(
            f"unknown config field(s) {sorted(unknown)} for {name!r}; expected some of {params}"
        )
    if "npz_path" in config:
        config["npz_path"] = os.fspath(config["npz_path"])
    cfg = config_cls(name="default", **config)
    check_bounds(cfg)
    if hasattr(cfg, "validate"):
        cfg.validate()
    if hasattr(cfg, "identity"):
        ident = cfg.identity()
    else:
        ident = {p: getattr(cfg, p) for p in params}
    defaults = {p: fields[p].default for p in params}
    if not hasattr(cfg, "identity") and ident == defaults:
        cfg_name = "default"
    else:
        digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
        cfg_name = f"c{digest}"
    return dataclasses.replace(cfg, name=cfg_name, description=json.dumps(ident))


def dataset_dir(name: str, data_dir: str | os.PathLike | None = None, **config) -> pathlib.Path:
    """Where ``prepare`` puts (or has put) dataset ``name`` with this configuration."""
    builder_cls, _ = DATASETS[name]
    cfg = make_config(name, **config)
    root = pathlib.Path(data_dir) if data_dir is not None else default_data_dir()
    return root / builder_cls.name / cfg.name / str(builder_cls.VERSION)


class DataError(RuntimeError):
    """A dataset directory that cannot be used; the message names the file and the fix."""


def check_dataset_dir(path: str | os.PathLike) -> str | None:
    """None if the prepared dataset at ``path`` is complete, else what is wrong with it,
    naming the file: ``dataset_info.json`` missing or unreadable, a split's ArrayRecord
    shard missing, truncated or holding another number of records than recorded. Cheap:
    only each shard's footer is read."""
    from array_record.python.array_record_module import ArrayRecordReader

    path = pathlib.Path(path)
    info_file = path / "dataset_info.json"
    if not info_file.is_file():
        return f"{info_file} is missing"
    try:
        info = json.loads(info_file.read_text())
        splits = info["splits"]
    except (OSError, ValueError, KeyError) as e:
        return f"{info_file} is unreadable ({type(e).__name__}: {e})"
    ds_name = info.get("name", path.parent.parent.name)
    for sp in splits:
        lengths = [int(n) for n in sp.get("shardLengths", [])]
        for i, n in enumerate(lengths):
            template = sp.get("filepathTemplate", "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
            shard = path / (
                template.replace("{DATASET}", ds_name)
                .replace("{SPLIT}", sp["name"])
                .replace("{FILEFORMAT}", "array_record")
                .replace("{SHARD_X_OF_Y}", f"{i:05d}-of-{len(lengths):05d}")
            )
            if not shard.is_file():
                return f"{shard} is missing"
            try:
                reader = ArrayRecordReader(os.fspath(shard))
                got = reader.num_records()
                reader.close()
            except Exception as e:  # noqa: BLE001 - Riegeli raises RuntimeError / ValueError
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                return f"{shard} is corrupt or truncated ({type(e).__name__}: {first})"
            if got != n:
                return f"{shard} holds {got} records, dataset_info.json says {n}"
    return None


def _discard(path: pathlib.Path, root: pathlib.Path) -> None:
    """Move ``path`` out of the way atomically (readers never see half of it), then delete."""
    trash = root / f".discarded-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return  # another process discarded it first
    shutil.rmtree(trash, ignore_errors=True)


def prepare(name: str, data_dir: str | os.PathLike | None = None, **config) -> pathlib.Path:
    """Generate dataset ``name`` under ``data_dir`` unless present; return its directory.

    Idempotent. ``config`` are fields of the dataset's config class
    (``SyntheticTrimodalConfig``, ``TrifeatureConfig``, ``EmbeddingsConfig``). An existing
    directory is checked (:func:`check_dataset_dir`); an incomplete or corrupt one (every
    built-in dataset is generated locally, so nothing is lost) is reported, discarded and
    generated again. A :class:`DataError` names the directory and the command that fixes it
    when that fails.
    """
    builder_cls, _ = DATASETS[name]
    cfg = make_config(name, **config)
    root = pathlib.Path(data_dir) if data_dir is not None else default_data_dir()
    final = root / builder_cls.name / cfg.name / str(builder_cls.VERSION)
    if final.exists():
        problem = check_dataset_dir(final)
        if problem is None:
            return final
        log.warning("dataset %s at %s is unusable: %s; generating it again", name, final, problem)
        _discard(final, root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".incomplete-{name}-{uuid.uuid4().hex[:8]}"
    try:
        # TFDS refuses a config object named like a BUILDER_CONFIGS entry: pass the name.
        builder = builder_cls(
            config="default" if cfg.name == "default" else cfg,
            data_dir=os.fspath(tmp),
            file_format="array_record",
        )
        builder.download_and_prepare()
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(builder.data_dir, final)
        except OSError:
            # Another process finished first: keep its copy if it is complete.
            if check_dataset_dir(final) is not None:
                raise
    except (OSError, RuntimeError) as e:  # disk full, I/O errors (TFDS wraps them)
        raise DataError(
            f"could not generate dataset {name!r} in {final} ({type(e).__name__}: "
            f"{str(e).strip()[:300]}). Remove it and run again: rm -rf {final}"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    problem = check_dataset_dir(final)
    if problem is not None:
        raise DataError(
            f"dataset {name!r} in {final} is unusable right after generating it: {problem}. "
            f"Check the disk, remove it and run again: rm -rf {final}"
        )
    return final


def splits(name: str, data_dir: str | os.PathLike | None = None, **config) -> list[str]:
    """Split names of a prepared dataset."""
    path = prepare(name, data_dir, **config)
    return sorted(tfds.builder_from_directory(os.fspath(path)).info.splits.keys())


def load_source(name: str, split: str, data_dir: str | os.PathLike | None = None, **config):
    """Random-access source (``len``, ``[i]`` -> dict of numpy values) of one split.

    Prepares the dataset first if needed. Raises ValueError for an unknown dataset, config
    field or split, and for an empty split.
    """
    path = prepare(name, data_dir, **config)
    builder = tfds.builder_from_directory(os.fspath(path))
    available = sorted(builder.info.splits.keys())
    base = split.split("[", 1)[0]
    if base not in available:
        raise ValueError(f"unknown split {split!r} for {name!r}; expected one of {available}")
    if name == "trifeature" and base in trifeature.PAIR_SPLITS:
        if "[" in split:
            raise ValueError("slicing is not supported for trifeature pair splits")
        images = builder.as_data_source(split=f"images_{base.split('_')[0]}")
        source = trifeature.TrifeaturePairSource(builder.as_data_source(split=base), images)
    else:
        source = builder.as_data_source(split=split)
    if len(source) == 0:
        raise ValueError(f"split {split!r} of {name!r} is empty")
    return source
