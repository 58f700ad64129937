"""Runs you can trust, the cheap cases: real files, real processes, no training.

Checkpoint checksums (a flipped bit), a save that fails on a full disk, the workdir lock
(a second process, kill -9), the config comparison, corrupt / partial dataset directories,
TFDS's standard builder call without TensorFlow, the final report and the data/model
boundary errors of ``train()``.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gram_jax.data import registry
from gram_jax.training.checkpoint import (
    Checkpointer,
    CheckpointWriteError,
    WorkdirBusy,
    WorkdirLock,
    config_diff,
)
from gram_jax.training.config import ConfigError, base_config
from gram_jax.training.reporting import format_report

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = {"train_size": 64, "validation_size": 16, "test_size": 16}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


# -- checkpoints: checksums, a failed save ---------------------------------------------------


def _state(x: float) -> dict:
    return {"w": jnp.full((64, 32), x, jnp.float32), "b": jnp.arange(8, dtype=jnp.int32)}


def test_flipped_bit_is_detected_reported_quarantined_and_the_previous_step_used(tmp_path):
    ck = Checkpointer(tmp_path, keep=3, async_save=True)
    ck.save(1, _state(1.0))
    ck.save(2, _state(2.0))
    ck.close()
    step2 = tmp_path / "checkpoints" / "2"
    manifest = json.loads((step2 / "checksums.json").read_text())["sha256"]
    assert manifest, "no checksums written"
    # The biggest file of the state holds the array bytes: flip one bit in its middle.
    victim = max((step2 / rel for rel in manifest), key=lambda p: p.stat().st_size)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))

    ck = Checkpointer(tmp_path, keep=3)
    step, state = ck.restore(_state(0.0))
    ck.close()
    assert step == 1
    np.testing.assert_array_equal(np.asarray(state["w"]), 1.0)
    msg = " ".join(ck.messages)
    assert "step 2" in msg and str(victim.relative_to(step2)) in msg and "checksum" in msg
    assert not step2.exists() and (tmp_path / "checkpoints" / "2.corrupt-0").is_dir()


def test_intact_checkpoints_restore_without_warnings(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    ck.save(3, _state(3.0))
    ck.close()
    ck = Checkpointer(tmp_path, keep=2)
    step, state = ck.restore(_state(0.0))
    ck.close()
    assert step == 3 and ck.messages == []
    np.testing.assert_array_equal(np.asarray(state["w"]), 3.0)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 512 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_async_save_on_a_full_disk_is_reported_at_once_keeping_the_last_good(tiny_disk):
    ck = Checkpointer(tiny_disk, keep=3, async_save=True)
    ck.save(1, _state(1.0))  # 8 KiB: fits
    ck.finish()
    noise = np.random.default_rng(0).standard_normal((1024, 1024))
    big = {"w": jnp.asarray(noise, jnp.float32)}  # 4 MiB, incompressible: does not fit
    with pytest.raises(CheckpointWriteError) as err:
        ck.save(2, big)
        deadline = time.time() + 60
        while time.time() < deadline:  # what the training loop does after every step
            ck.poll()
            time.sleep(0.05)
    assert err.value.step == 2 and err.value.last_good == 1
    assert "Last good checkpoint: step 1" in str(err.value)
    ck.manager.close()
    ck = Checkpointer(tiny_disk, keep=3)
    step, _ = ck.restore(_state(0.0))
    ck.manager.close()
    assert step == 1


# -- config comparison -----------------------------------------------------------------------


def test_config_diff_splits_structural_from_resumable_keys():
    a = base_config()
    b = base_config()
    b.model.embed_dim = 32
    b.loss.name = "infonce"
    b.train.steps = 5
    b.train.log_every = 1
    b.eval.batch_size = 7
    structural, resumable = config_diff(json.loads(a.to_json_best_effort()), b)
    assert sorted(structural) == ["loss.name", "model.embed_dim"]
    assert structural["model.embed_dim"] == (64, 32)
    assert sorted(resumable) == ["eval.batch_size", "train.log_every", "train.steps"]
    assert config_diff(a, base_config()) == ({}, {})


def test_a_structural_change_is_refused_before_any_file_changes(tmp_path):
    saved = base_config()
    ck = Checkpointer(tmp_path, keep=2)
    ck.save(4, _state(1.0), config=saved)
    ck.close()
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    changed = base_config()
    changed.model.embed_dim = 32
    ck = Checkpointer(tmp_path, keep=2)
    with pytest.raises(ConfigError, match=r"model\.embed_dim: 64 -> 32.*another --workdir"):
        ck.check_config(changed)
    ck.manager.close()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    safe = base_config()
    safe.train.steps = 7
    ck = Checkpointer(tmp_path, keep=2)
    assert ck.check_config(safe) == {"train.steps": (1000, 7)}
    ck.manager.close()


# -- the workdir lock: real processes ---------------------------------------------------------

HOLD = textwrap.dedent(
    """
    import sys, time
    from gram_jax.training.checkpoint import WorkdirLock
    lock = WorkdirLock(sys.argv[1]); lock.acquire()
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_second_writer_is_refused_naming_the_holder_and_kill_9_frees_the_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], env=_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirBusy, match=rf"pid {holder.pid}\b.*another --workdir"):
            WorkdirLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
        holder.wait()
    lock = WorkdirLock(tmp_path)
    lock.acquire()  # the dead holder's lock is reclaimed
    assert f"pid {os.getpid()}" in (tmp_path / "lock").read_text()
    lock.release()


# -- data directories ---------------------------------------------------------------------------


