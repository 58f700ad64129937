"""Why GRAM does not learn from scratch: three measurements (issue 14, deliverable 1).

(a) ``grad``: the norm of each loss's gradient with respect to the embeddings at
    initialisation, ``|dL/dz|`` (Frobenius norm over all k x B x D entries, taken through the
    L2 normalisation, i.e. its tangential part), for GRAM (``gram_contrastive_loss``, exact
    gradient), anchored and all-pairs InfoNCE (``infonce_loss``), both with label smoothing 0.1
    as the configs, and SigLIP (``siglip_loss``, scale 1 / tau and bias -1 / tau: SigLIP's own
    init 10 / -10 at tau = 0.1); B = 128, k = 3.
    - ``grad_random``: i.i.d. uniform unit vectors, D x tau grid, ``--draws`` draws (mean, std).
    - ``grad_model``: the embeddings of a real first training batch under the untrained model
      of ``--config`` (default ``configs/synthetic.py:method=gram_exact``, GRAM), seeds
      ``--seeds``, tau = the config's ``model.temperature_init``; also the mean |cosine| of
      positive and negative pairs (random unit vectors give sqrt(2 / (pi D))).
(b) ``plateau``: the default config's initial loss plateau, one factor at a time around it:
    ``model.temperature_init``, ``optim.lr``, ``model.embed_dim``. Each run keeps the config's
    schedule (600 steps, warm-up 50) but stops at the plateau exit or at ``--plateau-cap``
    steps. Plateau length = the first step whose training loss is below ln(B) - 0.05 (every
    step is logged here); also the parameter-gradient norm (``grad_norm``, before clipping)
    at step 1 and averaged over steps 1-25 and 26-50.
(c) ``anti``: after ``--steps`` training steps of ``--config`` and ``--baseline`` (anchored
    InfoNCE), the fraction of held-out items whose positive pair (anchor_i, m_i) has cosine
    < 0, per non-anchor modality m, with the mean positive cosine and text -> rest R@1 by
    volume and by cosine.

The training runs use the library's own trainer (``get_trainer``: the jitted train step of
``train``), stepped here so that every step's metrics are seen and a run can stop at the
plateau exit. Results are rewritten after every unit (one D x tau cell, one seed, one run) to
``experiments/results/gram_diagnosis.{json,md}``; ``--resume`` keeps finished units.

    python experiments/gram_diagnosis.py                      # all parts
    python experiments/gram_diagnosis.py --parts anti --steps 600 --resume
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from summary import summarise

import gram_jax
from gram_jax.training import evaluate as eval_lib
from gram_jax.training.config import load_config
from gram_jax.training.loop import (
    _modalities,
    get_trainer,
    load_split,
    make_train_iterator,
    setup_runtime,
)
from gram_jax.training.sharding import make_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
B, K = 128, 3
SMOOTHING = 0.1
DIMS = (16, 64, 256, 512)
TAUS = (0.01, 0.03, 0.07, 0.2, 1.0)
LOSSES = ("gram", "infonce_anchored", "infonce_all", "siglip")
LABELS = {
    "gram": "GRAM",
    "infonce_anchored": "anchored InfoNCE",
    "infonce_all": "all-pairs InfoNCE",
    "siglip": "SigLIP",
}
# One factor at a time around the default (tau 0.07, lr 1e-3, embed_dim 64).
PLATEAU_RUNS = {
    "default": [],
    "tau=0.03": ["model.temperature_init=0.03"],
    "tau=0.2": ["model.temperature_init=0.2"],
    "lr=3e-4": ["optim.lr=3e-4"],
    "lr=3e-3": ["optim.lr=3e-3"],
    "embed_dim=32": ["model.embed_dim=32"],
    "embed_dim=128": ["model.embed_dim=128"],
}
QUIET = ["train.progress_bar=False", "train.checkpoint_every=0", "train.final_eval=False"]


# ------------------------------------------------------------------------------------------
# (a) gradient norms with respect to the embeddings
# ------------------------------------------------------------------------------------------


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _loss(name: str, a, b, c, tau):
    a, b, c = _unit(a), _unit(b), _unit(c)
    if name == "gram":
        return gram_jax.gram_contrastive_loss(a, [b, c], tau, label_smoothing=SMOOTHING)[0]
    if name.startswith("infonce"):
        pairs = "anchored" if name == "infonce_anchored" else "all"
        return gram_jax.infonce_loss(a, [b, c], tau, label_smoothing=SMOOTHING, pairs=pairs)[0]
    return gram_jax.siglip_loss(a, [b, c], scale=1.0 / tau, bias=-1.0 / tau)[0]


@jax.jit
def loss_and_grad_norms(a, b, c, tau):
    """``{loss: (value, |d loss / d (a, b, c)|)}`` at unit embeddings (B, D) each."""
    out = {}
    for name in LOSSES:
        val, g = jax.value_and_grad(lambda *z, n=name: _loss(n, *z, tau), argnums=(0, 1, 2))(
            a, b, c
        )
        out[name] = (val, jnp.sqrt(sum(jnp.sum(x**2) for x in g)))
    return out


def _flat(res) -> dict[str, float]:
    r = jax.device_get(res)
    flat = {f"{n}/grad_norm": float(r[n][1]) for n in LOSSES}
    flat.update({f"{n}/loss": float(r[n][0]) for n in LOSSES})
    return flat


def grad_random(dim: int, tau: float, draw: int) -> dict[str, float]:
    ka, kb, kc = jax.random.split(jax.random.key(draw), 3)
    a, b, c = (_unit(jax.random.normal(k, (B, dim))) for k in (ka, kb, kc))
    return _flat(loss_and_grad_norms(a, b, c, jnp.float32(tau)))


def _trainer(config_path: str, overrides: list[str]):
    config = load_config(config_path, overrides)
    setup_runtime(config)
    mesh = make_mesh(config)
    trainer = get_trainer(config, mesh)
    return config, mesh, trainer


def _embed_fn(trainer):
    def fn(params, rest, batch):
        return trainer.task.eval_embed(nnx.merge(trainer.graphdef, params, rest), batch)

    return jax.jit(fn)


def _cos_stats(z: dict, anchor: str, others: list[str]) -> dict[str, float]:
    out = {}
    a = np.asarray(z[anchor], np.float64)
    off = ~np.eye(len(a), dtype=bool)
    for m in (anchor, *others):
        # Concentration of one modality: mean cosine between different items (0 on the sphere).
        x = np.asarray(z[m], np.float64)
        out[f"cos_within/{m}"] = float((x @ x.T)[off].mean())
    for m in others:
        s = a @ np.asarray(z[m], np.float64).T
        out[f"abs_cos_positive/{m}"] = float(np.abs(np.diag(s)).mean())
        out[f"abs_cos_negative/{m}"] = float(np.abs(s[off]).mean())
    return out


def grad_model(config_path: str, seed: int) -> dict[str, float]:
    config, mesh, trainer = _trainer(config_path, [f"seed={seed}", *QUIET])
    if config.train.batch_size != B or len(config.model.modalities) != K:
        raise ValueError(f"{config_path}: needs batch {B} and {K} modalities")
    state = trainer.init()
    batch = next(make_train_iterator(config, mesh, load_split(config, config.data.train_split)))
    model_batch = {k: v for k, v in batch.items() if k != "index" and "/" not in k}
    z = jax.device_get(_embed_fn(trainer)(state["params"], state["rest"], model_batch))
    anchor = config.model.anchor
    others = [m for m in config.model.modalities if m != anchor]
    a, b, c = (jnp.asarray(z[m], jnp.float32) for m in (anchor, *others))
    out = _flat(loss_and_grad_norms(a, b, c, jnp.float32(config.model.temperature_init)))
    out["temperature"] = float(config.model.temperature_init)
    out["embed_dim"] = float(config.model.embed_dim)
    out.update(_cos_stats(z, anchor, others))
    return out


# ------------------------------------------------------------------------------------------
# (b, c) training runs
# ------------------------------------------------------------------------------------------


def train_run(config, mesh, trainer, max_steps: int, stop_below: float | None) -> tuple:
    """Step the config's trainer for up to ``max_steps`` (its schedule unchanged); stop at the
    first step whose loss is below ``stop_below`` (None: never). Returns (state, curve)."""
    iterator = make_train_iterator(config, mesh, load_split(config, config.data.train_split))
    state = trainer.init()
    curve = {"loss": [], "grad_norm": [], "temperature": []}
    t0 = time.time()
    for step in range(1, max_steps + 1):
        state, metrics = trainer.step(state, next(iterator))
        m = jax.device_get(metrics)
        if step == 1:
            t0 = time.time()  # steps/s without the compilation of step 1
        if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
            raise FloatingPointError(f"non-finite loss / gradient at step {len(curve['loss'])}")
        for key in curve:
            curve[key].append(float(m.get(key, np.nan)))
        if step % 50 == 0:
            print(f"  step {step}: loss {curve['loss'][-1]:.4f}", flush=True)
        if stop_below is not None and curve["loss"][-1] < stop_below:
            break
    curve["steps_per_sec"] = (len(curve["loss"]) - 1) / max(time.time() - t0, 1e-9)
    return state, curve


def plateau_run(config_path: str, overrides: list[str], cap: int, seed: int) -> dict:
    config, mesh, trainer = _trainer(config_path, [f"seed={seed}", *overrides, *QUIET])
    threshold = math.log(config.train.batch_size) - 0.05
    _, curve = train_run(config, mesh, trainer, cap, threshold)
    losses, g = curve["loss"], np.array(curve["grad_norm"])
    exited = losses[-1] < threshold
    return {
        "overrides": overrides,
        "plateau_steps": len(losses) if exited else None,
        "cap": cap,
        "threshold": threshold,
        "grad_norm/step1": float(g[0]),
        "grad_norm/steps1-25": float(g[:25].mean()),
        "grad_norm/steps26-50": float(g[25:50].mean()) if len(g) > 25 else None,
        "loss/step1": losses[0],
        "loss/last": losses[-1],
        "steps_per_sec": curve["steps_per_sec"],
        "curve": curve,
    }


def anti_run(config_path: str, steps: int, seed: int) -> dict:
    config, mesh, trainer = _trainer(config_path, [f"seed={seed}", *QUIET])
    state, curve = train_run(config, mesh, trainer, steps, None)
    embed = _embed_fn(trainer)
    emb, _ = eval_lib.collect(
        lambda b: embed(state["params"], state["rest"], b),
        load_split(config, config.data.eval_split),
        batch_size=config.eval.batch_size,
        sharding=trainer.batch_sharding,
        modalities=_modalities(config),  # the loop's modality -> data-kind map
    )
    anchor = config.model.anchor
    others = [m for m in config.model.modalities if m != anchor]
    a = np.asarray(emb[anchor], np.float64)
    out = {"steps": steps, "seed": seed, "items": len(a), "loss/last": curve["loss"][-1]}
    for m in others:
        cos = np.sum(a * np.asarray(emb[m], np.float64), axis=-1)
        out[f"anti_aligned/{m}"] = float(np.mean(cos < 0))
        out[f"cos_positive_mean/{m}"] = float(cos.mean())
    report = eval_lib.retrieval_report(emb, anchor, others, ("volume", "cosine"))
    for score in ("volume", "cosine"):
        out[f"R@1/text_to_rest/{score}"] = report[f"retrieval/text_to_rest/{score}/R@1"]
    out["chance/R@1"] = report["chance/R@1"]
    out["steps_per_sec"] = curve["steps_per_sec"]
    return out


# ------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------


def _pm(s: dict, key: str, fmt: str = ".3f") -> str:
    return f"{s[key]['mean']:{fmt}} ± {s[key]['std']:{fmt}}" if key in s else "-"


def markdown(res: dict) -> str:
    lines = []
    gr = res.get("grad_random", {})
    if gr:
        lines += [
            f"## (a) |dL/dz| at random unit embeddings (B = {B}, k = {K}), mean ± std over "
            f"{res['draws']} draws; ratio = GRAM / anchored InfoNCE",
            "",
            "| D | tau | " + " | ".join(LABELS[n] for n in LOSSES) + " | ratio | GRAM loss |",
            "|---|---|" + "---|" * (len(LOSSES) + 2),
        ]
        for key, draws in gr.items():
            s = summarise(list(draws.values()))
            dim, tau = key.split("/")
            ratio = s["gram/grad_norm"]["mean"] / s["infonce_anchored/grad_norm"]["mean"]
            cells = [_pm(s, f"{n}/grad_norm") for n in LOSSES]
            lines.append(
                f"| {dim[2:]} | {tau[4:]} | "
                + " | ".join(cells)
                + f" | {ratio:.3f} | {s['gram/loss']['mean']:.4f} |"
            )
        lines.append(f"\nln(B) = {math.log(B):.4f}.")
    gm = res.get("grad_model", {})
    if gm:
        s = summarise(list(gm.values()))
        lines += [
            "",
            f"## (a') |dL/dz| at the untrained model of `{res['config']}` on a real first "
            f"batch (tau = {_pm(s, 'temperature', '.2f')}, D = {_pm(s, 'embed_dim', '.0f')}), "
            f"seeds {sorted(gm)}",
            "",
            "| " + " | ".join(LABELS[n] for n in LOSSES) + " | ratio GRAM / anchored |",
            "|---" * (len(LOSSES) + 1) + "|",
            "| "
            + " | ".join(_pm(s, f"{n}/grad_norm") for n in LOSSES)
            + f" | {s['gram/grad_norm']['mean'] / s['infonce_anchored/grad_norm']['mean']:.3f} |",
            "",
            "| pair | mean abs cos, positives | mean abs cos, negatives |",
            "|---|---|---|",
        ]
        for m in sorted(k.split("/")[1] for k in s if k.startswith("abs_cos_positive/")):
            lines.append(
                f"| anchor-{m} | {_pm(s, f'abs_cos_positive/{m}')} | "
                f"{_pm(s, f'abs_cos_negative/{m}')} |"
            )
        within = sorted(k.split("/")[1] for k in s if k.startswith("cos_within/"))
        if within:
            lines += ["", "| modality | mean cosine between different items |", "|---|---|"]
            lines += [f"| {m} | {_pm(s, f'cos_within/{m}')} |" for m in within]
        dim = s["embed_dim"]["mean"]
        lines.append(
            f"\nUniform unit vectors: sqrt(2 / (pi D)) = {math.sqrt(2 / math.pi / dim):.3f}."
        )
    pl = res.get("plateau", {})
    if pl:
        lines += [
            "",
            f"## (b) plateau of `{res['config']}`: first step with loss < ln(B) - 0.05 "
            f"= {math.log(B) - 0.05:.3f} (schedule of the config; runs stop there or at the cap)",
            "",
            "| run | plateau steps: mean ± std (per seed) | grad_norm step 1 | mean steps 1-25 "
            "| mean steps 26-50 | steps/s |",
            "|---|---|---|---|---|---|",
        ]
        for name, runs in pl.items():
            rs = list(runs.values())
            steps = [r["plateau_steps"] if r["plateau_steps"] is not None else math.inf for r in rs]
            shown = ", ".join(str(x) if x != math.inf else f"> {rs[0]['cap']}" for x in steps)
            mean = f"{np.mean(steps):.0f} ± {np.std(steps):.0f}" if math.inf not in steps else "-"
            s = summarise(rs, skip=("overrides", "curve", "plateau_steps", "cap", "threshold"))
            lines.append(
                f"| {name} | {mean} ({shown}) | {_pm(s, 'grad_norm/step1', '.4f')} | "
                f"{_pm(s, 'grad_norm/steps1-25', '.4f')} | {_pm(s, 'grad_norm/steps26-50', '.4f')}"
                f" | {s['steps_per_sec']['mean']:.2f} |"
            )
        lines.append(f"\nSeeds {sorted(next(iter(pl.values())))}: mean ± std (each seed).")
    an = res.get("anti", {})
    if an:
        lines += [
            "",
            "## (c) held-out positives with cosine(anchor_i, m_i) < 0 after training",
            "",
            "| config | steps | modality | anti-aligned fraction | mean positive cosine "
            "| T->rest R@1 volume | T->rest R@1 cosine |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, runs in an.items():
            rs = list(runs.values())
            s = summarise(rs)
            for m in sorted(k.split("/")[1] for k in s if k.startswith("anti_aligned/")):
                lines.append(
                    f"| {name} (n={len(rs)}) | {rs[0]['steps']} | {m} | "
                    f"{_pm(s, f'anti_aligned/{m}')} | {_pm(s, f'cos_positive_mean/{m}')} | "
                    f"{_pm(s, 'R@1/text_to_rest/volume', '.1f')} | "
                    f"{_pm(s, 'R@1/text_to_rest/cosine', '.1f')} |"
                )
            per_seed = ", ".join(
                f"seed {k}: "
                + " / ".join(
                    f"{r[f'anti_aligned/{m}']:.3f}"
                    for m in sorted(x.split("/")[1] for x in r if x.startswith("anti_aligned/"))
                )
                for k, r in runs.items()
            )
            lines.append(f"| | | per seed (anti-aligned, modalities as above) | {per_seed} | | | |")
        r0 = next(iter(next(iter(an.values())).values()))
        lines.append(f"\n{r0['items']} held-out items; chance R@1 = {r0['chance/R@1']:.2f} %.")
    lines.append(f"\nTotal wall clock: {res['wall_seconds_total']:.0f} s.")
    return "\n".join(lines) + "\n"


def write(res: dict, out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gram_diagnosis.json").write_text(json.dumps(res, indent=2))
    (out / "gram_diagnosis.md").write_text(markdown(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--parts",
        nargs="+",
        default=["grad", "plateau", "anti"],
        choices=["grad", "grad_model", "plateau", "anti", "report"],
        help="report: only rewrite the Markdown from the JSON (with --resume)",
    )
    p.add_argument("--config", default="configs/synthetic.py:method=gram_exact")
    p.add_argument("--baseline", default="configs/synthetic.py:method=infonce")
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--plateau-cap", type=int, default=200)
    p.add_argument("--plateau-runs", nargs="+", default=list(PLATEAU_RUNS))
    p.add_argument("--steps", type=int, default=600, help="training steps of part (c)")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS)
    p.add_argument("--resume", action="store_true", help="keep finished units of the JSON")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config, baseline = (str(ROOT / p) for p in (args.config, args.baseline))  # abs stays
    res = {"config": args.config, "baseline": args.baseline, "draws": args.draws}
    previous = args.out / "gram_diagnosis.json"
    if args.resume and previous.is_file():
        res = {**json.loads(previous.read_text()), **res}
    t_start = time.time() - res.get("wall_seconds_total", 0.0)

    def save():
        res["wall_seconds_total"] = time.time() - t_start
        write(res, args.out)

    if "grad" in args.parts:  # "grad_model": only the untrained model's embeddings
        gr = res.setdefault("grad_random", {})
        for dim in DIMS:
            for tau in TAUS:
                cell = gr.setdefault(f"D={dim}/tau={tau}", {})
                for d in range(args.draws):
                    if str(d) not in cell:
                        cell[str(d)] = grad_random(dim, tau, d)
            save()
    if "grad" in args.parts or "grad_model" in args.parts:
        gm = res.setdefault("grad_model", {})
        for seed in args.seeds:
            if str(seed) not in gm:
                gm[str(seed)] = grad_model(config, seed)
                save()
    if "plateau" in args.parts:
        pl = res.setdefault("plateau", {})
        for seed in args.seeds:  # seed-major: an interrupted study has every factor
            for name in args.plateau_runs:
                runs = pl.setdefault(name, {})
                if str(seed) not in runs:
                    print(f"plateau run {name} seed {seed}", flush=True)
                    runs[str(seed)] = plateau_run(
                        config, PLATEAU_RUNS[name], args.plateau_cap, seed
                    )
                    save()
    if "anti" in args.parts:
        an = res.setdefault("anti", {})
        for seed in args.seeds:
            for name, path in (("gram", config), ("infonce_anchored", baseline)):
                runs = an.setdefault(f"{name} ({pathlib.Path(path).name})", {})
                if str(seed) not in runs:  # --resume keeps a finished run whatever its --steps
                    print(f"anti-alignment run {name} seed {seed}, {args.steps} steps", flush=True)
                    runs[str(seed)] = anti_run(path, args.steps, seed)
                    save()
    save()
    print(markdown(res))


if __name__ == "__main__":
    main()
