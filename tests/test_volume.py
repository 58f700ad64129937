"""Tests of gram_jax.volume: fixture agreement, properties, degenerate inputs, transforms, errors.

Reference values come from two independent places: the GRAM authors' own PyTorch code
(``gram_reference.npz``, float32) and a float64 NumPy evaluation of the definition
``vol = sqrt(det(A A^T))`` with a dense LU determinant (:func:`dense_volume64` below).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gram_jax.volume import (
    candidate_gram,
    gram_volume,
    pairwise_gram_det,
    pairwise_volume,
    safe_sqrt,
    span_distance,
)

PROPERTY = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# Shapes are fixed per test so that every hypothesis example reuses one compiled function.
B1, B2, D = 5, 7, 8

_pv = jax.jit(pairwise_volume, static_argnames=("squared", "gradient", "chunk_size"))
_span = jax.jit(span_distance, static_argnames=("squared", "ridge", "chunk_size"))


@jax.jit
def _suite(anchor, *others):
    """Every quantity the property tests compare, in one compiled function per k."""
    return {
        "det": pairwise_gram_det(anchor, *others),
        "vol": pairwise_volume(anchor, *others),
        "squared": pairwise_volume(anchor, *others, squared=True),
        "span": span_distance(anchor, *others),
        "det_m": candidate_gram(*others)[2],
    }


def _det(anchor, *others):
    return _suite(anchor, *others)["det"]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def unit_rows(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_case(seed: int, k: int, b1: int = B1, b2: int = B2, d: int = D):
    rng = np.random.default_rng(seed)
    return unit_rows(rng, b1, d), [unit_rows(rng, b2, d) for _ in range(k - 1)]


def dense_gram_det64(anchor, others) -> np.ndarray:
    """float64 ``det G_ij`` by building every k x k Gram matrix and calling ``np.linalg.det``."""
    a = np.asarray(anchor, np.float64)
    cs = [np.asarray(o, np.float64) for o in others]
    b1, b2 = a.shape[0], cs[0].shape[0]
    stack = np.stack(
        [np.broadcast_to(a[:, None, :], (b1, b2, a.shape[1]))]
        + [np.broadcast_to(c[None, :, :], (b1, b2, a.shape[1])) for c in cs],
        axis=2,
    )  # (B1, B2, k, D)
    gram = np.einsum("ijrd,ijcd->ijrc", stack, stack)
    return np.linalg.det(gram)


def dense_volume64(anchor, others) -> np.ndarray:
    return np.sqrt(np.maximum(dense_gram_det64(anchor, others), 0.0))


def rel_err(x, ref) -> float:
    """Max absolute difference relative to the reference's largest entry (the fixture metric)."""
    ref = np.asarray(ref, np.float64)
    return float(np.max(np.abs(np.asarray(x, np.float64) - ref)) / np.max(np.abs(ref)))


def random_rotation(seed: int, d: int = D) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Agreement with the authors' code
# ---------------------------------------------------------------------------------------------


@jax.jit
def _both_sqrts(anchor, *others):
    return pairwise_volume(anchor, *others), pairwise_volume(anchor, *others, gradient="faithful")


def test_volumes_match_authors_fixture(fixtures_dir):
    ref = np.load(fixtures_dir / "gram_reference.npz")
    assert len(ref["cases"]) == 5
    for c, (b1, b2, k, d) in enumerate(ref["cases"]):
        anchor = ref[f"c{c}_anchor"]
        others = [ref[f"c{c}_other{m}"] for m in range(k - 1)]
        assert anchor.shape == (b1, d) and others[0].shape == (b2, d)
        vol, vol_faithful = _both_sqrts(anchor, *others)
        assert vol.shape == (b1, b2) and vol.dtype == jnp.float32
        err = rel_err(vol, ref[f"c{c}_volume"])
        assert err <= 1e-5, f"case c{c} (k = {k}): volume error {err:.2e}"
        # The faithful square root gives the same values.
        assert rel_err(vol_faithful, vol) <= 1e-7


def test_fixture_volumes_match_float64_reference(fixtures_dir):
    """The fixture is itself right: our float64 dense reference reproduces it."""
    ref = np.load(fixtures_dir / "gram_reference.npz")
    for c, (_, _, k, _) in enumerate(ref["cases"]):
        others = [ref[f"c{c}_other{m}"] for m in range(k - 1)]
        v64 = dense_volume64(ref[f"c{c}_anchor"], others)
        assert rel_err(ref[f"c{c}_volume"], v64) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)


