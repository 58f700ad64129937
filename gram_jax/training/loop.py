"""The training loop: data, resume, steps, logging, checkpoints, evaluation, final report.

``train(config, workdir)`` runs a config end to end and returns the final held-out metrics
(also written to ``<workdir>/final_metrics.json``). Files in ``workdir``: ``config.json``,
``metrics.jsonl``, ``tensorboard/``, ``checkpoints/<step>/``, ``final_metrics.json``.

Exit conditions: normal end (final checkpoint + evaluation); non-finite loss or gradient
(:class:`NonFiniteError` naming the step; the last good checkpoint on disk is kept and no
later one is written).
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from gram_jax import data as data_lib
from gram_jax.models import count_params
from gram_jax.training import evaluate as eval_lib
from gram_jax.training.checkpoint import Checkpointer
from gram_jax.training.reporting import MetricWriter, Progress, format_report
from gram_jax.training.sharding import DATA_AXES, make_mesh
from gram_jax.training.step import Trainer, make_trainer
from gram_jax.training.tasks import make_task

__all__ = ["train", "evaluate", "NonFiniteError", "setup_runtime", "make_train_iterator"]

log = logging.getLogger("gram_jax.training")


class NonFiniteError(RuntimeError):
    """The loss or a gradient became non-finite; ``step`` is the first bad step."""

    def __init__(self, step: int, last_good: int | None):
        self.step = step
        self.last_good = last_good
        where = f"step {last_good}" if last_good is not None else "none saved yet"
        super().__init__(
            f"non-finite loss or gradient at step {step}: training stopped, the update of that "
            f"step was not applied. Last good checkpoint: {where}."
        )


def setup_runtime(config: ml_collections.ConfigDict) -> None:
    """absl flags for grain, and ``jax.distributed.initialize`` when configured."""
    import tensorflow_datasets as tfds
    from absl import flags

    tfds.disable_progress_bar()

    if not flags.FLAGS.is_parsed():
        # grain reads absl flags; unparsed flags raise in worker processes (jax_stack.md).
        flags.FLAGS.mark_as_parsed()
    d = config.distributed
    if d.initialize:
        kw = {}
        if d.coordinator_address:
            kw["coordinator_address"] = d.coordinator_address
        if d.num_processes > 0:
            kw["num_processes"] = d.num_processes
        if d.process_id >= 0:
            kw["process_id"] = d.process_id
        jax.distributed.initialize(**kw)


def _data_kwargs(config) -> dict[str, Any]:
    return {k: v for k, v in config.data.builder.items()}


def _data_dir(config):
    return config.data.data_dir or None


# Encoder kinds whose inputs the data pipeline knows under another kind (a CNN reads images).
def _modalities(config) -> dict[str, str]:
    return {name: m.kind for name, m in config.model.modalities.items()}


def load_split(config, split: str):
    """Random-access source of a split (generates the dataset first if absent)."""
    return data_lib.load_source(config.data.name, split, _data_dir(config), **_data_kwargs(config))


def make_train_iterator(config, mesh, source):
    """Grain iterator of global training batches, repeated forever, sharded on the mesh."""
    augment = None if config.data.augment == "none" else config.data.augment
    return data_lib.make_iterator(
        source,
        batch_size=config.train.batch_size,
        seed=config.seed,
        shuffle=True,
        num_epochs=None,
        mesh=mesh,
        data_axis=DATA_AXES,
        augment=augment,
        two_views=config.data.two_views,
        worker_count=config.data.worker_count,
        modalities=_modalities(config),
    )


_EVAL_FNS: dict[tuple[int, str], Any] = {}


def _eval_fn(trainer: Trainer, kind: str):
    """Jitted ``(params, rest, batch) -> outputs`` for evaluation, compiled once per trainer
    (periodic evaluations reuse it). ``kind``: "embed" (retrieval embeddings) or "features"
    (linear-probe features: CoMM's pre-projector fused vector, else the concatenated
    embeddings or, with ``eval.probe_features="encoders"``, pooled encoder outputs)."""
    key = (id(trainer), kind)
    if key not in _EVAL_FNS:
        task, graphdef = trainer.task, trainer.graphdef
        mods = list(trainer.config.model.modalities.keys())

        def fn(params, rest, batch):
            model = nnx.merge(graphdef, params, rest)
            if kind == "embed":
                return task.eval_embed(model, batch)
            if trainer.config.model.kind == "comm":
                return task.features(model, batch)
            if trainer.config.eval.probe_features == "encoders":
                return task.features(model, batch)
            z = task.eval_embed(model, batch)
            return jnp.concatenate([z[m] for m in mods], axis=-1)

        if len(_EVAL_FNS) > 8:
            _EVAL_FNS.clear()
        _EVAL_FNS[key] = jax.jit(fn, out_shardings=eval_lib.replicated(trainer.mesh))
    return _EVAL_FNS[key]


def evaluate(trainer: Trainer, state: Any, config: ml_collections.ConfigDict) -> dict[str, float]:
    """Held-out retrieval (+ linear probes) of the current state (see evaluate.py)."""
    batch_sharding = trainer.batch_sharding
    mods = _modalities(config)
    out: dict[str, float] = {}
    if config.eval.scores:
        embed = _eval_fn(trainer, "embed")
        source = load_split(config, config.data.eval_split)
        emb, _ = eval_lib.collect(
            lambda b: embed(state["params"], state["rest"], b),
            source,
            batch_size=config.eval.batch_size,
            sharding=batch_sharding,
            modalities=mods,
            max_examples=config.eval.max_examples,
            split=config.data.eval_split,
        )
        anchor = config.model.anchor
        others = [m for m in mods if m != anchor]
        fused = "+".join(others) if config.model.kind == "comm" else None
        out.update(eval_lib.retrieval_report(emb, anchor, others, tuple(config.eval.scores), fused))
    tasks = tuple(config.eval.probe_tasks)
    if tasks:
        feat = _eval_fn(trainer, "features")

        def features(split, max_examples):
            return eval_lib.collect(
                lambda b: feat(state["params"], state["rest"], b),
                load_split(config, split),
                batch_size=config.eval.batch_size,
                sharding=batch_sharding,
                modalities=mods,
                max_examples=max_examples,
                label_keys=tasks,
                split=split,
            )

        x_tr, y_tr = features(config.eval.probe_train_split, config.eval.probe_train_examples)
        x_te, y_te = features(config.data.eval_split, config.eval.max_examples)
        for t in tasks:
            res = eval_lib.linear_probe(x_tr, y_tr[t], x_te, y_te[t], seed=config.seed)
            out[f"probe/{t}/balanced_accuracy"] = res["balanced_accuracy"]
            if "auc" in res:
                out[f"probe/{t}/auc"] = res["auc"]
    return out


_TRAINERS: dict[tuple, Trainer] = {}


def get_trainer(config: ml_collections.ConfigDict, mesh) -> Trainer:
    """``make_trainer`` memoised on (config, mesh): a second ``train`` of the same config in one
    process (a notebook, a restart after a fallback) reuses the compiled step."""
    key = (config.to_json_best_effort(sort_keys=True), mesh.devices.tobytes(), mesh.axis_names)
    if key not in _TRAINERS:
        _TRAINERS.clear()  # keep one: executables hold device memory
        _TRAINERS[key] = make_trainer(config, mesh, make_task(config, mesh))
    return _TRAINERS[key]


def _fetch(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
    """Run ``config`` in ``workdir`` (resuming from its newest good checkpoint)."""
    setup_runtime(config)
    workdir = pathlib.Path(workdir).expanduser().absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    mesh = make_mesh(config)
    t0 = time.time()
    source = load_split(config, config.data.train_split)
    data_seconds = time.time() - t0
    trainer = get_trainer(config, mesh)
    writer = MetricWriter(workdir)
    say = Progress(0, 0, False).write
    n_params = count_params(nnx.eval_shape(lambda: trainer.model(trainer.abstract_state)))
    say(
        f"{config.name}: {config.model.kind} model, {n_params:,} parameters, loss "
        f"{config.loss.name} ({config.loss.impl}), mesh {dict(mesh.shape)}, global batch "
        f"{config.train.batch_size}, {config.train.steps} steps; data ready in "
        f"{data_seconds:.1f}s"
    )

    iterator = make_train_iterator(config, mesh, source)
    ckpt = Checkpointer(workdir, config.train.keep_checkpoints, config.train.async_checkpointing)
    restored = ckpt.restore(trainer.abstract_state, iterator)
    for msg in ckpt.messages:
        say(f"WARNING: {msg}")
        writer.event(0, msg)
    if restored is None:
        state = trainer.init()
        start = 0
    else:
        start, state = restored
        msg = f"resumed from checkpoint step {start}"
        say(msg)
        writer.event(start, msg)
    last_saved = start if restored is not None else None
    progress = Progress(config.train.steps, start, config.train.progress_bar)
    say = progress.write

    steps = config.train.steps
    batch_size = config.train.batch_size
    t_last, s_last = time.time(), start
    try:
        for step in range(start + 1, steps + 1):
            batch = next(iterator)
            state, metrics = trainer.step(state, batch)
            is_log = step % config.train.log_every == 0 or step == steps or step == start + 1
            is_ckpt = config.train.checkpoint_every and step % config.train.checkpoint_every == 0
            if is_log or is_ckpt:
                bad = int(state["bad_step"])
                if bad >= 0:
                    raise NonFiniteError(bad, last_saved)
            if is_log:
                m = _fetch(metrics)
                now = time.time()
                dt = max(now - t_last, 1e-9)
                m["steps_per_sec"] = (step - s_last) / dt
                m["examples_per_sec"] = m["steps_per_sec"] * batch_size
                t_last, s_last = now, step
                writer.write(step, "train", m)
                progress.update(step, m)
            if is_ckpt and step != steps:
                ckpt.save(step, state, iterator)
                last_saved = step
            if config.train.eval_every and step % config.train.eval_every == 0 and step != steps:
                ev = evaluate(trainer, state, config)
                writer.write(step, "eval", ev)
                say(format_report(ev, f"evaluation at step {step}"))
                t_last = time.time()
        if last_saved != steps:
            ckpt.save(steps, state, iterator)
        ckpt.wait()
    except NonFiniteError as e:
        writer.event(e.step, str(e))
        say(f"ERROR: {e}")
        ckpt.close()
        writer.close()
        progress.close()
        raise
    progress.close()
    if not config.train.final_eval:
        ckpt.close()
        writer.close()
        return {}
    final = evaluate(trainer, state, config)
    final["train/steps"] = float(steps)
    writer.write(steps, "eval", final)
    if is_main:
        (workdir / "final_metrics.json").write_text(json.dumps(final, indent=2, sort_keys=True))
    say(format_report(final, f"{config.name}: held-out evaluation after {steps} steps"))
    ckpt.close()
    writer.close()
    return final
