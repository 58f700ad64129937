"""Precision of the float32 volumes where GRAM lives: aligned (small-volume) tuples.

References are float64 NumPy evaluations on the same float32 inputs (``np.linalg.slogdet`` of
each k x k Gram matrix; the gradient ``d vol / d A = vol G^-1 A``), and the authors'
formulation in NumPy float32 (each tuple's Gram matrix from float32 products, ``np.linalg.det``:
the LU of ``torch.det``; its gradient ``vol G^-1 A`` with a float32 inverse).

**The two bounds asserted per tuple, and so per decade of volume.** ``pairwise_volume``
computes ``det G_ij = det(M_j) d_ij``: the pivots of ``det M_j`` come from a Gram-Schmidt in
D-space (relative error O(k eps)), and ``d_ij = a.a - sum_r (a . q_jr)^2`` is the anchor's
squared distance to the candidate's span, a difference of O(1) float32 dot products. A float32
dot product of unit vectors has an absolute error ``gamma_D ~ sqrt(D) eps`` (eps = 2^-23), so
``d_ij`` is off by ``~ 2 gamma_D`` and this *dot-product form* (``refine=0``) obeys

    |vol - vol64| / vol64  <=  C sqrt(D) eps / dist64^2 + 1e-5,        dist64 = dist(a, span C)

(half the relative error of ``det``; ``C = 4`` holds with margin on every draw here): for
clustered tuples (``x_m = normalise(e + sigma g_m)``, ``vol ~ sigma^(k-1)``, ``dist ~ sigma``)
at k = 2 nothing below vol ~ 1e-3 is resolvable, as ``cos = 1 - vol^2 / 2`` is lost in the
dot product's rounding. Each anchor's nearest candidate (here: its positive) is rescored per
item by default (``refine=1``): the anchor's residual off the candidate's orthonormal basis,
Gram-Schmidt twice, is backward stable (absolute error O(eps |a|)), so

    |vol - vol64| / vol64  <=  C eps / dist64 + 1e-5                   (item_bound)

which is <= 1e-3 at vol >= 1e-4 for k >= 3 (``dist ~ vol^(1/(k-1))``) and at vol >= 5e-4
for k = 2 (``dist = vol``); between 1e-4 and 5e-4 at k = 2 the measured errors (2.5e-4 at
most) are well under it. The gradient's relative error (``|g - g64| / |g64|`` over the
tuple) obeys the same bounds: it is set by the same residual. On the positives the tests
also assert the acceptance figure directly, error <= 1e-3 per decade down to 1e-4 and <= the
authors' float32 LU's on the same inputs (``docs/precision.md`` has the tables).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gram_jax.volume import gram_volume, pairwise_volume, span_distance

EPS = float(np.finfo(np.float32).eps)
C_BOUND = 4.0
EXTRA = 5  # extra random candidates, so B2 = B1 + EXTRA


def clustered(rng, b: int, k: int, d: int, sigma) -> np.ndarray:
    """(b, k, d) float32 unit vectors ``normalise(e + sigma g)``, ``g ~ N(0, I / d)``."""
    e = rng.standard_normal((b, 1, d))
    e /= np.linalg.norm(e, axis=-1, keepdims=True)
    x = e + np.asarray(sigma)[..., None, None] * rng.standard_normal((b, k, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def near_span(rng, b: int, k: int, d: int, eps) -> np.ndarray:
    """Generic candidates, anchor = normalise(combination of them + eps noise): vol ~ eps."""
    c = rng.standard_normal((b, k - 1, d))
    c /= np.linalg.norm(c, axis=-1, keepdims=True)
    a = np.einsum("bm,bmd->bd", rng.standard_normal((b, k - 1)), c)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    a = a + np.asarray(eps)[:, None] * rng.standard_normal((b, d)) / np.sqrt(d)
    a /= np.linalg.norm(a, axis=-1, keepdims=True)
    return np.concatenate([a[:, None], c], 1).astype(np.float32)


def reference(x: np.ndarray):
    """float64 volume, gradient ``vol G^-1 A`` and anchor-to-span distance per tuple."""
    a = x.astype(np.float64)
    g = a @ a.transpose(0, 2, 1)
    sign, logdet = np.linalg.slogdet(g)
    vol = np.where(sign > 0, np.exp(0.5 * logdet), 0.0)
    _, logdet_m = np.linalg.slogdet(g[:, 1:, 1:])
    dist = np.exp(0.5 * (logdet - logdet_m))
    return vol, vol[:, None, None] * np.linalg.solve(g, a), dist


def authors(x: np.ndarray):
    """The authors' float32 formulation: per-tuple Gram matrix and LU determinant."""
    g = x @ x.transpose(0, 2, 1)
    vol = np.sqrt(np.abs(np.linalg.det(g))).astype(np.float64)
    grad = np.full(x.shape, np.inf)
    for i in range(x.shape[0]):
        try:
            grad[i] = vol[i] * (np.linalg.inv(g[i]) @ x[i])
        except np.linalg.LinAlgError:  # float32 LU finds G singular
            pass
    return vol, grad


