"""Runs you can trust, with real ``train.py`` processes and real signals (marked slow).

One uninterrupted reference run (module fixture) of a shortened default config; the other
tests interrupt, restart or re-run against copies of its workdir: SIGTERM at a random step
(and a second ``train.py`` on the same workdir while it runs), SIGINT during an async save,
a structural config change, fewer steps than done, a safe change.

    python -m pytest -m slow tests/test_reliability_process.py -n 0
"""

import hashlib
import json
import pathlib
import random
import shutil
import signal
import subprocess
import time

import pytest
import train_process

pytestmark = pytest.mark.slow

STEPS = 200  # long enough that a signal sent at step k lands well before the end


def _env() -> dict:
    return train_process.env(1)


def _cmd(workdir, data_dir, *extra):
    return train_process.cmd(workdir, data_dir, STEPS, 50, *extra)


def _run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(*args, env=_env(), capture_output=True, text=True, timeout=600, **kw)


_rows = train_process.rows
_losses = train_process.losses


def _snapshot(workdir) -> dict[str, str]:
    """Relative path -> sha256 of every file (the lock file's holder line excluded)."""
    root = pathlib.Path(workdir)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "lock"
    }


def _steps(workdir) -> list[int]:
    return sorted(
        int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit()
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("rel_data")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """``(workdir, losses)`` of an uninterrupted run."""
    workdir = tmp_path_factory.mktemp("rel_reference")
    r = _run(_cmd(workdir, data_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"workdir {workdir}" in r.stdout
    losses = _losses(_rows(workdir))
    assert sorted(losses) == list(range(1, STEPS + 1))
    return workdir, losses


def _wait_for_step(proc, workdir, step: int, timeout: float = 600) -> None:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists():
            logged = _losses(
                json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")
            )
            if logged and max(logged) >= step:
                return
        time.sleep(0.01)
    raise AssertionError(f"the run ended or stalled before step {step}")


def _interrupt_and_resume(tmp_path, data_dir, reference, sig, at: int, *extra, restart=()):
    ref_dir, ref = reference
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(workdir, data_dir, *extra),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_step(proc, workdir, at)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-3000:]
    name = signal.Signals(sig).name
    assert f"{name} received: training stopped after step" in err
    assert "cannot schedule new futures" not in err and "Traceback" not in err
    stopped = max(_losses(_rows(workdir)))
    assert f"after step {stopped}, checkpoint step {stopped} saved" in err
    assert stopped in _steps(workdir)
    assert (workdir / "checkpoints" / str(stopped) / "checksums.json").is_file()

    r = _run(_cmd(workdir, data_dir, *restart))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(workdir)
    events = [i for i, x in enumerate(rows) if x["kind"] == "event" and "resumed" in x["message"]]
    assert events and f"resumed from checkpoint step {stopped}" in rows[events[-1]]["message"]
    resumed = _losses(rows[events[-1] :])
    nxt = sorted(resumed)[:20]
    assert nxt == list(range(stopped + 1, stopped + 21)), (stopped, nxt)
    for step in nxt:  # bit for bit
        assert resumed[step] == ref[step], (step, resumed[step], ref[step])
    return stopped


def test_sigterm_at_a_random_step_then_restart_reproduces_the_next_20_losses(
    tmp_path, data_dir, reference
):
    at = random.Random().randint(5, 120)
    print(f"SIGTERM after step {at}")
    _interrupt_and_resume(tmp_path, data_dir, reference, signal.SIGTERM, at)


def test_sigint_during_an_async_save_keeps_the_checkpoint_and_resumes_exactly(
    tmp_path, data_dir, reference
):
    # A save every step: the Ctrl-C lands while one is being written. The restart goes back
    # to the reference's cadence (a resumable change) so it stays cheap.
    _interrupt_and_resume(
        tmp_path, data_dir, reference, signal.SIGINT, 20, "--config.train.checkpoint_every=1"
    )


def test_structural_change_stops_naming_the_keys_and_touches_nothing(tmp_path, data_dir, reference):
    workdir = tmp_path / "copy"
    shutil.copytree(reference[0], workdir)
    before = _snapshot(workdir)
    r = _run(_cmd(workdir, data_dir, "--config.model.embed_dim=32"))
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("config error:") and "model.embed_dim: 64 -> 32" in err[-1]
    assert "another --workdir" in err[-1]
    assert _snapshot(workdir) == before  # checkpoints and config.json untouched
    assert not list((workdir / "checkpoints").glob("*.corrupt-*"))


def test_fewer_steps_says_already_finished_evaluates_and_saves_nothing(
    tmp_path, data_dir, reference
):
    workdir = tmp_path / "copy"
    shutil.copytree(reference[0], workdir)
    ckpts = {k: v for k, v in _snapshot(workdir).items() if k.startswith("checkpoints")}
    r = _run(_cmd(workdir, data_dir, "--config.train.steps=30", "--config.train.final_eval=True"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"already finished at step {STEPS}" in r.stdout
    assert f"held-out evaluation after {STEPS} steps" in r.stdout
    assert "*text -> audio+image" in r.stdout
    assert {k: v for k, v in _snapshot(workdir).items() if k.startswith("checkpoints")} == ckpts
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert final["train/steps"] == STEPS


def test_safe_change_resumes_and_says_what_changed(tmp_path, data_dir, reference):
    workdir = tmp_path / "copy"
    shutil.copytree(reference[0], workdir)
    r = _run(
        _cmd(workdir, data_dir, f"--config.train.steps={STEPS + 4}", "--config.train.log_every=2")
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from checkpoint step {STEPS}; config changed since it was saved" in r.stdout
    assert f"train.steps: {STEPS} -> {STEPS + 4}" in r.stdout
    assert "train.log_every: 1 -> 2" in r.stdout
    assert _steps(workdir)[-1] == STEPS + 4
    # The original command afterwards: finished at the later step, nothing saved as STEPS.
    r = _run(_cmd(workdir, data_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"already finished at step {STEPS + 4}" in r.stdout
    assert _steps(workdir)[-1] == STEPS + 4


def test_second_run_on_a_workdir_stops_naming_the_holder_and_kill_9_frees_it(tmp_path, data_dir):
    workdir = tmp_path / "run"
    first = subprocess.Popen(
        _cmd(workdir, data_dir, "--config.train.steps=1000000"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_step(first, workdir, 1)
        t0 = time.time()
        second = _run(_cmd(workdir, data_dir))
        assert second.returncode == 4, second.stderr[-2000:]
        assert f"pid {first.pid}" in second.stderr and "another --workdir" in second.stderr
        assert "Traceback" not in second.stderr
        print(f"second run refused after {time.time() - t0:.1f}s")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        first.kill()
        first.wait()
    # The lock of the killed run is reclaimed: the next run trains (and saves) normally.
    third = _run(_cmd(workdir, data_dir, "--config.train.steps=3"))
    assert third.returncode == 0, third.stderr[-3000:]
    assert 3 in _steps(workdir) or "already finished" in third.stdout
