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

import functools
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
    "check_finite_rows",
]

Ties = Literal["pessimistic", "optimistic"]
ScoreKind = str  # a name of gram_jax.scores.SCORES (register_score adds one)
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
    block: Array,
    positive: Array,
    lower_is_better: bool,
    pessimistic: bool | Array,
    valid: Array,
    weight=1,
) -> Array:
    """Per row: how many entries of ``block`` (R, C) where ``valid`` beat ``positive`` (R,),
    each counted ``weight`` (broadcast to (R, C)) times.

    ``pessimistic`` (a bool, or a traced bool scalar so that one compiled retrieval serves both
    tie rules) counts equal entries as beating. A non-finite positive is beaten by every valid
    entry; a non-finite entry beats no finite positive (module docstring).
    """
    p = positive[:, None]
    better = block < p if lower_is_better else block > p
    beats = better | (pessimistic & (block == p))
    beats = jnp.where(jnp.isfinite(p), beats & jnp.isfinite(block), True)
    return jnp.sum(jnp.where(beats & valid, weight, 0), axis=1)


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
    return _count_beating(scores, pos, lower_is_better, ties == "pessimistic", others) + 1


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
    :func:`chunked_retrieval`: the block function of the score table
    :data:`gram_jax.scores.SCORES` (the volume on :func:`~gram_jax.volume.pow2_rows`-scaled
    rows, so huge inputs do not overflow). A duplicated item scores bit for bit alike in both
    (distinct rows are scored once). The volume scores rescore each row's nearest candidate
    of a block per item, so a chunked run can rescore pairs a dense one leaves in the
    dot-product form; a query's positive, when it is its nearest, is rescored in both.
    """
    return get_score(score).block(anchor, terms)


def _check_tables(anchor, others) -> None:
    _check_array("anchor", anchor)
    for m, x in enumerate(others):
        _check_array(f"others[{m}]", x)
    validate_pairwise_inputs(anchor, others)
    check_finite_rows("anchor", anchor)
    for m, x in enumerate(others):
        check_finite_rows(f"others[{m}]", x)


def _distinct_rows(x) -> tuple[np.ndarray, np.ndarray]:
    """``(first, inverse)``: index of each distinct row's first occurrence, and per row the
    number of its distinct row (``x[first][inverse] == x``, bit for bit). Distinct rows are
    compared as bytes, so only identical rows merge."""
    x = np.ascontiguousarray(np.asarray(x).reshape(len(x), -1))
    keys = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))


def retrieval_scores(
    anchor: Float[Array, "B1 D"], *others: Float[Array, "B2 D"], score: ScoreKind = "volume"
) -> Float[Array, "B1 B2"]:
    """Dense (B1, B2) scores of anchor i against candidate j.

    ``volume``: :func:`~gram_jax.volume.pairwise_volume` (lower is better); ``span_distance``:
    :func:`~gram_jax.volume.span_distance` (lower is better); ``cosine``: anchor .
    ``others[0]`` (higher is better; the other modalities are ignored).

    **Duplicates score bit for bit alike.** A GEMM's rounding of one output can depend on its
    position in the kernel's tiles, so identical rows at different positions could differ in
    the last bit and a tie rule would count them differently. On concrete inputs the scores
    are computed once per distinct anchor row and distinct candidate tuple and gathered.
    Under ``jit`` (tracers: no ``np.unique``) every row is scored where it stands.
    """
    _check_tables(anchor, others)
    _lower_is_better(score)
    if _concrete(anchor, others):
        fa, ia = _distinct_rows(anchor)
        fc, ic = _distinct_rows(np.concatenate([np.asarray(x) for x in others], axis=1))
        s = _block_scores(score, anchor[fa], _candidate_terms(score, [x[fc] for x in others]))
        return s[ia][:, ic]
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
    candidates. Memory is O(chunk^2 + N top_k), so 100k x 100k tables fit.

    **Duplicates.** On concrete inputs the blocks run over distinct anchor rows and distinct
    candidate tuples only (as :func:`retrieval_scores`): a competitor that is a copy of the
    query's own positive is not scored again but counted as the exact tie it is (weight =
    its number of copies), and every other competitor is scored once, so copies are counted
    alike by both tie rules whatever their positions. Under ``jit`` every row is its own
    distinct row (each item is scored where it stands).

    Args:
      anchor, *others: the embedding tables; row i of each is item i.
      score: a name of :data:`gram_jax.scores.SCORES` (``"volume"``, ``"span_distance"``,
        ``"cosine"`` (uses ``others[0]``), ``"simplex"``, ``"symile"``).
      direction: ``"anchor_to_rest"`` ranks candidates (others) for each anchor;
        ``"rest_to_anchor"`` ranks anchors for each candidate.
      chunk_size: block size (an int >= 1; clamped to N).
      top_k: how many best candidates to return per query (an int >= 1; clamped to N).
      ties: the tie rule (module docstring).

    Returns:
      ``(ranks, topk_indices)``: (N,) 1-based ranks, (N, top_k) candidate indices, best first
      (copies of one candidate in ascending order).
    """
    _check_tables(anchor, others)
    _check_ties(ties)
    _check_count("chunk_size", chunk_size)
    _check_count("top_k", top_k)
    _lower_is_better(score)
    n = anchor.shape[0]
    if others[0].shape[0] != n:
        raise ValueError(f"anchor has {n} rows but the candidates have {others[0].shape[0]}")
    if direction not in ("anchor_to_rest", "rest_to_anchor"):
        raise ValueError(f"direction must be 'anchor_to_rest' or 'rest_to_anchor': {direction!r}")
    top_k = int(min(top_k, n))
    if not _concrete(anchor, others):
        ident = jnp.arange(n)
        return _ranks_of_distinct(
            anchor,
            list(others),
            ident,
            ident,
            jnp.ones(n, jnp.int32),
            jnp.asarray(ties == "pessimistic"),
            score=score,
            direction=direction,
            chunk=int(min(chunk_size, n)),
            top_k=top_k,
        )
    fa, ia = _distinct_rows(anchor)
    fc, ic = _distinct_rows(np.concatenate([np.asarray(x) for x in others], axis=1))
    fp, ip = _distinct_rows(np.stack([ia, ic], axis=1))  # distinct (anchor, candidate) items
    comp = ic if direction == "anchor_to_rest" else ia  # the competitors' distinct ids
    weights = np.bincount(comp)
    ranks, top = _ranks_of_distinct(
        jnp.asarray(anchor)[fa],
        [jnp.asarray(x)[fc] for x in others],
        jnp.asarray(ia[fp]),
        jnp.asarray(ic[fp]),
        jnp.asarray(weights, jnp.int32),
        jnp.asarray(ties == "pessimistic"),
        score=score,
        direction=direction,
        chunk=int(min(chunk_size, len(weights), len(fp))),
        top_k=int(min(top_k, len(weights))),
    )
    # Expand the distinct competitors of each list into their items, ascending per copy set.
    order = np.argsort(comp, kind="stable")
    starts = np.concatenate([[0], np.cumsum(weights)[:-1]])
    top = np.asarray(top)  # (P, t)
    offs = np.arange(top_k)
    slot = starts[top][:, :, None] + offs  # (P, t, top_k) candidate positions in `order`
    ok = offs < weights[top][:, :, None]
    items = np.where(ok, order[np.minimum(slot, n - 1)], -1).reshape(len(top), -1)
    keep = np.argsort(~ok.reshape(len(top), -1), axis=1, kind="stable")[:, :top_k]
    items = np.take_along_axis(items, keep, axis=1)
    return jnp.asarray(np.asarray(ranks)[ip]), jnp.asarray(items[ip].astype(np.int32))


