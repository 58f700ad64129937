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

from gram_jax.training.config import eval_scores

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


def _direction(name: str, anchor: str | None, rest: str | None) -> str:
    """``text_to_rest`` -> ``text -> image+audio`` (names as the run's modalities)."""
    src, _, dst = name.partition("_to_")
    if rest is not None:
        src, dst = (rest if x == "rest" else x for x in (src, dst))
    return f"{src} -> {dst}" if dst else name


def format_report(
    metrics: dict[str, float], title: str = "held-out evaluation", config: Any = None
) -> str:
    """A text table: one row per (direction, score), columns R@1 R@5 R@10 (percent of the
    queries whose match ranks in the top k) and MdR (median rank); linear probes.

    With ``config``, the headline row comes first (anchor -> the other modalities by
    the primary score of :func:`~gram_jax.training.config.eval_scores`: the loss's own; marked
    ``*``) and "rest" is spelled out
    as the other modalities joined by ``+``.
    """
    anchor = rest = None
    primary = None
    if config is not None:
        mods = list(config.model.modalities.keys())
        anchor = config.model.anchor
        rest = "+".join(m for m in mods if m != anchor)
        primary = next(iter(eval_scores(config)), None)
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for key, v in metrics.items():
        parts = key.split("/")
        if parts[0] == "retrieval" and len(parts) == 4:
            rows.setdefault((parts[1], parts[2]), {})[parts[3]] = v
    head = (f"{anchor}_to_rest", primary)
    order = sorted(rows, key=lambda r: (r != head, r))
    cols = ("R@1 %", "R@5 %", "R@10 %", "MdR")
    lines = [title]
    width = max([24] + [len(_direction(d, anchor, rest)) + 2 for d, _ in rows])
    if rows:
        lines.append(f"{'direction':<{width}} {'score':<14}" + "".join(f"{c:>8}" for c in cols))
        lines.append("-" * len(lines[-1]))
    for d, score in order:
        vals = rows[(d, score)]
        mark = "*" if (d, score) == head else " "
        name = f"{mark}{_direction(d, anchor, rest):<{width - 1}} {score:<14}"
        keys = [c.split()[0] for c in cols]
        lines.append(name + "".join(f"{vals.get(c, float('nan')):>8.2f}" for c in keys))
    if head in rows:
        lines.append(f"* headline: {_direction(head[0], anchor, rest)} by {primary}")
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
