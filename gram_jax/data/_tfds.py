"""Shared TFDS builder base for the locally generated datasets, and the range check of
their config fields."""

from __future__ import annotations

import dataclasses
import inspect
import numbers
from typing import Any

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A ``GeneratorBasedBuilder`` whose data is generated locally (nothing downloaded).

    ``code_path`` is overridden: TFDS's own implementation probes
    ``importlib_resources.abc.Traversable`` for builders living in an installed package,
    and ``importlib_resources`` is not a dependency of tensorflow-datasets, so
    ``download_and_prepare`` would fail with ModuleNotFoundError. The plain file path is
    all TFDS needs (to look for a checksums file, which local datasets do not have).

    The default ``file_format`` is ArrayRecord (TFDS's is TFRecord, whose writer needs
    TensorFlow), so the standard ``tfds.builder(name, data_dir=...).download_and_prepare()``
    works without TensorFlow and writes what ``gram_jax.data.prepare`` writes.
    """

    # Every local dataset starts here; one whose records change sets its own VERSION (the
    # version is part of the prepared directory's path, so old and new never mix).
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def __init__(self, *args, file_format=None, **kwargs):
        super().__init__(*args, file_format=file_format or "array_record", **kwargs)

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:
        try:
            return epath.Path(inspect.getfile(cls))
        except (TypeError, OSError):
            return None

    def local_info(self, description: str, features: dict, **metadata) -> tfds.core.DatasetInfo:
        """The ``DatasetInfo`` of a local dataset: ``features`` (a dict of TFDS features) and
        ``metadata`` (``modalities={name: kind}`` and the builder's own entries).

        TFDS shuffling is off: record i of a split is the example generated i-th, and the
        pipeline draws its own (topology-independent) order over those indices.
        """
        return tfds.core.DatasetInfo(
            builder=self,
            description=description,
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(**metadata),
        )


def bounded(default: int, low: int, high: int | None = None) -> Any:
    """A builder-config int field in ``[low, high]`` (``high=None``: no upper bound), checked
    by :func:`check_bounds` when ``gram_jax.data.prepare`` makes the config."""
    return dataclasses.field(default=default, metadata={"range": (low, high)})


def check_bounds(config: Any) -> None:
    """Raise ValueError naming the first :func:`bounded` field of the dataclass ``config`` that
    is not an int in its range."""
    for f in dataclasses.fields(config):
        if "range" not in f.metadata:
            continue
        (low, high), v = f.metadata["range"], getattr(config, f.name)
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise ValueError(f"{f.name} must be an int, got {v!r}")
        if high is None and v < low:
            raise ValueError(f"{f.name} must be >= {low}, got {v}")
        if high is not None and not low <= v <= high:
            raise ValueError(f"{f.name} must be in [{low}, {high}], got {v}")
