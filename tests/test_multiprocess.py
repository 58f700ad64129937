"""train.py as several processes of one JAX job (gram_jax.launch, gloo CPU collectives).

Default run: the launcher's process handling (no JAX, cheap) and 2 processes x 4 devices
against 1 x 8 for a few steps. Marker ``multiprocess`` (``pytest -m multiprocess``, run by
.ci/run as its own step): the 4 x 2 / 8 x 1 layouts, evaluation, elastic resume 2 -> 1 and
1 -> 2 at step 40 of 60, and ``kill -9`` of process 1.
"""

import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gram_jax import data
from gram_jax.launch import free_port, launch, process_env
from gram_jax.training.config import load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The run name of train.py's default config (the prefix of its printed lines).
NAME = load_config(str(ROOT / "configs" / "synthetic.py")).name
SIZES = {"train_size": 256, "validation_size": 32, "test_size": 32}


def _env() -> dict:
    env = dict(os.environ)
    # See tests/conftest.py: cached multi-device CPU executables can deadlock on jaxlib 0.10.2.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    for k in ("GRAM_JAX_NUM_PROCESSES", "GRAM_JAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _args(workdir, data_dir, steps, *extra):
    return [
        str(ROOT / "train.py"),
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={data_dir}",
        f"--config.data.builder={SIZES}",
        "--config.data.augment=default",  # augmentations must follow the global order too
        "--config.train.batch_size=16",
        f"--config.train.steps={steps}",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=0",
        "--config.train.final_eval=False",
        "--config.train.progress_bar=False",
        "--config.optim.warmup_steps=3",
        *extra,
    ]


def _run(processes, devices, workdir, data_dir, steps, *extra, timeout=900) -> str:
    """Run train.py as ``processes`` x ``devices``; returns the output, fails on an error."""
    args = _args(workdir, data_dir, steps, *extra)
    if processes == 1:
        env = _env()
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        env["JAX_PLATFORMS"] = "cpu"
        p = subprocess.run(
            [sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout
        )
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout + p.stderr
    out = io.StringIO()
    code = launch(args, processes, devices, env=_env(), out=out)
    assert code == 0, out.getvalue()[-6000:]
    return out.getvalue()


def _rows(workdir, kind="train") -> list[dict]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(workdir)}


