"""The ``cnn`` encoder kind: shapes, parameter count of the CoMM CPU plan's CNN, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gram_jax.models import CNNConfig, CNNEncoder, CoMMModel, build_encoder, count_params
from gram_jax.training.config import base_config, modality, validate

X = np.random.default_rng(0).uniform(size=(3, 64, 64, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    return build_encoder("cnn", "tiny", seed=0)


def test_tiny_is_the_plans_cnn(tiny):
    assert isinstance(tiny, CNNEncoder)
    assert tiny.cfg.cnn_layer_channels == (32, 64, 64, 64)
    # conv5x5(3 -> 32) + conv3x3(32 -> 64) + 2 x conv3x3(64 -> 64), with biases.
    expected = (75 * 32 + 32) + (288 * 64 + 64) + 2 * (576 * 64 + 64)
    assert count_params(tiny) == expected == 94_784
    assert tiny.width == 64


def test_tokens_grid_and_pooled(tiny):
    out = tiny(X)
    assert out.tokens.shape == (3, 16, 64) and out.grid == (4, 4)
    assert out.pooled.shape == (3, 64) and out.token_mask.shape == (3, 16)
    assert bool(out.token_mask.all())
    np.testing.assert_allclose(out.pooled, out.tokens.mean(1), atol=1e-6)
    assert float(out.tokens.min()) >= 0.0  # ReLU outputs
    assert tiny.output_grid(32, 48) == (2, 3)
    assert tiny(X[:, :32, :48]).grid == (2, 3)


def test_tokens_follow_the_image_row_major(tiny):
    # Token (r, c) sees only its receptive field: changing the bottom-right corner leaves the
    # top-left tokens unchanged and changes the last token.
    y = X.copy()
    y[:, 48:, 48:] = 1.0 - y[:, 48:, 48:]
    a, b = tiny(X).tokens, tiny(y).tokens
    np.testing.assert_allclose(a[:, 0], b[:, 0], atol=1e-6)
    assert not np.allclose(a[:, 15], b[:, 15])


def test_jit_and_grad_are_finite(tiny):
    graphdef, params = nnx.split(tiny, nnx.Param)

    @jax.jit
    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x).pooled ** 2)

    grads = jax.grad(loss)(params, X)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.abs(g).sum()) > 0 for g in leaves)


def test_custom_channels_and_presets():
    enc = build_encoder("cnn", "tiny", cnn_channels=(8, 64), cnn_kernels=(3, 3), cnn_strides=(2, 4))
    out = enc(X)
    assert out.grid == (8, 8) and out.tokens.shape == (3, 64, 64)  # 64 / 2 / 4 = 8
    small = CNNConfig.from_preset("small")
    assert small.cnn_layer_channels == (192, 384, 384, 384)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"cnn_channels": (8, 16, 16, 32)}, "must equal width"),
        ({"cnn_kernels": (3, 3), "cnn_strides": (2,)}, "same length"),
        ({"cnn_kernels": (0, 3, 3, 3)}, "positive"),
    ],
)
def test_bad_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        CNNConfig.from_preset("tiny", **overrides)


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="rank-4"):
        tiny(X[0])
    with pytest.raises(ValueError, match="channels"):
        tiny(X[..., :2])
    with pytest.raises(ValueError, match="floating"):
        tiny(X.astype(np.int32))
    with pytest.raises(ValueError, match="token mask"):
        tiny(X, np.ones((3, 16), bool))


def test_comm_model_on_cnn_tokens():
    rngs = nnx.Rngs(0)
    encs = {m: build_encoder("cnn", "tiny", rngs=rngs) for m in ("image1", "image2")}
    model = CoMMModel(encs, fusion_width=64, projector_hidden=32, projector_out=16, rngs=rngs)
    out = model({"image1": X, "image2": X[::-1]})
    assert out["embeddings"].shape == (3, 3, 16) and out["fused"].shape == (3, 3, 64)
    assert model.features({"image1": X, "image2": X[::-1]}).shape == (3, 64)


def test_training_config_accepts_the_cnn_kind():
    c = base_config()
    c.model.modalities = {"image1": modality("cnn"), "image2": modality("cnn")}
    c.model.anchor = "image1"
    validate(c)
