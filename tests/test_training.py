"""The train step, optimiser, sharding rules, checkpoint fallback and the pod config (in-process,
8 virtual CPU devices from conftest)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gram_jax.training import optim, sharding, tasks
from gram_jax.training import step as step_lib
from gram_jax.training.config import base_config, load_config, validate

ROOT = pathlib.Path(__file__).resolve().parent.parent
B = 16
LR_GROUPS = (("encoders/image/", 0), ("heads/", 0.5))


def tiny_config(**over):
    c = base_config()
    c.train.batch_size = B
    c.train.steps = 10
    c.optim.warmup_steps = 2
    c.train.progress_bar = False
    c.data.builder = {"train_size": 256, "validation_size": 32, "test_size": 32}
    c.eval.batch_size = 32
    c.eval.scores = ("volume",)
    for k, v in over.items():
        node = c
        parts = k.split("__")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    validate(c)
    return c


def random_batch(seed=0, n=B):
    rng = np.random.default_rng(seed)
    text = rng.integers(1, 38, (n, 16)).astype(np.int32)
    text[:, 12:] = 0
    return {
        "text": text,
        "text_mask": text != 0,
        "image": rng.random((n, 32, 32, 3)).astype(np.float32),
        "audio": rng.standard_normal((n, 32, 32)).astype(np.float32),
    }


def make(config):
    mesh = sharding.make_mesh(config)
    trainer = step_lib.make_trainer(config, mesh, tasks.make_task(config, mesh))
    return trainer


def put(trainer, batch):
    return jax.device_put(batch, trainer.batch_sharding)


@pytest.fixture(scope="module")
def trainer():
    """Tiny GRAM trainer with a frozen image tower and half-rate heads."""
    return make(tiny_config(optim__lr_multipliers=LR_GROUPS))


def test_step_trains_and_state_is_sharded(trainer):
    state = trainer.init()
    batch = put(trainer, random_batch())
    losses = []
    for _ in range(4):
        state, m = trainer.step(state, batch)
        losses.append(float(m["loss"]))
    assert int(state["step"]) == 4 and int(state["bad_step"]) == -1
    assert losses[-1] < losses[0]
    for key in ("lr", "grad_norm", "temperature", "volume/positive"):
        assert np.isfinite(float(m[key]))
    leaf = state["params"]["encoders"]["image"]["patch_embed"]["kernel"]
    assert leaf.sharding.mesh.size == 8
    assert state["step"].sharding.is_fully_replicated


def test_decay_mask_excludes_norms_biases_and_scalars(trainer):
    params = trainer.abstract_state["params"]
    mask = optim.decay_mask(params)
    paths = optim.param_paths(params)
    flat = list(zip(jax.tree.leaves(paths), jax.tree.leaves(mask), strict=True))
    decayed = {p for p, m in flat if m}
    kept = {p for p, m in flat if not m}
    assert "encoders/image/patch_embed/kernel" in decayed
    assert "heads/text/linear/kernel" in decayed
    assert "temperature/log_tau" in kept
    assert "encoders/image/patch_embed/bias" in kept
    assert any(p.endswith("scale") for p in kept)
    assert not any(p.endswith("bias") or p.endswith("scale") for p in decayed)


def test_schedule_warmup_then_decay():
    c = tiny_config(optim__schedule="linear", optim__warmup_steps=4)
    s = optim.make_schedule(c)
    lr = c.optim.lr
    np.testing.assert_allclose([float(s(i)) for i in (0, 3, 4)], [lr / 4, lr, lr], rtol=1e-6)
    assert float(s(10)) == pytest.approx(0.0, abs=1e-9)
    c = tiny_config(optim__schedule="cosine", optim__warmup_steps=0, optim__end_lr_ratio=0.1)
    s = optim.make_schedule(c)
    assert float(s(0)) == pytest.approx(lr) and float(s(10)) == pytest.approx(0.1 * lr)


def test_frozen_tower_and_lr_groups(trainer):
    tr = trainer
    state = tr.init()
    before = jax.tree.map(np.asarray, state["params"])
    state, _ = tr.step(state, put(tr, random_batch()))
    after = jax.tree.map(np.asarray, state["params"])
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
    assert not any(jax.tree.leaves(changed["encoders"]["image"]))
    assert all(jax.tree.leaves(changed["encoders"]["text"]))
    assert all(jax.tree.leaves(changed["heads"]))


@pytest.mark.slow
def test_gradient_accumulation_keeps_negatives_global(trainer):
    """GradCache with 4 microbatches = the full-batch step (same loss, grads, update)."""
    tr4 = make(tiny_config(train__grad_accum=4, optim__lr_multipliers=LR_GROUPS))
    batch = random_batch(1)
    s1, s4 = trainer.init(), tr4.init()
    for _ in range(2):
        s1, m1 = trainer.step(s1, put(trainer, batch))
        s4, m4 = tr4.step(s4, put(tr4, batch))
        for k in ("loss", "grad_norm"):
            np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=2e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
        s1["params"],
        s4["params"],
    )


def test_non_finite_step_is_skipped_and_recorded(trainer):
    state = trainer.init()
    state, _ = trainer.step(state, put(trainer, random_batch()))
    good = jax.tree.map(np.asarray, state["params"])
    # A poisoned temperature makes the loss NaN at step 2.
    log_tau = state["params"]["temperature"]["log_tau"]
    state["params"]["temperature"]["log_tau"] = jnp.full_like(log_tau, jnp.nan)
    good["temperature"]["log_tau"] = np.asarray(jnp.nan, np.float32)
    state, m = trainer.step(state, put(trainer, random_batch()))
    assert not np.isfinite(float(m["loss"]))
    assert int(state["bad_step"]) == 2
    state, _ = trainer.step(state, put(trainer, random_batch()))  # sticky: still skipped
    assert int(state["bad_step"]) == 2 and int(state["step"]) == 3
    jax.tree.map(np.testing.assert_array_equal, good, jax.tree.map(np.asarray, state["params"]))


@pytest.mark.slow
def test_ring_loss_with_fsdp_params_matches_gspmd_replicated(trainer):
    """loss.impl='ring' (shard_map over both batch axes) + FSDP parameters on a 2 x 4 mesh
    gives the replicated GSPMD run's losses."""
    ring = make(
        tiny_config(
            optim__lr_multipliers=LR_GROUPS,
            loss__impl="ring",
            mesh__fsdp=4,
            mesh__params="fsdp",
            mesh__fsdp_min_size=256,
        )
    )
    s_ref, s_ring = trainer.init(), ring.init()
    for seed in range(3):
        batch = random_batch(seed)
        s_ref, m_ref = trainer.step(s_ref, put(trainer, batch))
        s_ring, m_ring = ring.step(s_ring, put(ring, batch))
        np.testing.assert_allclose(float(m_ring["loss"]), float(m_ref["loss"]), rtol=1e-5)