def _positives(anchor, *others, refine=1):
    return jnp.diagonal(pairwise_volume(anchor, *others, refine=refine))


def _total(anchor, *others, refine=1):
    vol = _positives(anchor, *others, refine=refine)
    return jnp.sum(vol), vol


# One compilation per (k, refine) gives both the volumes (aux) and their gradients.
_GRADS = {
    k: jax.jit(jax.grad(_total, argnums=tuple(range(k)), has_aux=True), static_argnames="refine")
    for k in range(2, 6)
}


def ours(x: np.ndarray, rng, refine: int = 1):
    """float32 pairwise volumes of the positives (a (B1, B1 + EXTRA) matrix) and gradients.

    ``refine=1`` (the default): each row's nearest candidate, here its positive, is rescored
    per item; ``refine=0``: the dot-product form, which every other pair gets."""
    k = x.shape[1]
    extra = clustered(rng, EXTRA, k - 1, x.shape[2], 1.0)
    args = [x[:, 0]] + [np.concatenate([x[:, m], extra[:, m - 1]]) for m in range(1, k)]
    grads, vol = _GRADS[k](*args, refine=refine)
    vol = np.asarray(vol, np.float64)
    b = x.shape[0]
    g = np.stack([np.asarray(grads[0])] + [np.asarray(gm)[:b] for gm in grads[1:]], 1)
    return vol, g.astype(np.float64)


def rel_grad_err(g, g64):
    num = np.linalg.norm((g - g64).reshape(len(g), -1), axis=1)
    den = np.linalg.norm(g64.reshape(len(g), -1), axis=1)
    return np.where(np.isfinite(num), num / den, np.inf)


def bound(dist, d: int):
    """The dot-product form's bound (module docstring)."""
    return C_BOUND * np.sqrt(d) * EPS / dist**2 + 1e-5


def item_bound(dist):
    """The per-item form's: the anchor's residual off an orthonormal basis, Gram-Schmidt twice,
    is backward stable (absolute error O(eps |a|)), so ``dist`` and the volume are accurate to
    ``~ eps / dist`` relative, with no sqrt(D) and no square (1e-3 at vol ~ 5e-4, k = 2)."""
    return C_BOUND * EPS / dist + 1e-5


def _aligned_batch(k: int, d: int):
    rng = np.random.default_rng(10 * k + d)
    per_decade = 6
    logv = np.repeat(np.arange(-1, -6, -1), per_decade) + rng.uniform(0.05, 0.95, 5 * per_decade)
    x = clustered(rng, logv.size, k, d, (10.0**logv) ** (1.0 / (k - 1)))
    return rng, x


# D = 512 repeats the D = 16 sweep at the embedding width of the authors' models (the sqrt(D)
# factors of the bounds): marked slow to keep the default run under 10 minutes; .ci/run runs it.
WIDE = pytest.param(512, marks=pytest.mark.slow)


@pytest.mark.parametrize("d", [16, WIDE])
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_aligned_tuples_by_decade(k, d):
    """The positives as ``pairwise_volume`` returns them (each row's nearest rescored)."""
    rng, x = _aligned_batch(k, d)
    vol64, g64, dist64 = reference(x)
    vol, g = ours(x, rng)
    err = np.abs(vol - vol64) / vol64
    gerr = rel_grad_err(g, g64)
    b = item_bound(dist64)
    worst = np.argmax(err / b)
    assert np.all(err <= b), f"value error {err[worst]:.2e} > bound {b[worst]:.2e}"
    assert np.all(gerr <= b), f"gradient error {np.max(gerr / b):.2f} x the bound"

    # Acceptance, every decade >= 1e-4: <= 1e-3, and <= the authors' float32 LU's.
    a_vol, a_grad = authors(x)
    a_err = np.abs(a_vol - vol64) / vol64
    a_gerr = rel_grad_err(a_grad, g64)
    decade = np.floor(np.log10(vol64))
    for lo in range(-1, -5, -1):
        sel = decade == lo
        assert sel.any(), lo
        assert err[sel].max() <= 1e-3 and gerr[sel].max() <= 1e-3, lo
        assert err[sel].max() <= a_err[sel].max() + 1e-6, (lo, err[sel].max(), a_err[sel])
        assert gerr[sel].max() <= a_gerr[sel].max() + 1e-6, lo


