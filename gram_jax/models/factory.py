"""Encoder factory and parameter accounting.

``build_encoder(kind, preset, **overrides)`` builds the encoder of a registered modality kind
(``gram_jax.modalities``: image, cnn, video, audio, waveform, text, features, or a user's own)
from its config dataclass, ``config.from_preset(preset, **overrides)``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import jax
import numpy as np
from flax import nnx

from gram_jax import modalities as modality_lib

__all__ = ["build_encoder", "count_params", "param_table", "param_counts"]


def build_encoder(
    kind: str,
    preset: str = "tiny",
    *,
    rngs: nnx.Rngs | None = None,
    seed: int = 0,
    **overrides: Any,
) -> nnx.Module:
    """Build an encoder of ``kind`` (a registered modality kind) from a preset plus overrides.

    ``rngs`` defaults to ``nnx.Rngs(seed)``. Unknown kinds, presets or config fields raise
    ``ValueError``.
    """
    rngs = rngs if rngs is not None else nnx.Rngs(seed)
    return modality_lib.build_encoder(kind, preset, rngs=rngs, **overrides)


def _path_str(path) -> tuple[str, ...]:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return tuple(parts)


def param_counts(module: nnx.Module) -> dict[tuple[str, ...], int]:
    """``{path: size}`` for every ``nnx.Param`` (works on ``nnx.eval_shape`` abstract models)."""
    state = nnx.state(module, nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    out = {}
    for path, leaf in leaves:
        parts = tuple(p for p in _path_str(path) if p != "value")
        out[parts] = int(np.prod(np.shape(leaf)))
    return out


def count_params(module: nnx.Module) -> int:
    """Total number of ``nnx.Param`` scalars (excludes BatchNorm statistics and RNG state)."""
    return sum(param_counts(module).values())


def param_table(model: nnx.Module, max_depth: int = 3) -> str:
    """A text table of parameter counts per sub-module, nested up to ``max_depth`` levels."""
    totals: dict[tuple[str, ...], int] = defaultdict(int)
    for path, n in param_counts(model).items():
        for d in range(1, min(len(path) - 1, max_depth) + 1):
            totals[path[:d]] += n
    rows = [("total", count_params(model))]
    for path in sorted(totals):
        rows.append(("  " * (len(path) - 1) + path[-1], totals[path]))
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{'module':<{width}}{'params':>14}", "-" * (width + 14)]
    lines += [f"{name:<{width}}{n:>14,}" for name, n in rows]
    return "\n".join(lines)