def _assert_close(a: dict, b: dict, steps) -> None:
    x = np.array([a[s] for s in steps])
    y = np.array([b[s] for s in steps])
    np.testing.assert_allclose(x, y, rtol=1e-5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mp_data")
    data.prepare("synthetic_trimodal", d, **SIZES)
    return d


# ---------------------------------------------------------------------------------------------
# The launcher (plain Python children, no JAX)
# ---------------------------------------------------------------------------------------------

_CHILD = (
    "import os, sys, time; i = int(os.environ['GRAM_JAX_PROCESS_ID']);"
    "print('hello', i, os.environ['GRAM_JAX_NUM_PROCESSES'], os.environ.get('XLA_FLAGS'),"
    " os.environ['JAX_COORDINATOR_ADDRESS'], flush=True);"
    "code = int(sys.argv[1]) if i == 1 else 0; time.sleep(float(sys.argv[2]) if i != 1 else 0.5);"
    "sys.exit(code)"
)


def test_launcher_prefixes_output_and_propagates_a_failure():
    out = io.StringIO()
    assert launch([sys.executable, "-c", _CHILD, "0", "0"], 3, 2, out=out) == 0
    text = out.getvalue()
    for i in range(3):
        line = next(x for x in text.splitlines() if x.startswith(f"[p{i}] hello {i} 3"))
        assert "--xla_force_host_platform_device_count=2" in line and "127.0.0.1:" in line
    # Process 1 fails with 7; the others (sleeping 60 s) are ended after the grace period.
    out = io.StringIO()
    t = time.monotonic()
    code = launch([sys.executable, "-c", _CHILD, "7", "60"], 3, peer_grace=0.5, out=out)
    assert code == 7, out.getvalue()
    assert time.monotonic() - t < 30
    assert "process 1 ended" in out.getvalue() and "exit code 7" in out.getvalue()
    assert "terminating processes [0, 2]" in out.getvalue()


def test_process_env_and_bad_arguments():
    env = process_env(
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"},
        process_id=1,
        processes=2,
        port=free_port(),
        devices_per_process=4,
        heartbeat_timeout=10,
    )
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
    assert env["GRAM_JAX_PROCESS_ID"] == "1" and env["GRAM_JAX_HEARTBEAT_TIMEOUT"] == "10"
    with pytest.raises(ValueError, match="--processes"):
        launch(["x.py"], 0)
    with pytest.raises(ValueError, match="no command"):
        launch([], 2)


# ---------------------------------------------------------------------------------------------
# Training in several processes
# ---------------------------------------------------------------------------------------------

CI_STEPS = 3


@pytest.mark.multiprocess  # ~80 s of real processes: .ci/run's marker step, not the default run
def test_two_processes_match_one(tmp_path, data_dir):
    """2 x 4 logs the losses of 1 x 8 (same examples and augmentations at every step);
    only process 0 writes metrics.jsonl (one row per step)."""
    _run(1, 8, tmp_path / "1x8", data_dir, CI_STEPS)
    out = _run(2, 4, tmp_path / "2x4", data_dir, CI_STEPS)
    steps = list(range(1, CI_STEPS + 1))
    assert [r["step"] for r in _rows(tmp_path / "2x4")] == steps
    _assert_close(_losses(tmp_path / "2x4"), _losses(tmp_path / "1x8"), steps)
    assert f"[p0] {NAME}: gram model" in out and f"[p1] {NAME}: gram model" not in out


STEPS = 60
RESUME_AT = 40


@pytest.fixture(scope="module")
def long_runs(tmp_path_factory, data_dir):
    """60-step runs (checkpoints every 20, final evaluation) for the layouts of the matrix."""
    runs = {}
    for layout in ((1, 8), (2, 4)):
        wd = tmp_path_factory.mktemp(f"run{layout[0]}x{layout[1]}")
        extra = ("--config.train.checkpoint_every=20", "--config.train.keep_checkpoints=5",
                 "--config.train.final_eval=True")  # fmt: skip
        runs[layout] = (wd, _run(*layout, wd, data_dir, STEPS, *extra))
    return runs


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", [(2, 4), (4, 2), (8, 1)])
def test_layout_matrix(tmp_path, data_dir, long_runs, layout):
    """60 steps on 2 x 4, 4 x 2, 8 x 1 log the losses of 1 x 8."""
    if layout in long_runs:
        wd = long_runs[layout][0]
    else:
        wd = tmp_path
        _run(*layout, wd, data_dir, STEPS)
    _assert_close(_losses(wd), _losses(long_runs[(1, 8)][0]), range(1, STEPS + 1))


@pytest.mark.multiprocess
def test_evaluation_in_many_processes_equals_one(long_runs):
    """Held-out metrics of 2 x 4 equal 1 x 8; written once (process 0)."""
    evals = {k: _rows(wd, "eval") for k, (wd, _) in long_runs.items()}
    assert [len(v) for v in evals.values()] == [1, 1]
    a, b = evals[(1, 8)][0], evals[(2, 4)][0]
    keys = [k for k in a if k.startswith("retrieval/") and k.endswith("/R@1")]
    assert keys
    for k in keys:
        assert abs(a[k] - b[k]) <= 0.1, k
    out = long_runs[(2, 4)][1]
    assert f"[p0] {NAME}: held-out evaluation" in out
    assert f"[p1] {NAME}: held-out" not in out


@pytest.mark.multiprocess
@pytest.mark.parametrize("written_by,resumed_by", [((2, 4), (1, 8)), ((1, 8), (2, 4)),
                                                   ((2, 4), (4, 2))])  # fmt: skip
def test_elastic_resume(tmp_path, data_dir, long_runs, written_by, resumed_by):
    """The checkpoint of step 40 written by one layout continues on another with the
    losses of the uninterrupted run for steps 41-60."""
    src = long_runs[written_by][0] / "checkpoints"
    (tmp_path / "checkpoints").mkdir()
    shutil.copytree(src / str(RESUME_AT), tmp_path / "checkpoints" / str(RESUME_AT))
    out = _run(*resumed_by, tmp_path, data_dir, STEPS, "--config.train.checkpoint_every=20")
    assert f"resumed from checkpoint step {RESUME_AT}" in out
    got = _losses(tmp_path)
    assert sorted(got) == list(range(RESUME_AT + 1, STEPS + 1))
    _assert_close(got, _losses(long_runs[(1, 8)][0]), range(RESUME_AT + 1, STEPS + 1))


@pytest.mark.multiprocess
def test_kill_minus_9_of_a_peer(tmp_path, data_dir, long_runs):
    """kill -9 of process 1: process 0 exits non-zero within 60 s naming task 1; restarting
    both resumes from the last complete checkpoint and logs the uninterrupted losses."""
    args = _args(tmp_path, data_dir, STEPS, "--config.train.checkpoint_every=10")
    port = free_port()
    logs = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]  # noqa: SIM115
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            env=process_env(
                _env(),
                process_id=i,
                processes=2,
                port=port,
                devices_per_process=4,
                heartbeat_timeout=15,
            ),  # fmt: skip
            stdout=logs[i],
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        ckpt = tmp_path / "checkpoints" / "20"
        deadline = time.monotonic() + 600
        while not ckpt.exists() and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), "a process ended early"
            time.sleep(0.2)
        assert ckpt.exists()
        procs[1].send_signal(signal.SIGKILL)
        t = time.monotonic()
        code = procs[0].wait(timeout=120)
        took = time.monotonic() - t
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    log0 = (tmp_path / "p0.log").read_text()
    assert code != 0 and took < 60, (code, took, log0[-3000:])
    assert "Task 1 heartbeat timeout" in log0 or "tasks are unhealthy" in log0, log0[-3000:]
    out = _run(2, 4, tmp_path, data_dir, STEPS, "--config.train.checkpoint_every=10")
    assert "resumed from checkpoint step" in out
    _assert_close(_losses(tmp_path), _losses(long_runs[(1, 8)][0]), range(1, STEPS + 1))
