"""The n-modal family side by side (issue 14): every loss, 3 seeds, own score and cosine.

Methods (``METHODS``): each is a recipe of ``configs/synthetic.py``'s ``LOSS_RECIPES`` (its
``config.loss`` keys; ``configs/synthetic.py:method=<recipe>``) applied to the setting's
config, so all share data, encoders, optimiser, steps and batch:

* ``gram``: GRAM as the authors train it (``loss.gradient=faithful``: their no-grad gather);
* ``gram_exact``: the same loss with its exact gradient (this library's default);
* ``gram_infonce``: GRAM + the cosine remedy of ``docs/gram_from_scratch.md``
  (``loss.name=gram+infonce``, the anchored InfoNCE term at a constant weight 0.5);
* ``gram_handover``: the same remedy as a warm-up (InfoNCE weight 1 -> 0 over 200 steps);
* ``simplex``, ``triangle`` (k = 3 only), ``symile``: the n-modal scores (``docs/nmodal.md``);
* ``infonce_anchored``, ``infonce_all``, ``siglip``: the pairwise baselines;
* ``comm``: CoMM's fusion network (its own model and two augmented views).

Settings (``--settings``):

* ``synthetic``: ``configs/synthetic.py`` (text anchor; image, audio) at its 600 steps;
* ``synthetic_2000``: the same at 2,000 steps (warm-up and cosine decay stretched by the
  trainer's schedule; nothing else changes);
* ``msrvtt``: the frozen MSR-VTT embedding heads (``configs/gram_embeddings.py``, the
  ``experiments/msrvtt_embeddings.py`` setting) with all four modalities: text anchor; video,
  audio, subtitles; 300 steps;
* ``trifeature``: Trifeature short (``experiments/trifeature_repro.py --variant short``
  setting: two images, k = 2, linear probes R and U after 100 steps x 64).

Retrieval is read by each method's own score (``gram_jax.losses.LOSSES[name].score``; CoMM:
``fused_cosine``) AND by cosine (the anchor vs the normalised mean of the others), text ->
rest and rest -> text, on the held-out split. Wall-clock per step is the median of the
logged ``steps_per_sec`` (compilation excluded; Trifeature: training seconds / steps, which
includes compilation). Results are rewritten after every run into
``experiments/results/nmodal_study.json`` / ``.md``; ``--resume`` keeps finished runs.

    python experiments/nmodal_study.py                                  # everything
    python experiments/nmodal_study.py --settings synthetic --seeds 0 1 2 --resume
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import pathlib
import shutil
import statistics
import tempfile
import time

from summary import summarise

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
QUIET = ["train.progress_bar=False", "train.checkpoint_every=0"]


def _synthetic_config_module():
    """``configs/synthetic.py``, whose ``LOSS_RECIPES`` is the one definition of each method."""
    spec = importlib.util.spec_from_file_location("synthetic_config", ROOT / "configs/synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SYNTHETIC_CONFIG = _synthetic_config_module()
RECIPES = SYNTHETIC_CONFIG.LOSS_RECIPES
# study name -> (label, recipe of configs/synthetic.py; None: CoMM, its own model)
METHODS: dict[str, tuple[str, str | None]] = {
    "gram": ("GRAM (authors', faithful)", "gram"),
    "gram_exact": ("GRAM (exact gradient)", "gram_exact"),
    "gram_infonce": ("GRAM + InfoNCE (w 0.5)", "gram_infonce"),
    "gram_handover": ("GRAM, InfoNCE warm-up 1 -> 0", "gram_handover"),
    "simplex": ("simplex volume", "simplex"),
    "triangle": ("TRIANGLE", "triangle"),
    "symile": ("Symile", "symile"),
    "infonce_anchored": ("anchored InfoNCE", "infonce"),
    "infonce_all": ("all-pairs InfoNCE", "infonce_all"),
    "siglip": ("SigLIP", "siglip"),
    "comm": ("CoMM", None),
}
# setting -> (config, steps, extra overrides)
SETTINGS = {
    "synthetic": ("configs/synthetic.py", 600, []),
    "synthetic_2000": ("configs/synthetic.py", 2000, []),
    "msrvtt": ("configs/gram_embeddings.py:subtitles=True", 300, []),
    "trifeature": (None, 100, []),
}


def recipe_overrides(method: str) -> list[str]:
    """The method's config.loss keys as ``key=value`` overrides (for the other settings)."""
    return [f"{k}={v!r}" for k, v in RECIPES[METHODS[method][1]].items()]