@PROPERTY
@given(seed=seeds, k=st.integers(2, 6))
def test_matches_float64_dense_det(seed, k):
    anchor, others = random_case(seed, k)
    det64 = dense_gram_det64(anchor, others)
    out = _suite(anchor, *others)
    det32 = np.asarray(out["det"])
    np.testing.assert_allclose(det32, det64, rtol=0, atol=2e-6)
    # sqrt turns an absolute det error e into at most e / (2 vol).
    vol64 = np.sqrt(np.maximum(det64, 0))
    np.testing.assert_allclose(out["vol"], vol64, rtol=1e-5, atol=2e-6)
    np.testing.assert_array_equal(out["squared"], det32)


@PROPERTY
@given(seed=seeds, k=st.integers(2, 6), eps=st.sampled_from([1e-1, 1e-2, 1e-3]))
def test_matches_float64_near_degenerate(seed, k, eps):
    """Candidates close to containing the anchor: small volumes, still exact in absolute terms."""
    anchor, others = random_case(seed, k)
    rng = np.random.default_rng(seed + 1)
    near = anchor[rng.integers(0, B1, B2)] + eps * rng.standard_normal((B2, D))
    others[0] = (near / np.linalg.norm(near, axis=-1, keepdims=True)).astype(np.float32)
    det64 = dense_gram_det64(anchor, others)
    np.testing.assert_allclose(np.asarray(_det(anchor, *others)), det64, rtol=0, atol=2e-6)


@PROPERTY
@given(seed=seeds, k=st.integers(2, 5))
def test_invariant_to_common_rotation(seed, k):
    anchor, others = random_case(seed, k)
    q = random_rotation(seed)
    base = np.asarray(_det(anchor, *others))
    rotated = np.asarray(_det(anchor @ q, *[o @ q for o in others]))
    np.testing.assert_allclose(rotated, base, rtol=0, atol=2e-6)
    np.testing.assert_allclose(
        np.asarray(_suite(anchor @ q, *[o @ q for o in others])["vol"]),
        np.asarray(_suite(anchor, *others)["vol"]),
        rtol=1e-5,
        atol=2e-6,
    )


@PROPERTY
@given(seed=seeds, k=st.integers(3, 6), data=st.data())
def test_invariant_to_permuting_non_anchor_modalities(seed, k, data):
    anchor, others = random_case(seed, k)
    perm = data.draw(st.permutations(range(k - 1)))
    base = np.asarray(_det(anchor, *others))
    permuted = np.asarray(_det(anchor, *[others[m] for m in perm]))
    np.testing.assert_allclose(permuted, base, rtol=0, atol=2e-6)


@PROPERTY
@given(seed=seeds, k=st.integers(2, 6))
def test_unit_vectors_have_volume_between_zero_and_one(seed, k):
    anchor, others = random_case(seed, k)
    # Include degenerate pairs: the anchor itself among the candidates.
    others[0][:B1] = anchor
    vol = np.asarray(_suite(anchor, *others)["vol"])
    assert np.all(np.isfinite(vol))
    assert vol.min() >= 0.0
    assert vol.max() <= 1.0 + 1e-6
    # The anchor inside the candidate: volume (numerically) zero.
    assert np.max(np.diagonal(vol[:, :B1])) <= 2e-3


