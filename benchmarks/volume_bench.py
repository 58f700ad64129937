"""Benchmark of the pairwise GRAM volume and loss against the dense formulations (issue 2, point 6).

For every batch size B and number of modalities k (D = 512 by default) it measures, in the same
process and interleaved round by round (so load from other processes hits all alike):

- ``ours_volume``: :func:`gram_jax.pairwise_volume` (a Gram-Schmidt basis per candidate, k - 1
  GEMMs against it and an elementwise sum of squares);
- ``ours_volume_refine0``: the same with ``refine=0`` (no per-item recomputation of each
  anchor's smallest volume; ``refine_cost`` is the ratio);
- ``adjugate_volume``: the previous formulation of ``pairwise_volume`` (k - 1 GEMMs against the
  candidate vectors and the polynomial ``(a.a) det M - u^T adj(M) u``), kept here as the
  baseline (it loses all precision on aligned tuples: ``docs/precision.md``);
- ``floor``: the bare k - 1 matrix products ``anchor @ others[m].T`` (a lower bound for any
  method that needs every anchor-candidate dot product);
- ``dense_volume``: the authors' formulation in JAX, a (B, B, k, k) Gram tensor and
  ``jnp.linalg.det`` per pair, then ``sqrt(abs(det))``;
- ``torch_volume``: the authors' ``volume_computation`` ported to PyTorch (Gram tensor, batched
  ``torch.det``, ``sqrt(abs)``), only if ``torch`` is importable;
- ``ours_loss`` / ``adjugate_loss`` / ``dense_loss`` / ``torch_loss``: the GRAM contrastive
  loss (both directions, label smoothing 0.1, exact gradient), forward + backward w.r.t. all k
  inputs;
- ``simplex_volume`` / ``simplex_loss``: :func:`gram_jax.volume.pairwise_simplex_volume` and
  the ``simplex`` loss (issue 14), against ``ours_volume`` / ``ours_loss`` (``--simplex-only``
  times just these four);
- ``infonce_loss``: anchored InfoNCE over the same k - 1 (anchor, modality) pairs per item pair,
  forward + backward.

Time is the median over repeats of one call (after a warm-up call); memory is XLA's peak
temporary allocation of the compiled function, ``compiled.memory_analysis().temp_size_in_bytes``
(inputs and outputs excluded). Prints ONE JSON object on stdout; progress goes to stderr.

    python benchmarks/volume_bench.py            # full: B in 512..4096, k in {3, 4}
    python benchmarks/volume_bench.py --quick    # a smoke run in well under a minute
    python benchmarks/volume_bench.py --batch 1024 2048 --k 4 --repeats 15
    python benchmarks/volume_bench.py --batch 1024 --k 4 --x64   # + the float64 recipe's cost
    python benchmarks/volume_bench.py --batch 2048 --k 4 --simplex-only  # simplex vs volume
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from _timing import interleaved, paired_ratio, ratio, temp_bytes

from gram_jax.losses import (
    gram_contrastive_loss,
    infonce_loss,
    simplex_contrastive_loss,
    smoothed_cross_entropy,
)
from gram_jax.volume import _gemm, pairwise_simplex_volume, pairwise_volume

_HIGHEST = jax.lax.Precision.HIGHEST
TAU = 0.07
SMOOTHING = 0.1

# Acceptance targets of issue 2 (2 CPU cores), checked at B = 2048, k = 4.
TARGETS = {
    "ours_over_floor": ("<=", 1.3),
    "dense_over_ours": (">=", 10.0),
    "loss_over_infonce": ("<=", 1.5),
    "memory_ours_over_dense": ("<=", 0.25),
    "simplex_over_volume": ("<=", 1.3),  # issue 14
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The formulations
# ---------------------------------------------------------------------------------------------


def floor_products(anchor, *others, precision=_HIGHEST):
    """The k - 1 anchor-candidate matrix products and nothing else."""
    return tuple(jnp.matmul(anchor, o.T, precision=precision) for o in others)


def _minor_det(entries, rows, cols, memo):
    """Laplace expansion along the first row with shared sub-minors (the previous code)."""
    key = (rows, cols)
    if key not in memo:
        if len(rows) == 1:
            memo[key] = entries[rows[0]][cols[0]]
        else:
            out = 0.0
            for j, c in enumerate(cols):
                term = entries[rows[0]][c] * _minor_det(
                    entries, rows[1:], cols[:j] + cols[j + 1 :], memo
                )
                out = out - term if j % 2 else out + term
            memo[key] = out
    return memo[key]


def adjugate_volume(anchor, *others):
    """The previous ``pairwise_volume``: ``sqrt((a.a) det M - u^T adj(M) u)``, u by k-1 GEMMs."""
    n = len(others)
    m = [[jnp.sum(others[r] * others[c], -1) for c in range(n)] for r in range(n)]
    memo: dict = {}
    full = tuple(range(n))
    det_m = _minor_det(m, full, full, memo)

    def adj(i, j):
        if n == 1:
            return jnp.ones_like(det_m)
        minor = _minor_det(m, full[:j] + full[j + 1 :], full[:i] + full[i + 1 :], memo)
        return -minor if (i + j) % 2 else minor

    u = [_gemm(anchor, o) for o in others]
    quad = 0.0
    for r in range(n):
        quad = quad + adj(r, r)[None] * u[r] * u[r]
        for c in range(r + 1, n):
            quad = quad + 2.0 * adj(r, c)[None] * u[r] * u[c]
    aa = jnp.sum(anchor * anchor, -1)[:, None]
    return jnp.sqrt(jnp.maximum(aa * det_m[None] - quad, 0.0))


def dense_volume(anchor, *others, precision=_HIGHEST):
    """The authors' ``volume_computation`` in JAX: (B1, B2, k, k) Gram tensor + det per pair."""
    b1, b2 = anchor.shape[0], others[0].shape[0]
    aa = jnp.broadcast_to(jnp.sum(anchor * anchor, -1)[:, None], (b1, b2))
    a_dot = [jnp.matmul(anchor, o.T, precision=precision) for o in others]
    inter = [
        [jnp.broadcast_to(jnp.sum(x * y, -1)[None, :], (b1, b2)) for y in others] for x in others
    ]
    gram = jnp.stack(
        [jnp.stack([aa, *a_dot], -1)]
        + [jnp.stack([a_dot[i], *inter[i]], -1) for i in range(len(others))],
        -2,
    )
    return jnp.sqrt(jnp.abs(jnp.linalg.det(gram)))


