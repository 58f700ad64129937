"""Modality kinds: one registration per kind, read by the data pipeline, the model factory,
config validation and the abstract batch of the train step.

A kind (``config.model.modalities.<m>.kind``) says everything about one modality:

=================  ===========================================================================
field              meaning
=================  ===========================================================================
``encoder``        encoder class, built as ``encoder(config.from_preset(preset, **overrides),
                   rngs=rngs)``; it maps a batch (B, ...) to an ``EncoderOutput``
``config``         its frozen hyper-parameter dataclass (a ``models.EncoderConfig`` subclass)
``convert``        ``(modality name, stored array) -> example`` (one record, no batch axis)
``spec``           ``(stored shape, stored dtype) -> (example shape, example dtype)``: the
                   abstract input, so a step compiles from the dataset's declared features
``augment``        default augmentation ``(example, numpy Generator) -> example`` or None
``mask``           ``example -> bool array`` emitted as ``<m>_mask`` (text: ``ids != 0``) or None
``claims``         ``stored array -> bool``: inference of undeclared records; a kind without
                   it is used only when declared
``data_kind``      name the augmentation presets address (``cnn`` augments as ``image``)
=================  ===========================================================================

Built-in kinds and their example formats:

============  ===============================  =================  =============================
kind          stored record value              example            encoder
============  ===============================  =================  =============================
image         uint8 / float (H, W, 3)          float32 in [0, 1]  ImageEncoder (ViT)
cnn           as image                         as image           CNNEncoder (conv stack)
video         uint8 / float (T, H, W, 3)       float32 in [0, 1]  VideoEncoder (per-frame ViT)
audio         float (T, n_mels) log-mel        float32, standard  AudioEncoder (AST-style)
waveform      float (S,)                       float32            WaveformEncoder
text          int (L,) ids, 0 = pad            int32 + ``_mask``  TextEncoder
features      float (F,)                       float32            FeatureEncoder (MLP)
============  ===============================  =================  =============================

``register_modality(name, ...)`` adds a kind (e.g. depth maps) from a user's config file; a
re-registration of a user kind replaces it (loading a config twice), built-in kinds cannot be
replaced. Inference (:func:`infer_kind`) never guesses: an array that no kind or several
kinds claim (a float (H, W) array is a spectrogram or a depth map) raises and asks for the
kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from gram_jax.data.augment import AudioAug, FeatureAug, ImageAug, TextAug, WaveformAug
from gram_jax.models import config as model_config
from gram_jax.models.cnn import CNNEncoder
from gram_jax.models.config import (
    AudioConfig,
    CNNConfig,
    FeatureConfig,
    ImageConfig,
    TextConfig,
    WaveformConfig,
)
from gram_jax.models.encoders import (
    AudioEncoder,
    FeatureEncoder,
    ImageEncoder,
    TextEncoder,
    VideoEncoder,
    WaveformEncoder,
)
from gram_jax.registry import Registry

__all__ = [
    "KINDS",
    "ModalityKind",
    "build_encoder",
    "example_spec",
    "get_kind",
    "infer_kind",
    "register_modality",
]

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ModalityKind:
    """One registered modality kind (fields: module docstring)."""

    name: str
    encoder: type
    config: type[model_config.EncoderConfig]
    convert: Callable[[str, np.ndarray], np.ndarray]
    spec: Callable[[Shape, np.dtype], tuple[Shape, np.dtype]] | None = None
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None
    mask: Callable[[np.ndarray], np.ndarray] | None = None
    claims: Callable[[np.ndarray], bool] | None = None
    data_kind: str = ""

    def example_spec(self, name: str, shape: Shape, dtype) -> dict[str, tuple[Shape, np.dtype]]:
        """``{name: (shape, dtype)[, name_mask: ...]}`` of one converted example.

        Without a registered ``spec`` the example is converted from zeros of the stored
        shape (exact, at the cost of one conversion).
        """
        dtype = np.dtype(dtype)
        if self.spec is not None:
            shape, out_dtype = self.spec(tuple(shape), dtype)
            shape = tuple(shape)
        else:
            x = np.asarray(self.convert(name, np.zeros(shape, dtype)))
            shape, out_dtype = x.shape, x.dtype
        out = {name: (shape, np.dtype(out_dtype))}
        if self.mask is not None:
            out[f"{name}_mask"] = (shape, np.dtype(bool))
        return out


KINDS: Registry[ModalityKind] = Registry("modality kind")


def register_modality(
    name: str,
    *,
    encoder: type,
    config: type[model_config.EncoderConfig],
    convert: Callable[[str, np.ndarray], np.ndarray] | None = None,
    spec: Callable[[Shape, np.dtype], tuple[Shape, np.dtype]] | None = None,
    augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    mask: Callable[[np.ndarray], np.ndarray] | None = None,
    claims: Callable[[np.ndarray], bool] | None = None,
    like: str | None = None,
    builtin: bool = False,
) -> ModalityKind:
    """Register modality kind ``name`` (usable as ``config.model.modalities.<m>.kind``).

    ``like="image"`` reuses that kind's data path (convert, spec, augment, mask, augmentation
    presets) for a new encoder over the same data, as ``cnn`` does; ``claims`` is never
    inherited (two kinds claiming the same arrays would make inference ambiguous). Raises
    ``ValueError`` for a built-in name, ``TypeError`` for a config that is not an
    :class:`~gram_jax.models.EncoderConfig` dataclass or a missing ``convert``.
    """
    if not (isinstance(config, type) and issubclass(config, model_config.EncoderConfig)):
        raise TypeError(
            f"config must be a gram_jax.models.EncoderConfig subclass (a frozen dataclass), "
            f"got {config!r}"
        )
    data_kind = name
    if like is not None:
        base = get_kind(like)
        convert = convert or base.convert
        spec = spec or base.spec
        augment = augment or base.augment
        mask = mask or base.mask
        data_kind = base.data_kind
    if not callable(convert):
        raise TypeError(f"modality kind {name!r}: convert must be callable (name, array) -> array")
    kind = ModalityKind(name, encoder, config, convert, spec, augment, mask, claims, data_kind)
    return KINDS.add(name, kind, builtin=builtin)


def get_kind(name: str) -> ModalityKind:
    """The registered kind ``name`` (:class:`~gram_jax.registry.UnknownName`, a ``ValueError``,
    naming the registered kinds otherwise)."""
    return KINDS[name]


def build_encoder(kind: str, preset: str = "tiny", *, rngs, **overrides: Any):
    """Encoder of ``kind`` from ``config.from_preset(preset, **overrides)``."""
    k = get_kind(kind)
    return k.encoder(k.config.from_preset(preset, **overrides), rngs=rngs)


def example_spec(kind: str, name: str, shape: Shape, dtype) -> dict[str, tuple[Shape, np.dtype]]:
    """Abstract example entries of modality ``name`` of ``kind`` stored as (shape, dtype)."""
    return get_kind(kind).example_spec(name, shape, dtype)


def infer_kind(key: str, value) -> str:
    """The one registered kind that claims the stored array ``value`` of record field ``key``.

    Raises ``ValueError`` when no kind or several kinds claim it, asking for the kind.
    """
    v = np.asarray(value)
    found = sorted(n for n, k in KINDS.items() if k.claims is not None and k.claims(v))
    if len(found) == 1:
        return found[0]
    what = f"several kinds ({', '.join(found)}) fit it" if found else "no kind claims it"
    raise ValueError(
        f"cannot infer the modality kind of record field {key!r} ({v.dtype} {v.shape}): {what}. "
        f"Name the kind: config.model.modalities.{key}.kind (or make_iterator's modalities="
        f"{{{key!r}: kind}}), or declare the dataset's kinds in its DatasetInfo metadata "
        f"(modalities={{{key!r}: kind}}); registered kinds: {sorted(KINDS)}"
    )


def declared_kinds(source) -> Mapping[str, str] | None:
    """``{name: kind}`` a source declares: its ``modalities`` attribute or, for a TFDS data
    source, ``dataset_info.metadata["modalities"]``; None if it declares none."""
    declared = getattr(source, "modalities", None)
    if declared:
        return dict(declared)
    info = getattr(source, "dataset_info", None)
    metadata = getattr(info, "metadata", None) or {}
    declared = metadata.get("modalities") if hasattr(metadata, "get") else None
    return dict(declared) if declared else None


# ---------------------------------------------------------------------------------------------
# Built-in kinds
# ---------------------------------------------------------------------------------------------


def _float_spec(shape: Shape, dtype) -> tuple[Shape, np.dtype]:
    return shape, np.dtype(np.float32)


def _pixels(name: str, x: np.ndarray, layout: str, rank: int) -> np.ndarray:
    if x.ndim != rank or x.shape[-1] != 3:
        raise ValueError(f"modality {name!r}: expected an {layout} image, got {x.shape}")
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def convert_image(name: str, value) -> np.ndarray:
    """(H, W, 3) uint8 -> float32 / 255; a float image passes as float32."""
    return _pixels(name, np.asarray(value), "(H, W, 3)", 3)


def convert_video(name: str, value) -> np.ndarray:
    """(T, H, W, 3) frames, uint8 -> float32 / 255; float frames pass as float32."""
    return _pixels(name, np.asarray(value), "(T, H, W, 3) video of (H, W, 3)", 4)


def convert_audio(name: str, value) -> np.ndarray:
    """(T, n_mels) log-mel, standardised per example: (x - mean) / (std + 1e-5)."""
    x = np.asarray(value)
    if x.ndim != 2:
        raise ValueError(f"modality {name!r}: expected a (T, n_mels) spectrogram, got {x.shape}")
    x = x.astype(np.float32)
    return (x - x.mean()) / (x.std() + 1e-5)


def convert_text(name: str, value) -> np.ndarray:
    """(L,) token ids as int32 (0 = padding)."""
    x = np.asarray(value)
    if x.ndim != 1:
        raise ValueError(f"modality {name!r}: expected (L,) token ids, got {x.shape}")
    return x.astype(np.int32)


def convert_vector(name: str, value) -> np.ndarray:
    """(F,) or (S,) vector as float32."""
    x = np.asarray(value)
    if x.ndim != 1:
        raise ValueError(f"modality {name!r}: expected a vector, got {x.shape}")
    return x.astype(np.float32)


def _text_spec(shape: Shape, dtype) -> tuple[Shape, np.dtype]:
    return shape, np.dtype(np.int32)


def _nonzero(x: np.ndarray) -> np.ndarray:
    return x != 0


# Inference predicates (named functions, so kinds pickle into grain worker processes).
def _is_rgb_image(v: np.ndarray) -> bool:
    return v.dtype == np.uint8 and v.ndim == 3 and v.shape[-1] == 3


def _is_rgb_video(v: np.ndarray) -> bool:
    return v.dtype == np.uint8 and v.ndim == 4 and v.shape[-1] == 3


def _is_id_sequence(v: np.ndarray) -> bool:
    return np.issubdtype(v.dtype, np.integer) and v.ndim == 1


def _is_float_vector(v: np.ndarray) -> bool:
    return np.issubdtype(v.dtype, np.floating) and v.ndim == 1


def _register_builtin(name, encoder, config, convert=None, augment=None, **kw) -> None:
    kw.setdefault("spec", _float_spec)
    register_modality(
        name, encoder=encoder, config=config, convert=convert, augment=augment, builtin=True, **kw
    )


_register_builtin(
    "image", ImageEncoder, ImageConfig, convert_image, ImageAug(), claims=_is_rgb_image
)
_register_builtin("cnn", CNNEncoder, CNNConfig, like="image")
# No default augmentation: a per-frame crop would differ between frames.
_register_builtin("video", VideoEncoder, ImageConfig, convert_video, claims=_is_rgb_video)
# No claims: a float (T, M) array may as well be a depth map or any other 2-D signal.
_register_builtin("audio", AudioEncoder, AudioConfig, convert_audio, AudioAug())
_register_builtin(
    "text",
    TextEncoder,
    TextConfig,
    convert_text,
    TextAug(),
    spec=_text_spec,
    mask=_nonzero,
    claims=_is_id_sequence,
)
_register_builtin(
    "features",
    FeatureEncoder,
    FeatureConfig,
    convert_vector,
    FeatureAug(),
    claims=_is_float_vector,
)
# No claims: a float vector is a feature vector unless declared a waveform.
_register_builtin("waveform", WaveformEncoder, WaveformConfig, convert_vector, WaveformAug())