@PROPERTY
@given(seed=seeds)
def test_k2_is_sine_of_the_angle(seed):
    anchor, (other,) = random_case(seed, 2)
    cos = anchor.astype(np.float64) @ other.T.astype(np.float64)
    expected = np.sqrt(1.0 - cos**2)
    vol = np.asarray(_suite(anchor, other)["vol"])
    np.testing.assert_allclose(vol, expected, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(
        np.asarray(gram_volume(anchor[:, None, :], other[None, :, :])),
        expected,
        rtol=1e-5,
        atol=2e-6,
    )


@jax.jit
def _gram_volume_views(anchor, *others):
    broadcast = gram_volume(anchor[:, None, :], *[o[None, :, :] for o in others])
    aligned = gram_volume(anchor, *[o[: anchor.shape[0]] for o in others], squared=True)
    return broadcast, aligned


@PROPERTY
@given(seed=seeds, k=st.integers(2, 5))
def test_gram_volume_broadcasts_to_pairwise(seed, k):
    anchor, others = random_case(seed, k)
    per_item, diag = _gram_volume_views(anchor, *others)
    assert per_item.shape == (B1, B2)
    out = _suite(anchor, *others)
    np.testing.assert_allclose(per_item, out["vol"], rtol=1e-5, atol=2e-6)
    # Row-aligned items (anchor i with candidate i): the diagonal of the pairwise matrix.
    np.testing.assert_allclose(diag, np.diagonal(out["squared"])[:B1], rtol=0, atol=2e-6)


@PROPERTY
@given(seed=seeds, k=st.sampled_from([2, 4]), chunk=st.sampled_from([2, (None, 3), (4, 2), 100]))
def test_chunked_equals_unchunked(seed, k, chunk):
    """Chunks that do not divide B1 = 5 / B2 = 7 exercise the padding of the last block."""
    anchor, others = random_case(seed, k)
    full = _suite(anchor, *others)
    np.testing.assert_allclose(
        np.asarray(_pv(anchor, *others, chunk_size=chunk)), full["vol"], rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(_span(anchor, *others, chunk_size=chunk)), full["span"], rtol=0, atol=1e-6
    )


def test_chunked_gradient_equals_unchunked():
    anchor, others = random_case(3, 3)

    def total(chunk):
        def f(a, *o):
            v = pairwise_volume(a, *o, chunk_size=chunk)
            return jnp.sum(v * jnp.arange(v.size, dtype=v.dtype).reshape(v.shape))

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(anchor, *others)

    for g_chunk, g_full in zip(total((2, 3)), total(None), strict=True):
        np.testing.assert_allclose(g_chunk, g_full, rtol=1e-5, atol=1e-5)


@PROPERTY
@given(seed=seeds, k=st.integers(2, 5))
def test_span_distance_times_candidate_volume_is_volume(seed, k):
    anchor, others = random_case(seed, k)
    out = _suite(anchor, *others)
    vol, dist, det_m = np.asarray(out["vol"]), np.asarray(out["span"]), out["det_m"]
    np.testing.assert_allclose(dist * np.sqrt(np.asarray(det_m))[None, :], vol, atol=2e-5)
    # And the distance itself: residual of the anchor off the candidate span, float64.
    c64 = np.stack([o.astype(np.float64) for o in others], 1)  # (B2, k-1, D)
    for j in range(B2):
        coef, *_ = np.linalg.lstsq(c64[j].T, anchor.T.astype(np.float64), rcond=None)
        resid = np.linalg.norm(anchor.T - c64[j].T @ coef, axis=0)
        np.testing.assert_allclose(dist[:, j], resid, atol=2e-5)


def test_span_distance_of_degenerate_candidate_is_distance_to_actual_span():
    rng = np.random.default_rng(0)
    anchor = unit_rows(rng, 4)
    v = unit_rows(rng, 3)
    # Candidate 0 repeats v twice: its span is the line through v_0.
    dist = span_distance(anchor, v, v.copy())
    cos = anchor.astype(np.float64) @ v.T.astype(np.float64)
    np.testing.assert_allclose(dist, np.sqrt(1 - cos**2), atol=1e-3)
    assert np.all(np.isfinite(dist))


# ---------------------------------------------------------------------------------------------
# Gradients and degenerate inputs
# ---------------------------------------------------------------------------------------------


@jax.jit(static_argnames="gradient")
def _grads(anchor, *others, gradient):
    def f(a, *o):
        v = pairwise_volume(a, *o, gradient=gradient)
        return jnp.sum(v * jnp.linspace(0.5, 1.5, v.size).reshape(v.shape))

    return jax.grad(f, argnums=tuple(range(1 + len(others))))(anchor, *others)


def _volume_grads(anchor, others, gradient):
    return _grads(anchor, *others, gradient=gradient)


def _degenerate_cases():
    rng = np.random.default_rng(7)
    anchor = unit_rows(rng, 4)
    v, a = unit_rows(rng, 4), unit_rows(rng, 4)
    identical = (anchor, [anchor.copy(), anchor.copy()])  # t = v = a for every item
    zero_v = v.copy()
    zero_v[2] = 0.0
    zero = (anchor, [zero_v, a])  # a zero vector (F.normalize of a zero row)
    duplicated = (anchor, [v, v.copy()])  # every candidate has two equal modalities
    anchor_zero = anchor.copy()
    anchor_zero[1] = 0.0
    zero_anchor = (anchor_zero, [v, a])
    return {
        "identical_modalities": identical,
        "zero_vector": zero,
        "duplicated_candidates": duplicated,
        "zero_anchor": zero_anchor,
    }


_det_jit = jax.jit(lambda a, *o: pairwise_gram_det(a, *o))


@pytest.mark.parametrize("case", sorted(_degenerate_cases()))
def test_degenerate_inputs_safe_finite_faithful_nan(case):
    anchor, others = _degenerate_cases()[case]
    vol = np.asarray(_pv(anchor, *others))
    assert np.all(np.isfinite(vol)) and vol.min() <= 1e-4
    safe = _volume_grads(anchor, others, "safe")
    for g in safe:
        assert np.all(np.isfinite(np.asarray(g))), f"{case}: safe gradient not finite"
    # The authors' sqrt(abs(det)) has d/dx at 0 = sign(0) * inf: NaN wherever det is exactly
    # 0 (documented difference). A repeated or zero candidate vector gets an exactly zero pivot
    # and so an exactly zero det; a pair that is degenerate only through the anchor (anchor in
    # the candidate's span) keeps rounding noise in d_ij, and faithful is then finite there:
    # NaN appears exactly where the compiled det is exactly 0.
    faithful = _volume_grads(anchor, others, "faithful")
    has_nan = any(np.isnan(np.asarray(g)).any() for g in faithful)
    assert has_nan == bool(np.any(np.asarray(_det_jit(anchor, *others)) == 0.0)), case
    if case != "duplicated_candidates":
        assert has_nan, f"{case}: an exact zero volume must give the authors' NaN"


def test_faithful_nan_for_duplicated_candidates_op_by_op():
    anchor, others = _degenerate_cases()["duplicated_candidates"]
    with jax.disable_jit():
        det = np.asarray(pairwise_gram_det(anchor, *others))
        assert np.all(det == 0.0)
        grads = jax.grad(lambda a: jnp.sum(pairwise_volume(a, *others, gradient="faithful")))(
            anchor
        )
    assert np.all(np.isnan(np.asarray(grads)))


def test_safe_gradient_equals_faithful_away_from_zero():
    anchor, others = random_case(11, 4)
    for g_safe, g_faithful in zip(
        _volume_grads(anchor, others, "safe"),
        _volume_grads(anchor, others, "faithful"),
        strict=True,
    ):
        np.testing.assert_allclose(g_safe, g_faithful, rtol=1e-5, atol=1e-6)


def test_gradient_matches_finite_differences_float64():
    from jax.test_util import check_grads

    anchor, others = random_case(5, 4, b1=3, b2=4)
    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in (anchor, *others)]
        vol = jax.jit(lambda a, *o: pairwise_volume(a, *o))
        check_grads(vol, args, order=1, modes=["rev"])
        check_grads(jax.jit(lambda a, *o: span_distance(a, *o)), args, order=1, modes=["rev"])


