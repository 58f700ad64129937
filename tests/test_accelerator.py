"""benchmarks/accelerator.py --small: the accelerator check's code at toy sizes on CPU, so it
cannot rot between the sessions that have a GPU (issue 15). One subprocess run (~70 s on 2
cores, so it is marked slow: ``.ci/run`` runs it with the other end-to-end processes); the
checks are on the JSON's structure and on every section having succeeded."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent
SECTIONS = ("environment", "tests", "volume", "torch", "train", "memory")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("accel")
    env = dict(os.environ, JAX_PLATFORMS="cpu", OUT=str(out))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # One CPU device: the check is written for one accelerator.
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env.pop("XLA_FLAGS", None)
    if flags:  # XLA reads a blank XLA_FLAGS as a flag-file name and aborts
        env["XLA_FLAGS"] = " ".join(flags)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "accelerator.py"), "--small"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    written = json.loads((out / "accelerator.json").read_text())
    assert printed == written
    return printed


def test_every_section_ran(report):
    assert report["mode"] == "small"
    assert tuple(report["sections"]) == SECTIONS
    for name, sec in report["sections"].items():
        allowed = ("ok", "skipped") if name == "torch" else ("ok",)
        assert sec["status"] in allowed, (name, sec)
        assert sec["seconds"] > 0


def test_environment_and_tests(report):
    env = report["sections"]["environment"]["result"]
    assert env["platform"] == "cpu" and env["device_count"] == 1
    assert env["versions"]["jax"]
    tests = report["sections"]["tests"]["result"]
    assert tests["passed"] >= 1 and tests["failed"] == 0 and tests["errors"] == 0


def test_volume_and_torch(report):
    (case,) = report["sections"]["volume"]["result"]["cases"]
    r = case["by_precision"]["highest"]
    for name in ("ours_volume", "floor", "dense_volume", "ours_loss", "loss_floor", "dense_loss"):
        assert r["median_s"][name] > 0, name
        assert r["compile_s"][name]["compile_s"] > 0, name
    assert r["ratios"]["ours_over_floor"] > 0 and r["ratios"]["dense_over_ours"] > 0
    (row,) = report["summary"]["volume_table"]
    assert (row["B"], row["k"], row["precision"]) == (case["B"], case["k"], "highest")
    torch = report["sections"]["torch"]
    if torch["status"] == "ok":
        assert row["torch_over_ours"] > 0 and row["torch_loss_over_loss"] > 0
    else:
        assert torch["result"]["skipped"] == "torch is not importable"


def test_train(report):
    train = report["sections"]["train"]["result"]
    assert train["matmul"]["flops_per_s"] > 0
    for name in ("default", "base"):
        res = train[name]
        assert res["fits"] and res["steps_per_s"] > 0, (name, res)
        assert res["examples_per_s"] == pytest.approx(res["global_batch"] * res["steps_per_s"])
        assert res["xla_flops_per_step"] > 0 and res["mfu_vs_measured_bf16_matmul"] > 0
        assert res["compile"]["compile_s"] > 0
        assert res["mfu"] is None  # no datasheet peak for a CPU
    assert train["base"]["dtype"] == "bfloat16"


def test_memory_search(report):
    mem = report["sections"]["memory"]["result"]
    assert mem["limit_source"] == "--small bound"
    dense = mem["impls"]["dense_det"]
    # The (B, B, k, k) tensor outgrows the 1 MiB bound first; the chunked loss fits them all.
    assert dense["largest_confirmed_by_run"] == 32 and dense["first_failing"] == 64
    chunked = mem["impls"]["chunked"]
    assert chunked["bounded"] and chunked["largest_predicted"] == 64
    for row in dense["rows"] + chunked["rows"]:
        assert row["memory_bytes"]["total"] > 0
