"""CoMM's controlled Trifeature experiment (issue 6): CoMM vs Cross, Cross+Self and GRAM.

Pretrain on Trifeature pairs, then linear-probe the frozen representation on unbiased test
pairs (docs/authors_code.md 9, 12): redundancy R = shape (``share``), uniqueness U1 / U2 =
texture of image 1 / 2 (``unique1`` / ``unique2``), synergy S = ``1[(texture_1, colour_2)
in M]`` (binary; balanced accuracy, chance 50, plus ROC-AUC of the probe score as a
threshold-free diagnostic). Chance is 10 % for R and U.

Variants:

* ``short`` (minutes): every method pretrained on UNBIASED pairs for a few hundred steps,
  R / U probes at the end. Shows the pattern of the paper's table: all methods learn R, the
  cross-modal-only objectives (Cross, GRAM) lose U, CoMM and Cross+Self keep it.
* ``long`` (about an hour on a shared 2-core CPU): CoMM pretrained on the BIASED pairs
  (colour_2 = M(texture_1) in every training pair), all four probes at intervals (the
  synergy trajectory), then, while the time budget lasts, the baselines on biased pairs at
  a smaller budget.

Writes ``experiments/results/trifeature_<variant>.json`` and ``.md`` (our numbers beside the
paper's, with every size reduction in the notes)::

    python experiments/trifeature_repro.py --variant short
    python experiments/trifeature_repro.py --variant long --deadline 2026-12-01T05:30

``--deadline`` (UTC, ISO format) stops a run at the first step past it, probes it there and
records the steps actually done; methods not started by then are listed as not run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pathlib
import time
from collections.abc import Callable, Sequence

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
CONFIGS = ROOT / "configs"

# The CPU plan's CNN for both images (docs/authors_code.md 12), whatever the configs' default.
CNN = (
    "model.modalities.image1.kind=cnn",
    "model.modalities.image2.kind=cnn",
    # the configs' ViT patch_size is not a CNNConfig field
    "model.modalities.image1.overrides={}",
    "model.modalities.image2.overrides={}",
)
# The tiny ViT with 16x16 patches: the same 4x4 token grid at 64x64.
VIT = (
    "model.modalities.image1.kind=image",
    "model.modalities.image2.kind=image",
    "model.modalities.image1.overrides.patch_size=16",
    "model.modalities.image2.overrides.patch_size=16",
)
# method -> (config file, extra overrides)
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "comm": ("trifeature.py:method=comm", CNN),
    "cross": ("trifeature.py:method=cross", CNN),
    "cross_self": ("trifeature.py:method=cross_self", CNN),
    "gram": ("trifeature.py:method=gram", CNN),
    "comm_vit": ("trifeature.py:method=comm", VIT),
}
LABELS = {
    "comm": "CoMM",
    "cross": "Cross",
    "cross_self": "Cross+Self",
    "gram": "GRAM",
    "comm_vit": "CoMM (tiny ViT encoders)",
}
# Paper (Dufumier et al., ICLR 2025, Trifeatures figure; docs/authors_code.md 10): R / U / S, %.
PAPER = {
    "comm": {"R": 99.9, "U": 87.8, "S": 71.9},
    "cross": {"R": 100.0, "U": 11.6, "S": 50.0},
    "cross_self": {"R": 99.7, "U": 86.9, "S": 50.0},
    "factorcl": {"R": 99.8, "U": 62.5, "S": 46.5},
}
TASKS_RU = ("share", "unique1", "unique2")
TASKS_ALL = ("share", "unique1", "unique2", "synergy")

VARIANTS = {
    "short": {
        "methods": ("comm", "cross", "cross_self", "gram", "comm_vit"),
        "train_split": "train",
        "steps": 200,
        "batch_size": 64,
        "probe_every": 0,
        "tasks": TASKS_RU,
        "baseline_steps": 0,
    },
    "long": {
        "methods": ("comm",),
        "train_split": "train_biased",
        "steps": 1000,
        "batch_size": 128,
        "probe_every": 200,
        "tasks": TASKS_ALL,
        "baseline_steps": 200,
    },
}


def method_config(
    method: str,
    *,
    train_split: str = "train",
    steps: int = 200,
    batch_size: int = 64,
    tasks: Sequence[str] = TASKS_RU,
    overrides: Sequence[str] = (),
):
    """The validated config of ``method`` (a key of :data:`METHODS`) for this experiment.

    ``overrides`` are extra ``"dotted.key=value"`` strings (e.g. ``data.builder.render_size=32``
    for a cheaper dataset, ``data.data_dir=...``).
    """
    from gram_jax.training.config import load_config

    path, extra = METHODS[method]
    items = [
        *extra,
        f"data.train_split={train_split!r}",
        f"train.steps={steps}",
        f"train.batch_size={batch_size}",
        f"eval.probe_tasks={tuple(tasks)!r}",
        "train.progress_bar=False",
        *overrides,
    ]
    return load_config(str(CONFIGS / path), items)


def _probe_row(ev: dict[str, float], tasks: Sequence[str]) -> dict[str, float]:
    names = {"share": "R", "unique1": "U1", "unique2": "U2", "synergy": "S"}
    row = {names[t]: ev[f"probe/{t}/balanced_accuracy"] for t in tasks}
    if "U1" in row and "U2" in row:
        row["U"] = 0.5 * (row["U1"] + row["U2"])
    if "synergy" in tasks:
        row["S_auc"] = ev["probe/synergy/auc"]
    return row


def run_method(
    config,
    *,
    probe_every: int = 0,
    deadline: float | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Pretrain ``config`` from scratch and probe it (every ``probe_every`` steps and at the end).

    Returns ``{"steps_done", "train_seconds", "probe_seconds", "trajectory": [{"step", "R",
    "U1", "U2", "U", ["S", "S_auc"]}], "final": last row, "stopped_by_deadline"}``. A run
    stops at the first step after ``deadline`` (``time.time()`` seconds) and is probed there.
    """
    from gram_jax.training import loop
    from gram_jax.training.sharding import make_mesh

    loop.setup_runtime(config)
    mesh = make_mesh(config)
    source = loop.load_split(config, config.data.train_split)
    trainer = loop.get_trainer(config, mesh)
    iterator = loop.make_train_iterator(config, mesh, source)
    tasks = tuple(config.eval.probe_tasks)
    state = trainer.init()
    steps = config.train.steps
    trajectory, train_s, probe_s, stopped = [], 0.0, 0.0, False
    t0 = time.time()
    step = 0
    for step in range(1, steps + 1):
        state, metrics = trainer.step(state, next(iterator))
        last = step == steps or (deadline is not None and time.time() > deadline)
        stopped = last and step < steps
        if (probe_every and step % probe_every == 0) or last:
            jax.block_until_ready(state)
            if int(state["bad_step"]) >= 0:
                raise FloatingPointError(f"{config.name}: non-finite loss at step {step}")
            train_s += time.time() - t0
            t1 = time.time()
            row = {"step": step, **_probe_row(loop.evaluate(trainer, state, config), tasks)}
            probe_s += time.time() - t1
            row["loss"] = float(metrics["loss"])
            trajectory.append(row)
            log(
                f"  {config.name} step {step}: "
                + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k != "step")
            )
            t0 = time.time()
        if last:
            break
    return {
        "steps_done": step,
        "train_seconds": round(train_s, 1),
        "probe_seconds": round(probe_s, 1),
        "trajectory": trajectory,
        "final": trajectory[-1],
        "stopped_by_deadline": stopped,
    }


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.1f}"