@pytest.mark.parametrize(("k", "d"), [(2, 512), (4, 16)])
def test_dot_product_form_by_decade(k, d):
    """``refine=0``, the accuracy of the pairs that are not rescored: the float32 floor
    ``4 sqrt(D) eps / dist^2`` (module docstring)."""
    rng, x = _aligned_batch(k, d)
    vol64, g64, dist64 = reference(x)
    vol, g = ours(x, rng, refine=0)
    b = bound(dist64, d)
    err = np.abs(vol - vol64) / vol64
    assert np.all(err <= b), f"value error {np.max(err / b):.2f} x the bound"
    assert np.all(rel_grad_err(g, g64) <= b)


def test_refine_rescores_the_nearest_span_not_the_smallest_volume():
    """A hub (a candidate whose own two vectors are nearly parallel, vol(C) ~ 1e-6) has the
    smallest volume in every row, ``vol(C) dist``; the pair the dot products resolve worst is
    the aligned positive (``dist`` ~ 1e-2). ``refine=1`` must rescore the positive, with
    ``chunk_size`` too (the selection is over the whole row)."""
    rng = np.random.default_rng(7)
    k, d, b = 3, 512, 6
    x = clustered(rng, b, k, d, np.full(b, 10.0**-2.0))
    hub = clustered(rng, 1, 2, d, np.array([1e-6]))[0]
    others = [np.concatenate([x[:, m], hub[m - 1 : m]]) for m in (1, 2)]
    vol64, _, dist64 = reference(x)
    for kw in ({}, {"chunk_size": (4, 3)}):
        vol = np.asarray(pairwise_volume(x[:, 0], *others, **kw), np.float64)
        assert np.all(vol[:, b] < np.diagonal(vol)), "the hub is every row's smallest volume"
        err = np.abs(np.diagonal(vol) - vol64) / vol64
        assert np.all(err <= item_bound(dist64)), (kw, err)
    plain = np.asarray(pairwise_volume(x[:, 0], *others, refine=0), np.float64)
    assert np.max(np.abs(np.diagonal(plain) - vol64) / vol64) > 10 * np.max(item_bound(dist64))


@pytest.mark.parametrize(("k", "ridge"), [(2, 0.0), (2, 1e-6), (3, 1e-6)])
def test_span_distance_of_aligned_tuples(k, ridge):
    """``span_distance`` rescores each anchor's nearest span in D-space too: its positives
    against the same function in float64 (the same ``ridge``) within the per-item bound, where
    the dot-product form (``refine=0``) is off by up to 100 % at k = 2."""
    rng = np.random.default_rng(30 + k)
    x = clustered(rng, 30, k, 512, (10.0 ** rng.uniform(-4, -0.5, 30)) ** (1.0 / (k - 1)))
    others = [x[:, m] for m in range(1, k)]
    with jax.enable_x64(True):
        ref = span_distance(jnp.float64(x[:, 0]), *[jnp.float64(o) for o in others], ridge=ridge)
        ref = np.diagonal(np.asarray(ref))
    err = {
        r: np.abs(
            np.diagonal(np.asarray(span_distance(x[:, 0], *others, ridge=ridge, refine=r))) - ref
        )
        / ref
        for r in (0, 1)
    }
    assert np.all(err[1] <= item_bound(ref)), err[1].max()
    if k == 2:
        assert err[0].max() > 100 * np.max(err[1]), (err[0].max(), err[1].max())


@pytest.mark.parametrize("k", [2, 4])
def test_anchor_near_span(k):
    rng = np.random.default_rng(k)
    d = 64
    x = near_span(rng, 20, k, d, 10.0 ** rng.uniform(-3.5, -0.5, 20))
    vol64, g64, dist64 = reference(x)
    vol, g = ours(x, rng)
    assert np.all(np.abs(vol - vol64) / vol64 <= bound(dist64, d))
    assert np.all(rel_grad_err(g, g64) <= bound(dist64, d))