def _loss_from_volume(vol):
    row = smoothed_cross_entropy(-vol / TAU, label_smoothing=SMOOTHING)
    col = smoothed_cross_entropy(-vol.T / TAU, label_smoothing=SMOOTHING)
    return 0.5 * (jnp.mean(row) + jnp.mean(col))


def ours_loss(anchor, *others):
    return gram_contrastive_loss(anchor, list(others), TAU, label_smoothing=SMOOTHING)[0]


def adjugate_loss(anchor, *others):
    return _loss_from_volume(adjugate_volume(anchor, *others))


def dense_loss(anchor, *others, precision=_HIGHEST):
    return _loss_from_volume(dense_volume(anchor, *others, precision=precision))


def simplex_loss(anchor, *others):
    return simplex_contrastive_loss(anchor, others, TAU, label_smoothing=SMOOTHING)[0]


def anchored_infonce(anchor, *others):
    return infonce_loss(anchor, list(others), TAU, pairs="anchored")[0]


def fwd_bwd(loss_fn: Callable, k: int) -> Callable:
    return jax.value_and_grad(loss_fn, argnums=tuple(range(k)))


def torch_functions():
    """The authors' PyTorch formulation (ispamm/GRAM utils/volume.py), or None without torch."""
    try:
        import torch
    except ImportError:
        return None

    def volume_computation(language, *inputs):
        b1, b2 = language.shape[0], inputs[0].shape[0]
        aa = torch.einsum("bi,bi->b", language, language).unsqueeze(1).expand(-1, b2)
        l_dot = [language @ x.T for x in inputs]
        inter = [
            [torch.einsum("bi,bi->b", x, y).unsqueeze(0).expand(b1, -1) for y in inputs]
            for x in inputs
        ]
        mat = torch.stack(
            [torch.stack([aa, *l_dot], dim=-1)]
            + [torch.stack([l_dot[i], *inter[i]], dim=-1) for i in range(len(inputs))],
            dim=-2,
        )
        return torch.sqrt(torch.abs(torch.det(mat.float())))

    def volume(*xs):
        with torch.no_grad():
            return volume_computation(*xs)

    def loss_fwd_bwd(*xs):
        xs = [x.detach().requires_grad_(True) for x in xs]
        vol = volume_computation(*xs)
        target = torch.arange(vol.shape[0], device=vol.device)
        f = torch.nn.functional.cross_entropy
        loss = 0.5 * (
            f(-vol / TAU, target, label_smoothing=SMOOTHING)
            + f(-vol.T / TAU, target, label_smoothing=SMOOTHING)
        )
        loss.backward()
        return loss

    return torch, volume, loss_fwd_bwd


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def bench_case(
    b: int,
    k: int,
    d: int,
    repeats: int,
    slow_repeats: int,
    mem_limit: float,
    torch_fns,
    x64: bool = False,
    simplex_only: bool = False,
):
    rng = np.random.default_rng(b * 10 + k)
    xs = rng.standard_normal((k, b, d)).astype(np.float32)
    xs /= np.linalg.norm(xs, axis=-1, keepdims=True)
    args = tuple(jnp.asarray(x) for x in xs)

    jitted = {
        "ours_volume": jax.jit(pairwise_volume),
        "ours_volume_refine0": jax.jit(functools.partial(pairwise_volume, refine=0)),
        "adjugate_volume": jax.jit(adjugate_volume),
        "floor": jax.jit(floor_products),
        "dense_volume": jax.jit(dense_volume),
        "ours_loss": jax.jit(fwd_bwd(ours_loss, k)),
        "adjugate_loss": jax.jit(fwd_bwd(adjugate_loss, k)),
        "infonce_loss": jax.jit(fwd_bwd(anchored_infonce, k)),
        "dense_loss": jax.jit(fwd_bwd(dense_loss, k)),
        "simplex_volume": jax.jit(pairwise_simplex_volume),
        "simplex_loss": jax.jit(fwd_bwd(simplex_loss, k)),
    }
    if simplex_only:
        keep = ("ours_volume", "simplex_volume", "ours_loss", "simplex_loss")
        jitted = {n: jitted[n] for n in keep}
        torch_fns = None
    memory = {name: temp_bytes(fn, args) for name, fn in jitted.items()}
    skipped = {
        name: f"temporary memory {memory[name] / 2**30:.1f} GiB > --dense-memory-limit-gb"
        for name in ("dense_volume", "dense_loss")
        if name in memory and memory[name] > mem_limit * 2**30
    }

    fast_names = ("ours_volume", "ours_volume_refine0", "adjugate_volume", "floor", "ours_loss")
    fast_names = (*fast_names, "adjugate_loss")
    fast_names = (*fast_names, "infonce_loss", "simplex_volume", "simplex_loss")
    fast = {n: (jitted[n], args) for n in fast_names if n in jitted}
    times = interleaved(fast, repeats)
    slow = {
        n: (jitted[n], args)
        for n in ("dense_volume", "dense_loss")
        if n in jitted and n not in skipped
    }
    if torch_fns is not None:
        torch, t_volume, t_loss = torch_fns
        targs = tuple(torch.from_numpy(x) for x in xs)
        slow["torch_volume"] = (t_volume, targs)
        slow["torch_loss"] = (t_loss, targs)
    times.update(interleaved(slow, slow_repeats))

    if x64:
        # The more-accurate-dot-product recipe (docs/precision.md): float64 inputs under
        # jax_enable_x64, against the float32 call in the same mode, interleaved.
        with jax.enable_x64(True):
            args64 = tuple(jnp.asarray(x, jnp.float64) for x in xs)
            pair = {
                "ours_volume_f32_x64mode": (jax.jit(pairwise_volume), args),
                "ours_volume_f64": (jax.jit(pairwise_volume), args64),
                "ours_loss_f32_x64mode": (jax.jit(fwd_bwd(ours_loss, k)), args),
                "ours_loss_f64": (jax.jit(fwd_bwd(ours_loss, k)), args64),
            }
            times.update(interleaved(pair, repeats))

    med = {name: statistics.median(t) for name, t in times.items()}
    ratios = {
        "simplex_over_volume": paired_ratio(times, "simplex_volume", "ours_volume"),
        "simplex_loss_over_loss": paired_ratio(times, "simplex_loss", "ours_loss"),
        "memory_simplex_over_volume": ratio(memory["simplex_volume"], memory["ours_volume"]),
    }
    if simplex_only:
        times_only = {"median_s": med, "repeats": {n: len(t) for n, t in times.items()}}
        return {"B": b, "k": k, "D": d, **times_only, "temp_bytes": memory, "ratios": ratios}
    ratios |= {
        "ours_over_floor": paired_ratio(times, "ours_volume", "floor"),
        "ours_over_floor_of_medians": ratio(med.get("ours_volume"), med.get("floor")),
        "refine_cost": paired_ratio(times, "ours_volume", "ours_volume_refine0"),
        "adjugate_over_floor": paired_ratio(times, "adjugate_volume", "floor"),
        "ours_over_adjugate": paired_ratio(times, "ours_volume", "adjugate_volume"),
        "adjugate_loss_over_infonce": paired_ratio(times, "adjugate_loss", "infonce_loss"),
        "loss_over_adjugate_loss": paired_ratio(times, "ours_loss", "adjugate_loss"),
        "dense_over_ours": ratio(med.get("dense_volume"), med.get("ours_volume")),
        "torch_over_ours": ratio(med.get("torch_volume"), med.get("ours_volume")),
        "loss_over_infonce": paired_ratio(times, "ours_loss", "infonce_loss"),
        "loss_over_infonce_of_medians": ratio(med.get("ours_loss"), med.get("infonce_loss")),
        "dense_loss_over_loss": ratio(med.get("dense_loss"), med.get("ours_loss")),
        "torch_loss_over_loss": ratio(med.get("torch_loss"), med.get("ours_loss")),
        "f64_over_f32_volume": paired_ratio(times, "ours_volume_f64", "ours_volume_f32_x64mode"),
        "f64_over_f32_loss": paired_ratio(times, "ours_loss_f64", "ours_loss_f32_x64mode"),
        "memory_ours_over_dense": ratio(memory["ours_volume"], memory["dense_volume"]),
        "memory_loss_over_dense_loss": ratio(memory["ours_loss"], memory["dense_loss"]),
        "memory_loss_over_infonce": ratio(memory["ours_loss"], memory["infonce_loss"]),
    }
    return {
        "B": b,
        "k": k,
        "D": d,
        "median_s": med,
        "repeats": {name: len(t) for name, t in times.items()},
        "temp_bytes": memory,
        "skipped": skipped,
        "ratios": ratios,
    }


