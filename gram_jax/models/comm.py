"""CoMM (Dufumier et al., ICLR 2025): fusion of modality tokens, masked passes, projector.

Architecture, as the authors' ``MMFusion`` (docs/authors_code.md 7):

1. Encoders: ``e_m = Encoder_m(x_m)`` -> tokens (B, L_m, W_m) + validity mask (once per view).
2. Input adapters: ``t_m = Linear_m(e_m) + P_m`` (B, L_m, D); ``Linear_m`` has PyTorch's
   default init (CoMM's 1x1 conv), ``P_m`` is a FIXED sin-cos position (2-D for patch grids,
   tiled per frame for video, 1-D for sequences). No modality-type embedding.
3. Fusion transformer on ``[c ; t_1 ; ... ; t_k]`` with a learned CLS ``c ~ N(0, 1)``:
   ``num_layers`` (default 1) pre-LN blocks, 8 heads, MLP 4 D with QuickGELU, CLIP init,
   LayerNorm eps 1e-5, final LayerNorm, CLS pooling -> fused vector (B, D).
4. Projector ``Linear-BN-ReLU-Linear-BN-ReLU-Linear`` (D -> 512 -> 512 -> 256 by default).

**Masked passes in one call.** CoMM fuses k + 1 token subsets per view: modality i alone
(masks ``e_1 .. e_k``) and all modalities (last). The authors drop the other modalities'
tokens and rerun the transformer k + 1 times. Here the k + 1 mask patterns are folded into the
batch: the full token sequence is repeated P = k + 1 times, ``(P * B, 1 + L, D)``, and pattern
p masks the keys of its dropped modalities (and padding) in every attention. A masked key gets
weight exp(float32 min - max) = 0 exactly, and every other operation (LayerNorm, MLP) is
per-token, so the CLS output equals the dropped-token pass (tested to 1e-5). One difference
from the authors' masked training path: text padding keys are masked here too (their code
forgets the key-padding mask in that path, docs/authors_code.md 7).

**Projector BatchNorm, per call.** The authors apply the projector separately to each of the
2 (k + 1) fused vectors, so BatchNorm statistics are computed per (view, mask) call. Here the
projector runs once per pattern on its (B, D) slice (a cheap loop over P inside the jitted
function); running averages are updated after each call in order, as PyTorch's. Call the model
once per view. Synchronisation over data-parallel devices (SyncBatchNorm):

* under ``jit`` with a batch sharded on a mesh (GSPMD), the batch is one global array, so the
  mean / variance over axis 0 are already global statistics (XLA inserts the all-reduce);
  leave ``bn_axis_name=None``;
* inside ``jax.shard_map`` / ``pmap`` each device sees its local shard: build the model with
  ``bn_axis_name="data"`` (the mesh axis) so ``nnx.BatchNorm`` averages statistics with
  ``lax.pmean`` over it.

Momentum 0.9 / eps 1e-5 are PyTorch's BatchNorm1d defaults (momentum 0.1 in its convention).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float

from gram_jax.models.encoders import EncoderOutput
from gram_jax.models.gram_model import split_inputs
from gram_jax.models.layers import (
    Transformer,
    prepend_cls,
    sincos_1d,
    sincos_2d,
    torch_default_bias_init,
)

__all__ = [
    "InputAdapter",
    "CoMMProjector",
    "CoMMModel",
    "default_mask_patterns",
    "torch_linear_init",
]


def torch_linear_init():
    """PyTorch's default Linear/Conv kernel init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_linear(din: int, dout: int, dtype, param_dtype, rngs) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        kernel_init=torch_linear_init(),
        bias_init=torch_default_bias_init(din),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def default_mask_patterns(k: int) -> np.ndarray:
    """CoMM's masks ``[e_1, ..., e_k, 1]``: (k + 1, k) bool, True = modality kept."""
    return np.concatenate([np.eye(k, dtype=bool), np.ones((1, k), bool)], axis=0)


def positions_for(grid: tuple[int, ...] | None, length: int, dim: int) -> np.ndarray:
    """Fixed positions (length, dim) for a token layout ``grid`` (see ``EncoderOutput``)."""
    if grid is not None and int(np.prod(grid)) == length:
        if len(grid) == 2:
            return sincos_2d(grid[0], grid[1], dim)
        if len(grid) == 3:
            return np.tile(sincos_2d(grid[1], grid[2], dim), (grid[0], 1))
    return sincos_1d(length, dim)


