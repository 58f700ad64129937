"""Forward + backward time of the losses against a baseline copy of ``gram_jax/losses.py``.

    git show 3fa0ff5:gram_jax/losses.py > /tmp/old_losses.py
    python benchmarks/loss_bench.py --baseline /tmp/old_losses.py [--batch 1024 --reps 10]

Prints one JSON object: per case the median ms of the current and baseline code (same process,
interleaved) and their ratio (current / baseline; < 1 is faster).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gram_jax import losses


def _load(path: str):
    spec = importlib.util.spec_from_file_location("baseline_losses", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(mod)
    return mod


def _cases(mod, b: int, d: int):
    key = jax.random.key(0)
    x = jax.random.normal(key, (3, b, d), jnp.float32)
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    tau = jnp.float32(0.07)
    return {
        "gram_k3": (
            lambda t, a, o: mod.gram_contrastive_loss(a, o, t)[0],
            (tau, x[0], [x[1], x[2]]),
        ),
        "infonce_anchored_k3": (
            lambda t, a, o: mod.infonce_loss(a, o, t)[0],
            (tau, x[0], [x[1], x[2]]),
        ),
        "siglip_k2": (lambda t, a, o: mod.siglip_loss(a, o, 10.0, t)[0], (tau, x[0], x[1])),
        "comm_k2": (
            lambda t, a, o: mod.comm_loss([a, o[0], o[1]], [o[1], a, o[0]], t)[0],
            (tau, x[0], [x[1], x[2]]),
        ),
    }


def _time(fn, args, reps: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", required=True)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    old = _load(a.baseline)
    new_cases, old_cases = _cases(losses, a.batch, a.dim), _cases(old, a.batch, a.dim)
    result = {"batch": a.batch, "dim": a.dim, "backend": jax.default_backend(), "cases": {}}
    for name, (fn, args) in new_cases.items():
        f_new = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))
        f_old = jax.jit(jax.value_and_grad(old_cases[name][0], argnums=(0, 1, 2)))
        ms_new, ms_old = [], []
        for _ in range(3):  # interleaved rounds
            ms_new.append(_time(f_new, args, a.reps))
            ms_old.append(_time(f_old, args, a.reps))
        new, base = min(ms_new), min(ms_old)
        result["cases"][name] = {
            "ms": round(new, 2),
            "baseline_ms": round(base, 2),
            "ratio": round(new / base, 3),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
