"""Retrieval metrics: recall@k, median and mean rank, from score matrices or streamed in chunks.

Query i's positive is candidate i (row i of every modality is the same item).

**Rank and ties.** The rank of query i's positive is ``1 + #{j != i : s_ij beats s_ii}``, where
"beats" is strictly better plus, with ``ties="pessimistic"`` (default), equal. Exact ties occur
in real data (duplicate captions, empty subtitles); counting them against the positive gives the
conservative rank and does not depend on the sort order. ``ties="optimistic"`` counts only
strictly better candidates. (The authors sort with ``torch.sort``, whose tie order depends on the
device: their D->T numbers move by +-0.2 R@1 between rules on MSR-VTT.)

``R@k`` is the percentage of queries with rank <= k; ``MdR`` / ``MnR`` the median / mean rank.

**Non-finite values never score as hits.** Called on concrete arrays, :func:`positive_ranks`,
:func:`retrieval_metrics`, :func:`retrieval_scores` and :func:`chunked_retrieval` raise a
``ValueError`` naming the table and the rows when an input holds NaN or inf. Where that cannot
be checked (inside ``jit``) or a score overflows from finite inputs, one rule holds in the
dense and the chunked path alike: a non-finite score is worse than every finite score. A
query whose positive score is non-finite has the worst rank (every other candidate beats
it, whatever ``ties``), and a non-finite competitor beats no finite positive (and is never
in a top-k list ahead of a finite candidate).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gram_jax.volume import (
    _gemm,
    anchor_residual,
    candidate_gram,
    gram_det_block,
    safe_sqrt,
    span_basis,
    to_blocks,
    validate_pairwise_inputs,
)

__all__ = [
    "Ties",
    "ScoreKind",
    "positive_ranks",
    "metrics_from_ranks",
    "retrieval_metrics",
    "retrieval_scores",
    "chunked_retrieval",
    "check_finite_rows",
]

Ties = Literal["pessimistic", "optimistic"]
ScoreKind = Literal["volume", "span_distance", "cosine"]
RECALL_AT = (1, 5, 10)


def _check_ties(ties: str) -> None:
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")


def _check_bool(name: str, x) -> None:
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__} {x!r}")


def _check_count(name: str, x) -> None:
    """``x`` must be a Python / NumPy int >= 1 (not a bool, not a float)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= 1, got {type(x).__name__} {x!r}")
    if x < 1:
        raise ValueError(f"{name} must be >= 1, got {x}")


def _check_array(name: str, x) -> None:
    if not isinstance(x, (np.ndarray, jax.Array)):
        raise TypeError(
            f"{name} must be a NumPy or JAX array, got {type(x).__name__} "
            f"(convert nested lists with np.asarray(x, np.float32))"
        )


def check_finite_rows(name: str, x) -> None:
    """``ValueError`` naming ``name``, how many of its rows hold NaN or inf and the first
    ones, when ``x`` (N, ...) is concrete (under ``jit`` nothing can be raised; the ranking
    rule of the module docstring applies)."""
    if isinstance(x, jax.core.Tracer) or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        return
    bad = ~np.isfinite(np.asarray(x))
    if bad.any():
        rows = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))
        raise ValueError(
            f"{name}: NaN or infinite values in {rows.size} of {bad.shape[0]} rows "
            f"(first rows: {', '.join(map(str, rows[:5]))})"
        )


def _count_beating(
    block: Array, positive: Array, lower_is_better: bool, ties: Ties, valid: Array
) -> Array:
    """Per row: how many entries of ``block`` (R, C) where ``valid`` beat ``positive`` (R,).

    A non-finite positive is beaten by every valid entry; a non-finite entry beats no finite
    positive (module docstring).
    """
    p = positive[:, None]
    if lower_is_better:
        beats = block <= p if ties == "pessimistic" else block < p
    else:
        beats = block >= p if ties == "pessimistic" else block > p
    beats = jnp.where(jnp.isfinite(p), beats & jnp.isfinite(block), True)
    return jnp.sum(beats & valid, axis=1)


