"""Projection heads and learnable temperatures.

* :class:`ProjectionHead`: ``z = W x / max(||W x||_2, eps)`` with a bias-free ``W`` (GRAM's
  ``Contra_head``), (B, W_in) -> (B, D) unit vectors, computed in float32.
* :class:`LearnableTemperature`: ``tau = exp(s)``, ``s`` an ``nnx.Param`` initialised to
  ``log(0.07)`` (CLIP / GRAM default), optionally clipped to ``[min_tau, max_tau]``.
* :class:`SigLIPScaleBias`: SigLIP's learnable ``(log t, b)``, init ``t = 10, b = -10``;
  logits are ``t <x, y> + b``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from gram_jax.losses import l2_normalize  # one definition, shared with nt_xent

__all__ = ["l2_normalize", "ProjectionHead", "LearnableTemperature", "SigLIPScaleBias"]


class ProjectionHead(nnx.Module):
    """Bias-free linear map to the shared space then L2 normalisation: (B, W_in) -> (B, D).

    Input is cast to ``dtype`` (float32 by default, since Gram determinants need it).
    Kernel init: LeCun-normal (variance 1 / W_in).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        eps: float = 1e-6,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.eps = eps
        self.dtype = dtype
        self.linear = nnx.Linear(
            in_features,
            out_features,
            use_bias=False,
            kernel_init=nnx.initializers.lecun_normal(),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: Float[Array, "b w"]) -> Float[Array, "b d"]:
        return l2_normalize(self.linear(x.astype(self.dtype)), self.eps)


class LearnableTemperature(nnx.Module):
    """Stores ``log tau`` as an ``nnx.Param``; ``__call__()`` returns ``tau`` (a scalar)."""

    def __init__(
        self,
        init: float = 0.07,
        *,
        min_tau: float | None = None,
        max_tau: float | None = None,
    ):
        if init <= 0:
            raise ValueError(f"the initial temperature must be positive, got {init}")
        self.log_tau = nnx.Param(jnp.asarray(math.log(init), jnp.float32))
        self.min_tau = min_tau
        self.max_tau = max_tau

    def __call__(self) -> Float[Array, ""]:
        tau = jnp.exp(self.log_tau[...])
        if self.min_tau is not None or self.max_tau is not None:
            tau = jnp.clip(tau, self.min_tau, self.max_tau)
        return tau


class SigLIPScaleBias(nnx.Module):
    """SigLIP's learnable logit scale and bias: ``__call__() -> (t, b)``, ``t = exp(log_t)``."""

    def __init__(self, scale_init: float = 10.0, bias_init: float = -10.0):
        if scale_init <= 0:
            raise ValueError(f"the initial scale must be positive, got {scale_init}")
        self.log_scale = nnx.Param(jnp.asarray(math.log(scale_init), jnp.float32))
        self.bias = nnx.Param(jnp.asarray(bias_init, jnp.float32))

    def __call__(self) -> tuple[Float[Array, ""], Float[Array, ""]]:
        return jnp.exp(self.log_scale[...]), self.bias[...]
