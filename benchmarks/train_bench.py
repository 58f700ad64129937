"""Throughput of the default training config and the share of step time spent in the loss.

    python benchmarks/train_bench.py [--config configs/synthetic.py[:arg]] [--steps 30] [--no-data]

Prints one JSON object:

* ``step_only``: steps/s and examples/s of the jitted train step on a device-resident batch
  (forward, loss, backward, AdamW update; no input pipeline);
* ``with_data``: the same with batches from the Grain pipeline (the real training loop's
  rate; needs the dataset, generated if absent), unless ``--no-data``;
* ``loss``: time of the loss alone (value and gradient with respect to the embeddings and
  the temperature, on the same global batch), and ``loss_share`` = loss time / step time
  (goal < 10 %: the volume loss must not dominate training).

Times are medians of per-step wall times after a warm-up (compile excluded), on whatever
devices JAX sees (one CPU device unless ``XLA_FLAGS`` says otherwise).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _timing import median_time as _time  # noqa: E402
from flax import nnx  # noqa: E402

from gram_jax.training.config import load_config  # noqa: E402
from gram_jax.training.loop import load_split, make_train_iterator, setup_runtime  # noqa: E402
from gram_jax.training.sharding import make_mesh  # noqa: E402
from gram_jax.training.step import example_shapes, make_trainer  # noqa: E402
from gram_jax.training.tasks import make_task  # noqa: E402


def _random_batch(config, sharding, seed=0):
    rng = np.random.default_rng(seed)
    b = config.train.batch_size
    out = {}
    for k, s in example_shapes(config).items():
        shape = (b, *s.shape)
        if s.dtype == np.int32:
            x = rng.integers(1, 30, shape).astype(np.int32)
        elif s.dtype == np.bool_:
            x = np.ones(shape, bool)
        else:
            x = rng.random(shape).astype(np.float32)
        out[k] = x
    if config.data.two_views:
        out = {"view1": out, "view2": dict(out)}
    return jax.device_put(out, sharding)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "synthetic.py"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--no-data", action="store_true")
    args = p.parse_args(argv)
    config = load_config(args.config)
    setup_runtime(config)
    mesh = make_mesh(config)
    task = make_task(config, mesh)
    trainer = make_trainer(config, mesh, task)
    b = config.train.batch_size
    batch = _random_batch(config, trainer.batch_sharding)

    state = trainer.init()
    holder = {"state": state}

    def one_step(batch=batch):
        holder["state"], m = trainer.step(holder["state"], batch)
        return m["loss"]

    for _ in range(3):
        one_step()
    step_s = _time(one_step, args.steps)

    # The loss alone: value and gradient w.r.t. the embeddings and the model's own loss
    # parameters (temperature), on embeddings of the same batch.
    graphdef = trainer.graphdef

    @jax.jit
    def embed(params, rest, batch):
        return task.embed(nnx.merge(graphdef, params, rest), batch)

    @jax.jit
    def loss_grad(params, rest, emb, batch, rng):
        def f(p, e):
            return task.loss(nnx.merge(graphdef, p, rest), e, batch, rng)[0]

        return jax.value_and_grad(f, argnums=(0, 1))(params, emb)

    st = holder["state"]
    emb = embed(st["params"], st["rest"], batch)
    key = jax.random.PRNGKey(0)
    for _ in range(3):
        jax.block_until_ready(loss_grad(st["params"], st["rest"], emb, batch, key))
    loss_s = _time(lambda: loss_grad(st["params"], st["rest"], emb, batch, key), args.steps)

    out = {
        "config": config.name,
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "global_batch": b,
        "step_only": {"steps_per_sec": 1.0 / step_s, "examples_per_sec": b / step_s},
        "loss": {"seconds": loss_s, "step_seconds": step_s},
        "loss_share": loss_s / step_s,
    }
    if not args.no_data:
        it = make_train_iterator(config, mesh, load_split(config, config.data.train_split))
        next(it)

        def data_step():
            return one_step(next(it))

        for _ in range(3):
            data_step()
        data_s = _time(data_step, args.steps)
        out["with_data"] = {"steps_per_sec": 1.0 / data_s, "examples_per_sec": b / data_s}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