def test_safe_sqrt_value_and_derivative():
    x = jnp.array([-1e-7, 0.0, 0.25, 4.0])
    np.testing.assert_allclose(safe_sqrt(x), [0.0, 0.0, 0.5, 2.0])
    grad = jax.vmap(jax.grad(safe_sqrt))(x)
    np.testing.assert_allclose(grad, [0.0, 0.0, 1.0, 0.25])
    # Second derivative stays finite at 0 as well.
    assert np.all(np.isfinite(jax.vmap(jax.grad(jax.grad(safe_sqrt)))(x)))


def test_dot_products_use_highest_precision():
    """Under a bf16 default matmul precision the volumes must not move."""
    anchor, others = random_case(2, 4, b1=16, b2=16, d=64)
    base = np.asarray(pairwise_volume(anchor, *others))
    with jax.default_matmul_precision("bfloat16"):
        low = np.asarray(jax.jit(lambda a, *o: pairwise_volume(a, *o))(anchor, *others))
    np.testing.assert_allclose(low, base, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Transformations: jit, vmap, grad, shard_map
# ---------------------------------------------------------------------------------------------


def test_jit_vmap_and_grad():
    anchor, others = random_case(1, 4)
    eager = np.asarray(pairwise_volume(anchor, *others))
    np.testing.assert_allclose(_pv(anchor, *others), eager, rtol=1e-6, atol=1e-7)

    # vmap over a leading axis of independent problems.
    rng = np.random.default_rng(3)
    anchors = np.stack([unit_rows(rng, B1) for _ in range(3)])
    cands = [np.stack([unit_rows(rng, B2) for _ in range(3)]) for _ in range(3)]
    batched = jax.vmap(lambda a, *o: pairwise_volume(a, *o))(anchors, *cands)
    assert batched.shape == (3, B1, B2)
    for n in range(3):
        np.testing.assert_allclose(
            batched[n], pairwise_volume(anchors[n], *[c[n] for c in cands]), rtol=1e-6, atol=1e-7
        )
    per_item = jax.vmap(gram_volume)(anchors[:, 0], cands[0][:, 0], cands[1][:, 0])
    assert per_item.shape == (3,)

    # grad under jit, compared to the eager grad.
    g_eager = _volume_grads(anchor, others, "safe")
    g_jit = jax.jit(lambda a, *o: _volume_grads(a, o, "safe"))(anchor, *others)
    for x, y in zip(g_jit, g_eager, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_inside_shard_map_on_8_devices():
    devices = jax.devices()
    assert len(devices) == 8, "conftest sets 8 virtual CPU devices"
    mesh = Mesh(np.array(devices), ("data",))
    anchor, others = random_case(4, 4, b1=16, b2=12, d=32)

    def local(a, *o):  # a: this device's anchors; o: all candidates (replicated)
        return pairwise_volume(a, *o)

    sharded = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P("data"),) + (P(),) * 3,
            out_specs=P("data"),
        )
    )
    a_sh = jax.device_put(anchor, NamedSharding(mesh, P("data")))
    out = sharded(a_sh, *others)
    assert out.shape == (16, 12)
    np.testing.assert_allclose(out, pairwise_volume(anchor, *others), rtol=1e-6, atol=1e-7)

    # Gradients through shard_map: replicated candidates get the sum over devices.
    weights = jnp.linspace(0.5, 1.5, 16 * 12).reshape(16, 12)

    def loss_sharded(a, *o):
        return jnp.sum(sharded(a, *o) * weights)

    def loss_dense(a, *o):
        return jnp.sum(pairwise_volume(a, *o) * weights)

    g_sh = jax.jit(jax.grad(loss_sharded, argnums=(0, 1, 2, 3)))(a_sh, *others)
    g_dense = jax.grad(loss_dense, argnums=(0, 1, 2, 3))(anchor, *others)
    for x, y in zip(g_sh, g_dense, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def _bad_inputs():
    rng = np.random.default_rng(0)
    a, v, s = unit_rows(rng, 4), unit_rows(rng, 5), unit_rows(rng, 5)
    return [
        ("k < 2", (a,), {}, r"k >= 2"),
        ("mismatched D", (a, v[:, :6]), {}, r"embedding sizes differ"),
        ("mismatched B2", (a, v, s[:3]), {}, r"same batch size B2"),
        ("anchor rank 1", (a[0], v), {}, r"anchor must have shape \(B1, D\)"),
        ("anchor rank 3", (a[None], v), {}, r"anchor must have shape \(B1, D\)"),
        ("other rank 1", (a, v[0]), {}, r"others\[0\] must have shape \(B2, D\)"),
        ("integer anchor", (a.astype(np.int32), v), {}, r"anchor must have a floating dtype"),
        ("integer other", (a, v, (s > 0).astype(np.int32)), {}, r"others\[1\].*floating"),
        ("empty anchor batch", (a[:0], v), {}, r"empty batch"),
        ("empty candidates", (a, v[:0]), {}, r"empty batch"),
        ("bad gradient mode", (a, v), {"gradient": "exact"}, r"gradient must be"),
        ("bad chunk size", (a, v), {"chunk_size": 0}, r"chunk_size must be positive"),
    ]


@pytest.mark.parametrize(
    "args,kwargs,match", [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()]
)
def test_pairwise_volume_rejects_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pairwise_volume(*args, **kwargs)


def test_bad_gradient_mode_rejected_even_when_squared():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="gradient must be"):
        pairwise_volume(unit_rows(rng, 3), unit_rows(rng, 3), squared=True, gradient="nope")
    with pytest.raises(ValueError, match="gradient must be"):
        gram_volume(unit_rows(rng, 3), unit_rows(rng, 3), squared=True, gradient="nope")


def test_other_functions_reject_bad_input():
    rng = np.random.default_rng(0)
    a, v = unit_rows(rng, 4), unit_rows(rng, 5)
    with pytest.raises(ValueError, match=r"k >= 2"):
        gram_volume(a)
    with pytest.raises(ValueError, match=r"embedding sizes differ"):
        gram_volume(a, v[:, :5])
    with pytest.raises(ValueError, match=r"floating dtype"):
        gram_volume(a, (v > 0).astype(np.int32)[:4])
    with pytest.raises(ValueError, match=r"scalar"):
        gram_volume(a, np.float32(1.0))
    with pytest.raises(ValueError, match=r"k >= 2"):
        span_distance(a)
    with pytest.raises(ValueError, match=r"embedding sizes differ"):
        span_distance(a, v[:, :6])
    with pytest.raises(ValueError, match=r"k >= 2"):
        pairwise_gram_det(a)
