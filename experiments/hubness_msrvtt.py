"""Hubness of raw-volume retrieval on real GRAM embeddings (MSR-VTT, 884 clips).

Reproduces the span factorisation of ``docs/design.md`` (section 2),
``vol(t; v, a, s) = vol(v, a, s) * dist(t, span(v, a, s))``: ranking candidates for a text by
raw volume multiplies the prior-free distance by a query-independent candidate prior
``vol(v_j, a_j, s_j)``. Candidates whose own modalities are mutually aligned then become the
top-1 hit for many texts ("hubs").

For each saved checkpoint (steps 0, 849, 1749) this prints and writes text -> candidates
R@1/5/10 by raw volume, by span distance and by cosine(text, video), the largest number of
queries sharing one top-1 candidate, and the correlation between a candidate's prior volume
and how often it is a top-1 hit.

    python experiments/hubness_msrvtt.py [--fixtures tests/fixtures] [--out experiments/results]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax.numpy as jnp
import numpy as np

from gram_jax import candidate_gram, retrieval_metrics, retrieval_scores

STEPS = (0, 849, 1749)
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DEFAULT_FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"


def analyse(path: pathlib.Path) -> dict:
    """Retrieval and hubness statistics of one ``msrvtt884_gram_step*.npz`` file."""
    d = np.load(path)
    t, v, a, s = (jnp.asarray(d[k]) for k in ("text", "video", "audio", "subtitles"))
    out = {}
    by_score = {
        "volume": (retrieval_scores(t, v, a, s, score="volume"), True),
        "span_distance": (retrieval_scores(t, v, a, s, score="span_distance"), True),
        "cosine_text_video": (retrieval_scores(t, v, score="cosine"), False),
    }
    for name, (scores, lower) in by_score.items():
        out[f"text_to_rest/{name}"] = retrieval_metrics(scores, lower_is_better=lower)
        out[f"rest_to_text/{name}"] = retrieval_metrics(scores.T, lower_is_better=lower)
        top1 = np.asarray(jnp.argmin(scores, 1) if lower else jnp.argmax(scores, 1))
        hits = np.bincount(top1, minlength=scores.shape[1])
        out[f"hubness/{name}/max_top1_hits"] = int(hits.max())
        if name == "volume":
            prior = np.sqrt(np.maximum(np.asarray(candidate_gram(v, a, s)[2]), 0.0))
            out["hubness/corr_prior_volume_vs_top1_hits"] = float(np.corrcoef(prior, hits)[0, 1])
    return out


def markdown(results: dict[int, dict]) -> str:
    rows = [
        "| step | T->C R@1/5/10 by volume | by span distance | cosine T->V | "
        "max top-1 hits (volume / span) | corr(prior vol, top-1 hits) |",
        "|---|---|---|---|---|---|",
    ]

    def rk(m: dict) -> str:
        return f"{m['R@1']:.1f} / {m['R@5']:.1f} / {m['R@10']:.1f}"

    for step, r in results.items():
        rows.append(
            f"| {step} | {rk(r['text_to_rest/volume'])} | {rk(r['text_to_rest/span_distance'])} | "
            f"{rk(r['text_to_rest/cosine_text_video'])} | "
            f"{r['hubness/volume/max_top1_hits']} / {r['hubness/span_distance/max_top1_hits']} | "
            f"{r['hubness/corr_prior_volume_vs_top1_hits']:.2f} |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", type=pathlib.Path, default=DEFAULT_FIXTURES)
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = p.parse_args()
    results = {step: analyse(args.fixtures / f"msrvtt884_gram_step{step}.npz") for step in STEPS}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hubness_msrvtt.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "hubness_msrvtt.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
