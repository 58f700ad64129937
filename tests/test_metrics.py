"""Tests of gram_jax.metrics: tie rules, the authors' MSR-VTT numbers, chunked == dense."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gram_jax.metrics import (
    chunked_retrieval,
    metrics_from_ranks,
    positive_ranks,
    retrieval_metrics,
    retrieval_scores,
)


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def rounded(m: dict[str, float]) -> tuple[float, float, float]:
    return tuple(round(m[k], 1) for k in ("R@1", "R@5", "R@10"))


# ---------------------------------------------------------------------------------------------
# Ranks and tie rules on a hand-made matrix
# ---------------------------------------------------------------------------------------------

# Higher is better. Row i's positive is column i.
TIES = np.array(
    [
        [0.9, 0.9, 0.1, 0.5, 0.9],  # positive tied with two others, nothing strictly better
        [0.2, 0.5, 0.7, 0.5, 0.1],  # one strictly better, one tie
        [0.0, 0.0, 0.3, 0.1, 0.2],  # clear winner
        [1.0, 1.0, 1.0, 1.0, 1.0],  # everything tied
    ],
    np.float32,
)
PESSIMISTIC = [3, 3, 1, 5]  # 1 + #(better or equal, positive excluded)
OPTIMISTIC = [1, 2, 1, 1]  # 1 + #(strictly better)


def test_tie_rules_on_hand_made_matrix():
    np.testing.assert_array_equal(positive_ranks(TIES, lower_is_better=False), PESSIMISTIC)
    np.testing.assert_array_equal(
        positive_ranks(TIES, lower_is_better=False, ties="optimistic"), OPTIMISTIC
    )
    # Distances: the same ranks on the negated matrix.
    np.testing.assert_array_equal(positive_ranks(-TIES, lower_is_better=True), PESSIMISTIC)
    np.testing.assert_array_equal(
        positive_ranks(-TIES, lower_is_better=True, ties="optimistic"), OPTIMISTIC
    )
    # Integer scores work too.
    np.testing.assert_array_equal(
        positive_ranks((TIES * 10).astype(np.int32), lower_is_better=False), PESSIMISTIC
    )


def test_metrics_of_hand_made_matrix():
    pess = retrieval_metrics(TIES, lower_is_better=False)
    assert pess == pytest.approx({"R@1": 25.0, "R@5": 100.0, "R@10": 100.0, "MdR": 3.0, "MnR": 3.0})
    opt = retrieval_metrics(TIES, lower_is_better=False, ties="optimistic")
    assert opt == pytest.approx({"R@1": 75.0, "R@5": 100.0, "R@10": 100.0, "MdR": 1.0, "MnR": 1.25})


def test_metrics_from_ranks():
    m = metrics_from_ranks([1, 2, 6, 11, 30])
    assert m == pytest.approx({"R@1": 20.0, "R@5": 40.0, "R@10": 60.0, "MdR": 6.0, "MnR": 10.0})
    with pytest.raises(ValueError, match="empty"):
        metrics_from_ranks([])


def test_rank_input_errors():
    with pytest.raises(ValueError, match=r"\(Q, C\)"):
        positive_ranks(np.zeros((5, 3), np.float32), lower_is_better=True)
    with pytest.raises(ValueError, match=r"\(Q, C\)"):
        positive_ranks(np.zeros(4, np.float32), lower_is_better=True)
    with pytest.raises(ValueError, match=r"\(Q, C\)"):
        positive_ranks(np.zeros((0, 3), np.float32), lower_is_better=True)
    bad = TIES.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(bad, lower_is_better=False)
    with pytest.raises(ValueError, match="ties must be"):
        positive_ranks(TIES, lower_is_better=False, ties="random")


# ---------------------------------------------------------------------------------------------
# The authors' logged MSR-VTT numbers, from their saved embeddings
# ---------------------------------------------------------------------------------------------

LOGGED = {  # fixtures/README.md: text -> candidates, candidates -> text (R@1/5/10)
    0: ((24.1, 43.1, 50.6), (33.3, 64.7, 75.1)),
    849: ((40.0, 65.8, 75.0), (38.5, 67.5, 77.3)),
}


def _msrvtt(fixtures_dir, step):
    d = np.load(fixtures_dir / f"msrvtt884_gram_step{step}.npz")
    return [d[k] for k in ("text", "video", "audio", "subtitles")]


@pytest.mark.parametrize("step", [0, 849])
def test_msrvtt_volume_retrieval_matches_authors_logs(fixtures_dir, step):
    t, v, a, s = _msrvtt(fixtures_dir, step)
    assert t.shape == (884, 512)
    scores = retrieval_scores(t, v, a, s)
    t2d, d2t = LOGGED[step]
    assert rounded(retrieval_metrics(scores, lower_is_better=True)) == t2d
    assert rounded(retrieval_metrics(scores, lower_is_better=True, ties="optimistic")) == t2d
    # Candidates -> text has exact ties (duplicate captions): the authors' torch.sort order
    # falls between our two documented rules.
    pess = retrieval_metrics(scores.T, lower_is_better=True)
    opt = retrieval_metrics(scores.T, lower_is_better=True, ties="optimistic")
    for r, k in enumerate(("R@1", "R@5", "R@10")):
        assert round(pess[k], 1) <= d2t[r] <= round(opt[k], 1), k
    assert round(pess["R@1"], 1) < round(opt["R@1"], 1)  # the ties are really there


def test_msrvtt_step0_span_distance_and_cosine(fixtures_dir):
    t, v, a, s = _msrvtt(fixtures_dir, 0)
    vol = retrieval_metrics(retrieval_scores(t, v, a, s), lower_is_better=True)
    assert vol["MdR"] == 10.0 and round(vol["MnR"], 1) == 53.0
    span = retrieval_metrics(retrieval_scores(t, v, a, s, score="span_distance"), True)
    assert round(span["R@1"], 1) == 43.6  # the hubness-free score (docs/design.md section 2)
    cos = retrieval_metrics(retrieval_scores(t, v, a, s, score="cosine"), lower_is_better=False)
    assert rounded(cos) == (44.9, 72.4, 82.5)


def test_msrvtt_chunked_equals_dense(fixtures_dir):
    t, v, a, s = _msrvtt(fixtures_dir, 849)
    dense = np.asarray(positive_ranks(retrieval_scores(t, v, a, s), lower_is_better=True))
    ranks, top = chunked_retrieval(t, v, a, s, chunk_size=300, top_k=5)
    np.testing.assert_array_equal(np.asarray(ranks), dense)
    assert rounded(metrics_from_ranks(ranks)) == LOGGED[849][0]
    # The top-1 of each query is its best candidate; rank 1 <=> top-1 is the positive.
    top = np.asarray(top)
    np.testing.assert_array_equal(top[:, 0] == np.arange(884), dense == 1)


# ---------------------------------------------------------------------------------------------
# Chunked retrieval == dense, on random tables and with ties
# ---------------------------------------------------------------------------------------------


def _dense(score, direction, tables, ties="pessimistic"):
    s = np.asarray(retrieval_scores(*tables, score=score))
    s = s if direction == "anchor_to_rest" else s.T
    lower = score != "cosine"
    return np.asarray(positive_ranks(s, lower_is_better=lower, ties=ties)), s, lower


@pytest.mark.parametrize("direction", ["anchor_to_rest", "rest_to_anchor"])
@pytest.mark.parametrize("score", ["volume", "span_distance", "cosine"])
def test_chunked_retrieval_equals_dense(score, direction):
    rng = np.random.default_rng(0)
    tables = [unit_rows(rng, 37, 16) for _ in range(3)]
    dense_ranks, s, lower = _dense(score, direction, tables)
    ranks, top = chunked_retrieval(*tables, score=score, direction=direction, chunk_size=8, top_k=4)
    np.testing.assert_array_equal(np.asarray(ranks), dense_ranks)
    order = np.argsort(s if lower else -s, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(np.asarray(top), order)


def test_chunked_retrieval_tie_rules_match_dense():
    """Duplicated items give exact ties in both directions; both paths must count them alike."""
    rng = np.random.default_rng(1)
    t, v, a = (unit_rows(rng, 21, 8) for _ in range(3))
    for src, dst in ((0, 5), (3, 17), (3, 11)):
        t[dst], v[dst], a[dst] = t[src], v[src], a[src]
    a[9] = a[2]  # a duplicated row of one modality only
    ranks = {}
    for ties in ("pessimistic", "optimistic"):
        for direction in ("anchor_to_rest", "rest_to_anchor"):
            dense_ranks, _, _ = _dense("volume", direction, (t, v, a), ties)
            got, _ = chunked_retrieval(
                t, v, a, direction=direction, chunk_size=4, top_k=3, ties=ties
            )
            np.testing.assert_array_equal(np.asarray(got), dense_ranks, err_msg=direction)
            ranks[ties, direction] = np.asarray(got)
    for direction in ("anchor_to_rest", "rest_to_anchor"):
        pess, opt = ranks["pessimistic", direction], ranks["optimistic", direction]
        assert np.all(pess >= opt)
        assert pess[5] > opt[5]  # item 5 ties with item 0


def test_chunked_retrieval_errors():
    rng = np.random.default_rng(0)
    t, v = unit_rows(rng, 6, 4), unit_rows(rng, 6, 4)
    with pytest.raises(ValueError, match="rows"):
        chunked_retrieval(t, v[:5])
    with pytest.raises(ValueError, match="direction"):
        chunked_retrieval(t, v, direction="both")
    with pytest.raises(ValueError, match="unknown score"):
        chunked_retrieval(t, v, score="dot")
    with pytest.raises(ValueError, match="unknown score"):
        retrieval_scores(t, v, score="dot")
    with pytest.raises(ValueError, match="k >= 2"):
        chunked_retrieval(t)


def test_retrieval_scores_are_jittable():
    rng = np.random.default_rng(2)
    t, v, a = (unit_rows(rng, 9, 8) for _ in range(3))
    for score in ("volume", "span_distance", "cosine"):
        eager = np.asarray(retrieval_scores(t, v, a, score=score))
        jitted = jax.jit(lambda *x, sc=score: retrieval_scores(*x, score=sc))(t, v, a)
        np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("n", "chunks"),
    # The second size repeats the edges' cases with two padded blocks: slow (.ci/run runs it).
    [(21, (3, 4, 7)), pytest.param(37, (4, 7), marks=pytest.mark.slow)],
)
def test_duplicates_on_block_edges_score_bitwise_alike(n, chunks):
    """Identical items at positions on different block edges (first / last row of a block,
    the padded last block) must get bit-identical scores, so both tie rules count them alike
    in the dense and every chunked evaluation."""
    rng = np.random.default_rng(3)
    t, v, a = (unit_rows(rng, n, 8) for _ in range(3))
    copies = [0, 3, 6, 7, 13, n - 1]  # block starts and ends for chunk 3, 4 and 7
    for dst in copies[1:]:
        t[dst], v[dst], a[dst] = t[0], v[0], a[0]
    s = np.asarray(retrieval_scores(t, v, a))
    for i in copies:  # row i against every copy j, and the copies' columns against row i
        assert len({s[i, j].tobytes() for j in copies}) == 1
        np.testing.assert_array_equal(s[copies[0]], s[i])
        np.testing.assert_array_equal(s[:, copies[0]], s[:, i])
    for ties in ("pessimistic", "optimistic"):
        for direction in ("anchor_to_rest", "rest_to_anchor"):
            dense = np.asarray(
                positive_ranks(s if direction == "anchor_to_rest" else s.T, True, ties)
            )
            assert len(set(dense[copies])) == 1  # the copies rank alike
            for chunk in chunks:
                got, _ = chunked_retrieval(
                    t, v, a, direction=direction, chunk_size=chunk, top_k=2, ties=ties
                )
                np.testing.assert_array_equal(
                    np.asarray(got), dense, err_msg=f"{direction} {chunk}"
                )


def test_non_finite_scores_rank_as_misses_in_dense_and_chunked():
    """Under jit nothing can raise: a NaN positive ranks last, a NaN competitor beats nothing,
    padding never counts, in both paths (module docstring of gram_jax.metrics)."""
    rng = np.random.default_rng(4)
    t, v = unit_rows(rng, 6, 4), unit_rows(rng, 6, 4)
    t[2] = np.nan  # an all-NaN anchor: every score of row 2 is NaN
    chunked = jax.jit(
        lambda t, v, d, ties: chunked_retrieval(
            t, v, score="cosine", direction=d, chunk_size=4, top_k=3, ties=ties
        ),
        static_argnums=(2, 3),
    )
    dense = jax.jit(
        lambda s, ties: positive_ranks(s, lower_is_better=False, ties=ties), static_argnums=1
    )
    s = t @ v.T  # cosine scores of anchor i and candidate j: row 2 is NaN
    for ties in ("pessimistic", "optimistic"):
        for direction, scores in (("anchor_to_rest", s), ("rest_to_anchor", s.T)):
            ranks, top = chunked(t, v, direction, ties)
            ranks = np.asarray(ranks)
            assert ranks[2] == 6  # the worst possible rank, never a hit
            assert np.all(ranks <= 6)  # the padding of the last block is not counted
            if direction == "rest_to_anchor":  # the NaN anchor is nobody's best anchor
                assert not np.any(np.asarray(top)[:, 0] == 2)
            np.testing.assert_array_equal(np.asarray(dense(scores, ties)), ranks)
    # Concrete inputs: an error naming the table and the rows.
    with pytest.raises(ValueError, match=r"anchor: NaN or infinite values in 1 of 6 rows"):
        chunked_retrieval(t, v)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_scores(t, v)


@pytest.mark.parametrize("scale", [3e6, 1e10, 1e12])
def test_huge_inputs_volumes_stay_finite_and_rank_alike(scale):
    rng = np.random.default_rng(5)
    t, v, a = (unit_rows(rng, 12, 8) for _ in range(3))
    ref = np.asarray(retrieval_scores(t, v, a), np.float64)
    big = [x * np.float32(scale) for x in (t, v, a)]
    s = np.asarray(retrieval_scores(*big))
    assert np.all(np.isfinite(s))
    np.testing.assert_allclose(s / scale**3, ref, rtol=1e-5)
    ranks, _ = chunked_retrieval(*big, chunk_size=5)
    np.testing.assert_array_equal(np.asarray(ranks), np.asarray(positive_ranks(ref, True)))


def test_metrics_arguments_checked_at_the_door():
    rng = np.random.default_rng(0)
    t, v = unit_rows(rng, 6, 4), unit_rows(rng, 6, 4)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="chunk_size must be >= 1"):
            chunked_retrieval(t, v, chunk_size=bad)
        with pytest.raises(ValueError, match="top_k must be >= 1"):
            chunked_retrieval(t, v, top_k=bad)
    for bad in (2.5, True, "8"):
        with pytest.raises(TypeError, match="chunk_size must be an int"):
            chunked_retrieval(t, v, chunk_size=bad)
        with pytest.raises(TypeError, match="top_k must be an int"):
            chunked_retrieval(t, v, top_k=bad)
    with pytest.raises(TypeError, match="lower_is_better must be a bool"):
        positive_ranks(TIES, lower_is_better="yes")
    with pytest.raises(TypeError, match="lower_is_better must be a bool"):
        retrieval_metrics(TIES, lower_is_better=1)
    with pytest.raises(TypeError, match="scores must be a NumPy or JAX array.*np.asarray"):
        retrieval_metrics(TIES.tolist(), lower_is_better=False)
    with pytest.raises(TypeError, match=r"others\[0\] must be a NumPy or JAX array"):
        chunked_retrieval(t, v.tolist())
    with pytest.raises(TypeError, match="anchor must be a NumPy or JAX array"):
        retrieval_scores(t.tolist(), v)
    with pytest.raises(ValueError, match="ties must be"):
        chunked_retrieval(t, v, ties="random")