def test_a_dropped_trainer_is_freed():
    """No module-level cache keeps a trainer (and so its executables) alive after use."""
    import gc
    import weakref

    from gram_jax.training.loop import get_trainer

    c = tiny_config()
    tr = get_trainer(c, sharding.make_mesh(c))
    state = tr.init()
    emb = tr.eval_fns["embed"](state["params"], state["rest"], put(tr, random_batch()))
    assert emb["text"].shape == (B, c.model.embed_dim) and emb["text"].sharding.is_fully_replicated
    ref = weakref.ref(tr)
    del tr
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("policy", ["embeddings", "encoders"])
def test_probe_features_are_the_tasks_policy(policy):
    """``eval.probe_features`` is read by the task alone: unit embeddings or pooled encoder
    outputs, concatenated in modality order."""
    c = tiny_config(eval__probe_features=policy)
    task = tasks.make_task(c)
    model = tasks.build_model(c)
    batch = random_batch(n=4)
    feats = np.asarray(task.features(model, batch))
    out = model(task.model_inputs(batch))
    if policy == "embeddings":
        parts = [out["embeddings"][m] for m in model.modalities]
    else:
        parts = [out["encoder_outputs"][m].pooled for m in model.modalities]
    np.testing.assert_allclose(feats, np.concatenate(parts, -1), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_dam_term_trains_with_the_matching_head():
    tr = make(tiny_config(loss__dam_weight=0.1))
    state = tr.init()
    assert "matching" in state["params"]
    state, m = tr.step(state, put(tr, random_batch()))
    np.testing.assert_allclose(
        float(m["loss"]), float(m["loss/contrastive"]) + 0.1 * float(m["loss/dam"]), rtol=1e-5
    )
    assert 0.0 <= float(m["dam/accuracy"]) <= 1.0 and np.isfinite(float(m["grad_norm"]))


def test_fsdp_rules():
    c = tiny_config(
        mesh__fsdp=4,
        mesh__params="fsdp",
        mesh__fsdp_min_size=1024,
        mesh__rules=(
            ("encoders/text/embed", "replicated"),
            ("heads/text/linear/kernel", (None, "fsdp")),
        ),
    )
    mesh = sharding.make_mesh(c)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}
    tr = make(c)
    specs = jax.tree.map(lambda s: s.sharding.spec, tr.abstract_state["params"])
    assert specs["encoders"]["image"]["patch_embed"]["kernel"] == jax.P("fsdp")
    assert specs["encoders"]["text"]["embed"]["embedding"] == jax.P()
    assert specs["temperature"]["log_tau"] == jax.P()
    assert specs["heads"]["text"]["linear"]["kernel"] == jax.P(None, "fsdp")  # a tuple spec
    opt_specs = [s.sharding.spec for s in jax.tree.leaves(tr.abstract_state["opt_state"])]
    assert jax.P("fsdp") in opt_specs  # Adam moments follow their parameters


