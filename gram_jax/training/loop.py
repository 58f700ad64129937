"""The training loop: data, resume, steps, logging, checkpoints, evaluation, final report.

``train(config, workdir)`` runs a config end to end and returns the final held-out metrics
(also written to ``<workdir>/final_metrics.json``). Files in ``workdir``: ``config.json``,
``metrics.jsonl``, ``tensorboard/``, ``checkpoints/<step>/``, ``final_metrics.json``.

Exit conditions: normal end (final checkpoint + evaluation); the run already finished
(``steps`` <= the restored step: evaluation only, nothing saved); non-finite loss or gradient
(:class:`NonFiniteError` naming the step; the last good checkpoint on disk is kept and no
later one is written); SIGTERM / SIGINT (:class:`Interrupted`, after checkpointing the
current step when ``train.save_on_signal``); a failed save (:class:`CheckpointWriteError`,
at the first step after it failed); a second process on the workdir (:class:`WorkdirBusy`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
from flax import nnx

from gram_jax import data as data_lib
from gram_jax.models import count_params
from gram_jax.training import evaluate as eval_lib
from gram_jax.training import multihost
from gram_jax.training.checkpoint import (
    Checkpointer,
    CheckpointWriteError,
    WorkdirBusy,
    WorkdirLock,
    _TrainingStopped,
)
from gram_jax.training.config import ConfigError, eval_scores
from gram_jax.training.reporting import MetricWriter, Progress, format_report
from gram_jax.training.sharding import DATA_AXES, make_mesh
from gram_jax.training.step import Trainer, make_trainer
from gram_jax.training.tasks import make_task

__all__ = [
    "train",
    "evaluate",
    "NonFiniteError",
    "Interrupted",
    "CheckpointWriteError",
    "WorkdirBusy",
    "setup_runtime",
    "make_train_iterator",
]

log = logging.getLogger("gram_jax.training")


class NonFiniteError(_TrainingStopped):
    """The loss or a gradient became non-finite; ``step`` is the first bad step."""

    def __init__(self, step: int, last_good: int | None):
        super().__init__(
            step,
            last_good,
            f"non-finite loss or gradient at step {step}: training stopped, the update of that "
            "step was not applied",
            none="none saved yet",
        )


def setup_runtime(config: ml_collections.ConfigDict) -> None:
    """absl flags for grain, and ``jax.distributed.initialize`` when configured."""
    import tensorflow_datasets as tfds
    from absl import flags

    tfds.disable_progress_bar()

    if not flags.FLAGS.is_parsed():
        # grain reads absl flags; unparsed flags raise in worker processes (jax_stack.md).
        flags.FLAGS.mark_as_parsed()
    # config.distributed, else the launcher's environment, else JAX's cluster detection.
    multihost.initialize(config.distributed)


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


def evaluate(trainer: Trainer, state: Any, config: ml_collections.ConfigDict) -> dict[str, float]:
    """Held-out retrieval (+ linear probes) of the current state (see evaluate.py), with the
    trainer's jitted ``eval_fns`` (compiled once per trainer; the probe features are the
    task's :meth:`~gram_jax.training.tasks.Task.features`)."""
    batch_sharding = trainer.batch_sharding
    mods = _modalities(config)
    out: dict[str, float] = {}
    if config.eval.scores:
        embed = trainer.eval_fns["embed"]
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
        out.update(eval_lib.retrieval_report(emb, anchor, others, eval_scores(config), fused))
    tasks = tuple(config.eval.probe_tasks)
    if tasks:
        feat = trainer.eval_fns["features"]

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


def get_trainer(config: ml_collections.ConfigDict, mesh) -> Trainer:
    """The trainer of a config on ``mesh`` (its task and jitted functions). Nothing is cached
    at module level, so a dropped trainer frees its executables (a second ``train`` of the
    same config in one process compiles again)."""
    return make_trainer(config, mesh, make_task(config, mesh))


