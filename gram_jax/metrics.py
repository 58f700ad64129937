"""Retrieval metrics: recall@k, median and mean rank, from score matrices or streamed in chunks.

Query i's positive is candidate i (row i of every modality is the same item).

**Rank and ties.** The rank of query i's positive is ``1 + #{j != i : s_ij beats s_ii}``, where
"beats" is strictly better plus, with ``ties="pessimistic"`` (default), equal. Exact ties occur
in real data (duplicate captions, empty subtitles); counting them against the positive gives the
conservative rank and does not depend on the sort order. ``ties="optimistic"`` counts only
strictly better candidates. (The authors sort with ``torch.sort``, whose tie order depends on the
device: their D->T numbers move by +-0.2 R@1 between rules on MSR-VTT.)

``R@k`` is the percentage of queries with rank <= k; ``MdR`` / ``MnR`` the median / mean rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gram_jax.scores import get_score
from gram_jax.volume import to_blocks, validate_pairwise_inputs

__all__ = [
    "Ties",
    "ScoreKind",
    "positive_ranks",
    "metrics_from_ranks",
    "retrieval_metrics",
    "retrieval_scores",
    "chunked_retrieval",
]

Ties = Literal["pessimistic", "optimistic"]
ScoreKind = Literal["volume", "span_distance", "cosine", "simplex", "symile"]  # scores.SCORES
RECALL_AT = (1, 5, 10)


def _check_ties(ties: str) -> None:
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")


def _count_beating(block: Array, positive: Array, lower_is_better: bool, ties: Ties) -> Array:
    """Per row: how many entries of ``block`` (R, C) beat ``positive`` (R,)."""
    p = positive[:, None]
    if lower_is_better:
        beats = block <= p if ties == "pessimistic" else block < p
    else:
        beats = block >= p if ties == "pessimistic" else block > p
    return jnp.sum(beats, axis=1)


def positive_ranks(
    scores: Float[Array, "Q C"], lower_is_better: bool, ties: Ties = "pessimistic"
) -> Int[Array, " Q"]:
    """1-based rank of candidate i among row i of ``scores`` (Q <= C), tie rule as documented."""
    _check_ties(ties)
    scores = jnp.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] > scores.shape[1] or scores.shape[0] == 0:
        raise ValueError(
            f"scores must be (Q, C) with 1 <= Q <= C (query i's positive is column i), "
            f"got shape {scores.shape}"
        )
    if jnp.issubdtype(scores.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(scores))):
        raise ValueError("scores contain NaN or infinite values")
    q = scores.shape[0]
    pos = scores[jnp.arange(q), jnp.arange(q)]
    n = _count_beating(scores, pos, lower_is_better, ties)
    # The positive itself always satisfies "<=": it is rank 1 + (others that beat it).
    return n + (1 if ties == "optimistic" else 0)


def metrics_from_ranks(ranks) -> dict[str, float]:
    """``R@1``, ``R@5``, ``R@10`` (percent), ``MdR`` and ``MnR`` from 1-based ranks."""
    r = np.asarray(ranks)
    if r.size == 0:
        raise ValueError("no ranks: the query set is empty")
    out = {f"R@{k}": float(100.0 * np.mean(r <= k)) for k in RECALL_AT}
    out["MdR"] = float(np.median(r))
    out["MnR"] = float(np.mean(r))
    return out


def retrieval_metrics(
    scores: Float[Array, "Q C"], lower_is_better: bool, ties: Ties = "pessimistic"
) -> dict[str, float]:
    """Retrieval metrics of a score matrix whose row i's positive is column i.

    Returns ``{"R@1", "R@5", "R@10"}`` in percent and ``{"MdR", "MnR"}``. Use
    ``lower_is_better=True`` for volumes and distances, ``False`` for cosine similarities.
    """
    return metrics_from_ranks(positive_ranks(scores, lower_is_better, ties))


# ---------------------------------------------------------------------------------------------
# Score functions over embedding tables
# ---------------------------------------------------------------------------------------------


def _lower_is_better(score: ScoreKind) -> bool:
    return get_score(score).lower_is_better


def _candidate_terms(score: ScoreKind, others: Sequence[Array]):
    """The per-candidate terms that ``score`` needs (computed once per candidate)."""
    return get_score(score).terms(list(others))


def _block_scores(score: ScoreKind, anchor: Array, terms) -> Array:
    """(R, C) scores of anchor rows against a block of candidates' terms.

    The one score kernel of both :func:`retrieval_scores` (one block) and
    :func:`chunked_retrieval`, so a pair (and a duplicated item) scores bit for bit alike in
    both: the block function of the score table :data:`gram_jax.scores.SCORES`.
    """
    return get_score(score).block(anchor, terms)


def retrieval_scores(
    anchor: Float[Array, "B1 D"], *others: Float[Array, "B2 D"], score: ScoreKind = "volume"
) -> Float[Array, "B1 B2"]:
    """Dense (B1, B2) scores of anchor i against candidate j.

    ``volume``: :func:`~gram_jax.volume.pairwise_volume` (lower is better); ``span_distance``:
    :func:`~gram_jax.volume.span_distance` (lower is better); ``cosine``: anchor .
    ``others[0]`` (higher is better; the other modalities are ignored).
    """
    validate_pairwise_inputs(anchor, others)
    _lower_is_better(score)
    return _block_scores(score, anchor, _candidate_terms(score, others))


def chunked_retrieval(
    anchor: Float[Array, "N D"],
    *others: Float[Array, "N D"],
    score: ScoreKind = "volume",
    direction: Literal["anchor_to_rest", "rest_to_anchor"] = "anchor_to_rest",
    chunk_size: int = 1024,
    top_k: int = 10,
    ties: Ties = "pessimistic",
) -> tuple[Int[Array, " N"], Int[Array, "N top_k"]]:
    """Positive ranks and top-k lists without materialising the N x N score matrix.

    Scores are evaluated in (chunk, chunk) blocks; per query, a running count of candidates
    that beat the positive gives its exact rank, and a running ``top_k`` merge gives its best
    candidates. Memory is O(chunk^2 + N top_k), so 100k x 100k tables fit. Every block has the
    same shape (the tables are padded), so the positive's score is computed by the same kernel
    as its competitors and ties are decided consistently.

    Args:
      anchor, *others: the embedding tables; row i of each is item i.
      score: a name of :data:`gram_jax.scores.SCORES` (``"volume"``, ``"span_distance"``,
        ``"cosine"`` (uses ``others[0]``), ``"simplex"``, ``"symile"``).
      direction: ``"anchor_to_rest"`` ranks candidates (others) for each anchor;
        ``"rest_to_anchor"`` ranks anchors for each candidate.
      chunk_size: block size.
      top_k: how many best candidates to return per query.

    Returns:
      ``(ranks, topk_indices)``: (N,) 1-based ranks, (N, top_k) candidate indices, best first.
    """
    validate_pairwise_inputs(anchor, others)
    _check_ties(ties)
    lower = _lower_is_better(score)
    n = anchor.shape[0]
    if others[0].shape[0] != n:
        raise ValueError(f"anchor has {n} rows but the candidates have {others[0].shape[0]}")
    if direction not in ("anchor_to_rest", "rest_to_anchor"):
        raise ValueError(f"direction must be 'anchor_to_rest' or 'rest_to_anchor': {direction!r}")
    chunk = max(1, min(chunk_size, n))
    top_k = min(top_k, n)
    worst = jnp.inf if lower else -jnp.inf

    # Padding rows are zero vectors (a zero candidate has zero basis vectors and det 0) and are
    # masked out of every count below.
    a_blocks, n_chunks = to_blocks(anchor, chunk)
    c_blocks, _ = to_blocks(_candidate_terms(score, others), chunk)
    v_blocks, _ = to_blocks(jnp.ones(n, bool), chunk)

    def block(ai, ci):
        """Scores oriented as (queries, candidates) for anchor block ai x candidate block ci."""
        s = _block_scores(score, a_blocks[ai], jax.tree.map(lambda t: t[ci], c_blocks))
        if direction == "rest_to_anchor":
            s = s.T
        return s

    def query_pass(qi):
        # Queries are anchor block qi (anchor_to_rest) or candidate block qi (rest_to_anchor).
        diag = block(qi, qi)
        positive = jnp.diagonal(diag)

        def step(carry, ki):
            count, best_s, best_i = carry
            s = block(qi, ki) if direction == "anchor_to_rest" else block(ki, qi)
            s = jnp.where(v_blocks[ki][None, :], s, worst)
            idx = ki * chunk + jnp.arange(chunk)
            # The positive is left out of the count explicitly: XLA may fuse the diagonal block
            # differently from this one, so its score can differ in the last bit.
            is_self = idx[None, :] == (qi * chunk + jnp.arange(chunk))[:, None]
            count = count + _count_beating(jnp.where(is_self, worst, s), positive, lower, ties)
            all_s = jnp.concatenate([best_s, s], axis=1)
            all_i = jnp.concatenate([best_i, jnp.broadcast_to(idx, s.shape)], axis=1)
            _, sel = jax.lax.top_k(-all_s if lower else all_s, top_k)
            best_s = jnp.take_along_axis(all_s, sel, axis=1)
            best_i = jnp.take_along_axis(all_i, sel, axis=1)
            return (count, best_s, best_i), None

        init = (
            jnp.zeros(chunk, jnp.int32),
            jnp.full((chunk, top_k), worst, positive.dtype),
            jnp.zeros((chunk, top_k), jnp.int32),
        )
        (count, _, best_i), _ = jax.lax.scan(step, init, jnp.arange(n_chunks))
        return count + 1, best_i

    ranks, top = jax.lax.map(query_pass, jnp.arange(n_chunks))
    return ranks.reshape(-1)[:n], top.reshape(-1, top_k)[:n]