def acceptance(results: list[dict]) -> dict:
    case = next((r for r in results if r["B"] == 2048 and r["k"] == 4), None)
    if case is None:
        return {"checked": False, "reason": "B = 2048, k = 4 not in this run"}
    out: dict = {"checked": True, "B": 2048, "k": 4}
    for name, (op, bound) in TARGETS.items():
        if name not in case["ratios"]:
            continue
        value = case["ratios"][name]
        ok = None if value is None else (value <= bound if op == "<=" else value >= bound)
        out[name] = {"value": value, "target": f"{op} {bound}", "met": ok}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B = 256, 512; k = 3, 4; 3 repeats")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes B")
    parser.add_argument("--k", type=int, nargs="+", default=None, help="numbers of modalities")
    parser.add_argument("--dim", type=int, default=512, help="embedding size D")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per fast function")
    parser.add_argument("--slow-repeats", type=int, default=None, help="for dense / torch")
    parser.add_argument(
        "--dense-memory-limit-gb",
        type=float,
        default=8.0,
        help="do not run a dense formulation whose temporary memory exceeds this (still reported)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch formulation")
    parser.add_argument(
        "--x64", action="store_true", help="also time float64 inputs under jax_enable_x64"
    )
    parser.add_argument(
        "--simplex-only", action="store_true", help="only the simplex score / loss vs the volume's"
    )
    args = parser.parse_args(argv)

    batches = args.batch or ([256, 512] if args.quick else [512, 1024, 2048, 4096])
    ks = args.k or [3, 4]
    repeats = args.repeats or (3 if args.quick else 21)
    slow_repeats = args.slow_repeats or (2 if args.quick else 3)
    torch_fns = None if args.no_torch else torch_functions()

    results = []
    for b in batches:
        for k in ks:
            t0 = time.perf_counter()
            res = bench_case(
                b,
                k,
                args.dim,
                repeats,
                slow_repeats,
                args.dense_memory_limit_gb,
                torch_fns,
                x64=args.x64,
                simplex_only=args.simplex_only,
            )
            results.append(res)
            r = res["ratios"]
            log(f"B={b} k={k}: simplex/volume {r['simplex_over_volume']:.2f}, "
                f"simplex loss/loss {r['simplex_loss_over_loss']:.2f}")  # fmt: skip
            if args.simplex_only:
                continue
            log(
                f"B={b} k={k}: ours/floor {r['ours_over_floor']:.2f}, "
                f"dense/ours {r['dense_over_ours'] or float('nan'):.1f}, "
                f"loss/infonce {r['loss_over_infonce']:.2f}, "
                f"mem ours/dense {r['memory_ours_over_dense']:.4f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )

    report = {
        "benchmark": "gram_jax pairwise volume and GRAM loss vs dense / floor / InfoNCE / torch",
        "environment": {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "devices": jax.device_count(),
            "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": platform.python_version(),
            "torch": None if torch_fns is None else torch_fns[0].__version__,
            "torch_threads": None if torch_fns is None else torch_fns[0].get_num_threads(),
        },
        "settings": {
            "dtype": "float32",
            "temperature": TAU,
            "label_smoothing": SMOOTHING,
            "repeats": repeats,
            "slow_repeats": slow_repeats,
            "timing": "median of interleaved single calls after one warm-up call",
            "paired_ratio": "median over rounds of the ratio of two calls made back to back",
        },
        "results": results,
        "acceptance": acceptance(results),
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
