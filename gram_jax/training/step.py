"""Train state and THE train step: one ``jax.jit`` with explicit shardings and donated state.

State (a plain pytree of arrays, what Orbax saves)::

    {"params":    pure dict of nnx.Param arrays (sharded by config.mesh rules),
     "rest":      pure dict of the other nnx variables (BatchNorm statistics, RNG counters),
     "opt_state": optax state (moments sharded like their parameters),
     "step":      int32 (), completed steps,
     "rng":       uint32 (2,), base key; step s uses fold_in(rng, s),
     "bad_step":  int32 (), -1, or the first step whose loss or gradient was non-finite}

One step (:func:`train_step`): forward of every modality -> loss over the global batch ->
gradients -> clipped AdamW update -> metrics. The non-finite guard is in the step: if the
loss or the gradient norm is not finite, the update is skipped and ``bad_step`` records the
step; it is sticky, so the state stays the last good one and the loop (which reads
``bad_step`` at each log and before each checkpoint, not every step) stops with the step
number without host syncs in between. :func:`make_trainer` only derives shardings and jits.

Gradient accumulation (``train.grad_accum = A``, :func:`grad_cache`) is GradCache-style so
that contrastive negatives stay global: (1) embeddings of the A microbatches without
gradient (``lax.scan``), (2) loss and ``dL/d(embeddings)`` once over the global batch, (3) per
microbatch, the VJP of its re-computed embeddings with its slice of that cotangent, summed.
The result equals the gradient of the full-batch loss (up to float reassociation);
activation memory is one microbatch. Microbatch j takes rows ``i * A + j`` so that every
device keeps its own rows. BatchNorm statistics (CoMM's projector) are then per microbatch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gram_jax.distributed import replicated
from gram_jax.training.optim import make_optimizer
from gram_jax.training.sharding import DATA_AXES, batch_spec, param_specs, tree_shardings
from gram_jax.training.tasks import Task, build_model

__all__ = [
    "Trainer",
    "train_step",
    "grad_cache",
    "make_trainer",
    "example_shapes",
    "abstract_batch",
]


def _pure(state) -> Any:
    return nnx.to_pure_dict(state)


@dataclasses.dataclass
class Trainer:
    """Everything the loop needs: the jitted step, shardings, and model (un)packing.

    ``init()`` returns a fresh sharded state; ``abstract_state`` has ShapeDtypeStructs with
    shardings (for restoring); ``step(state, batch) -> (state, metrics)`` donates ``state``;
    ``eval_fns[kind](params, rest, batch)`` are the jitted evaluation functions of this trainer
    (``"embed"``: :meth:`Task.eval_embed`, ``"features"``: :meth:`Task.features`), compiled on
    first use and freed with the trainer; ``model(state)`` rebuilds the NNX model of a state.
    """

    config: ml_collections.ConfigDict
    mesh: Mesh
    task: Task
    graphdef: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: Any
    abstract_state: Any
    init: Callable[[], Any]
    step: Callable[[Any, Any], tuple[Any, dict]]
    batch_sharding: NamedSharding
    eval_fns: dict[str, Callable[[Any, Any, Any], Any]]

    def model(self, state) -> nnx.Module:
        return nnx.merge(self.graphdef, state["params"], state["rest"])


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------


def _embed(task: Task, graphdef, params, rest, batch) -> tuple[Any, Any]:
    """``(emb, new_rest)``: the task's embeddings of ``batch`` and the model's non-parameter
    variables after the forward pass (BatchNorm statistics, RNG counters)."""
    model = nnx.merge(graphdef, params, rest)
    emb = task.embed(model, batch)
    return emb, _pure(nnx.state(model, nnx.Not(nnx.Param)))


def _loss(task: Task, graphdef, params, rest, emb, batch, rng, step) -> tuple[jax.Array, dict]:
    """``(loss, metrics)`` of embeddings over the whole batch (the loss's own parameters, such
    as the temperature, are read from ``params``)."""
    return task.loss(nnx.merge(graphdef, params, rest), emb, batch, rng, step)


def _split_micro(x, accum: int):
    """(B, ...) -> (A, B / A, ...) with microbatch j = rows i * A + j (device-local rows)."""
    b = x.shape[0]
    y = x.reshape(b // accum, accum, *x.shape[1:])
    return jnp.swapaxes(y, 0, 1)


def _merge_micro(y):
    """Inverse of :func:`_split_micro`: (A, B / A, ...) -> (B, ...)."""
    x = jnp.swapaxes(y, 0, 1)
    return x.reshape(-1, *x.shape[2:])


def grad_cache(task: Task, graphdef, params, rest, batch, rng, step, *, accum: int, mesh: Mesh):
    """``(loss, metrics, new_rest, grads)`` of the full-batch loss in ``accum`` microbatches.

    GradCache (module docstring): embeddings of every microbatch without gradient, then the
    loss and ``dL/d(emb)`` once over the global batch, then per microbatch the VJP of its
    re-computed embeddings with its slice of that cotangent, summed into the loss's own
    parameter gradient. Activation memory is one microbatch.
    """
    micro = jax.tree.map(lambda x: _split_micro(x, accum), batch)
    micro = jax.lax.with_sharding_constraint(micro, NamedSharding(mesh, P(None, DATA_AXES)))

    def forward(r, mb):
        emb, r_new = _embed(task, graphdef, params, r, mb)
        return r_new, (jax.lax.stop_gradient(emb), r)

    new_rest, (emb_micro, rest_in) = jax.lax.scan(forward, rest, micro)
    emb = jax.tree.map(_merge_micro, emb_micro)
    (loss, metrics), (g_params, g_emb) = jax.value_and_grad(
        lambda p, e: _loss(task, graphdef, p, new_rest, e, batch, rng, step),
        argnums=(0, 1),
        has_aux=True,
    )(params, emb)
    g_emb_micro = jax.tree.map(lambda x: _split_micro(x, accum), g_emb)

    def backward(acc, xs):
        mb, g, r = xs
        _, vjp = jax.vjp(lambda p: _embed(task, graphdef, p, r, mb)[0], params)
        (gp,) = vjp(g)
        return jax.tree.map(jnp.add, acc, gp), None

    grads, _ = jax.lax.scan(backward, g_params, (micro, g_emb_micro, rest_in))
    return loss, metrics, new_rest, grads


def _keep_if(ok, new, old):
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def train_step(
    state: dict,
    batch: dict,
    *,
    task: Task,
    graphdef: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    accum: int = 1,
    mesh: Mesh | None = None,
) -> tuple[dict, dict[str, jax.Array]]:
    """One update: forward -> loss over the global batch -> gradients -> Optax update.

    ``accum > 1`` takes the gradient with :func:`grad_cache` (``mesh`` needed). A non-finite
    loss or gradient norm skips the update and records the step in ``bad_step`` (sticky: every
    later update is skipped too). Returns the new state and float32 scalar metrics: the task's,
    plus ``loss``, ``grad_norm``, ``lr`` and ``param_norm`` (of the parameters before the step).
    """
    step, params, rest = state["step"], state["params"], state["rest"]
    rng = jax.random.fold_in(state["rng"], step)
    if accum > 1:
        loss, metrics, new_rest, grads = grad_cache(
            task, graphdef, params, rest, batch, rng, step, accum=accum, mesh=mesh
        )
    else:

        def objective(p):
            emb, new_rest = _embed(task, graphdef, p, rest, batch)
            loss, metrics = _loss(task, graphdef, p, new_rest, emb, batch, rng, step)
            return loss, (metrics, new_rest)

        (loss, (metrics, new_rest)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, state["opt_state"], params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    good_so_far = state["bad_step"] < 0
    ok = finite & good_so_far
    new_state = {
        "params": _keep_if(ok, optax.apply_updates(params, updates), params),
        "rest": _keep_if(ok, new_rest, rest),
        "opt_state": _keep_if(ok, new_opt, state["opt_state"]),
        "step": step + 1,
        "rng": state["rng"],
        "bad_step": jnp.where(good_so_far & ~finite, step + 1, state["bad_step"]).astype(jnp.int32),
    }
    out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    out["loss"] = loss.astype(jnp.float32)
    out["grad_norm"] = grad_norm
    out["lr"] = jnp.asarray(schedule(step), jnp.float32)
    out["param_norm"] = optax.tree.norm(params)
    return new_state, out


def _eval_apply(params, rest, batch, *, task: Task, graphdef, method: str):
    """``task.<method>(model, batch)`` of the model in ``(params, rest)`` (evaluation)."""
    return getattr(task, method)(nnx.merge(graphdef, params, rest), batch)


# ---------------------------------------------------------------------------------------------
# Shardings and jit
# ---------------------------------------------------------------------------------------------


def _opt_specs(abs_opt: Any, abs_params: Any, p_specs: Any) -> Any:
    """Optimizer-state specs: a leaf whose trailing dict-key path and shape are a parameter's
    (Adam moments, inside any multi_transform group) takes that parameter's spec; the rest
    (counts, empty group states) is replicated."""
    by_path = {}
    for (path, spec), leaf in zip(
        jax.tree_util.tree_leaves_with_path(p_specs, is_leaf=lambda x: isinstance(x, P)),
        jax.tree.leaves(abs_params),
        strict=True,
    ):
        by_path[tuple(k.key for k in path)] = (spec, tuple(leaf.shape))

    def spec_of(path, leaf) -> P:
        keys = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.append(k.key)
        hit = by_path.get(tuple(reversed(keys)))
        if hit is not None and hit[1] == tuple(leaf.shape):
            return hit[0]
        return P()

    return jax.tree_util.tree_map_with_path(spec_of, abs_opt)


def _init_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation) -> dict:
    """A fresh state (module docstring) with the config's seeds."""
    _, params, rest = nnx.split(build_model(config), nnx.Param, ...)
    params, rest = _pure(params), _pure(rest)
    return {
        "params": params,
        "rest": rest,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(config.seed + 1),
        "bad_step": jnp.full((), -1, jnp.int32),
    }


