"""Timing and XLA-analysis helpers shared by the benchmark scripts (one copy of each).

Every time is wall-clock around one call that is synchronised before the clock is read
(``sync``: ``jax.block_until_ready`` for JAX, ``torch.cuda.synchronize`` for PyTorch on a GPU).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def _block(out: Any) -> Any:
    return jax.block_until_ready(out)


def timed(fn: Callable, args, sync: Callable = _block) -> float:
    """Seconds of one synchronised call ``fn(*args)``."""
    t0 = time.perf_counter()
    sync(fn(*args))
    return time.perf_counter() - t0


def median_time(fn: Callable[[], Any], n: int, sync: Callable = _block) -> float:
    """Median seconds over ``n`` synchronised calls of ``fn()`` (warm it up first)."""
    return statistics.median(timed(fn, (), sync) for _ in range(n))


def interleaved(
    fns: dict[str, tuple[Callable, tuple]], repeats: int, sync: Callable = _block
) -> dict[str, list[float]]:
    """Warm each function up once, then time one call of each, round-robin, ``repeats`` times.

    Odd rounds run in reverse order, so no function always follows the same other one.
    """
    for fn, args in fns.values():
        sync(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            fn, args = fns[name]
            times[name].append(timed(fn, args, sync))
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float | None:
    """Median over rounds of num / den measured back to back (robust to load drift)."""
    if num not in times or den not in times:
        return None
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def ratio(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None or y == 0 else x / y


def temp_bytes(jitted, args) -> int:
    """XLA's temporary allocation of ``jitted`` compiled for ``args`` (inputs/outputs excluded)."""
    analysis = jitted.lower(*args).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes)


def compile_timed(jitted, args) -> tuple[Any, dict[str, float]]:
    """Ahead-of-time ``lower`` + ``compile``: ``(compiled, {"lower_s", "compile_s"})``.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct`` s; call the returned executable with
    arrays of the same shapes, so the timed calls never trigger a second compilation.
    """
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1}


def memory_bytes(compiled) -> dict[str, int] | None:
    """``memory_analysis()`` of a compiled executable as ints (None where the backend has none).

    ``total`` = arguments + outputs + temporaries - aliased (donated) bytes: what one call
    needs resident on the device.
    """
    m = compiled.memory_analysis()
    if m is None:
        return None
    out = {
        name: int(getattr(m, f"{name}_size_in_bytes", 0) or 0)
        for name in ("argument", "output", "temp", "alias", "generated_code")
    }
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def cost_flops(compiled) -> float | None:
    """FLOPs of one call from XLA's ``cost_analysis()`` (a dict; a one-element list before
    jax 0.4.30), or None where the backend reports none."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])