def test_truncated_arrayrecord_is_named_and_the_dataset_regenerated(tmp_path, caplog):
    path = registry.prepare("synthetic_trimodal", tmp_path, **SMALL)
    train_file = next(path.glob("*-train.array_record-*"))
    size = train_file.stat().st_size
    with train_file.open("r+b") as fh:
        fh.truncate(size // 2)
    assert train_file.name in registry.check_dataset_dir(path)
    with caplog.at_level("WARNING", logger="gram_jax.data"):
        again = registry.prepare("synthetic_trimodal", tmp_path, **SMALL)
    assert again == path and train_file.stat().st_size == size
    assert train_file.name in caplog.text and "generating it again" in caplog.text
    src = registry.load_source("synthetic_trimodal", "train", tmp_path, **SMALL)
    assert len(src) == 64 and src[63]["text"].shape == (16,)


def test_missing_dataset_info_does_not_wedge_later_runs(tmp_path):
    path = registry.prepare("synthetic_trimodal", tmp_path, **SMALL)
    (path / "dataset_info.json").unlink()
    for _ in range(2):  # today: OSError "Directory not empty" on every rerun
        assert registry.prepare("synthetic_trimodal", tmp_path, **SMALL) == path
        assert registry.check_dataset_dir(path) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_dataset_that_cannot_be_written_says_which_command_fixes_it(tiny_disk):
    with pytest.raises(registry.DataError, match=r"rm -rf .*synthetic_trimodal"):
        registry.prepare("synthetic_trimodal", tiny_disk, train_size=512)


STANDARD_TFDS = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tensorflow_datasets as tfds
    import gram_jax.data  # registers the builders
    from gram_jax.data import synthetic, trifeature, embeddings
    d = sys.argv[1]
    np.savez(d + "/e.npz", text=np.ones((20, 4), np.float32), video=np.zeros((20, 4), np.float32))
    configs = {
        "synthetic_trimodal": synthetic.SyntheticTrimodalConfig(
            name="small", train_size=8, validation_size=4, test_size=4),
        "trifeature": trifeature.TrifeatureConfig(
            name="small", num_per_combination=1, max_pairs=4),
        "embeddings": embeddings.EmbeddingsConfig(name="small", npz_path=d + "/e.npz"),
    }
    for name, cfg in configs.items():
        b = tfds.builder(name, data_dir=d, config=cfg)
        b.download_and_prepare()
        split = sorted(b.info.splits)[0]
        assert len(b.as_data_source(split=split)) > 0, name
        print(name, b.info.file_format.value, flush=True)
    assert "tensorflow" not in sys.modules
    """
)


def test_standard_tfds_builder_call_works_without_tensorflow(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", STANDARD_TFDS, str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("synthetic_trimodal", "trifeature", "embeddings"):
        assert f"{name} array_record" in r.stdout


# -- what the run says --------------------------------------------------------------------------


def test_report_puts_the_headline_row_first_names_rest_and_marks_percent():
    config = base_config()
    metrics = {"chance/R@1": 0.1, "eval/examples": 1024.0}
    for d in ("text_to_rest", "rest_to_text"):
        for s in ("volume", "cosine", "span_distance"):
            for k, v in (("R@1", 12.5), ("R@5", 40.0), ("R@10", 70.0), ("MdR", 6.0)):
                metrics[f"retrieval/{d}/{s}/{k}"] = v
    lines = format_report(metrics, "title", config).splitlines()
    assert "R@1 %" in lines[1] and "MdR" in lines[1]
    assert lines[3].startswith("*text -> audio+image") and "volume" in lines[3]
    assert not any("rest" in line for line in lines)
    assert "audio+image -> text" in "\n".join(lines)


def _npz_config(tmp_path, width: int, in_features: int, names=("text", "video")):
    np.savez(
        tmp_path / "mine.npz",
        **{
            n: np.random.default_rng(i).standard_normal((48, width), np.float32)
            for i, n in enumerate(("text", "video"))
        },
    )
    c = base_config()
    c.data.name = "embeddings"
    c.data.data_dir = str(tmp_path / "data")
    c.data.builder = ml_collections.ConfigDict({"npz_path": str(tmp_path / "mine.npz")})
    feats = {"in_features": in_features, "width": 16, "depth": 0}
    c.model.modalities = ml_collections.ConfigDict(
        {n: {"kind": "features", "preset": "tiny", "overrides": feats} for n in names}
    )
    c.model.anchor = names[0]
    c.model.embed_dim = 16
    c.train.batch_size = 16
    c.train.steps = 2
    c.train.progress_bar = False
    c.train.final_eval = False
    return c


def test_wrong_embedding_width_is_one_config_error_naming_modality_and_key(tmp_path):
    from gram_jax.training.loop import train

    c = _npz_config(tmp_path, width=24, in_features=32)
    with pytest.raises(ConfigError) as err:
        train(c, tmp_path / "w")
    msg = str(err.value)
    assert "\n" not in msg
    assert "config.model.modalities." in msg and "overrides.in_features=24" in msg
    assert not (tmp_path / "w" / "checkpoints" / "0").exists()


def test_wrong_modality_name_is_one_config_error_listing_the_fields(tmp_path):
    from gram_jax.training.loop import train

    c = _npz_config(tmp_path, width=24, in_features=24, names=("text", "vidoe"))
    with pytest.raises(ConfigError) as err:
        train(c, tmp_path / "w")
    msg = str(err.value)
    assert "\n" not in msg
    assert "config.model.modalities.vidoe" in msg and "'video'" in msg
