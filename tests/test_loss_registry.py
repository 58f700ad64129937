"""The loss registry: a loss registered from a user's config file trains end to end through
``train.py``'s config path; config validation and the task read the registry entry."""

from __future__ import annotations

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gram_jax import losses
from gram_jax.training import tasks
from gram_jax.training.config import ConfigError, base_config, load_config, validate

# What a user writes: a loss function, one register_loss call, and a config that names it.
USER_CONFIG = '''
import jax
import jax.numpy as jnp

from gram_jax.losses import register_loss
from gram_jax.training.config import base_config, modality


def hinge_loss(anchor, others, temperature, margin):
    """mean_i max(0, margin - s_ii + max_{j != i} s_ij) over anchor . others[0]^T / tau."""
    s = anchor @ others[0].T / temperature
    pos = jnp.diagonal(s)
    hardest = jnp.max(jnp.where(jnp.eye(s.shape[0], dtype=bool), -jnp.inf, s), axis=1)
    loss = jnp.mean(jax.nn.relu(margin - pos + hardest))
    return loss, {"loss": loss, "toy/margin_violations": jnp.mean(hardest + margin > pos)}


register_loss(
    "toy_hinge", hinge_loss, args={"margin": "toy_margin"}, config_keys={"toy_margin": 0.5},
    impls=(),
)


def get_config():
    c = base_config()
    c.data.name = "embeddings"
    c.model.modalities = {
        "left": modality("features", "tiny", in_features=8, depth=0),
        "right": modality("features", "tiny", in_features=12, depth=0),
    }
    c.model.anchor = "left"
    c.model.embed_dim = 16
    c.loss.name = "toy_hinge"
    c.loss.toy_margin = 1.0
    c.train.batch_size = 16
    c.train.steps = 4
    c.train.log_every = 1
    c.train.checkpoint_every = 4
    c.train.progress_bar = False
    c.optim.warmup_steps = 1
    c.eval.batch_size = 32
    c.eval.scores = ("cosine",)
    return c
'''


def _npz(tmp_path, n=64):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((n, 6)).astype(np.float32)
    proj = rng.standard_normal((2, 6, 12)).astype(np.float32)
    path = tmp_path / "toy.npz"
    np.savez(path, left=z @ proj[0, :, :8], right=z @ proj[1])
    return path