def _fetch(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


class Interrupted(RuntimeError):
    """SIGTERM / SIGINT stopped training at ``step``; ``saved`` says whether that step was
    checkpointed (``config.train.save_on_signal``)."""

    def __init__(self, signum: int, step: int, saved: bool, last_good: int | None):
        self.signum = signum
        self.step = step
        self.saved = saved
        name = signal.Signals(signum).name
        if saved:
            what = f"checkpoint step {step} saved; run the same command to resume from it"
        else:
            where = f"step {last_good}" if last_good is not None else "none"
            what = f"no checkpoint written for it (last good checkpoint: {where})"
        super().__init__(f"{name} received: training stopped after step {step}, {what}.")


class _Signals:
    """SIGTERM / SIGINT set a flag that the loop reads between steps (so an in-flight save
    is never torn down from inside a signal handler). Multi-host runs leave SIGTERM to the
    JAX preemption service, which makes every host agree on the step
    (``CheckpointManager.reached_preemption``)."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is not threading.main_thread():
            return self
        sigs = [signal.SIGINT]
        if jax.process_count() == 1:
            sigs.append(signal.SIGTERM)
        for s in sigs:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()


def _check_fields(config, source) -> None:
    """Every configured modality is a field of the dataset (ConfigError naming the fix)."""
    fields = sorted(k for k in source[0] if k != "index" and not k.endswith("_mask"))
    for m in config.model.modalities:
        if m not in fields:
            raise ConfigError(
                f"config.model.modalities.{m}: dataset {config.data.name!r} has no field "
                f"{m!r}; its fields are {fields}. Name the modalities after them "
                f"(config.model.modalities, config.model.anchor)."
            )


# Encoder config field that must equal a size of the input, and which axis of one example.
_INPUT_FIELDS = {"in_features": -1, "n_mels": -1, "in_channels": -1}


def _check_inputs(config, trainer: Trainer, state, batch) -> None:
    """Shape-check one batch against each modality's encoder (abstractly, nothing runs);
    a mismatch is a one-line ConfigError naming the modality and the key to set."""
    one = batch["view1"] if config.data.two_views else batch
    model = trainer.model(state)
    for m in config.model.modalities:
        enc = model.encoders[m]
        x, mask = one[m], one.get(f"{m}_mask")
        sx = jax.ShapeDtypeStruct(x.shape, x.dtype)
        smask = None if mask is None else jax.ShapeDtypeStruct(mask.shape, mask.dtype)
        try:
            nnx.eval_shape(lambda e, a, k: e(a, k), enc, sx, smask)
        except (ValueError, TypeError) as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            hint = ""
            cfg = getattr(enc, "cfg", None)
            for field, axis in _INPUT_FIELDS.items():
                want = getattr(cfg, field, None)
                if want is not None and x.ndim >= 2 and x.shape[axis] != want:
                    hint = f"; set config.model.modalities.{m}.overrides.{field}={x.shape[axis]}"
                    break
            raise ConfigError(
                f"config.model.modalities.{m}: the data does not fit the model: {msg} (the "
                f"dataset's {m!r} batches are {x.dtype}{list(x.shape)}){hint or ''}"
                + ("" if hint else f"; change config.model.modalities.{m} to match the data")
            ) from None


def _saved_config(workdir: pathlib.Path) -> dict | None:
    path = workdir / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
    """Run ``config`` in ``workdir`` (resuming from its newest good checkpoint).

    Raises :class:`ConfigError` (bad config, a checkpoint written with a structurally
    different config, data that does not fit the model), :class:`WorkdirBusy` (another
    process is training in ``workdir``), :class:`NonFiniteError`, :class:`Interrupted`
    (SIGTERM / SIGINT) and :class:`CheckpointWriteError` (a save failed). The checkpointer,
    metric writer, progress bar, signal handlers and workdir lock are released on every exit.
    """
    setup_runtime(config)
    workdir = pathlib.Path(workdir).expanduser().absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(WorkdirLock(workdir))
        return _train(config, workdir, stack)


def _train(config, workdir: pathlib.Path, stack: contextlib.ExitStack) -> dict[str, float]:
    is_main = jax.process_index() == 0
    say = Progress(0, 0, False).write
    say(f"{config.name}: workdir {workdir}")
    ckpt = Checkpointer(workdir, config.train.keep_checkpoints, config.train.async_checkpointing)
    stack.push(ckpt.exit)
    # Before anything is built or written: a refused resume costs nothing and changes no file
    # (config.json is rewritten only after this check).
    changes = ckpt.check_config(config, fallback_config=_saved_config(workdir))
    mesh = make_mesh(config)
    t0 = time.time()
    source = multihost.first_then_rest(lambda: load_split(config, config.data.train_split))
    _check_fields(config, source)
    data_seconds = time.time() - t0
    trainer = get_trainer(config, mesh)
    n_params = count_params(nnx.eval_shape(lambda: trainer.model(trainer.abstract_state)))
    say(
        f"{config.name}: {config.model.kind} model, {n_params:,} parameters, loss "
        f"{config.loss.name} ({config.loss.impl}), mesh {dict(mesh.shape)}, global batch "
        f"{config.train.batch_size}, {config.train.steps} steps; data ready in "
        f"{data_seconds:.1f}s"
    )

    iterator = make_train_iterator(config, mesh, source)
    restored = ckpt.restore(trainer.abstract_state, iterator)
    writer = stack.enter_context(contextlib.closing(MetricWriter(workdir)))
    for msg in ckpt.messages:
        say(f"WARNING: {msg}")
        writer.event(0, msg)
    steps = config.train.steps
    if restored is None:
        state = trainer.init()
        start = 0
    else:
        start, state = restored
        msg = f"resumed from checkpoint step {start}"
        if changes:
            msg += "; config changed since it was saved: " + "; ".join(
                f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()
            )
        say(msg)
        writer.event(start, msg)
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    if restored is not None and start >= steps:
        msg = (
            f"the run in {workdir} is already finished at step {start} (config.train.steps="
            f"{steps}): nothing to train, no checkpoint written. Raise config.train.steps to "
            "train on, or use another --workdir for a new run."
        )
        say(msg)
        writer.event(start, msg)
        ckpt.close()
        if not config.train.final_eval:
            return {}
        return _final(config, trainer, state, start, workdir, writer, say)

    progress = stack.enter_context(
        contextlib.closing(Progress(steps, start, config.train.progress_bar))
    )
    say = progress.write
    signals = stack.enter_context(_Signals())
    batch_size = config.train.batch_size
    t_last, s_last = time.time(), start
    last_saved = start if restored is not None else None
    try:
        for step in range(start + 1, steps + 1):
            batch = next(iterator)
            if step == start + 1:
                _check_inputs(config, trainer, state, batch)
            state, metrics = trainer.step(state, batch)
            ckpt.poll()
            stop = signals.received is not None or (
                jax.process_count() > 1 and ckpt.manager.reached_preemption(step)
            )
            stop = stop and step != steps  # the last step: finish normally
            is_log = step % config.train.log_every == 0 or step == steps or step == start + 1
            is_ckpt = config.train.checkpoint_every and step % config.train.checkpoint_every == 0
            is_ckpt = is_ckpt or (stop and config.train.save_on_signal)
            if is_log or is_ckpt or stop:
                bad = int(state["bad_step"])
                if bad >= 0:
                    with contextlib.suppress(CheckpointWriteError):
                        ckpt.finish()  # the save in flight holds a good step: keep it
                    raise NonFiniteError(bad, ckpt.last_good)
            if is_log or stop:
                m = _fetch(metrics)
                now = time.time()
                dt = max(now - t_last, 1e-9)
                m["steps_per_sec"] = (step - s_last) / dt
                m["examples_per_sec"] = m["steps_per_sec"] * batch_size
                t_last, s_last = now, step
                writer.write(step, "train", m)
                progress.update(step, m)
            if is_ckpt and step != steps:
                ckpt.save(step, state, iterator, config)
                last_saved = step
            if stop:
                saved = bool(config.train.save_on_signal)
                if saved:
                    ckpt.finish()
                signum = signals.received or signal.SIGTERM
                raise Interrupted(signum, step, saved, ckpt.last_good)
            if config.train.eval_every and step % config.train.eval_every == 0 and step != steps:
                ev = evaluate(trainer, state, config)
                writer.write(step, "eval", ev)
                say(format_report(ev, f"evaluation at step {step}", config))
                t_last = time.time()
        signals.__exit__()  # a Ctrl-C during the final evaluation stops it at once
        if last_saved != steps:
            ckpt.save(steps, state, iterator, config)
        ckpt.close()
    except (NonFiniteError, Interrupted, CheckpointWriteError) as e:
        writer.event(getattr(e, "step", 0), str(e))
        say(f"ERROR: {e}")
        raise
    progress.close()
    if not config.train.final_eval:
        return {}
    return _final(config, trainer, state, steps, workdir, writer, say)


def _final(config, trainer, state, step: int, workdir, writer, say) -> dict[str, float]:
    final = evaluate(trainer, state, config)
    final["train/steps"] = float(step)
    writer.write(step, "eval", final)
    if jax.process_index() == 0:
        (workdir / "final_metrics.json").write_text(json.dumps(final, indent=2, sort_keys=True))
    say(format_report(final, f"{config.name}: held-out evaluation after {step} steps", config))
    return final
