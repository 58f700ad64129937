"""Shared set-up of the tests that run ``train.py`` as a real process: a shortened default
config (256 generated training examples, batch 16, every step logged, no final evaluation)."""

import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def env(devices: int) -> dict:
    out = dict(os.environ)
    out["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    out["JAX_PLATFORMS"] = "cpu"
    # See tests/conftest.py: multi-device CPU step executables loaded from a persistent
    # compilation cache can deadlock in their collectives on jaxlib 0.10.2.
    out.pop("JAX_COMPILATION_CACHE_DIR", None)
    out["PYTHONUNBUFFERED"] = "1"
    return out


def cmd(workdir, data_dir, steps: int, checkpoint_every: int, *extra) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        "--config.data.builder={'train_size': 256, 'validation_size': 32, 'test_size': 32}",
        "--config.train.batch_size=16",
        f"--config.train.steps={steps}",
        "--config.train.log_every=1",
        f"--config.train.checkpoint_every={checkpoint_every}",
        "--config.train.keep_checkpoints=3",
        "--config.train.final_eval=False",
        "--config.train.progress_bar=False",
        "--config.optim.warmup_steps=3",
        "--config.eval.batch_size=32",
        *extra,
    ]


def rows(workdir) -> list[dict]:
    """The lines of ``metrics.jsonl`` (complete lines only: the run may still be writing)."""
    text = (pathlib.Path(workdir) / "metrics.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines() if x.endswith("}")]


def losses(lines) -> dict[int, float]:
    """Step -> loss, the LAST logged line of each step winning (a resumed run re-logs)."""
    return {r["step"]: r["loss"] for r in lines if r["kind"] == "train"}
