"""Optax optimiser from a config: AdamW, warmup + cosine/linear decay, clipping, groups.

* Schedule: linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine or linear decay
  to ``lr * end_lr_ratio`` at ``train.steps`` (or constant). GRAM's authors use warmup 10 %
  then linear decay (docs/authors_code.md 4).
* Weight decay (decoupled, AdamW) only on parameters with ``ndim >= 2`` whose path does not
  name a norm or a bias: the CoMM rule (docs/authors_code.md 7). Temperatures, LayerNorm scales
  and biases, and position tables held as 1-D parameters are therefore not decayed.
* Per-module learning rates: ``optim.lr_multipliers = ((regex, mult), ...)``; the first regex
  that ``re.search``-es a parameter's path gives its multiplier (default 1). Multiplier 0
  freezes the parameters: ``optax.set_to_zero`` and their gradients are left out of the
  global norm used for clipping, so a frozen tower does not change how the others clip.
  Groups are built with ``optax.multi_transform``.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from gram_jax.models.factory import _path_str
from gram_jax.training.config import path_rules

__all__ = [
    "make_schedule",
    "param_paths",
    "decay_mask",
    "lr_groups",
    "make_optimizer",
]

_NO_DECAY = re.compile(r"(^|/)(bias|scale|ln[^/]*|norm[^/]*|[^/]*_norm|[^/]*_ln|bn[^/]*)(/|$)")


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Learning rate as a function of the step (0-based count of updates already applied)."""
    o, steps = config.optim, config.train.steps
    peak, end = o.lr, o.lr * o.end_lr_ratio
    warm = int(o.warmup_steps)
    if o.schedule == "constant":
        decay = optax.constant_schedule(peak)
    elif o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, max(steps - warm, 1), alpha=o.end_lr_ratio)
    else:
        decay = optax.linear_schedule(peak, end, max(steps - warm, 1))
    if warm == 0:
        return decay
    # Update i < warm trains at lr * (i + 1) / warm: the first is not wasted at lr 0.
    warmup = optax.linear_schedule(peak / warm, peak, max(warm - 1, 0))
    return optax.join_schedules([warmup, decay], [warm])


def param_paths(params: Any) -> Any:
    """A pytree like ``params`` whose leaves are the ``"a/b/c"`` path strings (an
    ``nnx.State`` leaf's trailing ``value`` attribute is dropped)."""

    def path(keys, _) -> str:
        parts = _path_str(keys)
        if parts and parts[-1] in ("value", "raw_value"):
            parts = parts[:-1]
        return "/".join(parts)

    return jax.tree_util.tree_map_with_path(path, params)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: ``ndim >= 2`` and no norm/bias in the path.

    Works on the group-masked trees ``optax.multi_transform`` passes (``MaskedNode`` leaves
    are empty subtrees and are skipped).
    """
    paths = param_paths(params)
    return jax.tree.map(
        lambda x, p: bool(jnp.ndim(x) >= 2 and not _NO_DECAY.search(p)), params, paths
    )


def lr_groups(config: ml_collections.ConfigDict, params: Any) -> Any:
    """Per-leaf learning-rate multiplier (float) from ``optim.lr_multipliers``."""
    rules = [
        (pat, float(val))
        for pat, val in path_rules("optim.lr_multipliers", config.optim.lr_multipliers)
    ]

    def mult(path: str) -> float:
        for pat, val in rules:
            if pat.search(path):
                return val
        return 1.0

    return jax.tree.map(mult, param_paths(params))


def _masked_clip(max_norm: float, trainable: Any) -> optax.GradientTransformation:
    """Global-norm clipping over the trainable leaves only (frozen ones are zeroed later)."""

    def update(updates, state, params=None):
        del params
        leaves = [
            u
            for u, t in zip(jax.tree.leaves(updates), jax.tree.leaves(trainable), strict=True)
            if t
        ]
        norm = optax.tree.norm(leaves)
        scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
        return jax.tree.map(lambda u: u * scale.astype(u.dtype), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(
    config: ml_collections.ConfigDict, params: Any
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)`` for ``params`` (a pytree of arrays or ShapeDtypeStructs).

    ``tx`` = [masked global-norm clip] -> multi_transform over learning-rate groups, each
    group ``adamw(schedule * mult, b1, b2, eps, weight_decay, mask=decay_mask)`` or
    ``set_to_zero`` for multiplier 0.
    """
    o = config.optim
    schedule = make_schedule(config)
    mults = lr_groups(config, params)
    labels = jax.tree.map(lambda m: "frozen" if m == 0 else f"lr_x{m:g}", mults)
    transforms = {}
    for m in sorted(set(jax.tree.leaves(mults))):
        name = "frozen" if m == 0 else f"lr_x{m:g}"
        if m == 0:
            transforms[name] = optax.set_to_zero()
            continue

        def group_schedule(step, m=m):
            return schedule(step) * m

        transforms[name] = optax.adamw(
            group_schedule,
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            mask=decay_mask,
        )
    tx = optax.multi_transform(transforms, labels)
    if o.clip_norm > 0:
        trainable = jax.tree.map(lambda m: m != 0, mults)
        tx = optax.chain(_masked_clip(o.clip_norm, trainable), tx)
    return tx, schedule
