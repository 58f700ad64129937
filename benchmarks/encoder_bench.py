"""Parameter count and CPU forward time of every encoder kind and size preset.

Prints ONE JSON object::

    {"jax": ..., "flax": ..., "device": ..., "batch": B, "repeats": R,
     "results": {kind: {preset: {"params": n, "input_shape": [...],
                                 "compile_s": c, "forward_ms_per_example": t}}}}

``forward_ms_per_example`` is the median over ``repeats`` timed calls of a jitted forward
pass (after one compile call), divided by the batch size. Presets listed in ``--param-only``
(default ``large``) are built abstractly with ``nnx.eval_shape`` and only counted.

Inputs follow the project's synthetic defaults: images 32x32x3 (patch 4), video 4 frames of
32x32x3, log-mel 32 frames x 32 mels, 0.25 s of 16 kHz waveform, 16 text tokens, 64 features.

    python benchmarks/encoder_bench.py [--presets tiny small base] [--batch 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gram_jax.models import build_encoder, count_params

KINDS = ("image", "video", "audio", "waveform", "text", "features")


def make_input(kind: str, batch: int) -> jax.Array:
    rng = np.random.default_rng(0)
    if kind == "image":
        return jnp.asarray(rng.uniform(size=(batch, 32, 32, 3)), jnp.float32)
    if kind == "video":
        return jnp.asarray(rng.uniform(size=(batch, 4, 32, 32, 3)), jnp.float32)
    if kind == "audio":
        return jnp.asarray(rng.standard_normal((batch, 32, 32)), jnp.float32)
    if kind == "waveform":
        return jnp.asarray(rng.standard_normal((batch, 4000)), jnp.float32)
    if kind == "text":
        return jnp.asarray(rng.integers(1, 1024, size=(batch, 16)), jnp.int32)
    if kind == "features":
        return jnp.asarray(rng.standard_normal((batch, 64)), jnp.float32)
    raise ValueError(f"unknown kind {kind!r}")


def bench_one(kind: str, preset: str, batch: int, repeats: int) -> dict:
    enc = build_encoder(kind, preset)
    x = make_input(kind, batch)
    graphdef, state = nnx.split(enc)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).pooled)
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(state, x))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(state, x))
        times.append(time.perf_counter() - t0)
    return {
        "params": count_params(enc),
        "input_shape": list(x.shape),
        "compile_s": round(compile_s, 2),
        "forward_ms_per_example": round(1e3 * statistics.median(times) / batch, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small", "base"])
    parser.add_argument("--param-only", nargs="+", default=["large"])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, dict[str, dict]] = {}
    for kind in args.kinds:
        results[kind] = {}
        for preset in args.presets:
            results[kind][preset] = bench_one(kind, preset, args.batch, args.repeats)
        for preset in args.param_only:
            abstract = nnx.eval_shape(lambda kind=kind, preset=preset: build_encoder(kind, preset))
            results[kind][preset] = {"params": count_params(abstract)}
    report = {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "batch": args.batch,
        "repeats": args.repeats,
        "dtype": str(jnp.float32.dtype),
        "results": results,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
