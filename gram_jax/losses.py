"""Contrastive losses: GRAM, DAM matching, InfoNCE (CLIP / anchored), SigLIP and CoMM.

Every loss is a pure function of embeddings (and temperature) returning ``(loss, metrics)``,
``metrics`` a flat dict of scalar diagnostics. Item i of every input is the same sample, so the
positives of an N x N score matrix sit on its diagonal.

Label-smoothed cross-entropy (used by GRAM, as in the authors' code, and optionally InfoNCE),
for a row of logits ``z`` with positive ``y`` and smoothing ``eps`` over ``N`` classes:

    CE_eps(z, y) = -sum_j q_j log softmax(z)_j,    q_j = (1 - eps) [j = y] + eps / N
                 = logsumexp(z) - (1 - eps) z_y - (eps / N) sum_j z_j.

The second form needs only a log-sum-exp, the positive and the row sum, so it streams over
column blocks (see :mod:`gram_jax.distributed`).

**Global batch and streaming.** The contrastive losses (GRAM, InfoNCE, SigLIP, NT-Xent / CoMM)
take three more keywords:

- ``axis_name``: call the loss inside your own ``jax.shard_map`` over the mesh axis the batch is
  sharded on (default ``check_vma=True``), on the LOCAL shards: it returns the GLOBAL loss and
  metrics (identical on every device) and its gradient inside the shard_map is the exact
  gradient of the global loss. ``None`` (default): the single-device loss.
- ``impl``: with ``axis_name``, ``"all_gather"`` (local rows against all-gathered columns;
  ``O(B^2 / n)`` scores per device), ``"ring"`` (``ppermute`` of candidate blocks with a
  streaming log-sum-exp and a recomputing custom VJP; ``O((B / n)^2)`` scores per device) or
  ``"ring_checkpoint"`` (the ring differentiated through ``jax.checkpoint``; for comparison).
- ``chunk_size``: without ``axis_name``, evaluate the loss over ``chunk_size x chunk_size``
  score tiles with a streaming log-sum-exp (``O(chunk^2)`` scores; for B beyond memory).

Without these keywords the loss is the dense reference computation (the full score matrix).
Metrics are the same quantities either way (accuracies use the first maximum, as argmax).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from gram_jax.distributed import Impl, pair_stats
from gram_jax.volume import GradientMode, pairwise_volume, validate_pairwise_inputs

__all__ = [
    "Metrics",
    "temperature_from_log",
    "log_temperature_init",
    "smoothed_cross_entropy",
    "gram_contrastive_loss",
    "infonce_loss",
    "siglip_loss",
    "nt_xent",
    "comm_loss",
    "cross_self_loss",
    "sample_hard_negatives",
    "dam_loss",
]

Metrics = dict[str, Array]
_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# Temperature
# ---------------------------------------------------------------------------------------------


def log_temperature_init(temperature: float = 0.07) -> Float[Array, ""]:
    """Initial value of a learnable log-temperature parameter: ``log(temperature)``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return jnp.log(jnp.asarray(temperature, jnp.float32))


def temperature_from_log(
    log_temperature: Float[Array, ""], min_value: float = 1e-3, max_value: float = 100.0
) -> Float[Array, ""]:
    """``tau = exp(log_tau)`` clipped to ``[min_value, max_value]``.

    Learning ``log_tau`` keeps tau positive (the authors learn tau raw and unclamped, which can
    cross zero); the clip bounds the logit scale as CLIP does (1 / tau <= 1000 by default).
    """
    return jnp.clip(jnp.exp(log_temperature), min_value, max_value)


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