def _config_path(setting: str, method: str) -> str:
    path = SETTINGS[setting][0]
    if setting.startswith("synthetic"):
        return f"{path}:method={METHODS[method][1] or 'comm'}"
    return path


def _msrvtt_comm() -> list[str]:
    """CoMM's model on the frozen-embedding towers (one token per modality): the same keys as
    ``configs/synthetic.py``'s ``comm``."""
    import ml_collections

    c = ml_collections.ConfigDict({"model": {}, "loss": {}, "data": {}, "optim": {}})
    SYNTHETIC_CONFIG.comm(c)
    c.data.augment = "none"  # feature vectors: the embeddings config has no augmentation
    flat = {f"{g}.{k}": v for g in c for k, v in c[g].items()}
    return [f"{k}={v!r}" for k, v in flat.items()]


def own_score(config) -> str:
    """CoMM's fused cosine, else the loss's own score (the first the trainer reports)."""
    from gram_jax.training.config import eval_scores

    return "fused_cosine" if config.model.kind == "comm" else eval_scores(config)[0]


def seconds_per_step(workdir: pathlib.Path) -> float:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["steps_per_sec"] for r in rows if r.get("kind") == "train"][1:]
    return 1.0 / statistics.median(rates) if rates else float("nan")


def run_retrieval(
    setting: str, method: str, seed: int, workroot: pathlib.Path, steps: int | None = None
) -> dict:
    from gram_jax.training.config import load_config
    from gram_jax.training.loop import train

    path, default_steps, extra = SETTINGS[setting]
    if setting == "msrvtt":
        extra = [*extra, *(recipe_overrides(method) if METHODS[method][1] else _msrvtt_comm())]
    if steps:  # a smoke test: the warm-up must fit
        extra = [*extra, f"optim.warmup_steps={steps // 10}"]
    steps = steps or default_steps
    overrides = list(extra)
    config = load_config(
        str(ROOT / _config_path(setting, method)),
        [
            *overrides,
            *QUIET,
            f"seed={seed}",
            f"train.steps={steps}",
            f"train.log_every={max(1, steps // 12)}",
        ],
    )
    config.eval.scores = ("cosine",)  # the trainer puts the loss's own score first
    score = own_score(config)
    workdir = workroot / f"{setting}_{method}_{seed}"
    t0 = time.time()
    metrics = train(config, workdir)
    anchor = config.model.anchor
    out = {
        "own_score": score,
        "wall_seconds": time.time() - t0,
        "seconds_per_step": seconds_per_step(workdir),
        "chance/R@1": metrics["chance/R@1"],
    }
    for d in (f"{anchor}_to_rest", f"rest_to_{anchor}"):
        key = d.replace(anchor, "anchor")
        for name, s in (("own", score), ("cosine", "cosine")):
            for k in ("R@1", "R@5", "R@10"):
                out[f"{key}/{name}/{k}"] = metrics[f"retrieval/{d}/{s}/{k}"]
    return out


def run_trifeature(method: str, seed: int, steps: int | None = None) -> dict:
    import trifeature_repro as tf

    base = "gram" if method != "comm" else "comm"
    config = tf.method_config(
        base,
        steps=steps or SETTINGS["trifeature"][1],
        batch_size=64,
        overrides=[*(recipe_overrides(method) if METHODS[method][1] else []), f"seed={seed}"],
    )
    r = tf.run_method(config, log=lambda s: None)
    f = r["final"]
    return {
        "R": f["R"],
        "U": f["U"],
        "U1": f["U1"],
        "U2": f["U2"],
        "seconds_per_step": r["train_seconds"] / r["steps_done"],
        "wall_seconds": r["train_seconds"] + r["probe_seconds"],
    }


def applicable(setting: str, method: str) -> bool:
    k = {"trifeature": 2, "msrvtt": 4}.get(setting, 3)
    if k == 2 and method == "infonce_all":
        return False  # the same loss as anchored InfoNCE at k = 2
    return not (method == "triangle" and k != 3)


def _cell(s: dict, key: str) -> str:
    if key not in s:
        return "–"
    return f"{s[key]['mean']:.1f} ± {s[key]['std']:.1f}"


