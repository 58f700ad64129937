"""The core volume and loss functions, with and without ``jax.jit`` (``chex.variants``).

Each test runs twice, once traced and compiled, once op by op, against an independent
float64 NumPy reference, so a function that only works (or only agrees) under one of the two
fails here. Shapes are tiny: the point is the execution mode, not the numerics at scale
(``test_volume.py`` and ``test_losses.py`` cover those).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np

import gram_jax

B, D, TAU, EPS = 6, 5, 0.07, 0.1


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(k: int, seed: int = 0, aligned: float = 0.6):
    """k L2-normalised (B, D) float64 arrays; modality m > 0 is a noisy copy of modality 0."""
    rng = np.random.default_rng(seed)
    t = _unit(rng.standard_normal((B, D)))
    return [t] + [_unit(t + aligned * rng.standard_normal((B, D))) for _ in range(k - 1)]


def _np_volume(*rows):
    a = np.stack(rows)
    return np.sqrt(max(np.linalg.det(a @ a.T), 0.0))


def _np_pairwise(anchor, *others):
    return np.array(
        [[_np_volume(anchor[i], *(o[j] for o in others)) for j in range(B)] for i in range(B)]
    )


def _np_span_distance(anchor, *others):
    out = np.empty((B, B))
    for j in range(B):
        c = np.stack([o[j] for o in others], axis=1)  # (D, k-1)
        proj = c @ np.linalg.lstsq(c, anchor.T, rcond=None)[0]
        out[:, j] = np.linalg.norm(anchor.T - proj, axis=0)
    return out


def _np_smoothed_ce(z, eps):
    """Mean over rows of the label-smoothed CE of logits z with positives on the diagonal."""
    n = z.shape[0]
    m = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
    return np.mean(lse - (1 - eps) * np.diag(z) - eps / n * z.sum(axis=1))


def _np_gram_loss(anchor, *others):
    z = -_np_pairwise(anchor, *others) / TAU
    return 0.5 * (_np_smoothed_ce(z, EPS) + _np_smoothed_ce(z.T, EPS))


def _np_infonce(x, y):
    z = x @ y.T / TAU
    return 0.5 * (_np_smoothed_ce(z, 0.0) + _np_smoothed_ce(z.T, 0.0))


def _f32(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


class CoreVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_gram_volume_per_item(self):
        for k in (2, 3, 4):
            xs = _inputs(k, seed=k)
            vol = self.variant(gram_jax.gram_volume)(*_f32(*xs))
            chex.assert_shape(vol, (B,))
            ref = [_np_volume(*(x[b] for x in xs)) for b in range(B)]
            np.testing.assert_allclose(vol, ref, atol=2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_pairwise_volume_and_span_distance(self):
        t, v, a = _inputs(3)
        vol = self.variant(gram_jax.pairwise_volume)(*_f32(t, v, a))
        dist = self.variant(gram_jax.span_distance)(*_f32(t, v, a))
        chex.assert_equal_shape([vol, dist])
        chex.assert_shape(vol, (B, B))
        np.testing.assert_allclose(vol, _np_pairwise(t, v, a), atol=2e-6)
        np.testing.assert_allclose(dist, _np_span_distance(t, v, a), atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gram_loss_value_and_gradient(self):
        t, v, a = _inputs(3, seed=1)

        def loss(t, v, a):
            return gram_jax.gram_contrastive_loss(t, [v, a], TAU, label_smoothing=EPS)[0]

        value, grads = self.variant(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*_f32(t, v, a))
        np.testing.assert_allclose(value, _np_gram_loss(t, v, a), rtol=1e-5)
        chex.assert_trees_all_equal_shapes(grads, tuple(_f32(t, v, a)))
        # Central differences of the float64 reference, on a few coordinates of each input.
        h = 1e-6
        for m, g in enumerate(grads):
            for i, d in ((0, 0), (2, 3), (5, 4)):
                hi = [x.copy() for x in (t, v, a)]
                lo = [x.copy() for x in (t, v, a)]
                hi[m][i, d] += h
                lo[m][i, d] -= h
                fd = (_np_gram_loss(*hi) - _np_gram_loss(*lo)) / (2 * h)
                np.testing.assert_allclose(g[i, d], fd, rtol=1e-3, atol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_gram_loss_gradient_finite_at_a_degenerate_candidate(self):
        t, v, a = _inputs(3, seed=2)
        a[0] = v[0]  # candidate 0's two modalities coincide: its volume is 0 for every anchor
        grads = self.variant(
            jax.grad(
                lambda t, v, a: gram_jax.gram_contrastive_loss(t, [v, a], TAU)[0],
                argnums=(0, 1, 2),
            )
        )(*_f32(t, v, a))
        chex.assert_tree_all_finite(grads)

    @chex.variants(with_jit=True, without_jit=True)
    def test_infonce_two_modalities(self):
        t, v = _inputs(2, seed=3)
        loss, metrics = self.variant(
            lambda t, v: gram_jax.infonce_loss(t, [v], TAU, label_smoothing=0.0)
        )(*_f32(t, v))
        chex.assert_rank(loss, 0)
        chex.assert_tree_all_finite(metrics)
        np.testing.assert_allclose(loss, _np_infonce(t, v), rtol=1e-5)
