"""Small convolutional image encoder: the per-modality CNN of CoMM's CPU plan.

docs/authors_code.md section 12 replaces the authors' AlexNet trunk (224^2 -> 256 x 6 x 6) by four
strided convolutions on 64^2 renders, ``conv5x5/2(32) -> conv3x3/2(64) -> conv3x3/2(64) ->
conv3x3/2(64)``, each followed by ReLU, giving a 4 x 4 x 64 map whose cells are CoMM's
tokens (the 1 x 1 conv to the fusion width and the fixed 2-D positions are CoMM's input
adapter, :class:`gram_jax.models.comm.InputAdapter`). For layer i with kernel k_i, stride s_i
and PyTorch-style symmetric padding ``k_i // 2``:

    h_i = ReLU(Conv_{k_i, s_i}(h_{i-1})),     H_i = floor((H_{i-1} + 2 (k_i // 2) - k_i) / s_i) + 1

(``H_i >= 1`` for any input size, since the padding covers the kernel).

    tokens = h_n reshaped (B, H_n W_n, W) row-major,   pooled = mean over the tokens (B, W)

Channels default to ``(W // 2, W, ..., W)`` (``CNNConfig.cnn_layer_channels``), so the
``tiny`` preset (W = 64) is exactly the plan's CNN and larger presets widen it. Kernels use
PyTorch's default init (U(+-1/sqrt(fan_in)), as the prototype the plan measured). There is no
positional embedding here: a conv map is already spatially ordered, and ``grid = (H_n, W_n)``
lets CoMM's adapter add 2-D sin-cos positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from gram_jax.models.config import CNNConfig
from gram_jax.models.encoders import EncoderOutput, _Encoder, check_float_input
from gram_jax.models.layers import torch_default_bias_init

__all__ = ["CNNEncoder"]


class CNNEncoder(_Encoder):
    """Strided conv stack: images (B, H, W, C) -> (B, H_n * W_n, W) tokens + mean-pooled (B, W).

    See the module docstring for the layer formula. ``cfg.in_channels`` must match C.
    """

    def __init__(self, cfg: CNNConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        chans = (cfg.in_channels, *cfg.cnn_layer_channels)
        layers = []
        for i, (k, s) in enumerate(zip(cfg.cnn_kernels, cfg.cnn_strides, strict=True)):
            fan_in = k * k * chans[i]
            layers.append(
                nnx.Conv(
                    chans[i],
                    chans[i + 1],
                    kernel_size=(k, k),
                    strides=(s, s),
                    padding=((k // 2, k // 2), (k // 2, k // 2)),
                    kernel_init=nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
                    bias_init=torch_default_bias_init(fan_in),
                    dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype,
                    rngs=rngs,
                )
            )
        self.convs = nnx.List(layers)

    def output_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (H_n, W_n) for an input of spatial size (height, width)."""
        h, w = height, width
        for k, s in zip(self.cfg.cnn_kernels, self.cfg.cnn_strides, strict=True):
            h = (h + 2 * (k // 2) - k) // s + 1
            w = (w + 2 * (k // 2) - k) // s + 1
        return h, w

    def __call__(self, x: Float[Array, "b h w c"], mask: None = None) -> EncoderOutput:
        channels = ("channels", self.cfg.in_channels)
        check_float_input("CNNEncoder", x, mask, 4, "(B, H, W, C)", channels)
        h = x.astype(self.cfg.dtype)
        for conv in self.convs:
            h = jax.nn.relu(conv(h))
        b, gh, gw, w = h.shape
        tokens = h.reshape(b, gh * gw, w)
        pooled = tokens.astype(jnp.float32).mean(1).astype(tokens.dtype)
        mask = jnp.ones((b, gh * gw), bool)
        return EncoderOutput(tokens=tokens, token_mask=mask, pooled=pooled, grid=(gh, gw))