def markdown(results: dict) -> str:
    lines = ["# The n-modal study (issue 14)", ""]
    for setting, per in results["summary"].items():
        if not per:
            continue
        path, steps, _ = SETTINGS[setting]
        chance = results["chance"].get(setting)
        n = {m: s[next(iter(s))]["n"] for m, s in per.items()}
        lines.append(
            f"## {setting}: {steps} steps" + (f", chance R@1 {chance:.2f} %" if chance else "")
        )
        lines.append("")
        if setting == "trifeature":
            lines += [
                "| method | seeds | R | U | U1 | U2 | s / step |",
                "|---|---|---|---|---|---|---|",
            ]
            for m, s in sorted(per.items(), key=lambda ms: list(METHODS).index(ms[0])):
                cells = [_cell(s, k) for k in ("R", "U", "U1", "U2")]
                sps = s["seconds_per_step"]["mean"]
                lines.append(
                    f"| {METHODS[m][0]} | {n[m]} | " + " | ".join(cells) + f" | {sps:.3f} |"
                )
        else:
            lines += [
                "| method | seeds | own score | T->rest R@1 own | T->rest R@1 cosine | "
                "rest->T R@1 own | rest->T R@1 cosine | T->rest R@5 own | s / step | "
                "T->rest R@1 own per seed |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for m, s in sorted(per.items(), key=lambda ms: list(METHODS).index(ms[0])):
                cells = [
                    _cell(s, f"{d}/{w}/R@1")
                    for d in ("anchor_to_rest", "rest_to_anchor")
                    for w in ("own", "cosine")
                ]
                cells.append(_cell(s, "anchor_to_rest/own/R@5"))
                runs = results["runs"][setting][m]
                own = runs[next(iter(runs))]
                seeds = ", ".join(f"{r['anchor_to_rest/own/R@1']:.1f}" for r in runs.values())
                lines.append(
                    f"| {METHODS[m][0]} | {n[m]} | {own['own_score']} | "
                    + " | ".join(cells)
                    + f" | {s['seconds_per_step']['mean']:.3f} | {seeds} |"
                )
        lines.append("")
    lines.append(
        "Mean ± population std over seeds; every run in the JSON. s / step: median "
        "logged seconds per training step (2 CPU cores)."
    )
    lines.append(f"\nTotal wall clock: {results['wall_seconds_total']:.0f} s.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("--resume", action="store_true", help="keep the runs already in the JSON")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="override every setting's steps (a smoke test; such results are not the study's)",
    )
    p.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the JSON")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out_json = args.out / "nmodal_study.json"
    if args.markdown_only:
        table = markdown(json.loads(out_json.read_text()))
        (args.out / "nmodal_study.md").write_text(table + "\n")
        print(table)
        return
    results = {"runs": {}, "chance": {}, "wall_seconds_total": 0.0, "steps_override": args.steps}
    if args.resume and out_json.is_file():
        results = json.loads(out_json.read_text())
    t_start = time.time() - results["wall_seconds_total"]
    workroot = pathlib.Path(tempfile.mkdtemp(prefix="nmodal_study_"))
    try:
        for setting in args.settings:
            for seed in args.seeds:
                for method in args.methods:
                    if not applicable(setting, method):
                        continue
                    runs = results["runs"].setdefault(setting, {}).setdefault(method, {})
                    if str(seed) in runs:
                        continue
                    if setting == "trifeature":
                        r = run_trifeature(method, seed, args.steps)
                    else:
                        r = run_retrieval(setting, method, seed, workroot, args.steps)
                        results["chance"][setting] = r["chance/R@1"]
                    runs[str(seed)] = r
                    results["wall_seconds_total"] = time.time() - t_start
                    results["summary"] = {
                        st: {
                            m: summarise(list(rs.values()), skip=("own_score",))
                            for m, rs in per.items()
                            if rs
                        }
                        for st, per in results["runs"].items()
                    }
                    args.out.mkdir(parents=True, exist_ok=True)
                    out_json.write_text(json.dumps(results, indent=1))
                    (args.out / "nmodal_study.md").write_text(markdown(results) + "\n")
                    print(
                        f"[{time.time() - t_start:.0f} s] {setting} {method} seed {seed}: "
                        + ", ".join(
                            f"{k} {v:.2f}"
                            for k, v in r.items()
                            if isinstance(v, float) and "R@1" in k or k in "RU"
                        ),
                        flush=True,
                    )
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    print(markdown(results))


if __name__ == "__main__":
    main()
