"""GRAM vs anchored InfoNCE projection heads on frozen MSR-VTT embeddings (issue 6).

Trains ``configs/gram_embeddings.py`` (GRAM volume loss) and the same config with
``loss.name = "infonce"`` (anchored: text-video + text-audio CLIP terms, label smoothing 0.1
as GRAM's) on the 884 MSR-VTT test clips of GRAM's step-0 checkpoint
(``msrvtt884_gram_step0.npz``: text / video / audio, 512-d each). Both use the same seeded
row split (``data.builder.seed = 0``, test_fraction 0.25: 663 train / 221 held-out rows),
the same steps, batch and optimiser; ``--seeds`` changes only the parameter init and the
training data order. Reported on the 221 held-out rows: text -> (video, audio) and
(video, audio) -> text R@1/5/10 by volume, span distance and cosine (text vs the normalised
mean of video and audio), plus ``no training``: the frozen fixture embeddings (L2-normalised)
scored the same way on the same rows, so the table shows what the heads add.

Reductions against the paper: this is not GRAM's MSR-VTT fine-tuning (no encoders are
trained, only a linear adapter + projection head per modality on frozen 512-d vectors;
663 training clips instead of MSR-VTT's 9k train split; subtitles unused; 221-row
retrieval, chance R@1 = 0.45 %). Defaults: 300 steps (the config's), seeds 0 1 2;
mean ± std (population std over seeds) in the table, every run in the JSON.
Measured: ~190 s for the whole script on 2 shared CPU cores.

    python experiments/msrvtt_embeddings.py [--steps 300] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import shutil
import tempfile
import time

import numpy as np
from summary import summarise

from gram_jax.data.embeddings import NpzEmbeddingSource
from gram_jax.models import l2_normalize
from gram_jax.training.config import load_config
from gram_jax.training.evaluate import retrieval_report
from gram_jax.training.loop import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "gram_embeddings.py"
RESULTS = ROOT / "experiments" / "results"
METHODS = {"gram": ["loss.name=gram"], "infonce_anchored": ["loss.name=infonce"]}
SCORES = ("volume", "span_distance", "cosine")
DIRECTIONS = ("text_to_rest", "rest_to_text")
KS = ("R@1", "R@5", "R@10")


def baseline(config) -> dict[str, float]:
    """Retrieval of the frozen fixture embeddings on the config's held-out rows."""
    b = config.data.builder
    src = NpzEmbeddingSource(
        b.npz_path, config.data.eval_split, test_fraction=b.test_fraction, seed=b.seed
    )
    mods = list(config.model.modalities.keys())
    rows = [src[i] for i in range(len(src))]
    emb = {m: np.asarray(l2_normalize(np.stack([r[m] for r in rows]))) for m in mods}
    anchor = config.model.anchor
    others = [m for m in mods if m != anchor]
    return retrieval_report(emb, anchor, others, SCORES)


def run(method: str, seed: int, steps: int, workroot: pathlib.Path) -> dict:
    overrides = [
        *METHODS[method],
        f"seed={seed}",
        f"train.steps={steps}",
        f"optim.warmup_steps={min(30, steps // 10)}",
        "train.progress_bar=False",
        "train.checkpoint_every=0",
        f"train.log_every={steps}",
    ]
    config = load_config(str(CONFIG), overrides)
    t0 = time.time()
    metrics = train(config, workroot / f"{method}_seed{seed}")
    metrics["wall_seconds"] = time.time() - t0
    return metrics


def markdown(results: dict) -> str:
    n_seeds = len(results["seeds"])
    lines = [
        f"MSR-VTT step-0 fixture embeddings, {results['held_out_rows']} held-out rows "
        f"(chance R@1 = {results['chance_R@1']:.2f} %), {results['steps']} steps, "
        f"seeds {results['seeds']}: mean ± std over {n_seeds} seeds (no training: one "
        "deterministic value). R@1 / R@5 / R@10 in percent.",
        "",
        "| method | direction | volume | span distance | cosine |",
        "|---|---|---|---|---|",
    ]
    names = {
        "no_training": "no training (raw)",
        "gram": "GRAM heads",
        "infonce_anchored": "anchored InfoNCE heads",
    }
    for method, label in names.items():
        s = results["summary"][method]
        for d in DIRECTIONS:
            cells = []
            for score in SCORES:
                parts = []
                for k in KS:
                    m = s[f"retrieval/{d}/{score}/{k}"]
                    parts.append(
                        f"{m['mean']:.1f}"
                        if method == "no_training"
                        else f"{m['mean']:.1f} ± {m['std']:.1f}"
                    )
                cells.append(" / ".join(parts))
            arrow = "T->(V,A)" if d == "text_to_rest" else "(V,A)->T"
            lines.append(f"| {label} | {arrow} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Single-pair cosine, text -> video and text -> audio: R@1 and median rank (MdR) of the "
        f"true item among {results['held_out_rows']} (mean over seeds). The volume and the span "
        "distance do not change when an embedding is negated, so the GRAM loss leaves the sign "
        "of each modality's head free: a median rank near N means text and video came out "
        "anti-aligned, and cosine retrieval fails while volume retrieval works.",
        "",
        "The raw fixture embeddings are GRAM's step-0 checkpoint outputs, already aligned by "
        "its pretraining; heads trained from a random init on 663 rows do not recover that "
        "alignment in this setting (no-training row).",
        "",
        "| method | T->V R@1 | T->V MdR | T->A R@1 | T->A MdR |",
        "|---|---|---|---|---|",
    ]
    for method, label in names.items():
        s = results["summary"][method]
        cells = [
            f"{s[f'retrieval/text_to_{m}/cosine/{k}']['mean']:.1f}"
            for m in ("video", "audio")
            for k in ("R@1", "MdR")
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t_start = time.time()
    base = baseline(load_config(str(CONFIG)))
    workroot = pathlib.Path(tempfile.mkdtemp(prefix="msrvtt_embeddings_"))
    try:
        runs = {m: [run(m, s, args.steps, workroot) for s in args.seeds] for m in METHODS}
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    summary = {"no_training": summarise([base])}
    summary.update({m: summarise(r) for m, r in runs.items()})
    results = {
        "config": str(CONFIG.relative_to(ROOT)),
        "steps": args.steps,
        "seeds": args.seeds,
        "held_out_rows": int(base["eval/examples"]),
        "chance_R@1": base["chance/R@1"],
        "spread": "std = population standard deviation over seeds",
        "summary": summary,
        "runs": {
            "no_training": base,
            **{m: dict(zip(map(str, args.seeds), r, strict=True)) for m, r in runs.items()},
        },
        "wall_seconds_total": time.time() - t_start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "msrvtt_embeddings.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (args.out / "msrvtt_embeddings.md").write_text(table + "\n")
    print(table)
    print(f"total wall clock {results['wall_seconds_total']:.0f} s")


if __name__ == "__main__":
    main()
