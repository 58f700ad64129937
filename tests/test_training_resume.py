"""train.py as a subprocess: exact resume after SIGKILL, and 1 vs 8 devices agree."""

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import train_process

STEPS = 30


def _env(devices: int) -> dict:
    return train_process.env(devices)


def _cmd(workdir, data_dir, *extra):
    return train_process.cmd(workdir, data_dir, STEPS, 5, *extra)


def _losses(workdir) -> dict[int, float]:
    return train_process.losses(train_process.rows(workdir))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("resume_data")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted run on 8 devices."""
    workdir = tmp_path_factory.mktemp("reference")
    subprocess.run(_cmd(workdir, data_dir), env=_env(8), check=True, timeout=600)
    return _losses(workdir)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_losses_exactly(tmp_path, data_dir, reference):
    assert sorted(reference) == list(range(1, STEPS + 1))
    proc = subprocess.Popen(
        _cmd(tmp_path, data_dir),
        env=_env(8),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = tmp_path / "checkpoints"
    deadline = time.time() + 600
    try:
        # Kill as soon as a checkpoint past step 5 is complete (finalised step directory).
        while time.time() < deadline and proc.poll() is None:
            done = (
                [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
            )
            if any(s >= 10 for s in done):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "training ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed = _losses(tmp_path)
    assert max(killed) < STEPS
    subprocess.run(_cmd(tmp_path, data_dir), env=_env(8), check=True, timeout=600)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    resumed_from = [r["step"] for r in rows if r["kind"] == "event" and "resumed" in r["message"]]
    assert resumed_from and 10 <= resumed_from[-1] < STEPS
    after = [r for r in rows[rows.index(next(r for r in rows if r["kind"] == "event")) :]]
    resumed = {r["step"]: r["loss"] for r in after if r["kind"] == "train"}
    assert sorted(resumed) == list(range(resumed_from[-1] + 1, STEPS + 1))
    for step, loss in resumed.items():
        assert loss == reference[step], (step, loss, reference[step])


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_losses(tmp_path, data_dir, reference):
    one = tmp_path / "one"
    subprocess.run(
        _cmd(one, data_dir, f"--config.train.steps={STEPS}"),
        env=_env(1),
        check=True,
        timeout=600,
    )
    losses_1 = _losses(one)
    steps = sorted(reference)
    np.testing.assert_allclose(
        [losses_1[s] for s in steps], [reference[s] for s in steps], rtol=1e-5
    )