def make_trainer(config: ml_collections.ConfigDict, mesh: Mesh, task: Task) -> Trainer:
    """Build the model abstractly, derive the state's shardings, and jit init, step and the
    evaluation functions (nothing is compiled until first called)."""
    abstract_model = nnx.eval_shape(lambda: build_model(config))
    graphdef, abs_params, abs_rest = nnx.split(abstract_model, nnx.Param, ...)
    abs_params, abs_rest = _pure(abs_params), _pure(abs_rest)
    tx, schedule = make_optimizer(config, abs_params)

    p_specs = param_specs(config, abs_params, mesh)
    specs = {
        "params": p_specs,
        "rest": param_specs(config, abs_rest, mesh),
        "opt_state": _opt_specs(jax.eval_shape(tx.init, abs_params), abs_params, p_specs),
        "step": P(),
        "rng": P(),
        "bad_step": P(),
    }
    shardings = tree_shardings(specs, mesh)
    batch_sharding = NamedSharding(mesh, batch_spec())
    init_fn = functools.partial(_init_state, config, tx)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(init_fn),
        shardings,
    )
    step_fn = functools.partial(
        train_step,
        task=task,
        graphdef=graphdef,
        tx=tx,
        schedule=schedule,
        accum=int(config.train.grad_accum),
        mesh=mesh,
    )
    eval_fns = {
        kind: jax.jit(
            functools.partial(_eval_apply, task=task, graphdef=graphdef, method=method),
            out_shardings=replicated(mesh),
        )
        for kind, method in (("embed", "eval_embed"), ("features", "features"))
    }
    return Trainer(
        config=config,
        mesh=mesh,
        task=task,
        graphdef=graphdef,
        tx=tx,
        schedule=schedule,
        state_shardings=shardings,
        abstract_state=abstract_state,
        init=jax.jit(init_fn, out_shardings=shardings),
        step=jax.jit(
            step_fn,
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, replicated(mesh)),
            donate_argnums=(0,),
        ),
        batch_sharding=batch_sharding,
        eval_fns=eval_fns,
    )


