"""Data layer: locally generated TFDS datasets and Grain pipelines.

* ``prepare(name, data_dir, **config)`` / ``load_source(name, split, data_dir, **config)``
  for ``synthetic_trimodal`` (default), ``trifeature`` and ``embeddings`` (see
  ``gram_jax.data.registry`` and each dataset's module); ``register_dataset`` adds your own
  builder (a ``LocalBuilder`` subclass) under a name the trainer's ``data.name`` accepts;
  its config's int fields declared with ``bounded(default, low, high)`` are range-checked.
* ``register_modality(name, ...)`` (from ``gram_jax.modalities``) adds a modality kind (how
  records convert and augment, its encoder and config) under a name ``config.model.modalities.
  <m>.kind`` accepts.
* ``make_iterator(source, batch_size=..., ...)``: checkpointable Grain iterator of
  (optionally mesh-sharded) batches; batch format in ``gram_jax.data.pipeline``.
* ``NpzEmbeddingSource``: in-memory source of an embeddings ``.npz``.
* ``python -m gram_jax.data.show <dataset>`` draws a PNG grid of examples.
"""

from gram_jax._lazy import lazy_exports as _lazy_exports
from gram_jax.data._tfds import LocalBuilder, bounded
from gram_jax.data.augment import (
    AudioAug,
    Augment,
    ColourJitter,
    FeatureAug,
    ImageAug,
    TextAug,
    WaveformAug,
)
from gram_jax.data.embeddings import NpzEmbeddingSource
from gram_jax.data.pipeline import infer_modalities, make_dataset, make_iterator, steps_per_epoch
from gram_jax.data.registry import (
    DATASETS,
    dataset_dir,
    default_data_dir,
    load_source,
    prepare,
    register_dataset,
    splits,
)
from gram_jax.data.synthetic import decode_caption, encode_caption, vocabulary
from gram_jax.data.trifeature import TrifeaturePairSource

__all__ = [
    "DATASETS",
    "AudioAug",
    "Augment",
    "ColourJitter",
    "FeatureAug",
    "ImageAug",
    "LocalBuilder",
    "NpzEmbeddingSource",
    "TextAug",
    "TrifeaturePairSource",
    "WaveformAug",
    "bounded",
    "dataset_dir",
    "decode_caption",
    "default_data_dir",
    "encode_caption",
    "infer_modalities",
    "load_source",
    "make_dataset",
    "make_iterator",
    "prepare",
    "register_dataset",
    "register_modality",
    "splits",
    "steps_per_epoch",
    "vocabulary",
]


# gram_jax.modalities imports this package (the augmentations): re-export it lazily.
__getattr__ = _lazy_exports(__name__, {"register_modality": "gram_jax.modalities"})
