"""The n-modal family beside GRAM: simplex volume, TRIANGLE, Symile, GRAM + InfoNCE handover.

References are independent NumPy float64 code (no fixtures): the scores from their definitions
(the simplex volume from the edges' Gram determinant, Symile's MIP by explicit products), the
losses by dense logits and ``logsumexp``; gradients by float64 central differences. Symile is
also checked against the authors' ``symile`` package when it (and torch) is installed.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gram_jax import losses, metrics, scores, volume

RTOL = 1e-5


def _unit(rng, *shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _simplex_ref(a, c):
    """(B1, B2) simplex (k-1)-volumes, float64, edges from the anchor (the definition)."""
    k = 1 + len(c)
    out = np.zeros((a.shape[0], c[0].shape[0]))
    for i, j in itertools.product(range(a.shape[0]), range(c[0].shape[0])):
        e = np.stack([x[j] - a[i] for x in c])
        out[i, j] = np.sqrt(max(np.linalg.det(e @ e.T), 0.0)) / math.factorial(k - 1)
    return out


def _lse(z, axis):
    m = z.max(axis, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis, keepdims=True))).squeeze(axis)


def _ce_sym_ref(s, tau, eps):
    """GRAM's two-direction label-smoothed CE of logits -s / tau (NumPy)."""
    z = -s / tau
    n = z.shape[0]

    def ce(z):
        return np.mean(_lse(z, 1) - (1 - eps) * np.diag(z) - eps * z.sum(1) / n)

    return 0.5 * (ce(z) + ce(z.T))


# ---------------------------------------------------------------------------------------------
# The simplex volume score
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_pairwise_simplex_volume_matches_float64(k):
    rng = np.random.default_rng(k)
    a, c = _unit(rng, 7, 16), [_unit(rng, 5, 16) for _ in range(k - 1)]  # B1 != B2
    ref = _simplex_ref(a, c)
    got = volume.pairwise_simplex_volume(
        jnp.float32(a), *[jnp.float32(x) for x in c], chunk_size=(3, 2)
    )
    np.testing.assert_allclose(np.asarray(got), ref, rtol=RTOL, atol=RTOL * ref.max())
    one = volume.simplex_volume([jnp.float32(a[0])] + [jnp.float32(x[1]) for x in c])
    np.testing.assert_allclose(float(one), ref[0, 1], rtol=RTOL)
    if k == 3:  # TRIANGLE's area, 1/2 sqrt(|u|^2 |w|^2 - (u.w)^2)
        u, w = a[0] - c[0][1], a[0] - c[1][1]
        area = 0.5 * np.sqrt(u @ u * (w @ w) - (u @ w) ** 2)
        np.testing.assert_allclose(ref[0, 1], area, rtol=1e-12)
    if k == 2:  # the chord length
        np.testing.assert_allclose(ref[0, 1], np.linalg.norm(a[0] - c[0][1]), rtol=1e-12)


def test_simplex_volume_is_sign_aware_and_the_volume_is_not():
    rng = np.random.default_rng(0)
    a, b, c = (jnp.float32(_unit(rng, 4, 8)) for _ in range(3))
    s, s_flip = (volume.pairwise_simplex_volume(a, b, x) for x in (c, -c))
    v, v_flip = (volume.pairwise_volume(a, b, x) for x in (c, -c))
    np.testing.assert_allclose(v, v_flip, rtol=1e-5)
    assert float(jnp.max(jnp.abs(s - s_flip))) > 0.05


@pytest.mark.parametrize("k", [2, 3, 5])
def test_simplex_gradient_matches_finite_differences(k):
    rng = np.random.default_rng(10 + k)
    a, c = _unit(rng, 3, 6), [_unit(rng, 4, 6) for _ in range(k - 1)]
    w = rng.normal(size=(3, 4))

    def f64(a, *c):
        return float(np.sum(w * _simplex_ref(a, list(c))))

    def f(a, *c):
        return jnp.sum(jnp.float32(w) * volume.pairwise_simplex_volume(a, *c))

    grads = jax.grad(f, argnums=tuple(range(k)))(jnp.float32(a), *[jnp.float32(x) for x in c])
    args = [a, *c]
    for m, g in enumerate(grads):
        num = np.zeros_like(args[m])
        for idx in np.ndindex(args[m].shape):
            h = 1e-6
            plus = [x.copy() for x in args]
            minus = [x.copy() for x in args]
            plus[m][idx] += h
            minus[m][idx] -= h
            num[idx] = (f64(*plus) - f64(*minus)) / (2 * h)
        scale = np.abs(num).max()
        assert np.abs(np.asarray(g) - num).max() <= 1e-4 * scale, f"modality {m}"


