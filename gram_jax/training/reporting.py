"""Metric sinks (``metrics.jsonl`` + TensorBoard), progress bar, final report table.

Only process 0 writes; other processes get no-op sinks. ``metrics.jsonl`` has one JSON object
per line: training lines ``{"step", "kind": "train", "loss", "lr", "temperature",
"grad_norm", "steps_per_sec", "examples_per_sec", ...}``, evaluation lines ``{"step",
"kind": "eval", "retrieval/...": ...}`` and event lines ``{"kind": "event", "message"}``
(resume, fallback to an older checkpoint, non-finite stop). A resumed run appends, so a step
may appear twice; the later line is the resumed run's.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any

import jax

__all__ = ["MetricWriter", "Progress", "format_report"]


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricWriter:
    """Append-only JSONL + TensorBoard (tensorboardX) writer in ``workdir``."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step: int, kind: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "kind": kind, "time": time.time()}
        row.update({k: _jsonable(float(v)) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        prefix = "" if kind == "eval" else f"{kind}/"
        for k, v in metrics.items():
            if math.isfinite(float(v)):
                self._tb.add_scalar(prefix + k, float(v), int(step))
        self._tb.flush()

    def event(self, step: int, message: str) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), "kind": "event", "message": message}) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Progress:
    """tqdm bar over the training steps with loss, lr, temperature and throughput."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        if enabled and jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc="train",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
                disable=None,
            )

    def update(self, step: int, m: dict[str, float]) -> None:
        if self.bar is None or self.bar.disable:
            # No terminal (logs of a batch job): one line per logged step instead.
            if self.enabled and jax.process_index() == 0:
                extra = f" tau {m['temperature']:.4f}" if "temperature" in m else ""
                rate = f" {m['examples_per_sec']:.0f} ex/s" if "examples_per_sec" in m else ""
                print(
                    f"step {step}: loss {m['loss']:.4f} lr {m['lr']:.2e}{extra}{rate}", flush=True
                )
            return
        post = {"loss": f"{m['loss']:.4f}", "lr": f"{m['lr']:.2e}"}
        if "temperature" in m:
            post["tau"] = f"{m['temperature']:.4f}"
        if "examples_per_sec" in m:
            post["ex/s"] = f"{m['examples_per_sec']:.0f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(step - self.bar.n)

    def write(self, text: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text)
        elif jax.process_index() == 0:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_report(metrics: dict[str, float], title: str = "held-out evaluation") -> str:
    """A text table: one row per (direction, score), columns R@1 R@5 R@10 MdR; probes."""
    rows: dict[str, dict[str, float]] = {}
    for key, v in metrics.items():
        parts = key.split("/")
        if parts[0] == "retrieval" and len(parts) == 4:
            rows.setdefault(f"{parts[1]:<22} {parts[2]:<14}", {})[parts[3]] = v
    cols = ("R@1", "R@5", "R@10", "MdR")
    lines = [title]
    if rows:
        lines.append(f"{'direction':<22} {'score':<14}" + "".join(f"{c:>8}" for c in cols))
        lines.append("-" * len(lines[-1]))
    for name in sorted(rows):
        vals = rows[name]
        lines.append(name + "".join(f"{vals.get(c, float('nan')):>8.2f}" for c in cols))
    if "chance/R@1" in metrics:
        lines.append(
            f"chance R@1 = {metrics['chance/R@1']:.3f} % over {int(metrics['eval/examples'])} "
            "held-out items"
        )
    probes = sorted(k for k in metrics if k.startswith("probe/"))
    if probes:
        lines.append("linear probes (held-out, %):")
        for k in probes:
            lines.append(f"  {k[len('probe/') :]:<36}{metrics[k]:>8.2f}")
    return "\n".join(lines)
