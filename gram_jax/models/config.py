"""Encoder hyper-parameters: one frozen dataclass per encoder family, and size presets.

:class:`EncoderConfig` holds what every encoder shares (the transformer trunk and the
numerics); each encoder family subclasses it with its own input fields only:

==================  ===============  ==========================================================
encoder             config           own fields
==================  ===============  ==========================================================
Image / Video       ImageConfig      ``patch_size`` (p x p patches), ``in_channels``
Audio (log-mel)     AudioConfig      ``n_mels``, ``audio_patch = (time, mel)``
Waveform            WaveformConfig   ``conv_channels`` / ``conv_kernels`` / ``conv_strides``
Text                TextConfig       ``vocab_size`` (id 0 is padding)
Feature vectors     FeatureConfig    ``in_features`` (F of the (B, F) input)
CNN (images)        CNNConfig        ``in_channels``, ``cnn_channels`` / ``cnn_kernels`` /
                                     ``cnn_strides``
==================  ===============  ==========================================================

Presets fix the trunk (width ``W``, depth, heads, MLP ratio) of any of them:

=========  =====  =====  =====  ==========================================================
preset     W      depth  heads  note
=========  =====  =====  =====  ==========================================================
``tiny``   64     2      4      CPU tests; ~0.1 M trunk parameters
``small``  384    6      6      ViT-S width, half depth (~10.6 M trunk parameters)
``base``   768    12     12     ViT-B/12 trunk (~85 M)
``large``  1024   24     16     ViT-L/24 trunk (~302 M)
=========  =====  =====  =====  ==========================================================

``dtype`` is the compute dtype (e.g. ``jnp.bfloat16`` on TPU); parameters are always stored in
``param_dtype`` (float32 by default) and attention softmax / LayerNorm statistics run in
float32. A new encoder family subclasses :class:`EncoderConfig` with its own fields and
checks them in ``__post_init__`` (calling ``super().__post_init__()``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

__all__ = [
    "PRESETS",
    "Activation",
    "AudioConfig",
    "CNNConfig",
    "EncoderConfig",
    "FeatureConfig",
    "ImageConfig",
    "Pool",
    "TextConfig",
    "WaveformConfig",
]

Pool = Literal["cls", "mean"]
Activation = Literal["gelu", "quick_gelu", "relu"]

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"width": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 4.0},
    "small": {"width": 384, "depth": 6, "num_heads": 6, "mlp_ratio": 4.0},
    "base": {"width": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0},
    "large": {"width": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0},
}


def _tuple(cfg, *names: str) -> None:
    # config files give lists; frozen dataclasses must hold hashable tuples
    for name in names:
        value = getattr(cfg, name)
        if value is not None:
            object.__setattr__(cfg, name, tuple(value))


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Fields every encoder shares: the transformer trunk and the numerics.

    ``width`` (token width W), ``depth`` (pre-LN blocks), ``num_heads`` (W must be divisible by
    it), ``mlp_ratio`` (MLP hidden = ``mlp_ratio * W``), ``activation``, ``pool`` (``"cls"``:
    pooled = final-LN CLS token; ``"mean"``: masked mean of the tokens), ``layer_norm_eps``,
    ``dtype`` (compute), ``param_dtype`` (storage).
    """

    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    activation: Activation = "gelu"
    pool: Pool = "cls"
    layer_norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        # accept dtype names from config files ("bfloat16", "float32")
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        if self.width <= 0 or self.depth < 0 or self.num_heads <= 0:
            raise ValueError(
                f"width, depth, num_heads must be positive (depth may be 0), got "
                f"{self.width}, {self.depth}, {self.num_heads}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.activation not in ("gelu", "quick_gelu", "relu"):
            raise ValueError(f"unknown activation {self.activation!r}")

    @property
    def mlp_dim(self) -> int:
        """Hidden width of the transformer MLP."""
        return int(round(self.mlp_ratio * self.width))

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any):
        """The config of a named preset (see :data:`PRESETS`) with fields overridden."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid: {sorted(fields)}")
        return cls(**{**PRESETS[preset], **overrides})


@dataclasses.dataclass(frozen=True)
class ImageConfig(EncoderConfig):
    """ViT image (and per-frame video) encoder: square ``patch_size`` patches, ``in_channels``."""

    patch_size: int = 4
    in_channels: int = 3

    def __post_init__(self):
        super().__post_init__()
        if self.patch_size <= 0 or self.in_channels <= 0:
            raise ValueError("patch_size and in_channels must be positive")


@dataclasses.dataclass(frozen=True)
class AudioConfig(EncoderConfig):
    """Log-mel spectrogram encoder: ``n_mels`` bins, ``audio_patch = (time, mel)`` patches."""

    n_mels: int = 32
    audio_patch: tuple[int, int] = (4, 4)

    def __post_init__(self):
        super().__post_init__()
        _tuple(self, "audio_patch")
        if len(self.audio_patch) != 2 or min(self.audio_patch) <= 0:
            raise ValueError(f"audio_patch must be two positive sizes, got {self.audio_patch}")


@dataclasses.dataclass(frozen=True)
class WaveformConfig(EncoderConfig):
    """Raw-audio encoder: 1-D conv front end (``conv_channels=None`` means ``(W // 2, W)``)."""

    conv_channels: tuple[int, ...] | None = None
    conv_kernels: tuple[int, ...] = (10, 8)
    conv_strides: tuple[int, ...] = (5, 4)

    def __post_init__(self):
        super().__post_init__()
        _tuple(self, "conv_channels", "conv_kernels", "conv_strides")
        n = len(self.conv_kernels)
        channels = self.conv_channels
        if len(self.conv_strides) != n or (channels is not None and len(channels) != n):
            raise ValueError(
                "conv_kernels, conv_strides (and conv_channels if given) must have the same "
                f"length, got {self.conv_kernels}, {self.conv_strides}, {channels}"
            )

    @property
    def waveform_channels(self) -> tuple[int, ...]:
        """Channels of the waveform conv stack (default ``(W // 2, W)`` for two layers)."""
        if self.conv_channels is not None:
            return tuple(self.conv_channels)
        n = len(self.conv_kernels)
        return tuple(max(self.width // 2 ** (n - 1 - i), 1) for i in range(n))


@dataclasses.dataclass(frozen=True)
class TextConfig(EncoderConfig):
    """Token-id encoder: ``vocab_size`` ids, 0 = padding."""

    vocab_size: int = 1024

    def __post_init__(self):
        super().__post_init__()
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")


@dataclasses.dataclass(frozen=True)
class FeatureConfig(EncoderConfig):
    """MLP over precomputed (B, F) feature vectors, F = ``in_features``."""

    in_features: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.in_features <= 0:
            raise ValueError(f"in_features must be positive, got {self.in_features}")


@dataclasses.dataclass(frozen=True)
class CNNConfig(EncoderConfig):
    """Strided conv stack of CoMM's CPU plan (:mod:`gram_jax.models.cnn`); tiny: 32, 64, 64, 64.

    ``cnn_channels=None`` means ``(W // 2, W, ..., W)``: the last layer outputs the token
    width W.
    """

    in_channels: int = 3
    cnn_channels: tuple[int, ...] | None = None
    cnn_kernels: tuple[int, ...] = (5, 3, 3, 3)
    cnn_strides: tuple[int, ...] = (2, 2, 2, 2)

    def __post_init__(self):
        super().__post_init__()
        _tuple(self, "cnn_channels", "cnn_kernels", "cnn_strides")
        n = len(self.cnn_kernels)
        channels = self.cnn_channels
        if n < 1 or len(self.cnn_strides) != n or (channels is not None and len(channels) != n):
            raise ValueError(
                "cnn_kernels, cnn_strides (and cnn_channels if given) must have the same "
                f"length >= 1, got {self.cnn_kernels}, {self.cnn_strides}, {channels}"
            )
        if min(self.cnn_kernels) <= 0 or min(self.cnn_strides) <= 0:
            raise ValueError("cnn kernel sizes and strides must be positive")
        if channels is not None and channels[-1] != self.width:
            raise ValueError(
                f"the last cnn channel count {channels[-1]} must equal width {self.width} "
                "(it is the token width)"
            )

    @property
    def cnn_layer_channels(self) -> tuple[int, ...]:
        """Output channels of the cnn conv layers (default ``(W // 2, W, ..., W)``)."""
        if self.cnn_channels is not None:
            return tuple(self.cnn_channels)
        n = len(self.cnn_kernels)
        return tuple(max(self.width // 2, 1) if i == 0 and n > 1 else self.width for i in range(n))