def test_simplex_degenerate_inputs_finite_gradients():
    """Identical vectors (zero volume), a repeated candidate vector, zero vectors."""
    rng = np.random.default_rng(1)
    x = jnp.float32(_unit(rng, 4, 8))
    cases = [(x, x, x), (x, x[::-1], x[::-1]), (jnp.zeros_like(x), x, jnp.zeros_like(x))]
    for a, b, c in cases:
        g = jax.grad(lambda a, b, c: jnp.sum(volume.pairwise_simplex_volume(a, b, c)), (0, 1, 2))(
            a, b, c
        )
        assert all(bool(jnp.all(jnp.isfinite(t))) for t in g)
        assert float(volume.pairwise_simplex_volume(a, b, c)[0, 0]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_simplex_precision_on_aligned_tuples(k):
    """Aligned positives (volumes down to ~1e-3): float32 within the documented floor of the
    float64 value (docs/nmodal.md: |error of det E| <~ det F * 8 sqrt(D) eps)."""
    rng = np.random.default_rng(2)
    d = 64
    base = _unit(rng, 1, d)
    errs = []
    for delta in (1e-1, 3e-2, 1e-2):
        vs = [base + delta * rng.normal(size=(1, d)) / np.sqrt(d) for _ in range(k)]
        vs = [v / np.linalg.norm(v) for v in vs]
        ref = _simplex_ref(vs[0], vs[1:])[0, 0]
        got = float(volume.pairwise_simplex_volume(*[jnp.float32(v) for v in vs])[0, 0])
        errs.append(abs(got - ref) / ref)
    # The anchor edge's squared length (~delta^2) carries an absolute error ~ sqrt(D) eps.
    eps = float(np.finfo(np.float32).eps)
    for delta, e in zip((1e-1, 3e-2, 1e-2), errs, strict=True):
        assert e <= 8 * np.sqrt(d) * eps / delta**2 + 1e-5, (delta, e)
    if k >= 3:
        # The candidate's own simplex tiny, the anchor far: det(F F^T) comes from D-space
        # Gram-Schmidt, so float32 keeps ~1e-5 (edges from the anchor: 100 % error at k = 4).
        a = _unit(rng, 1, d)
        cs = [base + 1e-4 * rng.normal(size=(1, d)) / np.sqrt(d) for _ in range(k - 1)]
        cs = [c / np.linalg.norm(c) for c in cs]
        ref = _simplex_ref(a, cs)[0, 0]
        got = float(volume.pairwise_simplex_volume(*[jnp.float32(v) for v in (a, *cs)])[0, 0])
        assert abs(got - ref) <= 1e-4 * ref, (got, ref)


def test_retrieval_scores_through_the_one_table():
    rng = np.random.default_rng(3)
    a, b, c = (jnp.float32(_unit(rng, 6, 8)) for _ in range(3))
    np.testing.assert_allclose(
        metrics.retrieval_scores(a, b, c, score="simplex"),
        volume.pairwise_simplex_volume(a, b, c),
        rtol=1e-6,
    )
    mip = np.einsum("id,jd,jd->ij", *(np.asarray(x, np.float64) for x in (a, b, c)))
    np.testing.assert_allclose(metrics.retrieval_scores(a, b, c, score="symile"), mip, atol=1e-6)
    for score in ("simplex", "symile"):
        want = metrics.positive_ranks(
            metrics.retrieval_scores(a, b, c, score=score), scores.get_score(score).lower_is_better
        )
        ranks, _ = metrics.chunked_retrieval(a, b, c, score=score, chunk_size=4, top_k=3)
        np.testing.assert_array_equal(np.asarray(ranks), np.asarray(want))
    with pytest.raises(ValueError, match="unknown score"):
        metrics.retrieval_scores(a, b, c, score="area")


# ---------------------------------------------------------------------------------------------
# Losses: values and gradients against NumPy float64
# ---------------------------------------------------------------------------------------------


def _inputs(k, b=6, d=8, seed=0):
    rng = np.random.default_rng(seed)
    x = _unit(rng, k, b, d)
    others = [0.6 * x[0] + 0.8 * x[m] for m in range(1, k)]
    return x[0], [o / np.linalg.norm(o, axis=-1, keepdims=True) for o in others]


def _symile_ref(mods, tau, perms=None):
    """Symile in NumPy: perms[m][n] the permutation of the n-th non-anchor modality of anchor m
    ('n'), or None ('n_squared': all combinations)."""
    k, b = len(mods), mods[0].shape[0]
    out = []
    for m in range(k):
        rest = [x for n, x in enumerate(mods) if n != m]
        if perms is not None:
            s = np.prod([x[p] for x, p in zip(rest, perms[m], strict=True)], 0)
            z = mods[m] @ s.T
            np.fill_diagonal(z, np.sum(mods[m] * np.prod(rest, 0), 1))
            pos = np.diag(z)
        else:
            combos = list(itertools.product(range(b), repeat=k - 1))
            z = np.stack(
                [np.sum(mods[m] * np.prod([r[j] for r, j in zip(rest, c, strict=True)], 0), 1)
                 for c in combos], 1,
            )  # fmt: skip
            pos = np.array([z[i, combos.index((i,) * (k - 1))] for i in range(b)])
        z = z / tau
        pos = pos / tau
        out.append(np.mean(_lse(z, 1) - pos))
    return float(np.mean(out))


def _symile_perms(key, k, b):
    keys = jax.random.split(key, k * (k - 1))
    return [[np.asarray(jax.random.permutation(keys[m * (k - 1) + n], b)) for n in range(k - 1)]
            for m in range(k)]  # fmt: skip


def _loss_cases(k):
    tau = 0.1
    cases = {
        "simplex": (
            lambda a, o: losses.simplex_contrastive_loss(a, o, tau)[0],
            lambda a, o: _ce_sym_ref(_simplex_ref(a, o), tau, 0.1),
        ),
        "symile_n2": (
            lambda a, o: losses.symile_loss(a, o, tau, negative_sampling="n_squared")[0],
            lambda a, o: _symile_ref([a, *o], tau),
        ),
    }
    key = jax.random.key(7)
    perms = _symile_perms(key, k, 6)
    cases["symile_n"] = (
        lambda a, o: losses.symile_loss(a, o, tau, key=key)[0],
        lambda a, o: _symile_ref([a, *o], tau, perms),
    )
    if k == 3:

        def tri(a, o):
            s = np.zeros((a.shape[0], a.shape[0]))
            for i, j in itertools.product(range(a.shape[0]), repeat=2):
                u, w = a[i] - o[0][j], a[i] - o[1][j]
                s[i, j] = (u @ u * (w @ w) - (u @ w) ** 2) / 2
            return _ce_sym_ref(s, tau, 0.1)

        cases["triangle"] = (lambda a, o: losses.triangle_loss(a, o, tau)[0], tri)
    return cases


# k = 5 repeats k = 2..4 with one more modality (slow: .ci/run runs it).
@pytest.mark.parametrize("k", [2, 3, 4, pytest.param(5, marks=pytest.mark.slow)])
def test_losses_match_float64_values_and_gradients(k):
    anchor, others = _inputs(k)
    for name, (fn, ref) in _loss_cases(k).items():
        if name == "symile_n2" and k == 5:
            continue  # 6^4 candidates per anchor: covered at k <= 4
        a32, o32 = jnp.float32(anchor), [jnp.float32(o) for o in others]
        val, (ga, go) = jax.value_and_grad(fn, (0, 1))(a32, o32)
        np.testing.assert_allclose(float(val), ref(anchor, others), rtol=RTOL, err_msg=name)
        # Central differences of the float64 reference along one random direction per input.
        rng = np.random.default_rng(5)
        for m, g in enumerate([ga, *go]):
            v = rng.normal(size=anchor.shape)
            h = 1e-6

            def shifted(t, m=m, v=v, ref=ref):
                xs = [anchor.copy(), *[o.copy() for o in others]]
                xs[m] = xs[m] + t * v
                return ref(xs[0], xs[1:])

            num = (shifted(h) - shifted(-h)) / (2 * h)
            got = float(np.sum(np.asarray(g, np.float64) * v))
            assert abs(got - num) <= 1e-4 * max(1.0, abs(num)), (name, k, m, got, num)


def test_triangle_needs_three_modalities():
    anchor, others = _inputs(4)
    with pytest.raises(ValueError, match="k = 3"):
        losses.triangle_loss(jnp.float32(anchor), [jnp.float32(o) for o in others], 0.1)


def test_symile_argument_errors():
    a, o = _inputs(3)
    a, o = jnp.float32(a), [jnp.float32(x) for x in o]
    with pytest.raises(ValueError, match="needs a PRNG key"):
        losses.symile_loss(a, o, 0.1)
    with pytest.raises(ValueError, match="n_squared"):
        losses.symile_loss(a, o, 0.1, negative_sampling="n_squared", chunk_size=2)
    with pytest.raises(ValueError, match="negative_sampling"):
        losses.symile_loss(a, o, 0.1, negative_sampling="all")


def test_degenerate_inputs_give_finite_gradients():
    """Identical modalities (zero simplex volume) and duplicated items, for every new loss."""
    rng = np.random.default_rng(4)
    x = jnp.float32(_unit(rng, 6, 8))
    dup = x.at[1].set(x[0])
    key = jax.random.key(0)
    fns = [
        lambda a, o: losses.simplex_contrastive_loss(a, o, 0.1)[0],
        lambda a, o: losses.triangle_loss(a, o, 0.1)[0],
        lambda a, o: losses.symile_loss(a, o, 0.1, key=key)[0],
        lambda a, o: losses.gram_infonce_loss(a, o, 0.1, step=3, handover_steps=10)[0],
    ]
    for fn in fns:
        for a, o in [(x, [x, x]), (dup, [dup, dup])]:
            val, g = jax.value_and_grad(fn, (0, 1))(a, o)
            assert np.isfinite(float(val))
            assert all(bool(jnp.all(jnp.isfinite(t))) for t in jax.tree.leaves(g))


def test_gram_infonce_handover():
    a, o = _inputs(3)
    a, o = jnp.float32(a), [jnp.float32(x) for x in o]
    nce = losses.infonce_loss(a, o, 0.1, label_smoothing=0.1)[0]  # the same smoothing as GRAM
    gram = losses.gram_contrastive_loss(a, o, 0.1)[0]
    kw = {"infonce_weight": 0.8, "infonce_weight_end": 0.2, "handover_steps": 100}
    for step, w in [(0, 0.8), (50, 0.5), (100, 0.2), (400, 0.2)]:
        loss, m = losses.gram_infonce_loss(a, o, 0.1, step=step, **kw)
        np.testing.assert_allclose(float(m["weight"]), w, rtol=1e-6)
        np.testing.assert_allclose(float(loss), w * nce + (1 - w) * gram, rtol=1e-6)
    const, _ = losses.gram_infonce_loss(a, o, 0.1, infonce_weight=0.3)
    np.testing.assert_allclose(float(const), 0.3 * nce + 0.7 * gram, rtol=1e-6)
    # GRAM's other keywords reach its term: here its score
    simplex = losses.gram_contrastive_loss(a, o, 0.1, score="simplex")[0]
    only_gram, _ = losses.gram_infonce_loss(a, o, 0.1, infonce_weight=0.0, score="simplex")
    np.testing.assert_allclose(float(only_gram), float(simplex), rtol=1e-6)
    assert abs(float(simplex) - float(gram)) > 1e-3
    with pytest.raises(ValueError, match="needs the training step"):
        losses.gram_infonce_loss(a, o, 0.1, handover_steps=10)
    with pytest.raises(ValueError, match="infonce_weight must be in"):
        losses.gram_infonce_loss(a, o, 0.1, infonce_weight=1.5)


def test_registry_entries():
    for name, score in [("simplex", "simplex"), ("triangle", "simplex"), ("symile", "symile"),
                        ("gram+infonce", "volume")]:  # fmt: skip
        spec = losses.get_loss(name)
        assert spec.score == score and spec.score in scores.SCORES
    assert losses.get_loss("symile").inputs == ("key",)
    assert losses.get_loss("gram+infonce").inputs == ("step",)


# ---------------------------------------------------------------------------------------------
# Symile against the authors' package (test-only; skipped without torch / symile)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling, k", [("n", 3), ("n", 4), ("n_squared", 3), ("n_squared", 4)])
def test_symile_matches_the_symile_package(sampling, k, monkeypatch):
    torch = pytest.importorskip("torch")
    symile = pytest.importorskip("symile")
    b, tau = 5, 0.1
    anchor, others = _inputs(k, b)
    key = jax.random.key(11)
    if sampling == "n":
        # The package draws torch.randperm per (anchor, other modality) in this order; feed it
        # the permutations our loss draws from ``key``.
        flat = iter(p for per_anchor in _symile_perms(key, k, b) for p in per_anchor)
        draw = lambda n, **kw: torch.as_tensor(np.array(next(flat)))
        monkeypatch.setattr(torch, "randperm", draw)
    mods = [torch.tensor(x) for x in [anchor, *others]]
    want = float(symile.Symile(negative_sampling=sampling)(mods, torch.tensor(1.0 / tau)))
    got = losses.symile_loss(
        jnp.float32(anchor), [jnp.float32(o) for o in others], tau, key=key,
        negative_sampling=sampling,
    )[0]  # fmt: skip
    np.testing.assert_allclose(float(got), want, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# Through the trainer: the task passes key / step, eval accepts the new scores
# ---------------------------------------------------------------------------------------------


def _feature_config(names, **loss):
    from gram_jax.training.config import base_config, validate

    c = base_config()
    c.model.modalities = {
        n: {"kind": "features", "preset": "tiny", "overrides": {"in_features": 4, "depth": 0}}
        for n in names
    }
    c.model.anchor = names[0]
    c.model.embed_dim = 8
    for key, value in loss.items():
        c.loss[key] = value
    validate(c)
    return c


@pytest.mark.parametrize("name", ["simplex", "triangle", "symile", "gram+infonce"])
def test_task_runs_each_new_loss(name):
    from flax import nnx

    from gram_jax.training import tasks

    config = _feature_config(("a", "b", "c"), name=name)
    model, task = tasks.build_model(config), tasks.make_task(config)
    x = np.random.default_rng(1).standard_normal((3, 8, 4)).astype(np.float32)
    batch = {"a": x[0], "b": x[1], "c": x[2]}

    def f(model):
        return task.loss(model, task.embed(model, batch), batch, jax.random.key(0), step=7)

    (loss, m), grads = nnx.value_and_grad(f, has_aux=True)(model)
    assert np.isfinite(float(loss))
    norm = sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(grads))
    assert np.isfinite(norm) and norm > 0
    if name == "gram+infonce":  # step 7 of the default 200-step handover from 1.0 to 0.0
        assert float(m["weight"]) == pytest.approx(1.0 - 7 / 200)


@pytest.mark.slow
def test_train_gram_infonce_with_new_eval_scores(tmp_path):
    """``train``: the train step hands the step to the loss (the weight moves), and
    ``eval.scores`` takes ``simplex`` and ``symile``."""
    import json

    from gram_jax.training.loop import train

    rng = np.random.default_rng(0)
    z = rng.standard_normal((64, 4)).astype(np.float32)
    path = tmp_path / "toy.npz"
    np.savez(path, a=z @ rng.standard_normal((4, 4)).astype(np.float32), b=z, c=-z)
    config = _feature_config(("a", "b", "c"), name="gram+infonce", handover_steps=2)
    config.data.name = "embeddings"
    config.data.data_dir = str(tmp_path / "data")
    config.data.builder = {"npz_path": str(path), "test_fraction": 0.25, "seed": 0}
    config.train.batch_size = 16
    config.train.steps = 3
    config.train.log_every = 1
    config.train.checkpoint_every = 3
    config.train.progress_bar = False
    config.optim.warmup_steps = 1
    config.eval.batch_size = 16
    config.eval.scores = ("simplex", "symile")
    train(config, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    weights = [x["weight"] for x in lines if x["kind"] == "train"]
    assert weights == pytest.approx([1.0, 0.5, 0.0])
    text = (tmp_path / "run" / "final_metrics.json").read_text()
    for score in ("simplex", "symile"):
        assert any(score in k and "R@1" in k for k in text.split('"')), text[:400]