@functools.partial(jax.jit, static_argnames=("score", "direction", "chunk", "top_k"))
def _ranks_of_distinct(
    anchor, others, q_a, q_c, weights, pessimistic, *, score, direction, chunk, top_k
):
    """Ranks and top-k over distinct rows: queries are (anchor id, candidate id) pairs
    ``(q_a, q_c)``; competitors the distinct candidates (``anchor_to_rest``) or anchors
    (``rest_to_anchor``), each standing for ``weights`` items. The competitor that is the
    query's own id ties exactly with the positive: it is left out of the comparisons and its
    ``weight - 1`` copies counted by the tie rule. ``pessimistic`` is that rule as a traced
    bool, so one compilation serves both rules."""
    lower = _lower_is_better(score)
    worst = jnp.inf if lower else -jnp.inf
    terms = _candidate_terms(score, others)
    n_q = q_a.shape[0]
    comps = terms if direction == "anchor_to_rest" else anchor
    n_c = weights.shape[0]
    q_blocks, n_qb = to_blocks((anchor[q_a], jax.tree.map(lambda t: t[q_c], terms)), chunk)
    own = q_c if direction == "anchor_to_rest" else q_a
    own_blocks, _ = to_blocks(own, chunk)
    c_blocks, n_cb = to_blocks(comps, chunk)
    w_blocks, _ = to_blocks(weights, chunk)  # padding: weight 0

    def query_pass(qb):
        (q_anchor, q_terms), own_id = qb
        positive = jnp.diagonal(_block_scores(score, q_anchor, q_terms))
        # The positive's other copies tie with it exactly (same distinct row): counted by rule.
        same = jnp.where(jnp.isfinite(positive), pessimistic, True)
        copies = jnp.take(weights, own_id, mode="clip") - 1

        def step(carry, ki):
            count, best_s, best_i = carry
            cb = jax.tree.map(lambda t: t[ki], c_blocks)
            if direction == "anchor_to_rest":
                s = _block_scores(score, q_anchor, cb)
            else:
                s = _block_scores(score, cb, q_terms).T
            idx = ki * chunk + jnp.arange(chunk)
            w = w_blocks[ki][None, :]
            valid = (w > 0) & (idx[None, :] != own_id[:, None])
            count = count + _count_beating(s, positive, lower, pessimistic, valid, w)
            s = jnp.where((w > 0) & jnp.isfinite(s), s, worst)
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
        (count, _, best_i), _ = jax.lax.scan(step, init, jnp.arange(n_cb))
        return count + jnp.where(same, copies, 0) + 1, best_i

    del n_c, n_qb
    ranks, top = jax.lax.map(query_pass, (q_blocks, own_blocks))
    return ranks.reshape(-1)[:n_q], top.reshape(-1, top_k)[:n_q]