def positive_ranks(
    scores: Float[Array, "Q C"], lower_is_better: bool, ties: Ties = "pessimistic"
) -> Int[Array, " Q"]:
    """1-based rank of candidate i among row i of ``scores`` (Q <= C), tie rule as documented.

    Concrete scores with NaN / inf raise; under ``jit`` a non-finite score is a miss (module
    docstring).
    """
    _check_ties(ties)
    _check_bool("lower_is_better", lower_is_better)
    _check_array("scores", scores)
    scores = jnp.asarray(scores)
    if scores.ndim != 2 or scores.shape[0] > scores.shape[1] or scores.shape[0] == 0:
        raise ValueError(
            f"scores must be (Q, C) with 1 <= Q <= C (query i's positive is column i), "
            f"got shape {scores.shape}"
        )
    check_finite_rows("scores", scores)
    q, c = scores.shape
    pos = scores[jnp.arange(q), jnp.arange(q)]
    others = jnp.arange(c)[None, :] != jnp.arange(q)[:, None]
    return _count_beating(scores, pos, lower_is_better, ties, others) + 1


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
    if score in ("volume", "span_distance"):
        return True
    if score == "cosine":
        return False
    raise ValueError(f"score must be 'volume', 'span_distance' or 'cosine', got {score!r}")


def _candidate_terms(score: ScoreKind, others: Sequence[Array]):
    """The per-candidate terms that ``score`` needs (computed once per candidate)."""
    if score == "cosine":
        return others[0]
    if score == "span_distance":
        return span_basis(*others)
    cand = candidate_gram(*others)
    return cand.basis, cand.det


def _block_scores(score: ScoreKind, anchor: Array, terms) -> Array:
    """(R, C) scores of anchor rows against a block of candidates' terms.

    The one score kernel of both :func:`retrieval_scores` (one block) and
    :func:`chunked_retrieval`, so a pair (and a duplicated item) scores bit for bit alike in
    both. The volume and span distance are those of :mod:`gram_jax.volume`.
    """
    if score == "cosine":
        return _gemm(anchor, terms)
    if score == "span_distance":
        return safe_sqrt(anchor_residual(anchor, terms))
    return safe_sqrt(gram_det_block(anchor, *terms))


def _check_tables(anchor, others) -> None:
    _check_array("anchor", anchor)
    for m, x in enumerate(others):
        _check_array(f"others[{m}]", x)
    validate_pairwise_inputs(anchor, others)
    check_finite_rows("anchor", anchor)
    for m, x in enumerate(others):
        check_finite_rows(f"others[{m}]", x)


def retrieval_scores(
    anchor: Float[Array, "B1 D"], *others: Float[Array, "B2 D"], score: ScoreKind = "volume"
) -> Float[Array, "B1 B2"]:
    """Dense (B1, B2) scores of anchor i against candidate j.

    ``volume``: :func:`~gram_jax.volume.pairwise_volume` (lower is better); ``span_distance``:
    :func:`~gram_jax.volume.span_distance` (lower is better); ``cosine``: anchor .
    ``others[0]`` (higher is better; the other modalities are ignored).
    """
    _check_tables(anchor, others)
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
      score: ``"volume"``, ``"span_distance"`` or ``"cosine"`` (cosine uses ``others[0]``).
      direction: ``"anchor_to_rest"`` ranks candidates (others) for each anchor;
        ``"rest_to_anchor"`` ranks anchors for each candidate.
      chunk_size: block size (an int >= 1; clamped to N).
      top_k: how many best candidates to return per query (an int >= 1; clamped to N).
      ties: the tie rule (module docstring).

    Returns:
      ``(ranks, topk_indices)``: (N,) 1-based ranks, (N, top_k) candidate indices, best first.
    """
    _check_tables(anchor, others)
    _check_ties(ties)
    _check_count("chunk_size", chunk_size)
    _check_count("top_k", top_k)
    lower = _lower_is_better(score)
    n = anchor.shape[0]
    if others[0].shape[0] != n:
        raise ValueError(f"anchor has {n} rows but the candidates have {others[0].shape[0]}")
    if direction not in ("anchor_to_rest", "rest_to_anchor"):
        raise ValueError(f"direction must be 'anchor_to_rest' or 'rest_to_anchor': {direction!r}")
    chunk = int(min(chunk_size, n))
    top_k = int(min(top_k, n))
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
            real = v_blocks[ki][None, :]
            idx = ki * chunk + jnp.arange(chunk)
            # The positive is left out of the count explicitly: XLA may fuse the diagonal block
            # differently from this one, so its score can differ in the last bit.
            is_self = idx[None, :] == (qi * chunk + jnp.arange(chunk))[:, None]
            count = count + _count_beating(s, positive, lower, ties, real & ~is_self)
            # Padding and non-finite scores go to the end of the top-k lists.
            s = jnp.where(real & jnp.isfinite(s), s, worst)
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