class InputAdapter(nnx.Module):
    """CoMM's "latent converter": ``Linear(W_m, D)`` + fixed sin-cos positions."""

    def __init__(
        self, in_width: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        if dim % 4:
            raise ValueError(f"the fusion width must be divisible by 4 (2-D positions), got {dim}")
        self.dim = dim
        self.proj = _torch_linear(in_width, dim, dtype, param_dtype, rngs)

    def __call__(self, out: EncoderOutput) -> Float[Array, "b l d"]:
        t = self.proj(out.tokens)
        pos = positions_for(out.grid, t.shape[1], self.dim)
        return t + jnp.asarray(pos, t.dtype)[None]


class CoMMProjector(nnx.Module):
    """``Linear-BN-ReLU-Linear-BN-ReLU-Linear``: (B, D) -> (B, out) (authors' ``_build_mlp``)."""

    def __init__(
        self,
        dim: int,
        hidden: int = 512,
        out: int = 256,
        *,
        bn_axis_name: str | None = None,
        bn_momentum: float = 0.9,
        bn_eps: float = 1e-5,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        f32 = jnp.float32
        # use_fast_variance=False: the two-pass variance E[(x - mean)^2], as PyTorch computes it.
        bn = {"momentum": bn_momentum, "epsilon": bn_eps, "axis_name": bn_axis_name}
        bn |= {"use_fast_variance": False, "dtype": f32, "param_dtype": param_dtype, "rngs": rngs}
        self.layer1 = _torch_linear(dim, hidden, f32, param_dtype, rngs)
        self.bn1 = nnx.BatchNorm(hidden, **bn)
        self.layer2 = _torch_linear(hidden, hidden, f32, param_dtype, rngs)
        self.bn2 = nnx.BatchNorm(hidden, **bn)
        self.layer3 = _torch_linear(hidden, out, f32, param_dtype, rngs)

    def __call__(
        self, x: Float[Array, "b d"], use_running_average: bool | None = None
    ) -> Float[Array, "b out"]:
        x = x.astype(jnp.float32)
        x = jax.nn.relu(self.bn1(self.layer1(x), use_running_average=use_running_average))
        x = jax.nn.relu(self.bn2(self.layer2(x), use_running_average=use_running_average))
        return self.layer3(x)


class CoMMModel(nnx.Module):
    """Encoders -> adapters -> ONE batched masked fusion pass -> per-call projector.

    Args:
      encoders: modality -> encoder (returns :class:`EncoderOutput`, exposes ``.width``); the
        dict order is the modality order (mask ``e_i`` keeps the i-th modality).
      fusion_width: D (512 in the paper; divisible by 4 and by ``num_heads``).
      num_heads, num_layers, mlp_ratio: fusion transformer (8, 1, 4 as the authors).
      projector_hidden, projector_out: projector widths (512, 256).
      bn_axis_name: mesh/pmap axis to synchronise BatchNorm statistics over when called
        inside ``shard_map``/``pmap`` (leave None under jit + GSPMD; module docstring).
      dtype: compute dtype of encoders' adapters and fusion (params stay ``param_dtype``).
    """

    def __init__(
        self,
        encoders: Mapping[str, nnx.Module],
        *,
        fusion_width: int = 512,
        num_heads: int = 8,
        num_layers: int = 1,
        mlp_ratio: float = 4.0,
        projector_hidden: int = 512,
        projector_out: int = 256,
        bn_axis_name: str | None = None,
        bn_momentum: float = 0.9,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if len(encoders) < 1:
            raise ValueError("CoMMModel needs at least one encoder")
        if fusion_width % num_heads:
            raise ValueError(
                f"fusion_width {fusion_width} is not divisible by num_heads {num_heads}"
            )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.modalities = tuple(encoders)
        self.fusion_width = fusion_width
        self.encoders = nnx.Dict(dict(encoders))
        self.adapters = nnx.Dict(
            {m: InputAdapter(enc.width, fusion_width, **kw) for m, enc in encoders.items()}
        )
        # The fusion transformer: CLS c ~ N(0, 1), pre-LN blocks with QuickGELU, CLIP init and
        # LayerNorm eps 1e-5 (the authors' values), final LayerNorm.
        self.cls_token = nnx.Param(
            jax.random.normal(rngs.params(), (1, 1, fusion_width), param_dtype)
        )
        mlp_dim = int(round(mlp_ratio * fusion_width))
        self.fusion = Transformer(
            fusion_width, num_layers, num_heads, mlp_dim,
            activation="quick_gelu", init="clip", eps=1e-5, **kw,
        )  # fmt: skip
        self.projector = CoMMProjector(
            fusion_width,
            projector_hidden,
            projector_out,
            bn_axis_name=bn_axis_name,
            bn_momentum=bn_momentum,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    def mask_patterns(self) -> np.ndarray:
        """The default (k + 1, k) mask patterns: single modalities in order, then all."""
        return default_mask_patterns(self.num_modalities)

    def encode(self, inputs: Mapping[str, Array]) -> dict[str, EncoderOutput]:
        """Run every modality encoder once (``inputs`` must hold every modality)."""
        arrays, masks = split_inputs(inputs, self.modalities)
        missing = [m for m in self.modalities if m not in arrays]
        if missing:
            raise ValueError(f"CoMMModel inputs miss modalities {missing}; got {list(arrays)}")
        return {m: self.encoders[m](arrays[m], masks.get(m)) for m in self.modalities}

    def adapt(
        self, outputs: Mapping[str, EncoderOutput]
    ) -> tuple[list[Float[Array, "b l d"]], list[Bool[Array, "b l"]]]:
        """Per-modality fusion-width tokens and their validity masks."""
        toks = [self.adapters[m](outputs[m]) for m in self.modalities]
        masks = [outputs[m].token_mask.astype(bool) for m in self.modalities]
        return toks, masks

    def fuse(
        self,
        tokens: list[Float[Array, "b l d"]],
        token_masks: list[Bool[Array, "b l"]],
        patterns: Bool[Array, "p k"] | np.ndarray | None = None,
    ) -> Float[Array, "p b d"]:
        """Fused CLS vectors (P, B, D) of every mask pattern, in ONE batched transformer call.

        ``patterns[p, m]`` True = keep modality m in pattern p (default
        :meth:`mask_patterns`). The pattern axis is folded into the batch.
        """
        k = len(tokens)
        patterns = self.mask_patterns() if patterns is None else patterns
        if jnp.shape(patterns)[1:] != (k,) or jnp.ndim(patterns) != 2:
            raise ValueError(f"mask patterns must be (P, {k}) bool, got {jnp.shape(patterns)}")
        p = jnp.shape(patterns)[0]
        x = jnp.concatenate(tokens, axis=1)  # (B, L, D)
        valid = jnp.concatenate(token_masks, axis=1)  # (B, L)
        owner = np.concatenate([np.full(t.shape[1], i) for i, t in enumerate(tokens)])  # (L,)
        keep = jnp.asarray(patterns, bool)[:, owner]  # (P, L)
        key_mask = keep[:, None, :] & valid[None]  # (P, B, L)
        b, length, d = x.shape
        xs = jnp.broadcast_to(x[None], (p, b, length, d)).reshape(p * b, length, d)
        fused = self.fuse_sequence(xs, key_mask.reshape(p * b, length))
        return fused.reshape(p, b, d)

    def fuse_sequence(
        self, tokens: Float[Array, "n l d"], key_mask: Bool[Array, "n l"] | None = None
    ) -> Float[Array, "n d"]:
        """The fusion transformer's CLS output (N, D) for a token sequence (N, L, D)
        (``key_mask`` True = valid): ``Transformer([c ; tokens])[:, 0]``. :meth:`fuse` calls it
        once on the patterns folded into the batch; called on a sequence with the dropped
        modalities' tokens removed, it is the authors' per-mask pass."""
        x, key_mask = prepend_cls(self.cls_token[...], tokens, key_mask)
        return self.fusion(x, key_mask=key_mask)[:, 0]

    def __call__(
        self,
        inputs: Mapping[str, Array],
        *,
        patterns: Bool[Array, "p k"] | np.ndarray | None = None,
        use_running_average: bool | None = None,
    ) -> dict[str, Any]:
        """One view: ``{"embeddings": (P, B, out), "fused": (P, B, D)}``.

        Entry p of each follows ``patterns`` (default: modality 1, ..., modality k, all), the
        order ``gram_jax.losses.comm_loss`` expects; ``fused`` are the pre-projector CLS
        vectors. The projector runs once per pattern (per-call BatchNorm statistics).
        """
        toks, masks = self.adapt(self.encode(inputs))
        fused = self.fuse(toks, masks, patterns)
        z = jnp.stack(
            [self.projector(fused[i], use_running_average) for i in range(fused.shape[0])]
        )
        return {"embeddings": z, "fused": fused}

    def features(self, inputs: Mapping[str, Array]) -> Float[Array, "b d"]:
        """Pre-projector fused CLS vector with every modality (what CoMM's probe uses)."""
        toks, masks = self.adapt(self.encode(inputs))
        full = np.ones((1, self.num_modalities), bool)
        return self.fuse(toks, masks, full)[0]