def smoothed_cross_entropy(
    logits: Float[Array, "R C"],
    positives: Int[Array, " R"] | None = None,
    label_smoothing: float = 0.0,
) -> Float[Array, " R"]:
    """Per-row ``CE_eps(z_r, y_r)`` (module docstring); positives default to the diagonal."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    r, c = logits.shape
    if positives is None:
        if r != c:
            raise ValueError(f"diagonal positives need a square score matrix, got {(r, c)}")
        pos = jnp.diagonal(logits)
    else:
        pos = jnp.take_along_axis(logits, positives[:, None], axis=1)[:, 0]
    lse = jax.nn.logsumexp(logits, axis=1)
    out = lse - (1.0 - label_smoothing) * pos
    if label_smoothing:
        out = out - label_smoothing * jnp.mean(logits, axis=1)
    return out


def _row_accuracy(logits: Array, larger_is_better: bool = True) -> Array:
    best = jnp.argmax(logits if larger_is_better else -logits, axis=1)
    return jnp.mean(best == jnp.arange(logits.shape[0]))


def _offdiag_mean(x: Array) -> Array:
    n = x.shape[0]
    # A float: n (n - 1) overflows int32 (the jit argument type) from n = 46341 on.
    return (jnp.sum(x) - jnp.trace(x)) / float(max(n * (n - 1), 1))


def _check_square_batch(anchor: Array, others: Sequence[Array]) -> None:
    validate_pairwise_inputs(anchor, others)
    if others[0].shape[0] != anchor.shape[0]:
        raise ValueError(
            "a contrastive loss pairs item i of every modality: anchor has "
            f"{anchor.shape[0]} rows but the other modalities have {others[0].shape[0]}"
        )


def _as_list(others) -> list:
    if isinstance(others, jax.Array) or hasattr(others, "shape"):
        return [others]
    return list(others)


def _check_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


class _Global:
    """Global-batch bookkeeping for the streamed losses: sums over the mesh axis, global ids."""

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
        return (self.sum(stats["tot"]) - self.sum(stats["pos"])) / float(max(self.n**2 - self.n, 1))


def _ce(stats: dict, label_smoothing: float, n: int) -> Array:
    """Per-row ``CE_eps`` from streamed statistics: ``lse - (1 - eps) z_pos - eps mean(z)``."""
    eps = label_smoothing
    return stats["lse"] - (1.0 - eps) * stats["pos"] - eps * stats["tot"] / n


def _dot_score(x: Array, y: Array) -> Array:
    return jnp.matmul(x, y.T, precision=_HIGHEST)


def _streamed(axis_name, chunk_size) -> bool:
    return axis_name is not None or chunk_size is not None


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
      axis_name: mesh axis of the batch when called inside ``shard_map`` on local shards
        (module docstring); the result is the global loss.
      impl: ``"all_gather"``, ``"ring"`` or ``"ring_checkpoint"`` (with ``axis_name``).
      chunk_size: single-device tile size for the streaming evaluation.

    Returns:
      ``(loss, metrics)``; metrics: ``loss``, ``temperature``, ``volume/positive`` and
      ``volume/negative`` (means), ``accuracy/anchor_to_rest`` and ``accuracy/rest_to_anchor``.
    """
    others = _as_list(others)
    _check_square_batch(anchor, others)
    if _streamed(axis_name, chunk_size):
        return _gram_streamed(
            anchor, others, temperature, label_smoothing, gradient, volume_gradient,
            axis_name, impl, chunk_size,
        )  # fmt: skip
    if gradient == "exact":
        v = pairwise_volume(anchor, *others, gradient=volume_gradient)
        v_row, v_col = v, v
    elif gradient == "faithful":
        sg = jax.lax.stop_gradient
        v_row = pairwise_volume(anchor, *[sg(o) for o in others], gradient=volume_gradient)
        v_col = pairwise_volume(sg(anchor), *others, gradient=volume_gradient)
        v = v_row
    else:
        raise ValueError(f"gradient must be 'exact' or 'faithful', got {gradient!r}")
    row = smoothed_cross_entropy(-v_row / temperature, label_smoothing=label_smoothing)
    col = smoothed_cross_entropy(-v_col.T / temperature, label_smoothing=label_smoothing)
    loss = 0.5 * (jnp.mean(row) + jnp.mean(col))
    vs = jax.lax.stop_gradient(v)
    metrics = {
        "loss": loss,
        "temperature": jnp.asarray(temperature, jnp.float32),
        "volume/positive": jnp.mean(jnp.diagonal(vs)),
        "volume/negative": _offdiag_mean(vs),
        "accuracy/anchor_to_rest": _row_accuracy(vs, larger_is_better=False),
        "accuracy/rest_to_anchor": _row_accuracy(vs.T, larger_is_better=False),
    }
    return loss, metrics


