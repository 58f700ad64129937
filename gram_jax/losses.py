"""Contrastive losses: GRAM, DAM matching, InfoNCE (CLIP / anchored), SigLIP, CoMM, Cross+Self.

Every loss is a pure function of embeddings (and temperature) returning ``(loss, metrics)``,
``metrics`` a flat dict of scalar diagnostics. Item i of every input is the same sample, so the
positives of an N x N score matrix sit on its diagonal.

**One code path.** A contrastive loss is a function of a score matrix
``z = scale * s(R, C) + bias`` (volumes, dot products) through a few row and column statistics
(``lse``, the positive ``pos``, the row sum ``tot``, a pointwise sum ``pw``), which
:func:`gram_jax.distributed.pair_stats` computes. Every loss here is written once on those
statistics; the engine's driver decides how the score matrix is evaluated:

- default: dense (the full ``B x B`` matrix, plain autodiff);
- ``chunk_size``: single device, ``chunk_size x chunk_size`` tiles with a streaming
  log-sum-exp and a recomputing custom VJP (``O(chunk^2)`` scores; for B beyond memory);
- ``axis_name``: call the loss inside your own ``jax.shard_map`` over the mesh axis the batch
  is sharded on (default ``check_vma=True``), on the LOCAL shards: it returns the GLOBAL loss
  and metrics (identical on every device) and its gradient inside the shard_map is the exact
  gradient of the global loss. ``impl``: ``"all_gather"`` (local rows against all-gathered
  columns; ``O(B^2 / n)`` scores per device), ``"ring"`` (``ppermute`` of candidate blocks with
  a recomputing custom VJP; ``O((B / n)^2)``) or ``"ring_checkpoint"`` (the ring
  differentiated through ``jax.checkpoint``; for comparison).

Label-smoothed cross-entropy (GRAM, as in the authors' code, and optionally InfoNCE), for a row
of logits ``z`` with positive ``y`` and smoothing ``eps`` over ``N`` classes:

    CE_eps(z, y) = -sum_j q_j log softmax(z)_j,    q_j = (1 - eps) [j = y] + eps / N
                 = logsumexp(z) - (1 - eps) z_y - (eps / N) sum_j z_j,

which needs only the statistics above. Metrics are the same quantities under every driver
(accuracies use the first maximum, as argmax).

**Registry.** :data:`LOSSES` maps a config's ``loss.name`` to a :class:`LossSpec` (the function,
how config keys map to its arguments, the parameters it receives, two views or not, the
distributed implementations it supports, its retrieval score); :func:`register_loss` adds one,
from a library file or a user's config file. The trainer's config validation and task read it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gram_jax import scores as score_lib
from gram_jax.distributed import IMPLS, Impl, pair_stats
from gram_jax.registry import Registry
from gram_jax.volume import (
    GradientMode,
    _product,
    pairwise_simplex_det,
    pairwise_simplex_volume,
    simplex_volume,
    validate_pairwise_inputs,
)

__all__ = [
    "Metrics",
    "temperature_from_log",
    "log_temperature_init",
    "check_label_smoothing",
    "check_temperature",
    "l2_normalize",
    "smoothed_cross_entropy",
    "gram_contrastive_loss",
    "infonce_loss",
    "siglip_loss",
    "nt_xent",
    "comm_loss",
    "cross_self_loss",
    "sample_hard_negatives",
    "dam_loss",
    "simplex_contrastive_loss",
    "triangle_loss",
    "symile_loss",
    "handover_weight",
    "gram_infonce_loss",
    "LossSpec",
    "LOSSES",
    "register_loss",
    "get_loss",
]

Metrics = dict[str, Array]
_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# Arguments checked at the door
# ---------------------------------------------------------------------------------------------


def _concrete(x) -> float | None:
    """The value of a scalar known at trace time, or None (a tracer: a learned parameter)."""
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def check_temperature(value, name: str = "temperature") -> None:
    """``ValueError`` unless a temperature (or scale) known at trace time is positive and
    finite; traced values (learnable log-temperatures, exp'd) pass unchecked."""
    v = _concrete(value)
    if v is not None and not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be positive and finite, got {v}")


def check_label_smoothing(label_smoothing: float) -> None:
    """``ValueError`` unless ``0 <= label_smoothing < 1``."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def _check_arrays(**named) -> None:
    for name, x in named.items():
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise TypeError(
                f"{name} must be an array (B, D), got a {type(x).__name__}; convert it with "
                "jnp.asarray (a list of modalities is a list of arrays)"
            )


def _as_list(others) -> list:
    if hasattr(others, "shape"):
        return [others]
    if not isinstance(others, Sequence):
        raise TypeError(f"others must be an array or a sequence of arrays, got {type(others)}")
    return list(others)


def _check_square_batch(anchor: Array, others: Sequence[Array]) -> None:
    _check_arrays(anchor=anchor, **{f"others[{m}]": o for m, o in enumerate(others)})
    validate_pairwise_inputs(anchor, others)
    if others[0].shape[0] != anchor.shape[0]:
        raise ValueError(
            "a contrastive loss pairs item i of every modality: anchor has "
            f"{anchor.shape[0]} rows but the other modalities have {others[0].shape[0]}"
        )


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Temperature and shared pieces
# ---------------------------------------------------------------------------------------------


def log_temperature_init(temperature: float = 0.07) -> Float[Array, ""]:
    """Initial value of a learnable log-temperature parameter: ``log(temperature)``."""
    check_temperature(temperature)
    return jnp.log(jnp.asarray(temperature, jnp.float32))


def temperature_from_log(
    log_temperature: Float[Array, ""], min_value: float = 1e-3, max_value: float = 100.0
) -> Float[Array, ""]:
    """``tau = exp(log_tau)`` clipped to ``[min_value, max_value]``.

    Learning ``log_tau`` keeps tau positive (the authors learn tau raw and unclamped, which can
    cross zero); the clip bounds the logit scale as CLIP does (1 / tau <= 1000 by default).
    """
    return jnp.clip(jnp.exp(log_temperature), min_value, max_value)


def l2_normalize(x: Float[Array, "... d"], eps: float = 1e-6) -> Float[Array, "... d"]:
    """``x / max(||x||_2, eps)`` over the last axis.

    The ``max`` is taken on the squared norm (``rsqrt(max(|x|^2, eps^2))``), so no ``sqrt(0)``
    is ever differentiated: a zero vector maps to zero with the finite gradient ``I / eps``.
    """
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _ce(stats: dict, label_smoothing: float, n: int) -> Array:
    """Per-row ``CE_eps = lse - (1 - eps) z_pos - eps sum(z) / n`` (module docstring)."""
    eps = label_smoothing
    return stats["lse"] - (1.0 - eps) * stats["pos"] - eps * stats["tot"] / n


def smoothed_cross_entropy(
    logits: Float[Array, "R C"],
    positives: Int[Array, " R"] | None = None,
    label_smoothing: float = 0.0,
) -> Float[Array, " R"]:
    """Per-row ``CE_eps(z_r, y_r)`` (module docstring) of a dense logit matrix; positives
    default to the diagonal."""
    check_label_smoothing(label_smoothing)
    r, c = logits.shape
    if positives is None:
        if r != c:
            raise ValueError(f"diagonal positives need a square score matrix, got {(r, c)}")
        pos = jnp.diagonal(logits)
    else:
        pos = jnp.take_along_axis(logits, positives[:, None], axis=1)[:, 0]
    stats = {"lse": jax.nn.logsumexp(logits, axis=1), "pos": pos, "tot": jnp.sum(logits, 1)}
    return _ce(stats, label_smoothing, c)


class _Global:
    """Batch bookkeeping over the statistics: sums over the mesh axis (if any), global ids."""

    def __init__(self, local_batch: int, axis_name: str | None):
        self.axis_name = axis_name
        n_dev = 1 if axis_name is None else jax.lax.axis_size(axis_name)
        first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * local_batch
        self.n = local_batch * n_dev  # global batch size
        self.ids = first + jnp.arange(local_batch)  # global indices of the local items

    def sum(self, x: Array) -> Array:
        s = jnp.sum(x)
        return s if self.axis_name is None else jax.lax.psum(s, self.axis_name)

    def mean(self, x: Array) -> Array:
        return self.sum(x) / self.n

    def accuracy(self, stats: dict) -> Array:
        return self.mean(stats["arg"] == self.ids)

    def offdiag_mean(self, stats: dict) -> Array:
        """Mean of the off-diagonal scores from the row sums and the diagonal."""
        # A float: n (n - 1) overflows int32 from n = 46341 on.
        return (self.sum(stats["tot"]) - self.sum(stats["pos"])) / float(max(self.n**2 - self.n, 1))


def _symmetric_ce(row: dict, col: dict, label_smoothing: float, g: _Global) -> Array:
    """``1/2 [mean_i CE_eps(z_i., i) + mean_j CE_eps(z_.j, j)]`` over the global batch."""
    return 0.5 * (g.mean(_ce(row, label_smoothing, g.n)) + g.mean(_ce(col, label_smoothing, g.n)))


def _dot_score(x: Array, y: Array) -> Array:
    return jnp.matmul(x, y.T, precision=_HIGHEST)


def _no_grad(tree):
    return jax.lax.stop_gradient(tree)


# ---------------------------------------------------------------------------------------------
# GRAM
# ---------------------------------------------------------------------------------------------


def gram_contrastive_loss(
    anchor: Float[Array, "B D"],
    others: Sequence[Float[Array, "B D"]],
    temperature: Float[Array, ""] | float,
    label_smoothing: float = 0.1,
    gradient: Literal["exact", "faithful"] = "exact",
    volume_gradient: GradientMode = "safe",
    axis_name: str | None = None,
    impl: Impl = "all_gather",
    chunk_size: int | None = None,
    score: Literal["volume", "simplex", "triangle"] = "volume",
) -> tuple[Float[Array, ""], Metrics]:
    """GRAM's volume contrastive loss over a batch of B items, both directions.

    With ``V_ij = vol(anchor_i, others[0]_j, ..., others[k-2]_j)`` (``(B, B)``):

        L = 1/2 [ mean_i CE_eps(-V_i. / tau, i) + mean_j CE_eps(-V_.j / tau, j) ]

    the first term ranks candidates for each anchor (D2A in the paper), the second anchors for
    each candidate (A2D).

    Args:
      anchor: (B, D) anchor embeddings (text in GRAM), L2-normalised.
      others: k - 1 >= 1 arrays (B, D), the other modalities of the same items.
      temperature: tau > 0 (raw value; see :func:`temperature_from_log` for a learnable one).
      label_smoothing: eps, 0.1 in the authors' code.
      gradient: ``"exact"``: the true gradient of L. ``"faithful"``: the authors' training
        gradient, where each term's gathered side is a stop-gradient (even on one device):
        ``1/2 [CE(-V(t, sg(o)) / tau) + CE(-V(sg(t), o)^T / tau)]``; same value, different
        gradient.
      volume_gradient: ``"safe"`` or ``"faithful"`` square root (see :mod:`gram_jax.volume`).
      axis_name, impl, chunk_size: the driver (module docstring); the result is the global loss.
      score: ``"volume"`` (GRAM), ``"simplex"``: the simplex volume ``S_ij`` in place of
        ``V_ij`` (:func:`simplex_contrastive_loss`), or ``"triangle"``: TRIANGLE's ``T_ij``
        (:func:`triangle_loss`; k = 3; no square root, so ``volume_gradient`` is unused).

    Returns:
      ``(loss, metrics)``; metrics: ``loss``, ``temperature``, ``volume/positive`` and
      ``volume/negative`` (means), ``accuracy/anchor_to_rest`` and ``accuracy/rest_to_anchor``.
    """
    # Per score: the engine's columns (from the candidates), the pairwise score of a tile, and
    # the per-item score of its positives (the diagonal), which keeps float32 accuracy on
    # aligned positives where the pairwise form, built from dot products, cannot
    # (docs/precision.md); the negatives are not refined (their volumes are ~1, and a tile's
    # smallest entry is the positive that the per-item score replaces). The volume's columns
    # are the candidates' Gram-Schmidt terms, made once per device: their backward then runs
    # once on the summed cotangent, not once per tile before the tiles' contributions cancel
    # (which costs the ring ~1e-5 at 1 x 1 tiles).
    vg = volume_gradient
    pair = {
        "volume": (
            score_lib.volume_terms,
            lambda a, t: score_lib.volume_block(a, t, vg, refine=0),
            lambda a, t: score_lib.volume_item(a, t, vg),
        ),
        "simplex": (
            tuple,
            lambda a, o: pairwise_simplex_volume(a, *o, gradient=vg),
            lambda a, o: simplex_volume([a, *o], gradient=vg),
        ),
        "triangle": (  # T = det(F F^T) / 2 = 2 S^2, S the triangle's area
            tuple,
            lambda a, o: 0.5 * pairwise_simplex_det(a, *o),
            lambda a, o: 2.0 * simplex_volume([a, *o], squared=True),
        ),
    }
    if score not in pair:
        raise ValueError(f"score must be 'volume', 'simplex' or 'triangle', got {score!r}")
    if score == "triangle" and len(_as_list(others)) != 2:
        raise ValueError(
            f"TRIANGLE is defined for k = 3 modalities (anchor + 2), got k = "
            f"{1 + len(_as_list(others))}; use loss 'simplex' for any k"
        )
    return _distance_contrastive(
        pair[score], score, anchor, others, temperature, label_smoothing, gradient, axis_name,
        impl, chunk_size,
    )  # fmt: skip


def _distance_contrastive(
    forms, name, anchor, others, temperature, label_smoothing, gradient, axis_name, impl, chunk_size
) -> tuple[Array, Metrics]:
    """GRAM's two-direction label-smoothed CE with logits ``-score / tau`` (any lower-is-better
    pair score; GRAM, simplex, TRIANGLE). ``forms``: the score's ``(columns, pairwise, per
    item)`` functions. Metrics ``<name>/positive`` and ``/negative``."""
    columns, score, positive = forms
    others = _as_list(others)
    _check_square_batch(anchor, others)
    check_temperature(temperature)
    check_label_smoothing(label_smoothing)
    _check_choice("gradient", gradient, ("exact", "faithful"))
    row, col = pair_stats(
        score, anchor, columns(others), -1.0 / temperature,  # z = -score / tau
        axis_name=axis_name, impl=impl, chunk_size=chunk_size, faithful=gradient == "faithful",
        positive=positive,
    )  # fmt: skip
    g = _Global(anchor.shape[0], axis_name)
    loss = _symmetric_ce(row, col, label_smoothing, g)
    tau, stats = _no_grad(jnp.asarray(temperature, jnp.float32)), _no_grad(row)
    metrics = {
        "loss": loss,
        "temperature": jnp.asarray(temperature, jnp.float32),
        f"{name}/positive": -tau * g.mean(stats["pos"]),
        f"{name}/negative": -tau * g.offdiag_mean(stats),
        "accuracy/anchor_to_rest": g.accuracy(row),
        "accuracy/rest_to_anchor": g.accuracy(col),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# InfoNCE / CLIP and SigLIP
# ---------------------------------------------------------------------------------------------


def infonce_loss(
    anchor: Float[Array, "B D"],
    others: Float[Array, "B D"] | Sequence[Float[Array, "B D"]],
    temperature: Float[Array, ""] | float,
    label_smoothing: float = 0.0,
    pairs: Literal["anchored", "all"] = "anchored",
    axis_name: str | None = None,
    impl: Impl = "all_gather",
    chunk_size: int | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """Symmetric InfoNCE (CLIP) loss, pairwise or over k modalities.

    For one pair ``(x, y)`` with ``S = x y^T / tau`` (``(B, B)``):
    ``L(x, y) = 1/2 [mean_i CE_eps(S_i., i) + mean_j CE_eps(S_.j, j)]``.

    - ``others`` one array: CLIP between ``anchor`` and it.
    - ``pairs="anchored"`` (ImageBind / LanguageBind): mean over m of ``L(anchor, others[m])``.
    - ``pairs="all"``: mean of ``L`` over all k(k-1)/2 pairs of ``[anchor, *others]``.

    Embeddings are expected L2-normalised. ``axis_name`` / ``impl`` / ``chunk_size``: the
    driver (module docstring). Returns ``(loss, metrics)``.
    """
    others = _as_list(others)
    _check_square_batch(anchor, others)
    check_temperature(temperature)
    check_label_smoothing(label_smoothing)
    _check_choice("pairs", pairs, ("anchored", "all"))
    mods = [anchor, *others]
    k = len(mods)
    index_pairs = [(a, b) for a in range(k) for b in range(a + 1, k) if pairs == "all" or a == 0]
    g = _Global(anchor.shape[0], axis_name)
    tau = _no_grad(jnp.asarray(temperature, jnp.float32))
    losses, pos, neg, acc = [], [], [], []
    for a, b in index_pairs:
        row, col = pair_stats(
            _dot_score, mods[a], mods[b], 1.0 / temperature,
            axis_name=axis_name, impl=impl, chunk_size=chunk_size,
        )  # fmt: skip
        losses.append(_symmetric_ce(row, col, label_smoothing, g))
        stats = _no_grad(row)
        pos.append(tau * g.mean(stats["pos"]))  # cosine = logit * tau
        neg.append(tau * g.offdiag_mean(stats))
        acc.append(g.accuracy(row))
    loss = jnp.mean(jnp.stack(losses))
    metrics = {
        "loss": loss,
        "temperature": jnp.asarray(temperature, jnp.float32),
        "cosine/positive": jnp.mean(jnp.stack(pos)),
        "cosine/negative": jnp.mean(jnp.stack(neg)),
        "accuracy/anchor_to_rest": jnp.mean(jnp.stack(acc)),
    }
    return loss, metrics


def _siglip_pointwise(z: Array, is_positive: Array) -> Array:
    """``-log sigmoid(l z) = softplus(-l z)`` with ``l = +1`` on positives, ``-1`` elsewhere."""
    return jax.nn.softplus(jnp.where(is_positive, -z, z))


def siglip_loss(
    x: Float[Array, "B D"],
    y: Float[Array, "B D"] | Sequence[Float[Array, "B D"]],
    scale: Float[Array, ""] | float,
    bias: Float[Array, ""] | float,
    axis_name: str | None = None,
    impl: Impl = "all_gather",
    chunk_size: int | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """SigLIP's pairwise sigmoid loss (Zhai et al., 2023).

    With ``z_ij = scale * x_i . y_j + bias`` and labels ``l_ij = +1`` if i = j else -1:

        L = -(1 / B) sum_{i, j} log sigmoid(l_ij z_ij).

    ``scale`` is t (SigLIP learns ``log t``, init log 10) and ``bias`` b (init -10). If ``y`` is
    a sequence, the loss is the mean over ``L(x, y[m])`` (anchored on ``x``).
    ``axis_name`` / ``impl`` / ``chunk_size``: the driver (module docstring); SigLIP needs only
    row sums, so no column statistic is computed.
    """
    ys = _as_list(y)
    _check_square_batch(x, ys)
    check_temperature(scale, "scale")
    if (b := _concrete(bias)) is not None and not math.isfinite(b):
        raise ValueError(f"bias must be finite, got {b}")
    g = _Global(x.shape[0], axis_name)
    losses, pos, neg = [], [], []
    for ym in ys:
        row, _ = pair_stats(
            _dot_score, x, ym, scale, bias, axis_name=axis_name, impl=impl,
            chunk_size=chunk_size, lse=False, pointwise=_siglip_pointwise, cols_stats=False,
        )  # fmt: skip
        losses.append(g.mean(row["pw"]))
        stats = _no_grad(row)
        pos.append(g.mean(stats["pos"]))
        neg.append(g.offdiag_mean(stats))
    loss = jnp.mean(jnp.stack(losses))
    metrics = {
        "loss": loss,
        "scale": jnp.asarray(scale, jnp.float32),
        "bias": jnp.asarray(bias, jnp.float32),
        "logit/positive": jnp.mean(jnp.stack(pos)),
        "logit/negative": jnp.mean(jnp.stack(neg)),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# NT-Xent: CoMM and Cross+Self
# ---------------------------------------------------------------------------------------------


def nt_xent(
    a: Float[Array, "N d"],
    b: Float[Array, "N d"],
    temperature: float = 0.1,
    axis_name: str | None = None,
    impl: Impl = "all_gather",
    chunk_size: int | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """SimCLR's 2N-way NT-Xent between paired sets ``a`` and ``b`` (rows L2-normalised here).

    With ``S_ab = a b^T / tau``, ``S_aa = a a^T / tau`` and ``S_bb`` (self-similarities
    excluded), row k of ``[S_ab | S_aa]`` has positive ``S_ab[k, k]`` and row k of
    ``[S_bb | S_ab^T]`` has positive ``S_ab^T[k, k]``; NTX is the mean CE over those 2N rows
    (negatives from both views: intra-view negatives):

        NTX = 1/2 mean_k [lse(S_ab[k.], S_aa[k.]) + lse(S_ab[.k], S_bb[k.]) - 2 S_ab[kk]]

    the LSEs of each block streamed separately and combined with ``logaddexp``. Returns
    ``(loss, top-1 accuracy)``. ``axis_name`` / ``impl`` / ``chunk_size``: the driver.
    """
    _check_arrays(a=a, b=b)
    check_temperature(temperature)
    a, b = l2_normalize(a), l2_normalize(b)
    kw = {"axis_name": axis_name, "impl": impl, "chunk_size": chunk_size}
    scale = 1.0 / temperature
    ab_row, ab_col = pair_stats(_dot_score, a, b, scale, **kw)
    # Self-similarities are left out of the LSE (the authors subtract 1e8: same result).
    aa, _ = pair_stats(_dot_score, a, a, scale, cols_stats=False, mask_diagonal=True, **kw)
    bb, _ = pair_stats(_dot_score, b, b, scale, cols_stats=False, mask_diagonal=True, **kw)
    g = _Global(a.shape[0], axis_name)
    lse_a = jnp.logaddexp(ab_row["lse"], aa["lse"])
    lse_b = jnp.logaddexp(ab_col["lse"], bb["lse"])
    loss = 0.5 * (g.mean(lse_a - ab_row["pos"]) + g.mean(lse_b - ab_col["pos"]))
    return loss, 0.5 * (g.accuracy(ab_row) + g.accuracy(ab_col))


def _check_two_views(view1, view2, what: str) -> None:
    """Two equally long (>= 2) sequences of same-shaped non-empty (B, d) floating arrays."""
    if hasattr(view1, "shape") or hasattr(view2, "shape"):
        raise TypeError("view1 and view2 must be sequences of (B, d) arrays, one per entry")
    if len(view1) != len(view2) or len(view1) < 2:
        raise ValueError(
            f"view1 and view2 must hold the same number {what}; got {len(view1)} and {len(view2)}"
        )
    named = {f"view{v}[{i}]": z for v, vs in ((1, view1), (2, view2)) for i, z in enumerate(vs)}
    _check_arrays(**named)
    shapes = {jnp.shape(z) for z in (*view1, *view2)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every embedding must have the same shape (B, d), got {shapes}")
    if next(iter(shapes))[0] == 0:
        raise ValueError("empty batch: the views hold 0 rows")
    for z in (*view1, *view2):
        if not jnp.issubdtype(z.dtype, jnp.floating):
            raise ValueError(f"embeddings must be floating arrays, got dtype {z.dtype}")


def comm_loss(
    view1: Sequence[Float[Array, "B d"]],
    view2: Sequence[Float[Array, "B d"]],
    temperature: float = 0.1,
    axis_name: str | None = None,
    impl: Impl = "all_gather",
    chunk_size: int | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """CoMM's loss (Dufumier et al., ICLR 2025), as in the authors' ``CoMMLoss``.

    ``view1[i]`` / ``view2[i]`` are the projected fused embeddings of two augmented views with
    mask i; masks ``0..n-1`` keep a single modality and the LAST entry keeps all modalities
    (the "prototype"). With NTX = :func:`nt_xent`:

        l_i = 1/2 [NTX(z'_i, z''_full) + NTX(z''_i, z'_full)],   L = mean_{i = 0..n} l_i,

    so ``l_full = NTX(z'_full, z''_full)`` is the -I(Z', Z'') term and each masked term aligns a
    single-modality view with the other view's full embedding. ``axis_name`` / ``impl`` /
    ``chunk_size`` are passed to every :func:`nt_xent`.
    """
    _check_two_views(
        view1, view2, "(n + 1 >= 2) of embeddings: the n single-modality ones then the full one"
    )
    ntx = lambda x, y: nt_xent(x, y, temperature, axis_name, impl, chunk_size)
    full1, full2 = view1[-1], view2[-1]
    terms = [ntx(full1, full2)] + [
        jax.tree.map(lambda u, v: 0.5 * (u + v), ntx(z1, full2), ntx(z2, full1))
        for z1, z2 in zip(view1[:-1], view2[:-1], strict=True)
    ]
    metrics = {}
    for name, (li, acc) in zip(["full", *map(str, range(len(view1) - 1))], terms, strict=True):
        metrics[f"comm/loss_{name}"] = li
        metrics[f"comm/accuracy_{name}"] = acc
    loss = jnp.mean(jnp.stack([t[0] for t in terms]))
    return loss, metrics | {"loss": loss, "temperature": jnp.asarray(temperature, jnp.float32)}


def cross_self_loss(
    view1: Sequence[Float[Array, "B d"]],
    view2: Sequence[Float[Array, "B d"]],
    temperature: float = 0.1,
    ssl_scale: float = 1.0,
    axis_name: str | None = None,
    impl: Impl = "all_gather",
    chunk_size: int | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """The "Cross+Self" baseline of CoMM (its ``CrossSelfLoss``): cross-modal + SimCLR terms.

    ``view1[m]`` / ``view2[m]`` are modality m's projected embeddings (B, d) of two augmented
    views (k >= 2 modalities, rows L2-normalised inside :func:`nt_xent`). With NTX =
    :func:`nt_xent` (2N-way, intra-view negatives):

        cross = mean_{v in (', '')} mean_{i < j} NTX(z^v_i, z^v_j)
        self  = mean_m NTX(z'_m, z''_m)
        L     = cross + ssl_scale * self

    For k = 2 this is the authors' ``NTX(z_1, z_2) + ssl_scale * 1/2 [NTX(z'_1, z''_1) +
    NTX(z'_2, z''_2)]`` with the cross term averaged over both views (their cross term sees a
    separate weakly augmented view; here both augmented views serve it).
    ``axis_name`` / ``impl`` / ``chunk_size`` are passed to every :func:`nt_xent`.
    """
    _check_two_views(view1, view2, "(k >= 2) of per-modality embeddings")
    ntx = lambda x, y: nt_xent(x, y, temperature, axis_name, impl, chunk_size)
    k = len(view1)
    cross = [ntx(v[i], v[j]) for v in (view1, view2) for i in range(k) for j in range(i + 1, k)]
    selfs = [ntx(a, b) for a, b in zip(view1, view2, strict=True)]
    mean = lambda terms, i: jnp.mean(jnp.stack([t[i] for t in terms]))
    l_cross, l_self = mean(cross, 0), mean(selfs, 0)
    loss = l_cross + ssl_scale * l_self
    metrics = {
        "loss": loss,
        "cross_self/loss_cross": l_cross,
        "cross_self/loss_self": l_self,
        "cross_self/accuracy_cross": mean(cross, 1),
        "cross_self/accuracy_self": mean(selfs, 1),
        "temperature": jnp.asarray(temperature, jnp.float32),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# DAM: data-anchor matching with volume-mined hard negatives
# ---------------------------------------------------------------------------------------------


def sample_hard_negatives(
    key: PRNGKeyArray, logits: Float[Array, "B B"], floor: float = 1e-4
) -> tuple[Int[Array, " B"], Int[Array, " B"]]:
    """Draw one hard negative per row and per column of a score matrix (positive excluded).

    Row i draws candidate j with probability proportional to ``softmax(logits_i.)_j + floor``
    over ``j != i``; column j draws an anchor the same way from ``softmax(logits_.j)``. For GRAM
    ``logits = -V / tau``, so closer (smaller-volume) wrong items are drawn more often.

    Returns ``(negative_candidate_per_anchor, negative_anchor_per_candidate)``, both (B,).
    """
    logits = jax.lax.stop_gradient(logits)
    n = logits.shape[0]
    if n < 2:
        raise ValueError("hard negatives need a batch of at least 2 items")
    not_self = ~jnp.eye(n, dtype=bool)
    k_row, k_col = jax.random.split(key)

    def draw(k, z):
        w = jax.nn.softmax(z, axis=1) + floor
        w = jnp.where(not_self, w, 0.0)
        return jax.random.categorical(k, jnp.log(w), axis=1)

    return draw(k_row, logits), draw(k_col, logits.T)


def dam_loss(
    key: PRNGKeyArray,
    volumes: Float[Array, "B B"],
    temperature: Float[Array, ""] | float,
    match_logits_fn: Callable[[Int[Array, " P"], Int[Array, " P"]], Array],
) -> tuple[Float[Array, ""], Metrics]:
    """GRAM's data-anchor matching (DAM / ITM) loss with volume-mined hard negatives.

    Builds 3B (anchor, candidate) index pairs: the B positives ``(i, i)``, each anchor with a
    sampled hard-negative candidate, and each candidate with a sampled hard-negative anchor
    (:func:`sample_hard_negatives` on ``-volumes / tau``), labels ``[1]*B + [0]*2B``, and
    scores them with ``match_logits_fn(anchor_idx, candidate_idx)`` (a matching head over the
    items' token sequences). Its output is either ``(3B, 2)`` class logits (softmax
    cross-entropy, as the authors' 2-way head) or ``(3B,)`` match logits (sigmoid BCE).
    The authors weight this term by 0.1 in the total loss.
    """
    b = volumes.shape[0]
    if volumes.shape != (b, b):
        raise ValueError(f"volumes must be a square (B, B) matrix, got {volumes.shape}")
    neg_cand, neg_anchor = sample_hard_negatives(key, -volumes / temperature)
    idx = jnp.arange(b)
    anchor_idx = jnp.concatenate([idx, idx, neg_anchor])
    cand_idx = jnp.concatenate([idx, neg_cand, idx])
    labels = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
    logits = match_logits_fn(anchor_idx, cand_idx)
    if logits.shape == (3 * b, 2):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        per = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
        pred = jnp.argmax(logits, axis=-1)
    elif logits.shape == (3 * b,):
        z = logits.astype(jnp.float32)
        per = -jnp.where(labels == 1, jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z))
        pred = (z > 0).astype(jnp.int32)
    else:
        raise ValueError(
            f"match_logits_fn must return (3B, 2) or (3B,) logits for B = {b}, got {logits.shape}"
        )
    loss = jnp.mean(per)
    return loss, {"loss": loss, "dam/accuracy": jnp.mean(pred == labels)}


# ---------------------------------------------------------------------------------------------
# The n-modal family beside GRAM: simplex volume, TRIANGLE, Symile; GRAM with a cosine warm-up
# (formulas and sources: docs/nmodal.md)
# ---------------------------------------------------------------------------------------------


def simplex_contrastive_loss(
    anchor: Float[Array, "B D"],
    others: Sequence[Float[Array, "B D"]],
    temperature: Float[Array, ""] | float,
    **kwargs: Any,
) -> tuple[Float[Array, ""], Metrics]:
    """GRAM's loss with the simplex volume in place of the parallelotope's (any k >= 2).

    ``S_ij`` = (k-1)-volume of the simplex with vertices ``anchor_i, others[0]_j, ...``
    (:func:`gram_jax.volume.pairwise_simplex_volume`: the chord length for k = 2, the
    triangle's area for k = 3); ``L = 1/2 [mean_i CE_eps(-S_i. / tau, i) + mean_j
    CE_eps(-S_.j / tau, j)]``. Sign-aware, unlike the volume: flipping a modality's embedding
    changes ``S``. ``kwargs``: those of :func:`gram_contrastive_loss` (``label_smoothing``,
    ``gradient``, ``volume_gradient``, the driver); metrics ``simplex/positive`` /
    ``simplex/negative`` (mean volumes) and the two accuracies.
    """
    return gram_contrastive_loss(anchor, others, temperature, score="simplex", **kwargs)


def triangle_loss(
    anchor: Float[Array, "B D"],
    others: Sequence[Float[Array, "B D"]],
    temperature: Float[Array, ""] | float,
    **kwargs: Any,
) -> tuple[Float[Array, ""], Metrics]:
    """TRIANGLE's training loss (k = 3: anchor t, candidates v, a), as in the authors' code.

    Their score (``utils/area.py`` ``area_computation``, the square root removed there) is

        T_ij = (|u|^2 |w|^2 - (u.w)^2) / 2,    u = t_i - v_j,  w = t_i - a_j,

    i.e. ``2 Area_ij^2`` (``Area = 1/2 sqrt(.)`` is the paper's triangle area), not the area:
    :func:`gram_jax.volume.pairwise_simplex_det` / 2 here, computed stably. The loss is GRAM's
    two-direction label-smoothed CE with logits ``-T / tau``. :func:`simplex_contrastive_loss`
    with k = 3 is the same loss on the area itself. ``kwargs``: those of
    :func:`gram_contrastive_loss`; metrics ``triangle/positive`` / ``triangle/negative``.
    """
    return gram_contrastive_loss(anchor, others, temperature, score="triangle", **kwargs)


def _symile_score(rows, cols) -> Array:
    """MIP tile: ``x_i . P_j`` on the diagonal (the true tuple), ``x_i . S_j`` off it."""
    x, rid = rows
    prod, shuffled, cid = cols
    diag = rid[:, None] == cid[None, :]
    return jnp.where(diag, _dot_score(x, prod), _dot_score(x, shuffled))


def _all_rows(x: Array, axis_name: str | None) -> Array:
    return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def symile_loss(
    anchor: Float[Array, "B D"],
    others: Sequence[Float[Array, "B D"]],
    temperature: Float[Array, ""] | float,
    key: PRNGKeyArray | None = None,
    negative_sampling: Literal["n", "n_squared"] = "n",
    axis_name: str | None = None,
    impl: Impl = "all_gather",
    chunk_size: int | None = None,
) -> tuple[Float[Array, ""], Metrics]:
    """Symile's loss (Saporta et al., NeurIPS 2024) over ``mods = [anchor, *others]`` (k >= 2).

    ``MIP(x_1, ..., x_k) = sum_d prod_m x_{m,d}``. Each modality m is the anchor in turn; with
    ``N_j`` a candidate tuple of the other modalities, ``L_m = mean_i CE(MIP(x_{m,i}, N_j) /
    tau over j, positive N_i = the other modalities of item i)`` (one direction, no label
    smoothing) and ``L = mean_m L_m``. Negatives, as the authors' ``Symile`` class:

    - ``"n"``: for each anchor m and each other modality l an independent uniform permutation
      ``pi_ml`` of the (global) batch; candidate j is ``(x_{l, pi_ml(j)})_l`` for ``j != i`` and
      the true tuple for ``j = i`` (their ``compute_logits_n``: shuffled rows, positives written
      on the diagonal), B - 1 negatives per row, fresh permutations from ``key`` every call.
      The score of a pair is one GEMM against the candidate's elementwise product, so it runs on
      every driver; under ``axis_name`` the others are all-gathered to apply the global
      permutation (``O(B k D)`` per device even for the ring).
    - ``"n_squared"``: every combination of the other modalities' rows, ``B^(k-1)`` candidates
      per anchor, built by rolls as the package's ``compute_non_anchor_products``: block
      ``s = (s_2, ...)`` holds ``x_1[j] * prod_l x_l[j - s_l]``, the first block (no shift) the
      positives. Dense, single device only (small B).

    ``temperature``: ``1 / logit_scale``. Returns ``(loss, metrics)``: ``loss``, ``temperature``,
    ``mip/positive`` (mean positive MIP) and ``accuracy/<m>`` per anchor modality.
    """
    others = _as_list(others)
    _check_square_batch(anchor, others)
    check_temperature(temperature)
    _check_choice("negative_sampling", negative_sampling, ("n", "n_squared"))
    mods = [anchor, *others]
    k, b = len(mods), anchor.shape[0]
    g = _Global(b, axis_name)
    if negative_sampling == "n":
        if key is None:
            raise ValueError("symile_loss with negative_sampling='n' needs a PRNG key (key=)")
        keys = jax.random.split(key, k * (k - 1))
        ids = g.ids.astype(anchor.dtype)  # exact below 2^24 items (float32)
    elif axis_name is not None or chunk_size is not None:
        raise ValueError(
            "negative_sampling='n_squared' scores B^(k-1) candidates per anchor densely on one "
            "device; use 'n' with axis_name / chunk_size"
        )
    losses, acc, pos = [], {}, []
    for m in range(k):
        rest = [x for n, x in enumerate(mods) if n != m]
        if negative_sampling == "n":
            perm = [jax.random.permutation(keys[m * (k - 1) + n], g.n) for n in range(k - 1)]
            shuffled = _product(
                [_all_rows(x, axis_name)[p[g.ids]] for x, p in zip(rest, perm, strict=True)]
            )
            row, _ = pair_stats(
                _symile_score, (mods[m], ids), (_product(rest), shuffled, ids), 1.0 / temperature,
                axis_name=axis_name, impl=impl, chunk_size=chunk_size, cols_stats=False,
            )  # fmt: skip
        else:
            blocks = [rest[0]]
            for x in rest[1:]:
                blocks = [c * jnp.roll(x, s, axis=0) for c in blocks for s in range(b)]
            row, _ = pair_stats(
                _dot_score, mods[m], jnp.concatenate(blocks), 1.0 / temperature, cols_stats=False
            )
        losses.append(g.mean(row["lse"] - row["pos"]))
        stats = _no_grad(row)
        pos.append(g.mean(stats["pos"]))
        acc[f"accuracy/{m}"] = g.accuracy(row)
    loss = jnp.mean(jnp.stack(losses))
    tau = _no_grad(jnp.asarray(temperature, jnp.float32))
    metrics = {
        "loss": loss,
        "temperature": jnp.asarray(temperature, jnp.float32),
        "mip/positive": tau * jnp.mean(jnp.stack(pos)),
    }
    return loss, metrics | acc


def handover_weight(
    step: Array | int | None, weight: float, weight_end: float, handover_steps: int
) -> Array:
    """``w(step) = w_end + (w0 - w_end) max(0, 1 - step / handover_steps)``: linear from
    ``weight`` at step 0 to ``weight_end`` at ``handover_steps`` (constant ``weight`` when
    ``handover_steps == 0``)."""
    for name, w in (("infonce_weight", weight), ("infonce_weight_end", weight_end)):
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {w}")
    if not (isinstance(handover_steps, int) and handover_steps >= 0):
        raise ValueError(f"handover_steps must be an int >= 0, got {handover_steps!r}")
    if handover_steps == 0:
        return jnp.asarray(weight, jnp.float32)
    if step is None:
        raise ValueError("a handover schedule (handover_steps > 0) needs the training step (step=)")
    frac = jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / handover_steps, 0.0, 1.0)
    return weight_end + (weight - weight_end) * frac


def gram_infonce_loss(
    anchor: Float[Array, "B D"],
    others: Sequence[Float[Array, "B D"]],
    temperature: Float[Array, ""] | float,
    step: Array | int | None = None,
    infonce_weight: float = 1.0,
    infonce_weight_end: float = 0.0,
    handover_steps: int = 0,
    label_smoothing: float = 0.1,
    **gram_kwargs: Any,
) -> tuple[Float[Array, ""], Metrics]:
    """GRAM with an anchored-InfoNCE term that hands over to it (issue 14, remedy (a)).

        L = w(step) InfoNCE_anchored + (1 - w(step)) L_GRAM,   w: :func:`handover_weight`

    InfoNCE gives a gradient at random initialisation (where the volume is flat) and fixes the
    embeddings' signs (the volume is sign-free); GRAM takes over. Both terms use the same
    temperature and the same label smoothing (as ``configs/synthetic.py:method=infonce``, so
    the two terms differ only in the score). ``gram_kwargs``: the other keywords of
    :func:`gram_contrastive_loss` (``gradient``, ``volume_gradient``, ``score``, the driver);
    the InfoNCE term takes the driver's. Metrics: the total, ``weight``, ``loss/infonce``,
    ``loss/gram`` and GRAM's own metrics.
    """
    w = handover_weight(step, infonce_weight, infonce_weight_end, handover_steps)
    driver = {k: v for k, v in gram_kwargs.items() if k in ("axis_name", "impl", "chunk_size")}
    l_nce, _ = infonce_loss(anchor, others, temperature, label_smoothing, **driver)
    l_gram, m_gram = gram_contrastive_loss(
        anchor, others, temperature, label_smoothing, **gram_kwargs
    )
    loss = w * l_nce + (1.0 - w) * l_gram
    metrics = m_gram | {"loss": loss, "weight": w, "loss/infonce": l_nce, "loss/gram": l_gram}
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# Registry: what the trainer needs to know about each loss
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One loss of the trainer (``config.loss.name``).

    The task calls ``fn(anchor, others, **params, **{arg: config.loss[key] for arg, key in
    args.items()})`` (``others`` the list of non-anchor embeddings), or ``fn(view1, view2, ...)``
    with the two augmented views' lists of (B, d) embeddings when ``two_views``; under a
    sharded ``config.loss.impl`` it adds ``axis_name=`` and ``impl=`` and runs inside
    ``shard_map`` on the local shards.

    Attributes:
      fn: the loss, ``(...) -> (loss, metrics)``.
      args: ``fn`` keyword -> key of ``config.loss`` it takes its value from.
      config_keys: keys this loss adds to ``config.loss``, with defaults (its own settings).
      params: the learnable scalars it receives: ``"temperature"`` (``temperature=``, the
        model's ``LearnableTemperature``; the constant ``model.temperature_init`` when
        ``model.learn_temperature`` is False), ``"scale_bias"`` (``scale=``, ``bias=``: SigLIP's
        ``SigLIPScaleBias`` that ``build_model`` creates as ``model.siglip``) or None.
      model: ``"gram"`` (one tower per modality, ``GramModel``) or ``"comm"`` (CoMM's fusion).
      two_views: needs two augmented views per example (``config.data.two_views``).
      impls: the sharded implementations it supports besides ``"gspmd"`` (which always works).
      score: the retrieval score of its geometry (a name of :data:`gram_jax.scores.SCORES`:
        ``"volume"``, ``"cosine"``, ``"simplex"``, ``"symile"``) or None.
      inputs: what else the task passes: ``"key"`` (``key=``, the step's PRNG key) and / or
        ``"step"`` (``step=``, the number of completed training steps).
    """

    fn: Callable[..., tuple[Array, Metrics]]
    args: Mapping[str, str] = dataclasses.field(default_factory=dict)
    config_keys: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    params: Literal["temperature", "scale_bias"] | None = "temperature"
    model: Literal["gram", "comm"] = "gram"
    two_views: bool = False
    impls: tuple[str, ...] = IMPLS
    score: str | None = "cosine"
    inputs: tuple[str, ...] = ()


LOSSES: Registry[LossSpec] = Registry("loss")


def register_loss(name: str, fn: Callable, *, builtin: bool = False, **spec: Any) -> LossSpec:
    """Make ``fn`` trainable as ``config.loss.name = name``; ``spec``: :class:`LossSpec` fields.

    Call it from a library file or a user's config file (before ``get_config`` returns).
    Built-in names are reserved; a user name may be registered again (a reloaded config).
    """
    s = LossSpec(fn, **spec)
    if s.params not in ("temperature", "scale_bias", None):
        raise ValueError(f"params must be 'temperature', 'scale_bias' or None, got {s.params!r}")
    if s.model not in ("gram", "comm"):
        raise ValueError(f"model must be 'gram' or 'comm', got {s.model!r}")
    if s.model == "comm" and s.params is not None:
        raise ValueError("a 'comm'-model loss gets no learnable params (CoMMModel holds none)")
    if bad := set(s.inputs) - {"key", "step"}:
        raise ValueError(f"inputs {sorted(bad)} are not among ('key', 'step')")
    if s.score is not None and s.score not in score_lib.SCORES:
        raise ValueError(f"score must be None or one of {tuple(score_lib.SCORES)}, got {s.score!r}")
    if bad := set(s.impls) - set(IMPLS):
        raise ValueError(f"impls {sorted(bad)} are not among {IMPLS}")
    return LOSSES.add(name, s, builtin=builtin)


def get_loss(name: str) -> LossSpec:
    """The registered :class:`LossSpec` of ``name`` (:class:`~gram_jax.registry.UnknownName`
    naming the registered ones)."""
    return LOSSES[name]


def _builtin(name: str, fn: Callable, **spec: Any) -> None:
    register_loss(name, fn, builtin=True, **spec)


_NTX_TAU = {"temperature": "nt_xent_temperature"}
_GRAM_ARGS = {"label_smoothing": "label_smoothing", "gradient": "gradient"}
_builtin("gram", gram_contrastive_loss, args=_GRAM_ARGS, score="volume")
_builtin("infonce", infonce_loss, args={"label_smoothing": "label_smoothing", "pairs": "pairs"})
_builtin("siglip", siglip_loss, params="scale_bias")
_builtin("comm", comm_loss, args=_NTX_TAU, params=None, model="comm", two_views=True)
_builtin("cross_self", cross_self_loss, args=_NTX_TAU, params=None, two_views=True)
_builtin("simplex", simplex_contrastive_loss, args=_GRAM_ARGS, score="simplex")
_builtin("triangle", triangle_loss, args=_GRAM_ARGS, score="simplex")
_builtin(
    "symile", symile_loss, args={"negative_sampling": "symile_negatives"},
    config_keys={"symile_negatives": "n"}, score="symile", inputs=("key",),
)  # fmt: skip
_builtin(
    "gram+infonce", gram_infonce_loss,
    args=_GRAM_ARGS | {
        "infonce_weight": "infonce_weight", "infonce_weight_end": "infonce_weight_end",
        "handover_steps": "handover_steps",
    },
    config_keys={"infonce_weight": 1.0, "infonce_weight_end": 0.0, "handover_steps": 200},
    score="volume", inputs=("step",),
)  # fmt: skip
