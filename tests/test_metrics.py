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
    with pytest.raises(ValueError, match="score must be"):
        chunked_retrieval(t, v, score="dot")
    with pytest.raises(ValueError, match="score must be"):
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
