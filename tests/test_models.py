"""Tests of gram_jax.models: encoders, heads, GRAM / CoMM models, masked volumes.

Tiny shapes throughout; every jitted function is compiled once per test (or module fixture).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gram_jax.models import (
    PRESETS,
    CoMMModel,
    EncoderConfig,
    GramModel,
    LearnableTemperature,
    MatchingHead,
    ProjectionHead,
    SigLIPScaleBias,
    build_encoder,
    count_params,
    masked_pairwise_volume,
    param_table,
)
from gram_jax.models.comm import CoMMProjector, default_mask_patterns
from gram_jax.models.layers import sincos_1d

B = 4
RNG = np.random.default_rng(0)

INPUTS = {
    "image": RNG.uniform(size=(B, 16, 16, 3)).astype(np.float32),
    "video": RNG.uniform(size=(B, 2, 8, 8, 3)).astype(np.float32),
    "audio": RNG.standard_normal((B, 16, 32)).astype(np.float32),
    "waveform": RNG.standard_normal((B, 400)).astype(np.float32),
    "text": np.array(
        [[3, 4, 5, 0, 0], [7, 0, 0, 0, 0], [1, 2, 3, 4, 5], [9, 9, 0, 0, 0]], np.int32
    ),
    "features": RNG.standard_normal((B, 64)).astype(np.float32),
}
EXPECTED_TOKENS = {
    "image": 16,
    "video": 2 * 4,
    "audio": 4 * 8,
    "waveform": ((400 - 10) // 5 + 1 - 8) // 4 + 1,
    "text": 5,
    "features": 1,
}


@pytest.fixture(scope="module")
def encoders():
    """One tiny encoder per kind, built once (eager parameter init compiles per shape)."""
    return {kind: build_encoder(kind, "tiny", seed=i) for i, kind in enumerate(sorted(INPUTS))}


@pytest.fixture(scope="module")
def light():
    """Depth-1 tiny encoders for the composite-model tests (same parameter shapes as tiny, so
    initialisation reuses the compiled random kernels; half the graph to compile)."""
    return {
        m: build_encoder(m, "tiny", depth=1, seed=7) for m in ("image", "text", "audio", "features")
    }


def _finite_tree(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _nonzero_tree(tree) -> bool:
    return sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(tree)) > 0


# ----------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_encoder_jit_grad(kind, encoders):
    enc = encoders[kind]
    x = jnp.asarray(INPUTS[kind])

    @nnx.jit
    def step(model, x):
        def loss(m):
            out = m(x)
            return jnp.mean(out.pooled**2) + jnp.mean(out.tokens**2), out

        (value, out), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return value, out, grads

    value, out, grads = step(enc, x)
    w = PRESETS["tiny"]["width"]
    assert out.tokens.shape == (B, EXPECTED_TOKENS[kind], w)
    assert out.token_mask.shape == (B, EXPECTED_TOKENS[kind]) and out.token_mask.dtype == bool
    assert out.pooled.shape == (B, w)
    assert np.isfinite(float(value))
    assert _finite_tree(grads) and _nonzero_tree(grads)
    if kind == "text":
        np.testing.assert_array_equal(out.token_mask, INPUTS["text"] != 0)
    else:
        assert bool(out.token_mask.all())
    assert count_params(enc) < 1_000_000


def test_text_padding_is_ignored():
    """Changing a masked-out token id does not change the pooled output or valid tokens."""
    enc = build_encoder("text", "tiny", pool="mean")
    ids = jnp.asarray(INPUTS["text"])
    mask = jnp.ones_like(ids, bool).at[2, 4].set(False)
    f = nnx.jit(lambda m, i, k: m(i, k))
    a = f(enc, ids, mask)
    b = f(enc, ids.at[2, 4].set(77), mask)
    np.testing.assert_allclose(a.pooled, b.pooled, atol=1e-6)
    np.testing.assert_allclose(a.tokens[2, :4], b.tokens[2, :4], atol=1e-6)
    assert not bool(a.token_mask[2, 4])
    c = f(enc, ids.at[2, 3].set(77), mask)  # a valid token: output must change
    assert float(jnp.abs(c.pooled[2] - a.pooled[2]).max()) > 1e-4


def test_video_pooled_is_mean_of_frames(encoders):
    enc = encoders["video"]
    pos = jnp.asarray(sincos_1d(2, enc.width))

    @nnx.jit
    def run(enc, x):
        frames = [
            enc.frame_encoder.embed_patches(x[:, t], jnp.broadcast_to(pos[t], (B, 1, enc.width)))
            for t in range(x.shape[1])
        ]
        return enc(x), frames

    out, frames = run(enc, jnp.asarray(INPUTS["video"]))
    ref = jnp.mean(jnp.stack([f.pooled for f in frames]), axis=0)
    np.testing.assert_allclose(out.pooled, ref, atol=1e-5)
    np.testing.assert_allclose(out.tokens[:, 4:], frames[1].tokens, atol=1e-5)
    assert out.grid == (2, 2, 2)


def test_bf16_compute_float32_params():
    enc = build_encoder("image", "tiny", dtype="bfloat16")  # names accepted (config files)
    leaves = jax.tree.leaves(nnx.state(enc, nnx.Param))
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)

    @nnx.jit
    def step(model, x):
        def loss(m):
            return jnp.mean(m(x).pooled.astype(jnp.float32) ** 2)

        return nnx.grad(loss)(model), model(x)

    grads, out = step(enc, jnp.asarray(INPUTS["image"]))
    assert out.tokens.dtype == jnp.bfloat16
    assert _finite_tree(grads) and _nonzero_tree(grads)


def test_presets_and_param_accounting():
    assert set(PRESETS) == {"tiny", "small", "base", "large"}
    enc = build_encoder("image", "tiny")
    leaves = jax.tree.leaves(nnx.state(enc, nnx.Param))
    assert count_params(enc) == sum(int(np.prod(x.shape)) for x in leaves)
    abstract = nnx.eval_shape(lambda: build_encoder("image", "tiny"))
    assert count_params(abstract) == count_params(enc)
    table = param_table(enc)
    assert "total" in table and f"{count_params(enc):,}" in table and "transformer" in table
    base = nnx.eval_shape(lambda: build_encoder("image", "base", patch_size=16))
    assert 80_000_000 < count_params(base) < 95_000_000  # ViT-B/16 trunk ~86M


def test_bad_inputs_raise_clear_errors(encoders):
    img = encoders["image"]
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        img(jnp.zeros((2, 18, 16, 3)))
    with pytest.raises(ValueError, match="rank-4"):
        img(jnp.zeros((2, 16, 16)))
    with pytest.raises(ValueError, match="channels = 3"):
        img(jnp.zeros((2, 16, 16, 1)))
    with pytest.raises(ValueError, match="rank-5"):
        encoders["video"](jnp.zeros((2, 16, 16, 3)))
    with pytest.raises(ValueError, match="n_mels = 32"):
        encoders["audio"](jnp.zeros((2, 16, 40)))
    with pytest.raises(ValueError, match="integer token ids"):
        encoders["text"](jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="too short"):
        encoders["waveform"](jnp.zeros((2, 20)))
    with pytest.raises(ValueError, match="F = 64"):
        encoders["features"](jnp.zeros((2, 10)))
    with pytest.raises(ValueError, match="unknown modality kind"):
        build_encoder("lidar", "tiny")
    with pytest.raises(ValueError, match="unknown preset"):
        build_encoder("image", "huge")
    with pytest.raises(ValueError, match="unknown ImageConfig field"):
        build_encoder("image", "tiny", patchsize=4)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        EncoderConfig(width=30, num_heads=4)
    gm = GramModel({"text": encoders["text"], "image": img}, 32, "text", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown modality key 'audio'"):
        gm({"text": jnp.ones((2, 3), jnp.int32), "audio": jnp.zeros((2, 16, 32))})
    with pytest.raises(ValueError, match="anchor modality 'text' is missing"):
        gm({"image": jnp.zeros((2, 16, 16, 3))})
    with pytest.raises(ValueError, match="anchor 'audio'"):
        GramModel({"text": img}, 32, "audio", rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------


def test_projection_head_unit_norm_and_zero_vector():
    head = ProjectionHead(8, 5, rngs=nnx.Rngs(0))
    x = jnp.asarray(RNG.standard_normal((3, 8)), jnp.float32).at[1].set(0.0)

    @nnx.jit
    def f(h, x):
        def loss(m, x):
            return jnp.sum(m(x) * jnp.arange(5.0))

        return h(x), nnx.grad(loss, argnums=(0, 1))(h, x)

    z, (grads, gx) = f(head, x)
    np.testing.assert_allclose(jnp.linalg.norm(z[jnp.array([0, 2])], axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(z[1], 0.0)
    assert _finite_tree(grads) and _nonzero_tree(grads)
    assert bool(jnp.all(jnp.isfinite(gx))) and float(jnp.abs(gx[1]).max()) > 0
    assert "bias" not in nnx.state(head, nnx.Param)["linear"]  # bias-free


def test_temperatures():
    t = LearnableTemperature()
    np.testing.assert_allclose(t(), 0.07, rtol=1e-6)
    np.testing.assert_allclose(t.log_tau[...], np.log(0.07), rtol=1e-6)
    assert isinstance(t.log_tau, nnx.Param)
    np.testing.assert_allclose(LearnableTemperature(0.5, max_tau=0.1)(), 0.1)
    g = nnx.grad(lambda m: m())(t)
    np.testing.assert_allclose(g["log_tau"][...], 0.07, rtol=1e-5)  # d exp(s)/ds = tau
    scale, bias = SigLIPScaleBias()()
    np.testing.assert_allclose((scale, bias), (10.0, -10.0), rtol=1e-6)


def test_matching_head_jit_grad_and_mask():
    head = MatchingHead(64, (64, 64), num_heads=4, rngs=nnx.Rngs(0))
    a = jnp.asarray(RNG.standard_normal((B, 5, 64)), jnp.float32)
    am = jnp.asarray(INPUTS["text"] != 0)
    c1 = jnp.asarray(RNG.standard_normal((B, 3, 64)), jnp.float32)
    c2 = jnp.asarray(RNG.standard_normal((B, 4, 64)), jnp.float32)
    cm2 = jnp.ones((B, 4), bool).at[:, 3].set(False)

    @nnx.jit
    def f(h, c2):
        def loss(m):
            logits = m(a, am, [c1, c2], [None, cm2])
            return jnp.mean(jax.nn.log_softmax(logits)[:, 1]), logits

        (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(h)
        return logits, grads

    logits, grads = f(head, c2)
    assert logits.shape == (B, 2)
    assert _finite_tree(grads) and _nonzero_tree(grads)
    logits2, _ = f(head, c2.at[:, 3].set(100.0))  # masked candidate token: no effect
    np.testing.assert_allclose(logits, logits2, atol=1e-5)
    logits3, _ = f(head, c2.at[:, 0].set(100.0))
    assert float(jnp.abs(logits3 - logits).max()) > 1e-4
    with pytest.raises(ValueError, match="2 candidate modalities"):
        head(a, am, c1, None)


# ----------------------------------------------------------------------------------------------
# Masked volumes
# ----------------------------------------------------------------------------------------------


def _np_volume(vectors: list[np.ndarray]) -> float:
    m = np.stack(vectors).astype(np.float64)
    return float(np.sqrt(max(np.linalg.det(m @ m.T), 0.0)))


def _unit(shape, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_masked_pairwise_volume_all_present():
    a, v, u, s = (_unit((5, 6), i) for i in range(4))
    got = np.asarray(jax.jit(masked_pairwise_volume)(a, [v, u, s]))
    ref = np.array([[_np_volume([a[i], v[j], u[j], s[j]]) for j in range(5)] for i in range(5)])
    np.testing.assert_allclose(got, ref, atol=2e-5)
    allp = [np.ones(5, bool)] * 3
    np.testing.assert_allclose(masked_pairwise_volume(a, [v, u, s], allp), got, atol=1e-6)


def test_masked_pairwise_volume_absent_modalities():
    a, v, u, s = (_unit((5, 6), i + 10) for i in range(4))
    pv = np.array([1, 1, 0, 1, 0], bool)
    pu = np.array([1, 0, 1, 1, 0], bool)
    # absent entries hold garbage: they must not matter
    v_in, u_in = v.copy(), u.copy()
    v_in[~pv] = 123.0
    u_in[~pu] = -7.0
    got = np.asarray(masked_pairwise_volume(a, [v_in, u_in, s], [pv, pu, None]))
    others = [(v, pv), (u, pu), (s, np.ones(5, bool))]
    ref = np.array(
        [
            [_np_volume([a[i]] + [x[j] for x, p in others if p[j]]) for j in range(5)]
            for i in range(5)
        ]
    )
    np.testing.assert_allclose(got, ref, atol=2e-5)
    # candidate 4 keeps only s: area of the (a, s) parallelogram = sqrt(1 - cos^2)
    np.testing.assert_allclose(got[:, 4], np.sqrt(1 - (a @ s[4]) ** 2), atol=2e-5)


def test_masked_volume_gradients_finite_at_degeneracy():
    a = _unit((3, 4), 0)
    v = a.copy()  # identical to the anchor: zero volume
    u = _unit((3, 4), 1)
    pu = np.array([True, False, True])

    def loss(a, v, u):
        return jnp.sum(masked_pairwise_volume(a, [v, u, u], [None, pu, pu]))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(a, v, u)
    assert _finite_tree(grads)
    np.testing.assert_array_equal(grads[2][1], 0.0)  # absent rows get no gradient


# ----------------------------------------------------------------------------------------------
# GramModel
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gram_model(light):
    enc = {m: light[m] for m in ("text", "image", "audio")}
    head = MatchingHead(64, (64, 64), num_heads=4, rngs=nnx.Rngs(5))
    return GramModel(enc, 64, "text", rngs=nnx.Rngs(3), matching_head=head)


def test_gram_model_forward_volume_grad(gram_model):
    batch = {
        "text": jnp.asarray(INPUTS["text"]),
        "text_mask": jnp.asarray(INPUTS["text"] != 0),
        "image": jnp.asarray(INPUTS["image"]),
        "audio": jnp.asarray(INPUTS["audio"]),
    }

    @nnx.jit
    def step(model, batch):
        def loss(m):
            out = m(batch)
            vol = m.pairwise_volume(out)
            logits = m.match_logits(out, jnp.arange(B), jnp.roll(jnp.arange(B), 1))
            return jnp.mean(vol / m.temperature()) + jnp.mean(logits**2), (out, vol, logits)

        (_, aux), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return aux, grads

    (out, vol, logits), grads = step(gram_model, batch)
    emb = out["embeddings"]
    assert set(emb) == {"text", "image", "audio"}
    for m in emb:
        assert emb[m].shape == (B, 64)
    assert set(out) == {"embeddings", "encoder_outputs"}  # no presence masks
    np.testing.assert_allclose(jnp.linalg.norm(emb["image"], axis=-1), 1.0, rtol=1e-5)
    assert out["encoder_outputs"]["text"].tokens.shape == (B, 5, 64)
    t, i, a = (np.asarray(emb[m], np.float64) for m in ("text", "image", "audio"))
    ref = [[_np_volume([t[r], i[c], a[c]]) for c in range(B)] for r in range(B)]
    np.testing.assert_allclose(vol, ref, atol=2e-4)
    assert logits.shape == (B, 2)
    assert _finite_tree(grads) and _nonzero_tree(grads["temperature"])
    assert _nonzero_tree(grads["matching"]) and _nonzero_tree(grads["encoders"]["audio"])
    filtered = gram_model.select_inputs({**batch, "label": jnp.zeros(B)})
    assert "label" not in filtered and "text_mask" in filtered


# ----------------------------------------------------------------------------------------------
# CoMM
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comm_model(light):
    enc = {m: light[m] for m in ("image", "text", "features")}
    return CoMMModel(
        enc, fusion_width=64, num_heads=8, projector_hidden=64, projector_out=32, rngs=nnx.Rngs(4)
    )


COMM_VIEW = {
    "image": jnp.asarray(INPUTS["image"]),
    "text": jnp.asarray(INPUTS["text"]),
    "features": jnp.asarray(INPUTS["features"]),
}


def test_comm_masked_pass_equals_dropped_token_passes(comm_model):
    patterns = default_mask_patterns(3)

    @nnx.jit
    def run(model, view):
        toks, masks = model.adapt(model.encode(view))
        fused = model.fuse(toks, masks)  # one batched call over the 4 patterns
        refs = []
        for keep in patterns:  # k + 1 separate passes with the tokens literally dropped
            kept = [i for i in range(3) if keep[i]]
            x = jnp.concatenate([toks[i] for i in kept], axis=1)
            km = jnp.concatenate([masks[i] for i in kept], axis=1)
            refs.append(model.fuse_sequence(x, km))
        return fused, refs, model.features(view)

    fused, refs, feats = run(comm_model, COMM_VIEW)
    np.testing.assert_allclose(feats, fused[-1], atol=1e-5)  # probe features = full pass
    assert fused.shape == (4, B, 64)
    for p in range(4):
        np.testing.assert_allclose(fused[p], refs[p], atol=1e-5, rtol=1e-5)
    # single-modality passes differ from each other and from the full pass
    assert float(jnp.abs(fused[0] - fused[3]).max()) > 1e-3
    assert float(jnp.abs(fused[0] - fused[1]).max()) > 1e-3


def test_comm_forward_grad_and_per_call_batchnorm(comm_model):
    model = nnx.clone(comm_model)
    proj_before = nnx.clone(model.projector)

    @nnx.jit
    def step(m, view):
        def loss(m):
            out = m(view)
            return jnp.mean(out["embeddings"] ** 2), out

        (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(m)
        return out, grads

    out, grads = step(model, COMM_VIEW)
    assert out["embeddings"].shape == (4, B, 32) and out["fused"].shape == (4, B, 64)
    assert _finite_tree(grads) and _nonzero_tree(grads["fusion"])
    assert _nonzero_tree(grads["encoders"]["text"]) and _nonzero_tree(grads["adapters"])

    # per-call statistics: pattern p's projection equals the projector run on that slice alone
    @nnx.jit
    def alone(proj, trained_proj, fused):
        solo = [nnx.clone(proj)(fused[p]) for p in range(4)]
        return solo, trained_proj(fused[-1], use_running_average=True)

    solo, eval_out = alone(proj_before, model.projector, out["fused"])
    for p in range(4):
        np.testing.assert_allclose(out["embeddings"][p], solo[p], atol=1e-5)
    # running statistics were updated (4 sequential calls) and are used in eval mode
    assert float(jnp.abs(model.projector.bn1.mean[...]).max()) > 0
    assert _finite_tree(eval_out)
    assert float(jnp.abs(eval_out - out["embeddings"][-1]).max()) > 1e-4
    with pytest.raises(ValueError, match="miss modalities"):
        model({"image": COMM_VIEW["image"]})


def test_comm_batchnorm_synchronised_over_mesh_axis():
    """Projector inside shard_map with bn_axis_name equals the global-batch projector."""
    n_dev = 8
    mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jnp.asarray(RNG.standard_normal((2 * n_dev, 64)), jnp.float32)
    ref_proj = CoMMProjector(64, 64, 32, rngs=nnx.Rngs(0))
    sync_proj = CoMMProjector(64, 64, 32, bn_axis_name="data", rngs=nnx.Rngs(0))

    def sharded(proj):
        graphdef, state = nnx.split(proj)

        def local(state, xb):
            return nnx.merge(graphdef, state)(xb)

        specs = dict(in_specs=(jax.P(), jax.P("data")), out_specs=jax.P("data"))
        return jax.jit(jax.shard_map(local, mesh=mesh, **specs))(state, x)

    ref = nnx.jit(lambda p, x: p(x))(ref_proj, x)  # jit + global array: global statistics
    np.testing.assert_allclose(sharded(sync_proj), ref, atol=1e-5)
    # without the axis name each device normalises with its own 2-example statistics
    assert float(jnp.abs(sharded(ref_proj) - ref).max()) > 1e-2


def test_default_mask_patterns():
    np.testing.assert_array_equal(
        default_mask_patterns(2), np.array([[1, 0], [0, 1], [1, 1]], bool)
    )
    assert list(itertools.chain(*default_mask_patterns(3)[-1:])) == [True] * 3