@pytest.mark.slow
def test_tpu_pod_base_lowers_and_compiles_on_8_devices():
    """The pod variant's step (base width, B = 4096, data x fsdp mesh, ring loss, bf16) with
    abstract inputs. Encoder depth is cut to 1 block to keep the CPU compile within the test
    budget; every other setting is the config's (the full 12-block compile was checked by
    hand: same program structure, ~4 min on this CPU)."""
    c = load_config(
        str(ROOT / "configs" / "synthetic.py:scale=pod"),
        [f"model.modalities.{m}.overrides.depth=1" for m in ("text", "image", "audio")],
    )
    mesh = sharding.make_mesh(c)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}
    tr = step_lib.make_trainer(c, mesh, tasks.make_task(c, mesh))
    batch = step_lib.abstract_batch(c, tr.batch_sharding)
    assert batch["image"].shape == (4096, 224, 224, 3)
    compiled = tr.step.lower(tr.abstract_state, batch).compile()
    text = compiled.as_text()
    assert "collective-permute" in text  # the ring loss
    assert "bf16" in text
    out_state, out_metrics = compiled.output_shardings
    kernel = out_state["params"]["encoders"]["image"]["patch_embed"]["kernel"]
    assert kernel.spec == jax.P("fsdp")


def _tiny_train_config(tmp, data_dir, **over):
    c = tiny_config(
        data__data_dir=str(data_dir),
        train__steps=6,
        train__checkpoint_every=2,
        train__keep_checkpoints=3,
        train__log_every=1,
        train__final_eval=False,
        **over,
    )
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(tmp_path, data_dir):
    from gram_jax.training.loop import train

    c = _tiny_train_config(tmp_path, data_dir)
    train(c, tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["2", "4", "6"]
    # Corrupt the newest: empty every array file of its state, garble its metadata.
    for f in (ckpts / "6" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"" if "METADATA" not in f.name else b"{not json")
    # And a newer save that was interrupted (Orbax's temporary directory, never finalised).
    (ckpts / "8.orbax-checkpoint-tmp-1234").mkdir()
    train(c, tmp_path)  # same config: resumes from step 4 and re-trains 5 and 6
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = [x["message"] for x in lines if x["kind"] == "event"]
    assert any("checkpoint step 6 is corrupt" in e for e in events), events
    assert any("resumed from checkpoint step 4" in e for e in events), events
    assert any("partial checkpoint(s)" in e and "8.orbax-checkpoint-tmp" in e for e in events)
    assert (ckpts / "6.corrupt-0").is_dir()  # kept for inspection, not overwritten
    assert (ckpts / "6").is_dir()  # written again by the resumed run
    train_rows = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in train_rows] == [1, 2, 3, 4, 5, 6, 5, 6]
    assert [x["loss"] for x in train_rows[6:]] == [x["loss"] for x in train_rows[4:6]]


def test_non_finite_loss_stops_with_the_step(tmp_path, data_dir):
    from gram_jax.training.loop import NonFiniteError, train

    c = _tiny_train_config(tmp_path, data_dir, optim__lr=1e38, optim__warmup_steps=0)
    c.optim.clip_norm = 0.0
    with pytest.raises(NonFiniteError, match=r"non-finite loss or gradient at step (\d+)") as e:
        train(c, tmp_path)
    bad = e.value.step
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert all(s < bad for s in saved)
    assert e.value.last_good == (max(saved) if saved else None)
