"""Shared transformer building blocks: sin-cos positions, attention, pre-LN blocks.

Every transformer in the package (the modality encoders, CoMM's fusion transformer and the
matching head) is built from :class:`TransformerBlock`:

    x <- x + Attn(LN_1(x), key_mask)
    x <- x + MLP(LN_2(x)),        MLP(h) = W_2 act(W_1 h + b_1) + b_2,

with multi-head scaled dot-product attention

    Attn(x)_q = W_o concat_h softmax_k( <W_q^h x_q, W_k^h c_k> / sqrt(d_h) + m_k ) W_v^h c_k,

``c = x`` (self-attention) or a context sequence (cross-attention), and ``m_k = 0`` for a valid
key and the most negative float32 for a masked one. ``exp`` of that underflows to exactly 0, so
attending with a key mask is the same computation as deleting the masked keys (up to the
summation order), and a fully masked row stays finite (uniform weights) instead of NaN.

Two initialisation schemes:
  * ``"vit"``: Xavier-uniform kernels, zero biases (ViT / MAE convention).
  * ``"clip"``: CLIP's scheme as CoMM uses it for its fusion transformer (docs/authors_code.md 7):
    q/k/v kernels ~ N(0, W^-1/2), attention output ~ N(0, W^-1/2 (2 L)^-1/2), MLP ``fc`` ~
    N(0, (2W)^-1/2), MLP ``proj`` ~ N(0, W^-1/2 (2L)^-1/2) (std values; L = number of layers),
    zero attention biases, MLP biases U(+-1/sqrt(fan_in)) (PyTorch's default).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float

__all__ = [
    "InitScheme",
    "sincos_1d",
    "sincos_2d",
    "activation_fn",
    "torch_default_bias_init",
    "Attention",
    "Mlp",
    "TransformerBlock",
    "Transformer",
    "prepend_cls",
]

InitScheme = Literal["vit", "clip"]
_NEG = float(np.finfo(np.float32).min)


def sincos_1d(length: int, dim: int) -> np.ndarray:
    """Fixed 1-D sin-cos positions, shape (length, dim), float32 (computed in NumPy).

    With ``p = dim // 2`` and ``w_k = 10000^(-k / p)``: ``pe[t] = [sin(t w), cos(t w)]``.
    ``dim`` must be even.
    """
    if dim % 2:
        raise ValueError(f"1-D sin-cos positions need an even width, got {dim}")
    p = dim // 2
    omega = 1.0 / 10000.0 ** (np.arange(p, dtype=np.float64) / p)
    t = np.arange(length, dtype=np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


def sincos_2d(height: int, width: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos positions of an (height, width) grid, shape (height * width, dim).

    As CoMM's ``PatchedInputAdapter``: ``p = dim // 4``, ``w_k = 10000^(-k / p)``; the token at
    (row r, col c) (row-major flattening) gets ``[sin(r w), cos(r w), sin(c w), cos(c w)]``.
    ``dim`` must be divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    p = dim // 4
    omega = 1.0 / 10000.0 ** (np.arange(p, dtype=np.float64) / p)
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    r = rows.reshape(-1, 1) * omega[None]
    c = cols.reshape(-1, 1) * omega[None]
    return np.concatenate([np.sin(r), np.cos(r), np.sin(c), np.cos(c)], axis=1).astype(np.float32)


def activation_fn(name: str):
    """``"gelu"`` (exact erf form), ``"quick_gelu"`` (``x sigmoid(1.702 x)``) or ``"relu"``."""
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unknown activation {name!r}")


def torch_default_bias_init(fan_in: int):
    """PyTorch's default ``nn.Linear`` bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _linear(din, dout, kernel_init, bias_init, dtype, param_dtype, rngs, use_bias=True):
    init = {"kernel_init": kernel_init, "bias_init": bias_init}
    return nnx.Linear(
        din, dout, use_bias=use_bias, **init, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


class Attention(nnx.Module):
    """Multi-head (self- or cross-) attention with an optional key-validity mask.

    ``__call__(x (B, Lq, W), context (B, Lk, Wc) | None, key_mask (B, Lk) bool | None)``
    returns (B, Lq, W). ``key_mask`` True = the key may be attended.
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        *,
        context_width: int | None = None,
        init: InitScheme = "vit",
        num_layers: int = 1,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        cw = width if context_width is None else context_width
        if init == "clip":
            in_init = nnx.initializers.normal(width**-0.5)
            out_init = nnx.initializers.normal(width**-0.5 * (2 * num_layers) ** -0.5)
        elif init == "vit":
            in_init = out_init = nnx.initializers.xavier_uniform()
        else:
            raise ValueError(f"unknown init scheme {init!r}")
        zeros = nnx.initializers.zeros_init()
        self.num_heads = num_heads
        self.width = width
        self.dtype = dtype
        self.query = _linear(width, width, in_init, zeros, dtype, param_dtype, rngs)
        self.key = _linear(cw, width, in_init, zeros, dtype, param_dtype, rngs)
        self.value = _linear(cw, width, in_init, zeros, dtype, param_dtype, rngs)
        self.out = _linear(width, width, out_init, zeros, dtype, param_dtype, rngs)

    def __call__(
        self,
        x: Float[Array, "b lq w"],
        context: Float[Array, "b lk wc"] | None = None,
        key_mask: Bool[Array, "b lk"] | None = None,
    ) -> Float[Array, "b lq w"]:
        ctx = x if context is None else context
        b, lq, _ = x.shape
        lk = ctx.shape[1]
        h, dh = self.num_heads, self.width // self.num_heads
        q = self.query(x).reshape(b, lq, h, dh)
        k = self.key(ctx).reshape(b, lk, h, dh)
        v = self.value(ctx).reshape(b, lk, h, dh)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits.astype(jnp.float32) / math.sqrt(dh)
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, None, :], logits, _NEG)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, lq, self.width)
        return self.out(o)


class Mlp(nnx.Module):
    """``Linear(W, H) -> act -> Linear(H, W)`` on the last axis."""

    def __init__(
        self,
        width: int,
        hidden: int,
        *,
        activation: str = "gelu",
        init: InitScheme = "vit",
        num_layers: int = 1,
        out_width: int | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_width = width if out_width is None else out_width
        if init == "clip":
            fc_init = nnx.initializers.normal((2 * width) ** -0.5)
            proj_init = nnx.initializers.normal(width**-0.5 * (2 * num_layers) ** -0.5)
            fc_bias, proj_bias = torch_default_bias_init(width), torch_default_bias_init(hidden)
        elif init == "vit":
            fc_init = proj_init = nnx.initializers.xavier_uniform()
            fc_bias = proj_bias = nnx.initializers.zeros_init()
        else:
            raise ValueError(f"unknown init scheme {init!r}")
        activation_fn(activation)  # validate the name now
        self.activation = activation  # a name (static, hashable), resolved at call time
        self.fc = _linear(width, hidden, fc_init, fc_bias, dtype, param_dtype, rngs)
        self.proj = _linear(hidden, out_width, proj_init, proj_bias, dtype, param_dtype, rngs)

    def __call__(self, x: Float[Array, "... w"]) -> Float[Array, "... w_out"]:
        return self.proj(activation_fn(self.activation)(self.fc(x)))


class TransformerBlock(nnx.Module):
    """Pre-LN transformer block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``.

    With ``cross_attention=True`` a cross-attention sub-layer sits between the two:
    ``x + CrossAttn(LN(x), LN_c(context))`` (BERT-style cross-attention layer, pre-LN).
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_dim: int,
        *,
        activation: str = "gelu",
        init: InitScheme = "vit",
        num_layers: int = 1,
        eps: float = 1e-6,
        cross_attention: bool = False,
        context_width: int | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        ln = dict(epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        common = dict(init=init, num_layers=num_layers, dtype=dtype, param_dtype=param_dtype)
        self.ln_1 = nnx.LayerNorm(width, **ln)
        self.attn = Attention(width, num_heads, rngs=rngs, **common)
        if cross_attention:
            cw = width if context_width is None else context_width
            self.ln_q = nnx.LayerNorm(width, **ln)
            self.ln_c = nnx.LayerNorm(cw, **ln)
            self.cross = Attention(width, num_heads, context_width=cw, rngs=rngs, **common)
        else:
            self.ln_q = self.ln_c = self.cross = None
        self.ln_2 = nnx.LayerNorm(width, **ln)
        self.mlp = Mlp(width, mlp_dim, activation=activation, rngs=rngs, **common)

    def __call__(
        self,
        x: Float[Array, "b l w"],
        key_mask: Bool[Array, "b l"] | None = None,
        context: Float[Array, "b lc wc"] | None = None,
        context_mask: Bool[Array, "b lc"] | None = None,
    ) -> Float[Array, "b l w"]:
        x = x + self.attn(self.ln_1(x), key_mask=key_mask)
        if self.cross is not None:
            if context is None:
                raise ValueError("this block has cross-attention: pass a context sequence")
            x = x + self.cross(self.ln_q(x), self.ln_c(context), key_mask=context_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):
    """``depth`` :class:`TransformerBlock` s followed by a final LayerNorm (B, L, W) -> same."""

    def __init__(
        self,
        width: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        *,
        activation: str = "gelu",
        init: InitScheme = "vit",
        eps: float = 1e-6,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.blocks = nnx.List(
            [
                TransformerBlock(
                    width,
                    num_heads,
                    mlp_dim,
                    activation=activation,
                    init=init,
                    num_layers=max(depth, 1),
                    eps=eps,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
                for _ in range(depth)
            ]
        )
        self.ln_f = nnx.LayerNorm(
            width, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(
        self, x: Float[Array, "b l w"], key_mask: Bool[Array, "b l"] | None = None
    ) -> Float[Array, "b l w"]:
        for block in self.blocks:
            x = block(x, key_mask=key_mask)
        return self.ln_f(x)


def prepend_cls(
    cls_token: Float[Array, "1 1 w"],
    tokens: Float[Array, "b l w"],
    mask: Bool[Array, "b l"] | None = None,
) -> tuple[Float[Array, "b l+1 w"], Bool[Array, "b l+1"] | None]:
    """``[CLS; tokens]`` (the token cast to the tokens' dtype) and the key mask with the CLS
    always valid (``mask=None`` stays None: every key valid)."""
    b, _, w = tokens.shape
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(tokens.dtype), (b, 1, w)), tokens], 1)
    if mask is not None:
        mask = jnp.concatenate([jnp.ones((b, 1), bool), mask.astype(bool)], axis=1)
    return x, mask