NOTES = [
    "Paper numbers: Dufumier et al. (ICLR 2025) Trifeatures figure, linear-probe accuracy after "
    "100 epochs (about 15.7k steps at batch 64) on 224x224 renders with AlexNet conv trunks, "
    "512-d fusion, SimCLR augmentations (docs/authors_code.md 10). The paper reports one U "
    "(texture); ours is the mean of U1 (texture of image 1) and U2 (texture of image 2). The "
    "paper has no GRAM row.",
    "Size reductions here: 64x64 renders (base shape 36 px, texture scale 6) instead of 224x224; "
    "a 4-layer CNN per modality (conv5x5/2(32), conv3x3/2(64) x3 -> 4x4x64 = 16 tokens, 95k "
    "parameters) instead of AlexNet (2.5M conv parameters, 6x6x256 = 36 tokens); fusion width "
    "64 (1 block, 8 heads) instead of 512; projector 64-256-256-128 instead of 512-512-512-256; "
    "AdamW lr 1e-3 (paper 3e-4), constant; light augmentation (random resized crop 0.3-1 + "
    "flip) instead of SimCLR's (whose colour jitter and grayscale erase the colour the synergy "
    "task needs); probes: standardised multinomial logistic regression (L-BFGS, L2 penalty "
    "picked on a 60/40 split by balanced accuracy) on 4,096 training pairs' features, scored "
    "on the 4,094 unbiased test pairs, features from un-augmented images (the authors crop "
    "0.5-1 at feature extraction).",
    "Baselines: Cross = CLIP InfoNCE between the two towers (learnable temperature, linear "
    "heads to 128-d); Cross+Self = cross NT-Xent + per-modality SimCLR NT-Xent between the two "
    "augmented views (tau 0.1; the same linear heads for both terms); GRAM = GRAM volume loss "
    "(k = 2: 1 - cos^2 of the angle under the square root). Their probe features are the "
    "concatenated mean-pooled CNN outputs (the authors use concat(e1, e2)); CoMM's are the "
    "pre-projector fused CLS vector.",
    "Balanced accuracy for S is the paper's metric (chance 50). S AUC (ROC-AUC of the probe's "
    "decision score) is an extra, threshold-free diagnostic: with 10 % positives an "
    "unweighted probe rarely predicts the positive class, so balanced accuracy stays near 50 "
    "long before the representation stops ranking M-consistent pairs first.",
    "Single runs, seed 0, on a 2-core CPU shared with other jobs (times are wall clock).",
]


