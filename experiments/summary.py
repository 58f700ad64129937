"""Mean / spread over repeated runs, shared by the experiment scripts (run as
``python experiments/<name>.py``, which puts this folder on ``sys.path``)."""

from __future__ import annotations

import numpy as np


def summarise(runs: list[dict], skip: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """``{key: {mean, std (population), min, max, n}}`` over the keys every run has."""
    keys = sorted(k for k in set.intersection(*(set(r) for r in runs)) if k not in skip)
    out = {}
    for k in keys:
        v = np.array([r[k] for r in runs], float)
        out[k] = {
            "mean": float(v.mean()),
            "std": float(v.std()),
            "min": float(v.min()),
            "max": float(v.max()),
            "n": len(v),
        }
    return out
