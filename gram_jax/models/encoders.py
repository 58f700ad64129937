"""Modality encoders: images, video frames, log-mel audio, raw waveforms, text, feature vectors.

Every encoder maps its input to an :class:`EncoderOutput`:

* ``tokens``  (B, L, W): the final-LayerNorm outputs of the L content tokens (patches, frames,
  words; the encoder's own CLS token is NOT included);
* ``token_mask`` (B, L) bool: True = valid token (False only for text padding);
* ``pooled`` (B, W): CLS token output (``pool="cls"``) or masked token mean (``pool="mean"``);
* ``grid`` (static): the token layout, ``(h, w)`` for patch grids, ``(t, h, w)`` for video,
  ``(L,)`` for sequences; CoMM's input adapters pick 2-D or 1-D positions from it.

Transformer encoders (image, video, audio, waveform, text) share one recipe:

    e = Embed(x) + P            (B, L, W)   P = fixed sin-cos positions (no parameters, any L)
    h = Transformer([c ; e])    (B, 1+L, W) c = learned CLS token ~ N(0, 0.02^2)
    tokens = h[:, 1:],  pooled = h[:, 0] (or masked mean of tokens)

with ``Embed`` a linear patch embedding (equivalent to a stride = kernel convolution), a conv
front end (waveform) or an embedding table (text). Shapes and value checks raise ``ValueError``
at trace time with the expected layout in the message.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Bool, Float, Int

from gram_jax.models.config import (
    AudioConfig,
    EncoderConfig,
    FeatureConfig,
    ImageConfig,
    TextConfig,
    WaveformConfig,
)
from gram_jax.models.layers import Mlp, Transformer, prepend_cls, sincos_1d, sincos_2d

__all__ = [
    "EncoderOutput",
    "ImageEncoder",
    "VideoEncoder",
    "AudioEncoder",
    "WaveformEncoder",
    "TextEncoder",
    "FeatureEncoder",
    "patchify",
]


@struct.dataclass
class EncoderOutput:
    """Token sequence, validity mask and pooled vector of one modality (a pytree).

    tokens (B, L, W); token_mask (B, L) bool (True = valid); pooled (B, W); grid: static token
    layout (see module docstring).
    """

    tokens: Float[Array, "b l w"]
    token_mask: Bool[Array, "b l"]
    pooled: Float[Array, "b w"]
    grid: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)


def _check_rank(name: str, x, rank: int, layout: str) -> None:
    if jnp.ndim(x) != rank:
        raise ValueError(
            f"{name} expects a rank-{rank} input {layout}, got shape {tuple(jnp.shape(x))}"
        )


def check_float_input(
    name: str, x, mask, rank: int, layout: str, last: tuple[str, int] | None = None
) -> None:
    """The input check of every float-input encoder: no token mask (only text has one), rank
    ``rank`` (``layout`` names the axes), a floating dtype and, with ``last = (what, size)``,
    the size of the last axis."""
    if mask is not None:
        raise ValueError(f"{name} does not take a token mask (only TextEncoder does)")
    _check_rank(name, x, rank, layout)
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
        raise ValueError(f"{name} expects a floating-point input, got dtype {jnp.asarray(x).dtype}")
    if last is not None and x.shape[-1] != last[1]:
        raise ValueError(
            f"{name} expects {last[0]} = {last[1]} (last axis), got shape {tuple(x.shape)}"
        )


def patchify(
    x: Float[Array, "b h w c"], ph: int, pw: int
) -> tuple[Float[Array, "b n d"], tuple[int, int]]:
    """Split (B, H, W, C) into row-major non-overlapping (ph, pw) patches, (B, N, ph*pw*C).

    Raises ``ValueError`` if H or W is not divisible by the patch size.
    """
    b, h, w, c = x.shape
    if h % ph or w % pw:
        raise ValueError(
            f"input spatial size ({h}, {w}) is not divisible by the patch size ({ph}, {pw})"
        )
    gh, gw = h // ph, w // pw
    x = x.reshape(b, gh, ph, gw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, ph * pw * c), (gh, gw)


class _Encoder(nnx.Module):
    """Base of the modality encoders: each keeps its config as ``self.cfg``, whose ``width``
    is the width D of the :class:`EncoderOutput` it returns."""

    @property
    def width(self) -> int:
        return self.cfg.width


class _TokenTransformer(nnx.Module):
    """CLS token + :class:`Transformer` + pooling over already-embedded tokens (shared core)."""

    def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.cls_token = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (1, 1, cfg.width), cfg.param_dtype)
        )
        self.transformer = Transformer(
            cfg.width,
            cfg.depth,
            cfg.num_heads,
            cfg.mlp_dim,
            activation=cfg.activation,
            eps=cfg.layer_norm_eps,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )

    def __call__(
        self,
        tokens: Float[Array, "b l w"],
        mask: Bool[Array, "b l"],
        grid: tuple[int, ...],
    ) -> EncoderOutput:
        x, key_mask = prepend_cls(self.cls_token[...], tokens, mask)
        h = self.transformer(x, key_mask=key_mask)
        out_tokens = h[:, 1:]
        if self.cfg.pool == "cls":
            pooled = h[:, 0]
        else:
            m = mask.astype(jnp.float32)[..., None]
            pooled = (out_tokens.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
            pooled = pooled.astype(out_tokens.dtype)
        return EncoderOutput(tokens=out_tokens, token_mask=mask, pooled=pooled, grid=grid)


class ImageEncoder(_Encoder):
    """ViT patch transformer: images (B, H, W, C) -> (B, (H/p)(W/p), W) tokens.

    Patches p x p (``cfg.patch_size``) are embedded by a linear map of the flattened
    (p * p * C) pixels; fixed 2-D sin-cos positions, so any H, W divisible by p work.
    """

    def __init__(self, cfg: ImageConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        p, c = cfg.patch_size, cfg.in_channels
        self.patch_embed = nnx.Linear(
            p * p * c, cfg.width, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
        )
        self.core = _TokenTransformer(cfg, rngs=rngs)

    def embed_patches(
        self, x: Float[Array, "b h w c"], extra_pos: Float[Array, "b 1 w"] | None = None
    ) -> EncoderOutput:
        """Encode (B, H, W, C) images, optionally adding a per-example position vector."""
        patches, grid = patchify(x, self.cfg.patch_size, self.cfg.patch_size)
        e = self.patch_embed(patches.astype(self.cfg.dtype))
        e = e + jnp.asarray(sincos_2d(*grid, self.cfg.width), e.dtype)[None]
        if extra_pos is not None:
            e = e + extra_pos.astype(e.dtype)
        mask = jnp.ones(e.shape[:2], bool)
        return self.core(e, mask, grid)

    def __call__(self, x: Float[Array, "b h w c"], mask: None = None) -> EncoderOutput:
        channels = ("channels", self.cfg.in_channels)
        check_float_input("ImageEncoder", x, mask, 4, "(B, H, W, C)", channels)
        return self.embed_patches(x)


class VideoEncoder(_Encoder):
    """Video as frames: (B, T, H, W, C) -> tokens of all frames (B, T * N, W).

    Each frame goes through the same ViT (:class:`ImageEncoder` weights, frames folded into the
    batch) with a fixed 1-D sin-cos frame position added to all its patch embeddings, so the
    tokens know their time step. ``pooled`` = mean over frames of the per-frame pooled vectors
    (frame pooling, as VAST/GRAM average frame features). ``grid = (T, h, w)``.
    """

    def __init__(self, cfg: ImageConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.frame_encoder = ImageEncoder(cfg, rngs=rngs)

    def __call__(self, x: Float[Array, "b t h w c"], mask: None = None) -> EncoderOutput:
        channels = ("channels", self.cfg.in_channels)
        check_float_input("VideoEncoder", x, mask, 5, "(B, T, H, W, C)", channels)
        b, t = x.shape[:2]
        frame_pos = jnp.asarray(sincos_1d(t, self.cfg.width))  # (T, W)
        frame_pos = jnp.broadcast_to(frame_pos[None], (b, t, self.cfg.width))
        out = self.frame_encoder.embed_patches(
            x.reshape(b * t, *x.shape[2:]), frame_pos.reshape(b * t, 1, self.cfg.width)
        )
        n = out.tokens.shape[1]
        tokens = out.tokens.reshape(b, t * n, self.cfg.width)
        mask = out.token_mask.reshape(b, t * n)
        pooled = out.pooled.reshape(b, t, self.cfg.width).astype(jnp.float32).mean(1)
        return EncoderOutput(tokens, mask, pooled.astype(out.pooled.dtype), (t, *out.grid))


class AudioEncoder(_Encoder):
    """Spectrogram transformer (AST-style): log-mel (B, T, n_mels) -> (B, (T/pt)(M/pf), W).

    Non-overlapping (pt, pf) = ``cfg.audio_patch`` time x mel patches, linear embedding, fixed
    2-D sin-cos positions over the (time, mel) patch grid. T must be divisible by pt and
    ``n_mels`` must equal ``cfg.n_mels``.
    """

    def __init__(self, cfg: AudioConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pt, pf = cfg.audio_patch
        if cfg.n_mels % pf:
            raise ValueError(f"n_mels {cfg.n_mels} is not divisible by the mel patch size {pf}")
        self.patch_embed = nnx.Linear(
            pt * pf, cfg.width, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
        )
        self.core = _TokenTransformer(cfg, rngs=rngs)

    def __call__(self, x: Float[Array, "b t m"], mask: None = None) -> EncoderOutput:
        check_float_input(
            "AudioEncoder", x, mask, 3, "(B, T, n_mels) log-mel", ("n_mels", self.cfg.n_mels)
        )
        pt, pf = self.cfg.audio_patch
        patches, grid = patchify(x[..., None], pt, pf)
        e = self.patch_embed(patches.astype(self.cfg.dtype))
        e = e + jnp.asarray(sincos_2d(*grid, self.cfg.width), e.dtype)[None]
        return self.core(e, jnp.ones(e.shape[:2], bool), grid)


class WaveformEncoder(_Encoder):
    """Raw audio (B, S) -> strided 1-D conv front end -> transformer, tokens (B, S', W).

    Front end (wav2vec-style): for each layer i, ``Conv1d(kernel k_i, stride s_i, VALID) ->
    GELU``; then a linear map to W and fixed 1-D sin-cos positions. The number of frames is
    ``S_i = floor((S_{i-1} - k_i) / s_i) + 1`` (need ``S' >= 1``).
    """

    def __init__(self, cfg: WaveformConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        chans = (1, *cfg.waveform_channels)
        self.convs = nnx.List(
            [
                nnx.Conv(
                    chans[i],
                    chans[i + 1],
                    kernel_size=(k,),
                    strides=(s,),
                    padding="VALID",
                    dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype,
                    rngs=rngs,
                )
                for i, (k, s) in enumerate(zip(cfg.conv_kernels, cfg.conv_strides, strict=True))
            ]
        )
        self.proj = nnx.Linear(
            chans[-1], cfg.width, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs
        )
        self.core = _TokenTransformer(cfg, rngs=rngs)

    def num_frames(self, num_samples: int) -> int:
        """Number of output tokens for a waveform of ``num_samples`` samples."""
        n = num_samples
        for k, s in zip(self.cfg.conv_kernels, self.cfg.conv_strides, strict=True):
            n = (n - k) // s + 1 if n >= k else 0
        return n

    def __call__(self, x: Float[Array, "b s"], mask: None = None) -> EncoderOutput:
        check_float_input("WaveformEncoder", x, mask, 2, "(B, num_samples) waveform")
        if self.num_frames(x.shape[1]) < 1:
            raise ValueError(
                f"WaveformEncoder: {x.shape[1]} samples are too short for the conv front end "
                f"(kernels {self.cfg.conv_kernels}, strides {self.cfg.conv_strides})"
            )
        h = x[..., None].astype(self.cfg.dtype)
        for conv in self.convs:
            h = jax.nn.gelu(conv(h), approximate=False)
        e = self.proj(h)
        e = e + jnp.asarray(sincos_1d(e.shape[1], self.cfg.width), e.dtype)[None]
        return self.core(e, jnp.ones(e.shape[:2], bool), (e.shape[1],))


class TextEncoder(_Encoder):
    """Text transformer over int token ids (B, L); id 0 is padding.

    ``token_mask = (ids != 0) & mask`` (``mask`` optional, (B, L) bool). Padded keys are masked
    out of every attention; with ``pool="mean"`` the mean runs over valid tokens only (an
    all-padding row pools to zeros). Embedding table ~ N(0, 0.02^2), fixed 1-D positions.
    Ids must lie in ``[0, vocab_size)``; this cannot be checked inside jit, and an
    out-of-range id gets a NaN embedding (``jnp.take``'s fill mode), which fails loudly.
    """

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.width,
            embedding_init=nnx.initializers.normal(0.02),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            rngs=rngs,
        )
        self.core = _TokenTransformer(cfg, rngs=rngs)

    def __call__(
        self, ids: Int[Array, "b l"], mask: Bool[Array, "b l"] | None = None
    ) -> EncoderOutput:
        _check_rank("TextEncoder", ids, 2, "(B, L) int token ids")
        if not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
            raise ValueError(f"TextEncoder expects integer token ids, got dtype {ids.dtype}")
        valid = ids != 0
        if mask is not None:
            if mask.shape != ids.shape:
                raise ValueError(
                    f"TextEncoder mask shape {mask.shape} must equal the ids shape {ids.shape}"
                )
            valid = valid & mask.astype(bool)
        e = self.embed(ids)
        e = e + jnp.asarray(sincos_1d(ids.shape[1], self.cfg.width), e.dtype)[None]
        return self.core(e, valid, (ids.shape[1],))


class FeatureEncoder(_Encoder):
    """MLP over precomputed feature vectors (B, F) -> one token (B, 1, W).

        h = Linear(F, W) x;   h <- h + MLP(LN(h))  (``depth`` times);   z = LN(h)

    ``tokens = z[:, None]``, ``token_mask`` all True, ``pooled = z``.
    """

    def __init__(self, cfg: FeatureConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.inp = nnx.Linear(cfg.in_features, cfg.width, **kw)
        self.norms = nnx.List(
            [nnx.LayerNorm(cfg.width, epsilon=cfg.layer_norm_eps, **kw) for _ in range(cfg.depth)]
        )
        self.mlps = nnx.List(
            [Mlp(cfg.width, cfg.mlp_dim, activation=cfg.activation, **kw) for _ in range(cfg.depth)]
        )
        self.ln_f = nnx.LayerNorm(cfg.width, epsilon=cfg.layer_norm_eps, **kw)

    def __call__(self, x: Float[Array, "b f"], mask: None = None) -> EncoderOutput:
        check_float_input(
            "FeatureEncoder", x, mask, 2, "(B, F) features", ("F", self.cfg.in_features)
        )
        h = self.inp(x.astype(self.cfg.dtype))
        for ln, mlp in zip(self.norms, self.mlps, strict=True):
            h = h + mlp(ln(h))
        z = self.ln_f(h)
        mask = jnp.ones((x.shape[0], 1), bool)
        return EncoderOutput(tokens=z[:, None], token_mask=mask, pooled=z, grid=(1,))