def markdown(result: dict) -> str:
    """The Markdown report of one variant's result dict."""
    v = result["variant"]
    lines = [f"# Trifeature reproduction ({v})", ""]
    kind = "biased" if "biased" in result["train_split"] else "unbiased"
    lines.append(
        f"Pretraining pairs: {result['train_split']} ({kind}); probes on the unbiased test "
        "pairs; balanced accuracy, %."
    )
    lines += [
        "",
        "| method | steps x batch | R | U1 | U2 | U | S | S AUC | paper R | paper U | paper S |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in result["methods"].items():
        paper = PAPER.get(name, {})
        if res.get("not_run"):
            lines.append(
                f"| {LABELS[name]} | not run: {res['not_run']} | | | | | | | "
                f"{_fmt(paper.get('R'))} | {_fmt(paper.get('U'))} | "
                f"{_fmt(paper.get('S'))} |"
            )
            continue
        f = res["final"]
        cut = " (deadline)" if res["stopped_by_deadline"] else ""
        lines.append(
            f"| {LABELS[name]} | {res['steps_done']} x {res['batch_size']}{cut} | "
            f"{_fmt(f.get('R'))} | {_fmt(f.get('U1'))} | {_fmt(f.get('U2'))} | "
            f"{_fmt(f.get('U'))} | {_fmt(f.get('S'))} | {_fmt(f.get('S_auc'))} | "
            f"{_fmt(paper.get('R'))} | {_fmt(paper.get('U'))} | {_fmt(paper.get('S'))} |"
        )
    p = PAPER["factorcl"]
    lines.append(f"| FactorCL (not run) | | | | | | | | {p['R']} | {p['U']} | {p['S']} |")
    lines.append("| chance | | 10.0 | 10.0 | 10.0 | 10.0 | 50.0 | 50.0 | 10 | 10 | 50 |")
    for name, res in result["methods"].items():
        if res.get("not_run") or len(res["trajectory"]) < 2:
            continue
        lines += [
            "",
            f"Trajectory of {LABELS[name]} (probe after each step count):",
            "",
            "| step | R | U1 | U2 | S | S AUC | loss |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in res["trajectory"]:
            lines.append(
                f"| {row['step']} | {_fmt(row.get('R'))} | {_fmt(row.get('U1'))} | "
                f"{_fmt(row.get('U2'))} | {_fmt(row.get('S'))} | {_fmt(row.get('S_auc'))} | "
                f"{row['loss']:.3f} |"
            )
    lines += [
        "",
        "Wall-clock seconds (train / probe): "
        + "; ".join(
            f"{LABELS[n]} {r['train_seconds']:.0f} / {r['probe_seconds']:.0f}"
            for n, r in result["methods"].items()
            if not r.get("not_run")
        ),
    ]
    lines += ["", "Notes:", ""] + [f"- {n}" for n in NOTES + result.get("notes", [])]
    lines.append(f"- Command: `{result['command']}`.")
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: pathlib.Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"trifeature_{result['variant']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    ap.add_argument("--steps", type=int, default=None, help="pretraining steps (CoMM in long)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--probe-every", type=int, default=None)
    ap.add_argument("--baseline-steps", type=int, default=None, help="long: baselines' steps")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    ap.add_argument("--deadline", default=None, help="UTC ISO time, e.g. 2026-12-01T05:30")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--override", action="append", default=[], help="extra dotted.key=value")
    args = ap.parse_args(argv)
    spec = dict(VARIANTS[args.variant])
    for key in ("steps", "batch_size", "probe_every", "baseline_steps"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    methods = tuple(args.methods.split(",")) if args.methods else spec["methods"]
    if args.variant == "long" and not args.methods and spec["baseline_steps"] > 0:
        methods = (*methods, "cross", "cross_self", "gram")
    deadline = None
    if args.deadline:
        deadline = dt.datetime.fromisoformat(args.deadline).replace(tzinfo=dt.UTC).timestamp()
    result = {
        "variant": args.variant,
        "train_split": spec["train_split"],
        "command": "python experiments/trifeature_repro.py "
        + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "paper": PAPER,
        "methods": {},
    }
    out = pathlib.Path(args.out)
    for i, name in enumerate(methods):
        steps = spec["steps"] if (args.variant == "short" or i == 0) else spec["baseline_steps"]
        if deadline is not None and time.time() > deadline:
            result["methods"][name] = {"not_run": "time budget used up"}
            continue
        config = method_config(
            name,
            train_split=spec["train_split"],
            steps=steps,
            batch_size=spec["batch_size"],
            tasks=spec["tasks"],
            overrides=args.override,
        )
        print(
            f"{LABELS[name]}: {steps} steps x {spec['batch_size']} on {spec['train_split']}",
            flush=True,
        )
        res = run_method(
            config,
            probe_every=spec["probe_every"] if i == 0 else 0,
            deadline=deadline,
            log=lambda s: print(s, flush=True),
        )
        res["batch_size"] = spec["batch_size"]
        res["steps_planned"] = steps
        result["methods"][name] = res
        result["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        write(result, out)  # after every method: a killed run keeps what it finished
    write(result, out)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