def test_gram_volume_per_item_has_no_floor():
    """Per item everything is D-space Gram-Schmidt: float32-accurate down to vol = 1e-5, k = 2."""
    rng = np.random.default_rng(0)
    for k in (2, 3, 5):
        logv = rng.uniform(-5.5, -0.5, 24)
        x = clustered(rng, 24, k, 512, (10.0**logv) ** (1.0 / (k - 1)))
        vol64, _, _ = reference(x)
        vol = np.asarray(jax.jit(gram_volume)(*[x[:, m] for m in range(k)]), np.float64)
        np.testing.assert_allclose(vol, vol64, rtol=2e-5 * k)


def test_float64_inputs_recipe():
    """The more-accurate-dot-product recipe: float64 inputs under jax_enable_x64."""
    rng = np.random.default_rng(1)
    x = clustered(rng, 12, 2, 512, 10.0 ** rng.uniform(-5, -1, 12))
    vol64, _, dist64 = reference(x)
    with jax.enable_x64(True):
        args = [jnp.asarray(x[:, m], jnp.float64) for m in range(2)]
        vol = np.asarray(jax.jit(_positives)(*args))
    assert vol.dtype == np.float64
    # The same bound with the float64 epsilon: 1e-5 relative at vol = 1e-5 for k = 2.
    eps64 = float(np.finfo(np.float64).eps)
    assert np.all(np.abs(vol - vol64) / vol64 <= C_BOUND * np.sqrt(512) * eps64 / dist64**2)
    assert np.max(np.abs(vol - vol64) / vol64) <= 1e-4


def test_duplicated_items_score_bitwise_alike():
    """Copies of an item score alike: bit for bit in the dot-product form (``refine=0``) and
    when every copy is rescored (``refine`` >= the copies); with fewer, the rescored copy has
    the per-item accuracy and the other the dot-product form's. (Retrieval scores each
    distinct row once, so its copies tie whatever ``refine``: ``tests/test_metrics.py``.)"""
    rng = np.random.default_rng(2)
    x = clustered(rng, 9, 4, 32, 10.0 ** rng.uniform(-3, -1, 9))
    t, v, a, s = (x[:, m].copy() for m in range(4))
    for src, dst in ((0, 5), (2, 7)):
        t[dst], v[dst], a[dst], s[dst] = t[src], v[src], a[src], s[src]
    fns = {r: jax.jit(functools.partial(pairwise_volume, refine=r)) for r in (0, 1, 2)}
    vols = {r: np.asarray(f(t, v, a, s)) for r, f in fns.items()}
    vol = vols[0]
    for src, dst in ((0, 5), (2, 7)):
        np.testing.assert_array_equal(vol[:, src], vol[:, dst])
        np.testing.assert_array_equal(vol[src], vol[dst])
        assert vol[src, dst] == vol[src, src]
    vol64, _, dist64 = reference(np.stack([t, v, a, s], 1))
    for src, dst in ((0, 5), (2, 7)):
        both = vols[2][[src, src, dst, dst], [src, dst, src, dst]]
        assert np.all(both == both[0]), both
        assert np.abs(both[0] - vol64[src]) / vol64[src] <= item_bound(dist64[src])
        errs = np.abs(vols[1][src, [src, dst]] - vol64[src]) / vol64[src]
        assert errs[0] <= item_bound(dist64[src]), errs  # the first copy: argmin's tie rule
        assert errs[1] <= bound(dist64[src], 32), errs


def test_safe_gradient_is_zero_subgradient_at_exactly_zero_volume():
    rng = np.random.default_rng(3)
    a = clustered(rng, 4, 1, 16, 1.0)[:, 0]
    zero = a.copy()
    zero[1] = 0.0
    for others in ([a.copy(), a.copy()], [zero, a.copy()]):
        det = np.asarray(pairwise_volume(a, *others, squared=True))
        degenerate = np.diagonal(det) == 0.0
        assert degenerate[0], "identical modalities: exactly zero det"

        def f(*xs, weight=degenerate):
            return jnp.sum(jnp.diagonal(pairwise_volume(*xs)) * weight)

        grads = jax.grad(f, argnums=tuple(range(1 + len(others))))(a, *others)
        for gm in grads:
            assert np.all(np.isfinite(gm))
            np.testing.assert_array_equal(np.asarray(gm)[degenerate], 0.0)