def test_loss_registered_in_a_config_file_trains(tmp_path):
    from gram_jax.training.loop import train

    cfg = tmp_path / "my_config.py"
    cfg.write_text(textwrap.dedent(USER_CONFIG))
    overrides = [
        f"data.data_dir={tmp_path / 'data'}",
        f"data.builder={{'npz_path': '{_npz(tmp_path)}', 'test_fraction': 0.25, 'seed': 0}}",
    ]
    config = load_config(str(cfg), overrides)
    assert config.loss.toy_margin == 1.0  # the loss's own key, set by the file
    config = load_config(str(cfg), overrides)  # registering again (a reload) is fine
    # Its entry declares no sharded implementation: the config says so.
    with pytest.raises(ConfigError, match=r"^config\.loss\.impl: the 'toy_hinge' loss supports"):
        load_config(str(cfg), [*overrides, "loss.impl=ring"])
    train(config, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    assert all(np.isfinite(x["loss"]) and "toy/margin_violations" in x for x in steps)
    assert (tmp_path / "run" / "final_metrics.json").is_file()


def test_builtin_names_and_bad_entries_are_rejected():
    with pytest.raises(ValueError, match="built-in"):
        losses.register_loss("gram", losses.infonce_loss)
    with pytest.raises(ValueError, match="params"):
        losses.register_loss("mine", losses.infonce_loss, params="log_tau")
    with pytest.raises(ValueError, match="impls"):
        losses.register_loss("mine", losses.infonce_loss, impls=("ringz",))
    with pytest.raises(ValueError, match="CoMMModel holds none"):
        losses.register_loss("mine", losses.comm_loss, model="comm", two_views=True)
    with pytest.raises(KeyError, match="registered"):
        losses.get_loss("nope")


def test_config_rules_come_from_the_entries():
    c = base_config()
    c.loss.name = "comm"  # a comm-model loss on a gram-kind model
    with pytest.raises(ConfigError, match=r"^config\.loss\.name: 'comm' trains a 'comm'-kind"):
        validate(c)
    c = base_config()
    c.loss.name = "cross_self"  # two views needed
    with pytest.raises(ConfigError, match=r"^config\.data\.two_views: the 'cross_self' loss needs"):
        validate(c)
    # Every built-in supports every sharded impl, ring_checkpoint (README) included, and the
    # ring GRAM loss any k (the old "k <= 4" rule is gone).
    for impl in ("all_gather", "ring", "ring_checkpoint"):
        c = base_config()
        c.loss.impl = impl
        c.model.modalities.depth = c.model.modalities.audio
        c.model.modalities.extra = c.model.modalities.image
        validate(c)
    c = base_config()
    c.loss.label_smoothing = 1.0
    with pytest.raises(ConfigError, match=r"^config\.loss\.label_smoothing: label_smoothing"):
        validate(c)
    c = base_config()
    c.loss.nt_xent_temperature = 0.0
    with pytest.raises(ConfigError, match=r"^config\.loss\.nt_xent_temperature"):
        validate(c)


def test_old_comm_temperature_key_is_an_alias(tmp_path):
    f = tmp_path / "old.py"
    f.write_text(
        "from gram_jax.training.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        "    c.loss.comm_temperature = 0.3\n"
        "    return c\n"
    )
    c = load_config(str(f))
    assert c.loss.nt_xent_temperature == 0.3 and "comm_temperature" not in c.loss
    c = load_config(str(f), ["loss.comm_temperature=0.2"])
    assert c.loss.nt_xent_temperature == 0.2


def _feature_config(**loss):
    c = base_config()
    c.model.modalities = {
        "a": {"kind": "features", "preset": "tiny", "overrides": {"in_features": 4, "depth": 0}},
        "b": {"kind": "features", "preset": "tiny", "overrides": {"in_features": 4, "depth": 0}},
    }
    c.model.anchor = "a"
    c.model.embed_dim = 8
    for k, v in loss.items():
        node, key = (c.model, k[6:]) if k.startswith("model_") else (c.loss, k)
        node[key] = v
    validate(c)
    return c


def _loss_and_grads(config):
    model = tasks.build_model(config)
    task = tasks.make_task(config)
    x = np.random.default_rng(1).standard_normal((2, 8, 4)).astype(np.float32)
    batch = {"a": x[0], "b": x[1]}

    def f(model):
        return task.loss(model, task.embed(model, batch), batch, jax.random.key(0))

    (_, metrics), grads = nnx.value_and_grad(f, has_aux=True)(model)
    return metrics, grads


def test_fixed_temperature_is_not_trained():
    metrics, grads = _loss_and_grads(
        _feature_config(name="infonce", model_learn_temperature=False, model_temperature_init=0.2)
    )
    assert float(metrics["temperature"]) == pytest.approx(0.2)
    assert float(jnp.abs(grads["temperature"]["log_tau"][...])) == 0.0
    metrics, grads = _loss_and_grads(_feature_config(name="infonce"))
    assert float(metrics["temperature"]) == pytest.approx(0.07)
    assert float(jnp.abs(grads["temperature"]["log_tau"][...])) > 0.0


def test_siglip_logs_what_it_trains():
    metrics, grads = _loss_and_grads(_feature_config(name="siglip"))
    assert "temperature" not in metrics  # SigLIP has no temperature: it learns scale and bias
    assert {"scale", "bias"} <= set(metrics)
    assert float(jnp.abs(grads["siglip"]["bias"][...])) > 0.0
