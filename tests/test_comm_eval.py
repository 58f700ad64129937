"""CoMM retrieval embeddings: per-pattern BatchNorm statistics, as in training."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gram_jax.models import l2_normalize
from gram_jax.training import tasks
from gram_jax.training.config import base_config, validate

B = 16


def comm_config():
    c = base_config()
    c.model.kind = "comm"
    c.model.fusion_width = 32
    c.model.fusion_heads = 4
    c.model.projector_dims = (32, 16)
    c.loss.name = "comm"
    c.data.two_views = True
    validate(c)
    return c


def batch(seed=0):
    rng = np.random.default_rng(seed)
    text = rng.integers(1, 38, (B, 16)).astype(np.int32)
    text[:, 12:] = 0
    return {
        "text": jnp.asarray(text),
        "text_mask": jnp.asarray(text != 0),
        "image": jnp.asarray(rng.random((B, 32, 32, 3)), jnp.float32),
        "audio": jnp.asarray(rng.standard_normal((B, 32, 32)), jnp.float32),
    }


def bn_stats(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))


def test_eval_embed_uses_each_patterns_batch_statistics():
    config = comm_config()
    model = tasks.build_model(config)
    task = tasks.make_task(config)
    x = batch()
    # Training-mode calls on other data move the running averages away from their init, with
    # every pattern's statistics mixed into the one set of averages.
    for s in (1, 2, 3):
        model(task.model_inputs(batch(s)))
    before = bn_stats(model)

    emb = task.eval_embed(model, x)

    # Single-modality embeddings equal the training path's (per-call batch statistics).
    train_z = l2_normalize(model(task.model_inputs(x))["embeddings"])
    for i, m in enumerate(model.modalities):
        np.testing.assert_allclose(emb[m], train_z[i], atol=1e-5)
    rest = "+".join(m for m in model.modalities if m != "text")
    assert set(emb) == {*model.modalities, rest}
    # ... and differ from the running-average reading, which mixes the patterns.
    running = l2_normalize(model(task.model_inputs(x), use_running_average=True)["embeddings"])
    t = model.modalities.index("text")
    assert not np.allclose(emb["text"], running[t], atol=1e-3)
    # Evaluation leaves the model's running averages unchanged (it runs on a copy).
    model2 = tasks.build_model(config)
    for s in (1, 2, 3):
        model2(task.model_inputs(batch(s)))
    task.eval_embed(model2, x)
    jax.tree.map(np.testing.assert_array_equal, bn_stats(model2), before)