PROPERTY = settings(
    max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(2, 5),
    log_sigma=st.floats(-2.5, -0.3),
    near=st.booleans(),
)
def test_near_aligned_property(seed, k, log_sigma, near):
    """Any near-aligned tuple (clustered or anchor-near-span): value and gradient within bound."""
    rng = np.random.default_rng(seed)
    d = 32
    sig = np.full(6, 10.0**log_sigma)
    x = near_span(rng, 6, k, d, sig) if near else clustered(rng, 6, k, d, sig)
    vol64, g64, dist64 = reference(x)
    vol, g = ours(x, rng)
    b = bound(dist64, d)
    assert np.all(np.abs(vol - vol64) / vol64 <= b)
    assert np.all(rel_grad_err(g, g64) <= b)


def _np_gram_loss(x: np.ndarray, tau: float, eps: float) -> float:
    """float64 NumPy GRAM loss of a batch of tuples (B, k, D): (B, B) volumes by ``slogdet``
    of every pair's k x k Gram matrix, two-direction label-smoothed CE on ``-V / tau``."""
    a = x.astype(np.float64)
    b = a.shape[0]
    tup = np.concatenate([np.repeat(a[:, None, :1], b, 1), np.repeat(a[None, :, 1:], b, 0)], 2)
    sign, logdet = np.linalg.slogdet(tup @ tup.transpose(0, 1, 3, 2))
    z = -np.where(sign > 0, np.exp(0.5 * logdet), 0.0) / tau
    target = np.full((b, b), eps / b) + (1 - eps) * np.eye(b)

    def ce(logits):
        m = logits.max(1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
        return -(target * logp).sum(1).mean()

    return 0.5 * (ce(z) + ce(z.T))


@pytest.mark.parametrize("d", [16, WIDE])
@pytest.mark.parametrize(
    ("score", "k"), [("volume", 2), ("volume", 3), ("volume", 5), ("simplex", 2), ("simplex", 3)]
)
def test_loss_on_aligned_batches_by_decade(score, k, d):
    """The loss reads its positives (the diagonal) from the per-item volume, so its value and
    gradient keep float32 accuracy where the pairwise form has none (k = 2, vol < 1e-2).

    Per decade of the positives' volume, a batch of 12 clustered tuples (negatives: the
    random-direction pairs across tuples, volumes ~1). Reference: the same loss in float64 on
    the same float32 inputs (checked against the NumPy loss above for the volume). Bound: the
    positives are then as accurate as :func:`gram_volume` (O(k eps) relative, tested above)
    and the negatives' O(sqrt(D) eps) absolute error enters the gradient with weight
    ``p_ij <= 1``, so the gradient's error relative to its scale is O(sqrt(D) eps / tau)
    ~ 4e-5 at D = 512; asserted: 1e-3 (the acceptance figure) for volumes >= 1e-4, 1e-2 below.
    """
    from gram_jax.losses import gram_contrastive_loss

    def loss(*xs):
        return gram_contrastive_loss(xs[0], list(xs[1:]), 0.07, score=score)[0]

    # One jitted function, compiled once per dtype (the decades share the shapes).
    f = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(k))))
    rng = np.random.default_rng(100 * k + d)
    for lo in range(-1, -6, -1):
        x = clustered(rng, 12, k, d, (10.0 ** rng.uniform(lo, lo + 1, 12)) ** (1.0 / (k - 1)))
        xs = [x[:, m] for m in range(k)]
        v32, g32 = f(*xs)
        with jax.enable_x64(True):
            v64, g64 = f(*[jnp.asarray(a, jnp.float64) for a in xs])
            g64 = np.stack([np.asarray(g) for g in g64])
            v64 = float(v64)
        if score == "volume":
            assert v64 == pytest.approx(_np_gram_loss(x, 0.07, 0.1), rel=1e-10)
        g32 = np.stack([np.asarray(g) for g in g32]).astype(np.float64)
        gerr = np.linalg.norm(g32 - g64) / np.linalg.norm(g64)
        limit = 1e-3 if lo >= -4 else 1e-2
        assert abs(float(v32) - v64) / v64 <= 1e-5, lo
        assert gerr <= limit, (lo, gerr)


@pytest.mark.parametrize("refine", [-1, True, 1.5, "1"])
def test_refine_must_be_a_count(refine):
    x = clustered(np.random.default_rng(0), 4, 2, 8, 1.0)
    with pytest.raises(ValueError, match="refine must be an int >= 0"):
        pairwise_volume(x[:, 0], x[:, 1], refine=refine)
