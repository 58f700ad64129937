"""Cross+Self loss (CoMM's baseline) against a NumPy reference, and its training wiring."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gram_jax.losses import cross_self_loss, nt_xent
from gram_jax.training.config import ConfigError, load_config

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def np_ntx(a: np.ndarray, b: np.ndarray, tau: float) -> float:
    """SimCLR 2N-way NT-Xent (intra-view negatives), written out row by row."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    s_ab, s_aa, s_bb = a @ b.T / tau, a @ a.T / tau, b @ b.T / tau
    rows = []
    for k in range(len(a)):
        ra = np.concatenate([s_ab[k], np.delete(s_aa[k], k)])
        rb = np.concatenate([np.delete(s_bb[k], k), s_ab[:, k]])
        rows += [np.log(np.exp(ra).sum()) - s_ab[k, k], np.log(np.exp(rb).sum()) - s_ab[k, k]]
    return float(np.mean(rows))


def _views(k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((6, 8)) for _ in range(k)], [
        rng.standard_normal((6, 8)) for _ in range(k)
    ]


@pytest.mark.parametrize("k, ssl_scale", [(2, 1.0), (3, 0.5)])
def test_matches_numpy(k, ssl_scale):
    v1, v2 = _views(k)
    cross = [np_ntx(v[i], v[j], 0.1) for v in (v1, v2) for i in range(k) for j in range(i + 1, k)]
    selfs = [np_ntx(a, b, 0.1) for a, b in zip(v1, v2, strict=True)]
    expected = np.mean(cross) + ssl_scale * np.mean(selfs)
    loss, m = cross_self_loss(
        [a.astype(np.float32) for a in v1], [b.astype(np.float32) for b in v2], 0.1, ssl_scale
    )
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(m["cross_self/loss_cross"]) == pytest.approx(np.mean(cross), rel=1e-5)
    assert float(m["cross_self/loss_self"]) == pytest.approx(np.mean(selfs), rel=1e-5)
    assert 0.0 <= float(m["cross_self/accuracy_self"]) <= 1.0


def test_two_modalities_is_the_authors_form():
    # k = 2: NTX(z1, z2) (averaged over both views) + 1/2 [NTX(z1', z1'') + NTX(z2', z2'')].
    (a1, a2), (b1, b2) = ([jnp.asarray(x, jnp.float32) for x in v] for v in _views(2, seed=3))
    loss, _ = cross_self_loss([a1, a2], [b1, b2], 0.2)
    ntx = lambda x, y: nt_xent(x, y, 0.2)[0]  # noqa: E731
    expected = 0.5 * (ntx(a1, a2) + ntx(b1, b2)) + 0.5 * (ntx(a1, b1) + ntx(a2, b2))
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_gradient_is_finite_and_aligning_views_lowers_the_loss():
    v1, v2 = _views(2, seed=5)
    v1 = [jnp.asarray(x, jnp.float32) for x in v1]
    v2 = [jnp.asarray(x, jnp.float32) for x in v2]
    g = jax.grad(lambda a, b: cross_self_loss(a, b)[0])(v1, v2)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
    same = [v1[0], v1[0]]  # all four embeddings of a sample equal: every positive is perfect
    assert float(cross_self_loss(same, same)[0]) < float(cross_self_loss(v1, v2)[0])


def test_bad_inputs():
    a = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="k >= 2"):
        cross_self_loss([a], [a])
    with pytest.raises(ValueError, match="same number"):
        cross_self_loss([a, a], [a, a, a])
    with pytest.raises(ValueError, match="same shape"):
        cross_self_loss([a, a], [a, np.zeros((4, 2), np.float32)])


def test_configs_wire_cross_self_and_reject_one_view():
    c = load_config(str(CONFIGS / "trifeature.py:method=cross_self"))
    assert c.loss.name == "cross_self" and c.data.two_views and c.model.kind == "gram"
    assert c.eval.probe_features == "encoders"
    with pytest.raises(ConfigError, match="two_views"):
        load_config(str(CONFIGS / "trifeature.py:method=cross_self"), ["data.two_views=False"])
    with pytest.raises(ConfigError, match="two_views"):
        load_config(str(CONFIGS / "trifeature.py:method=cross"), ["data.two_views=True"])
    with pytest.raises(ConfigError, match="probe_features"):
        load_config(str(CONFIGS / "trifeature.py:method=cross"), ["eval.probe_features='pooled'"])