def example_shapes(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """Per-example model inputs ``{key: ShapeDtypeStruct}`` of a config's dataset, as the
    Grain pipeline yields them: the dataset's declared record fields
    (:func:`gram_jax.data.pipeline.record_spec`) through each modality kind's registered
    spec (``gram_jax.modalities``), without reading or generating data (for lowering the step
    with abstract inputs)."""
    from gram_jax import modalities
    from gram_jax.data.pipeline import record_spec

    name = config.data.name
    fields = record_spec(name, **dict(config.data.builder))
    keep = {}
    for m, mod in config.model.modalities.items():
        if m not in fields:
            raise ValueError(f"modality {m!r} is not a field of dataset {name!r}: {sorted(fields)}")
        keep.update(modalities.example_spec(mod.kind, m, *fields[m]))
    return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in keep.items()}


def abstract_batch(config: ml_collections.ConfigDict, sharding: NamedSharding) -> dict:
    """The global training batch as ShapeDtypeStructs with ``sharding`` (two views for CoMM)."""
    b = config.train.batch_size
    one = {
        k: jax.ShapeDtypeStruct((b, *s.shape), s.dtype, sharding=sharding)
        for k, s in example_shapes(config).items()
    }
    return {"view1": one, "view2": dict(one)} if config.data.two_views else one