def _gram_streamed(
    anchor, others, temperature, label_smoothing, gradient, volume_gradient, axis_name, impl,
    chunk_size,
):  # fmt: skip
    """:func:`gram_contrastive_loss` through :func:`gram_jax.distributed.pair_stats`."""
    _check_smoothing(label_smoothing)
    if gradient not in ("exact", "faithful"):
        raise ValueError(f"gradient must be 'exact' or 'faithful', got {gradient!r}")

    def score(a, o):
        return pairwise_volume(a, *o, gradient=volume_gradient)

    # z = -V / tau: scale = -1 / tau.
    row, col = pair_stats(
        score, anchor, tuple(others), -1.0 / temperature, axis_name=axis_name, impl=impl,
        chunk_size=chunk_size, faithful=gradient == "faithful",
    )  # fmt: skip
    g = _Global(anchor.shape[0], axis_name)
    loss = 0.5 * (g.sum(_ce(row, label_smoothing, g.n)) + g.sum(_ce(col, label_smoothing, g.n)))
    loss = loss / g.n
    tau = jax.lax.stop_gradient(jnp.asarray(temperature, jnp.float32))
    stats = jax.lax.stop_gradient({k: row[k] for k in ("pos", "tot")})
    metrics = {
        "loss": loss,
        "temperature": jnp.asarray(temperature, jnp.float32),
        "volume/positive": -tau * g.mean(stats["pos"]),
        "volume/negative": -tau * g.offdiag_mean(stats),
        "accuracy/anchor_to_rest": g.accuracy(row),
        "accuracy/rest_to_anchor": g.accuracy(col),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# InfoNCE / CLIP and SigLIP
# ---------------------------------------------------------------------------------------------


def _clip_pair(x: Array, y: Array, temperature, label_smoothing: float) -> tuple[Array, Array]:
    logits = jnp.matmul(x, y.T, precision=_HIGHEST) / temperature
    row = smoothed_cross_entropy(logits, label_smoothing=label_smoothing)
    col = smoothed_cross_entropy(logits.T, label_smoothing=label_smoothing)
    return 0.5 * (jnp.mean(row) + jnp.mean(col)), logits


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

    Embeddings are expected L2-normalised. ``axis_name`` / ``impl`` / ``chunk_size``: global
    batch on a mesh or single-device tiling (module docstring). Returns ``(loss, metrics)``.
    """
    others = _as_list(others)
    _check_square_batch(anchor, others)
    mods = [anchor, *others]
    if pairs == "anchored":
        index_pairs = [(0, m) for m in range(1, len(mods))]
    elif pairs == "all":
        index_pairs = [(a, b) for a in range(len(mods)) for b in range(a + 1, len(mods))]
    else:
        raise ValueError(f"pairs must be 'anchored' or 'all', got {pairs!r}")
    if _streamed(axis_name, chunk_size):
        return _infonce_streamed(
            mods, index_pairs, temperature, label_smoothing, axis_name, impl, chunk_size
        )
    losses, pos, neg, acc = [], [], [], []
    for a, b in index_pairs:
        loss_ab, logits = _clip_pair(mods[a], mods[b], temperature, label_smoothing)
        sim = jax.lax.stop_gradient(logits) * temperature
        losses.append(loss_ab)
        pos.append(jnp.mean(jnp.diagonal(sim)))
        neg.append(_offdiag_mean(sim))
        acc.append(_row_accuracy(sim))
    return _pairs_result(temperature, losses, pos, neg, acc)


def _pairs_result(temperature, losses, pos, neg, acc) -> tuple[Array, dict[str, Array]]:
    """Mean loss over the modality pairs and the metrics averaged alike."""
    loss = jnp.mean(jnp.stack(losses))
    metrics = {
        "loss": loss,
        "temperature": jnp.asarray(temperature, jnp.float32),
        "cosine/positive": jnp.mean(jnp.stack(pos)),
        "cosine/negative": jnp.mean(jnp.stack(neg)),
        "accuracy/anchor_to_rest": jnp.mean(jnp.stack(acc)),
    }
    return loss, metrics


def _infonce_streamed(mods, index_pairs, temperature, label_smoothing, axis_name, impl, chunk):
    """:func:`infonce_loss` through :func:`gram_jax.distributed.pair_stats`, pair by pair."""
    _check_smoothing(label_smoothing)
    g = _Global(mods[0].shape[0], axis_name)
    tau = jax.lax.stop_gradient(jnp.asarray(temperature, jnp.float32))
    losses, pos, neg, acc = [], [], [], []
    for a, b in index_pairs:
        row, col = pair_stats(
            _dot_score, mods[a], mods[b], 1.0 / temperature, axis_name=axis_name, impl=impl,
            chunk_size=chunk,
        )  # fmt: skip
        ce = g.sum(_ce(row, label_smoothing, g.n)) + g.sum(_ce(col, label_smoothing, g.n))
        losses.append(0.5 * ce / g.n)
        stats = jax.lax.stop_gradient({k: row[k] for k in ("pos", "tot")})
        pos.append(tau * g.mean(stats["pos"]))  # cosine = logit * tau
        neg.append(tau * g.offdiag_mean(stats))
        acc.append(g.accuracy(row))
    return _pairs_result(temperature, losses, pos, neg, acc)


def _siglip_pointwise(z: Array, is_positive: Array) -> Array:
    """``-log sigmoid(l z)`` with ``l = +1`` on positives and ``-1`` elsewhere."""
    return -jax.nn.log_sigmoid(jnp.where(is_positive, z, -z))


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
    ``axis_name`` / ``impl`` / ``chunk_size``: global batch on a mesh or single-device tiling
    (module docstring); SigLIP needs only row sums, so no statistic travels back in the ring.
    """
    ys = _as_list(y)
    _check_square_batch(x, ys)
    if _streamed(axis_name, chunk_size):
        g = _Global(x.shape[0], axis_name)
        losses, pos, neg = [], [], []
        for ym in ys:
            row, _ = pair_stats(
                _dot_score, x, ym, scale, bias, axis_name=axis_name, impl=impl,
                chunk_size=chunk_size, lse=False, pointwise=_siglip_pointwise, cols_stats=False,
            )  # fmt: skip
            losses.append(g.mean(row["pw"]))
            stats = jax.lax.stop_gradient(row)
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
    b = x.shape[0]
    labels = 2.0 * jnp.eye(b, dtype=x.dtype) - 1.0
    losses, pos, neg = [], [], []
    for ym in ys:
        z = scale * jnp.matmul(x, ym.T, precision=_HIGHEST) + bias
        losses.append(-jnp.sum(jax.nn.log_sigmoid(labels * z)) / b)
        zs = jax.lax.stop_gradient(z)
        pos.append(jnp.mean(jnp.diagonal(zs)))
        neg.append(_offdiag_mean(zs))
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
# CoMM
# ---------------------------------------------------------------------------------------------


def _l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


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
    (negatives from both views: intra-view negatives). Returns ``(loss, top-1 accuracy)``.
    ``axis_name`` / ``impl`` / ``chunk_size``: global batch on a mesh or single-device tiling
    (module docstring): the LSEs of ``S_ab`` (rows and columns), ``S_aa`` and ``S_bb`` (rows,
    diagonal masked) are streamed separately and combined with ``logaddexp``.
    """
    a, b = _l2_normalize(a), _l2_normalize(b)
    if _streamed(axis_name, chunk_size):
        kw = {"axis_name": axis_name, "impl": impl, "chunk_size": chunk_size}
        scale = 1.0 / temperature
        ab_row, ab_col = pair_stats(_dot_score, a, b, scale, **kw)
        aa, _ = pair_stats(_dot_score, a, a, scale, cols_stats=False, mask_diagonal=True, **kw)
        bb, _ = pair_stats(_dot_score, b, b, scale, cols_stats=False, mask_diagonal=True, **kw)
        g = _Global(a.shape[0], axis_name)
        lse_a = jnp.logaddexp(ab_row["lse"], aa["lse"])
        lse_b = jnp.logaddexp(ab_col["lse"], bb["lse"])
        loss = 0.5 * (g.mean(lse_a - ab_row["pos"]) + g.mean(lse_b - ab_col["pos"]))
        return loss, 0.5 * (g.accuracy(ab_row) + g.accuracy(ab_col))
    n = a.shape[0]
    s_ab = jnp.matmul(a, b.T, precision=_HIGHEST) / temperature
    # Self-similarities are removed with -inf (the authors subtract 1e8: same result).
    diag = jnp.eye(n, dtype=bool)
    s_aa = jnp.where(diag, -jnp.inf, jnp.matmul(a, a.T, precision=_HIGHEST) / temperature)
    s_bb = jnp.where(diag, -jnp.inf, jnp.matmul(b, b.T, precision=_HIGHEST) / temperature)
    pos = jnp.diagonal(s_ab)
    lse_a = jax.nn.logsumexp(jnp.concatenate([s_ab, s_aa], axis=1), axis=1)
    lse_b = jax.nn.logsumexp(jnp.concatenate([s_bb, s_ab.T], axis=1), axis=1)
    loss = 0.5 * (jnp.mean(lse_a - pos) + jnp.mean(lse_b - pos))
    s = jax.lax.stop_gradient(s_ab)
    acc = 0.5 * (_row_accuracy(s) + _row_accuracy(s.T))
    return loss, acc


def _check_two_views(view1, view2, what: str) -> None:
    """Two equally long (>= 2) sequences of same-shaped (B, d) embeddings, or a named error."""
    if len(view1) != len(view2) or len(view1) < 2:
        raise ValueError(
            f"view1 and view2 must hold the same number {what}; got {len(view1)} and {len(view2)}"
        )
    shapes = {jnp.shape(z) for z in (*view1, *view2)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every embedding must have the same shape (B, d), got {shapes}")


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
    ``chunk_size`` are passed to every :func:`nt_xent` (global batch on a mesh, or tiling).
    """
    _check_two_views(
        view1, view2, "(n + 1 >= 2) of embeddings: the n single-modality ones then the full one"
    )
    full1, full2 = view1[-1], view2[-1]
    kw = {"axis_name": axis_name, "impl": impl, "chunk_size": chunk_size}
    terms, metrics = [], {}
    for i in range(len(view1)):
        if i == len(view1) - 1:
            li, acc = nt_xent(full1, full2, temperature, **kw)
        else:
            l12, a12 = nt_xent(view1[i], full2, temperature, **kw)
            l21, a21 = nt_xent(view2[i], full1, temperature, **kw)
            li, acc = 0.5 * (l12 + l21), 0.5 * (a12 + a21)
        name = "full" if i == len(view1) - 1 else str(i)
        metrics[f"comm/loss_{name}"] = li
        metrics[f"comm/accuracy_{name}"] = acc
        terms.append(li)
    loss = jnp.mean(jnp.stack(terms))
    metrics["loss"] = loss
    metrics["temperature"] = jnp.asarray(temperature, jnp.float32)
    return loss, metrics


def cross_self_loss(
    view1: Sequence[Float[Array, "B d"]],
    view2: Sequence[Float[Array, "B d"]],
    temperature: float = 0.1,
    ssl_scale: float = 1.0,
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
    """
    _check_two_views(view1, view2, "(k >= 2) of per-modality embeddings")
    k = len(view1)
    cross, cross_acc = [], []
    for view in (view1, view2):
        for i in range(k):
            for j in range(i + 1, k):
                loss, acc = nt_xent(view[i], view[j], temperature)
                cross.append(loss)
                cross_acc.append(acc)
    pairs = [nt_xent(a, b, temperature) for a, b in zip(view1, view2, strict=True)]
    selfs, self_acc = [p[0] for p in pairs], [p[1] for p in pairs]
    l_cross = jnp.mean(jnp.stack(cross))
    l_self = jnp.mean(jnp.stack(selfs))
    loss = l_cross + ssl_scale * l_self
    metrics = {
        "loss": loss,
        "cross_self/loss_cross": l_cross,
        "cross_self/loss_self": l_self,
        "cross_self/accuracy_cross": jnp.mean(jnp.stack(cross_acc)),
        "cross_self/accuracy_self": jnp.mean(jnp.stack(self_acc)),
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
