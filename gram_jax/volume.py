"""Volumes of k-dimensional parallelotopes spanned by modality embeddings (GRAM).

For k >= 2 vectors stacked as the rows of ``A`` (k x D), the k-volume is

    vol = sqrt(det(G)),    G = A A^T  (the k x k Gram matrix).

GRAM (Cicchetti et al., ICLR 2025) scores the alignment of one item's k modality embeddings by
this volume: small volume = aligned. Retrieval and the contrastive loss need it for every
(anchor i, candidate j) pair, where the anchor is one modality (text) of item i and the
candidate is the other k - 1 modalities of item j.

**How it is computed here.** Write ``a`` for the anchor, ``C`` for the (k-1) x D stack of the
candidate's vectors, ``M = C C^T``. The block (Schur) determinant gives

    det G = det(M) * d,    d = a.a - u^T M^-1 u = dist(a, span C)^2,    u = C a.

Both factors come from an elimination that never forms a difference of large products:

- per candidate (O(B2 k^2 D), once): Gram-Schmidt twice on the vectors ``c_0 .. c_{k-2}`` in
  D-space gives an orthonormal basis ``q_r`` of span(C) and the pivots ``|r_r|^2`` of the
  pivot-free ``LDL^T`` of ``M`` (``r_r`` = ``c_r`` minus its projection on the previous
  ones), so ``det M = prod_r |r_r|^2`` to O(k eps) relative error;
- per pair: ``d_ij = a_i.a_i - sum_r (a_i . q_jr)^2``, k - 1 matrix products of (B1, D) x
  (D, B2) and an elementwise sum of squares over the (B1, B2) grid (:func:`anchor_residual`).

No (B1, B2, k, k) tensor and no per-pair LU (the authors' code does both). The previous
evaluation, ``(a.a) det M - u^T adj(M) u``, summed O(det M) terms that cancel down to the
volume squared and lost every digit on aligned tuples; here the only cancellation left is the
one no method built on float32 dot products avoids: ``d_ij`` is the difference of O(1) dot
products, so it carries an absolute error ``~ sqrt(D) eps`` and a volume is accurate to
``~ 4 sqrt(D) eps / dist^2`` relative (k = 2: nothing below ``vol ~ 1e-3`` at D = 512 is
resolvable from dot products in float32). So each anchor's nearest candidate (the smallest
``d_ij``: an aligned positive, a retrieval's top match) is rescored per item (``refine=1``,
:func:`refine_smallest`): the anchor's residual off that candidate's basis in D-space, as
:func:`gram_volume` does, accurate to ``~ eps / dist`` relative, for one extra read of the
(B1, B2) result. ``docs/precision.md`` has the tables by decade for both forms and the
float64 recipe.

**Missing modalities.** ``present_anchor`` / ``present_others`` masks drop a vector from the
Gram matrix (its row and column become the identity's), so the volume is that of the pair's
present vectors: an absent candidate vector has ``q_r = 0`` and pivot 1, an absent anchor
``d = 1``. The absent vectors' values are never read.

Consequence used for retrieval: ``vol(a; C) = vol(C) * dist(a, span(C))``. Ranking anchors for a
fixed candidate by volume is ranking by distance to the candidate's span; ranking candidates for
a fixed anchor also multiplies by the query-independent prior ``vol(C_j)``, which causes hubness.
:func:`span_distance` gives the prior-free score.

**Gradients at zero volume.** ``sqrt`` has an infinite slope at 0 and the authors'
``sqrt(abs(det))`` returns NaN gradients there (identical modalities, zero vectors). The default
``gradient="safe"`` uses :func:`safe_sqrt`: the exact derivative ``1 / (2 sqrt(x))`` wherever
``x > 0`` and the zero subgradient where ``x <= 0``. The volume is a norm-like function of the
anchor's residual off the candidate span, so 0 is in its (Clarke) subdifferential there and the
choice keeps one degenerate item from poisoning a batch. ``gradient="faithful"`` reproduces
``sqrt(abs(det))`` exactly, NaN gradient included. A candidate vector within ``16 eps`` of the
span of the previous ones (a repeated modality, a zero vector) is rounding noise away from
exactly dependent and is treated as such: its pivot is exactly 0, so is ``det``.

**Simplex volumes** (:func:`pairwise_simplex_volume`, :func:`simplex_volume`): the simplex with
the k embeddings' endpoints as vertices, on the same elimination with edges from the candidate's
first vector (the comment above :class:`SimplexCandidate`; ``docs/nmodal.md``).

All Gram dot products run at ``precision=HIGHEST``: TF32/bf16-rounded products move MSR-VTT R@1
by up to 0.4 points.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

__all__ = [
    "GradientMode",
    "gram_volume",
    "pairwise_volume",
    "pairwise_gram_det",
    "span_distance",
    "span_basis",
    "span_terms",
    "span_distance_pairs",
    "span_distance_block",
    "candidate_gram",
    "CandidateGram",
    "anchor_residual",
    "gram_det_pairs",
    "refine_smallest",
    "refine_nearest_volumes",
    "residual_key",
    "gram_det_block",
    "masked_pairwise_volume",
    "to_blocks",
    "safe_sqrt",
    "pow2_rows",
    "validate_pairwise_inputs",
    "SimplexCandidate",
    "simplex_candidate",
    "simplex_det_block",
    "pairwise_simplex_det",
    "pairwise_simplex_volume",
    "simplex_volume",
]

GradientMode = Literal["safe", "faithful"]
_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# Square roots
# ---------------------------------------------------------------------------------------------


@jax.custom_jvp
def safe_sqrt(x: Array) -> Array:
    """``sqrt(max(x, 0))`` with a finite gradient everywhere.

    Derivative: ``1 / (2 sqrt(x))`` for ``x > 0``, and 0 for ``x <= 0`` (the zero subgradient).
    A slightly negative ``x`` (float rounding of a zero determinant) maps to 0.
    """
    return jnp.sqrt(jnp.maximum(x, 0.0))


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    positive = x > 0
    y = jnp.sqrt(jnp.where(positive, x, 0.0))
    # The inner where keeps 1/sqrt from being evaluated at 0 (0 * inf = NaN in the tangent).
    slope = jnp.where(positive, 0.5 / jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)
    return y, slope * dx


def _check_refine(refine) -> None:
    if isinstance(refine, bool) or not isinstance(refine, numbers.Integral) or refine < 0:
        raise ValueError(
            f"refine must be an int >= 0 (pairs recomputed per anchor), got {refine!r}"
        )


def _check_gradient_mode(gradient: str) -> None:
    if gradient not in ("safe", "faithful"):
        raise ValueError(f"gradient must be 'safe' or 'faithful', got {gradient!r}")


def _sqrt(x: Array, gradient: GradientMode) -> Array:
    _check_gradient_mode(gradient)
    if gradient == "safe":
        return safe_sqrt(x)
    return jnp.sqrt(jnp.abs(x))


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _check_float(name: str, x) -> None:
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {jnp.result_type(x)}")


def validate_pairwise_inputs(anchor, others: Sequence) -> None:
    """Raise ``ValueError`` naming the problem unless ``anchor (B1, D)`` and ``others`` are a
    non-empty sequence of ``(B2, D)`` floating arrays (so k = 1 + len(others) >= 2)."""
    if len(others) < 1:
        raise ValueError(
            "a volume needs k >= 2 vectors: got the anchor and no other modality (k = 1)"
        )
    if jnp.ndim(anchor) != 2:
        raise ValueError(f"anchor must have shape (B1, D), got shape {jnp.shape(anchor)}")
    _check_float("anchor", anchor)
    d = anchor.shape[-1]
    b2 = None
    for m, x in enumerate(others):
        if jnp.ndim(x) != 2:
            raise ValueError(f"others[{m}] must have shape (B2, D), got shape {jnp.shape(x)}")
        _check_float(f"others[{m}]", x)
        if x.shape[-1] != d:
            raise ValueError(
                f"embedding sizes differ: anchor has D = {d}, others[{m}] has D = {x.shape[-1]}"
            )
        if b2 is None:
            b2 = x.shape[0]
        elif x.shape[0] != b2:
            raise ValueError(
                "all candidate modalities must have the same batch size B2: "
                f"others[0] has {b2} rows, others[{m}] has {x.shape[0]}"
            )
    if anchor.shape[0] == 0 or b2 == 0:
        raise ValueError(f"empty batch: anchor has {anchor.shape[0]} rows, candidates {b2}")


def _validate_vectors(vectors: Sequence) -> None:
    if len(vectors) < 2:
        raise ValueError(f"a volume needs k >= 2 vectors, got k = {len(vectors)}")
    for m, v in enumerate(vectors):
        if jnp.ndim(v) < 1:
            raise ValueError(f"vectors[{m}] must have shape (..., D), got a scalar")
        _check_float(f"vectors[{m}]", v)
    dims = {jnp.shape(v)[-1] for v in vectors}
    if len(dims) != 1:
        raise ValueError(f"embedding sizes differ across vectors: D in {sorted(dims)}")


def _check_present(name: str, present, n: int) -> Array | None:
    """``present`` as a (n,) bool array (None = all present), or a ``ValueError``."""
    if present is None:
        return None
    if jnp.shape(present) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got shape {jnp.shape(present)}")
    return jnp.asarray(present).astype(bool)


def _check_present_others(present_others, others: Sequence) -> list[Array | None]:
    if present_others is None:
        return [None] * len(others)
    if len(present_others) != len(others):
        raise ValueError(
            f"present_others has {len(present_others)} entries for {len(others)} modalities"
        )
    b2 = jnp.shape(others[0])[0]
    return [_check_present(f"present_others[{m}]", p, b2) for m, p in enumerate(present_others)]


# ---------------------------------------------------------------------------------------------
# The elimination: an orthonormal basis of each candidate's span, in D-space
# ---------------------------------------------------------------------------------------------


def _dot(x: Array, y: Array) -> Array:
    return jnp.einsum("...d,...d->...", x, y, precision=_HIGHEST)


def _dependent_tol(dtype) -> float:
    """Relative size below which a Gram-Schmidt residual is rounding noise.

    Re-orthogonalised Gram-Schmidt leaves a residual of norm ``~ eps |c|`` when ``c`` lies in
    the span of the previous vectors (a repeated modality, the anchor itself); anything within
    ``16 eps`` of the span is that case, and its pivot is set to exactly 0.
    """
    return 16.0 * float(jnp.finfo(dtype).eps)


def _project_out(c: Array, qs: Sequence[Array]) -> Array:
    """``c`` minus its projection on the orthonormal ``qs`` (Gram-Schmidt twice: "twice is
    enough" for a residual accurate to O(eps |c|))."""
    r = c
    for _ in range(2):
        for q in qs:
            r = r - _dot(r, q)[..., None] * q
    return r


def _orthogonalise(
    vectors: Sequence[Array], present: Sequence[Array | None], ridge: float
) -> tuple[list[Array], list[Array]]:
    """Gram-Schmidt twice ("twice is enough") on the rows of ``vectors`` (each ``(..., D)``).

    Returns the unit directions ``q_r`` and the pivots ``piv_r = |r_r|^2``, ``r_r`` the part of
    ``c_r`` orthogonal to ``c_0 .. c_{r-1}``. The pivots are the ``D_r`` of the pivot-free
    ``LDL^T`` of ``M = C C^T``, so ``det M = prod_r piv_r``, but computed on the vectors: the
    relative error of a pivot is O(eps) instead of the O(eps / piv_r) of eliminating on
    rounded Gram entries. ``ridge = 0``: a residual within :func:`_dependent_tol` of 0 counts as
    exactly dependent (``piv_r = 0``, ``q_r = 0``). ``ridge > 0``: ``q_r = r_r / sqrt(|r_r|^2 +
    ridge)`` (smooth; see :func:`span_basis`). An absent vector (``present[r]`` False) has
    ``q_r = 0`` and ``piv_r = 1``: it drops out of the span and of the determinant, and its
    values are never read.
    """
    qs: list[Array] = []
    pivots: list[Array] = []
    for c, p in zip(vectors, present, strict=True):
        if p is not None:
            c = jnp.where(p[..., None], c, 0.0)
        r = _project_out(c, qs)
        piv = _dot(r, r)
        if ridge > 0:
            q = r * jax.lax.rsqrt(piv + ridge)[..., None]
        else:
            keep = piv > _dependent_tol(piv.dtype) ** 2 * _dot(c, c)
            piv = jnp.where(keep, piv, 0.0)
            q = jnp.where(
                keep[..., None], r * jax.lax.rsqrt(jnp.where(keep, piv, 1.0))[..., None], 0.0
            )
        if p is not None:
            piv = jnp.where(p, piv, 1.0)
            q = jnp.where(p[..., None], q, 0.0)
        qs.append(q)
        pivots.append(piv)
    return qs, pivots


_SCALE_ABOVE = 2.0**20


def pow2_rows(x: Float[Array, "*batch D"], present=None) -> tuple[Array, Array]:
    """``(x * 2^-e, 2^e)`` per row, the power of two ``e`` bringing a huge row into range.

    Volumes are homogeneous in each vector (``vol(s a, C) = |s| vol(a, C)``) and scaling by a
    power of two is exact in binary floating point, so a volume of scaled rows times the
    factors is the volume of the rows, without overflowing the squared Gram determinant
    (``|x|^(2k)``: float32 ``det`` overflows from norms ~3e6 at k = 3). ``e = 0`` (factor
    exactly 1, so values and gradients are bit for bit those of the unscaled rows) unless the
    row's largest ``|entry|`` exceeds ``2^20``; then ``e`` is its binary exponent (capped at
    126 so that ``2^-e`` is a normal number). ``present`` (False = absent row): factor 1.
    The factors are constants for differentiation (piecewise constant in ``x``).
    """
    m = jnp.max(jnp.abs(x), axis=-1)
    _, e = jnp.frexp(m)
    big = m > _SCALE_ABOVE
    if present is not None:
        big = big & present
    e = jnp.minimum(jnp.where(big, e, 0), 126)
    one = jnp.ones_like(m)
    f = jax.lax.stop_gradient(jnp.ldexp(one, e))
    return x * jax.lax.stop_gradient(jnp.ldexp(one, -e))[..., None], f


def _product(xs: Sequence[Array]) -> Array:
    out = xs[0]
    for x in xs[1:]:
        out = out * x
    return out


# ---------------------------------------------------------------------------------------------
# Per-item volumes
# ---------------------------------------------------------------------------------------------


def gram_volume(
    *vectors: Float[Array, "*batch D"],
    squared: bool = False,
    gradient: GradientMode = "safe",
) -> Float[Array, "*batch"]:
    """Volume of the parallelotope spanned by k >= 2 vectors, each ``(..., D)``, broadcasting.

    ``vol = sqrt(det(A A^T))`` with ``A`` the k x D stack of ``vectors``; the vectors are used as
    given (GRAM normalises embeddings first, so ``0 <= vol <= 1``). With ``squared=True``
    returns ``det(A A^T)``. Per item everything is in D-space: ``det = prod_r |r_r|^2`` over
    the Gram-Schmidt residuals of ``vectors[1:]`` and then ``vectors[0]`` (module docstring),
    so even a volume of 1e-6 keeps float32 relative accuracy.

    Args:
      *vectors: k arrays with a common last dimension D and broadcastable leading shapes.
      squared: return the squared volume.
      gradient: ``"safe"`` (finite gradient at zero volume) or ``"faithful"``
        (``sqrt(abs(det))`` as in the authors' code).

    Returns:
      The volumes, with the broadcast leading shape.
    """
    _validate_vectors(vectors)
    _check_gradient_mode(gradient)
    vectors, factors = zip(*(pow2_rows(v) for v in jnp.broadcast_arrays(*vectors)), strict=True)
    ordered = [*vectors[1:], vectors[0]]
    _, pivots = _orthogonalise(ordered, [None] * len(ordered), ridge=0.0)
    det, f = _product(pivots), _product(factors)
    return det * f * f if squared else _sqrt(det, gradient) * f


# ---------------------------------------------------------------------------------------------
# Pairwise volumes: anchor i against candidate j
# ---------------------------------------------------------------------------------------------


class CandidateGram(NamedTuple):
    """Per-candidate terms of the pairwise volume (n = k - 1 candidate modalities).

    ``basis``: n arrays (B2, D), an orthonormal basis of span(C_j) (zero rows for absent or
    dependent directions); ``pivots``: (B2, n), the ``LDL^T`` pivots of ``M_j = C_j C_j^T``
    (1 for an absent modality); ``det``: (B2,), ``det M_j = vol(C_j)^2``.
    """

    basis: list[Float[Array, "B2 D"]]
    pivots: Float[Array, "B2 n"]
    det: Float[Array, " B2"]


def candidate_gram(
    *others: Float[Array, "B2 D"],
    present_others: Sequence[Bool[Array, " B2"] | None] | None = None,
) -> CandidateGram:
    """The candidate's span basis, ``LDL^T`` pivots and ``det M_j`` (see :class:`CandidateGram`).

    They depend on the candidate only, so they are computed once per candidate (O(B2 n^2 D))
    and reused against every anchor. ``present_others``: per modality a (B2,) bool mask
    (True = present) or None; an absent modality drops out of the Gram matrix.
    """
    present = _check_present_others(present_others, others)
    basis, pivots = _orthogonalise(others, present, ridge=0.0)
    return CandidateGram(basis, jnp.stack(pivots, -1), _product(pivots))


def _gemm(x: Array, y: Array) -> Array:
    """``x @ y.T`` at HIGHEST precision, kept as a product of its own (see below).

    The ``reduce_precision`` to the array's own format is the identity on the values. It stops
    XLA:CPU from fusing the GEMM and the elementwise code that consumes it into one YNNPACK
    kernel, which runs 1.4-1.7x slower than a plain GEMM followed by a separate elementwise
    loop (``benchmarks/volume_bench.py``), and which rounds differently from the unfused
    product, so that the same pair could score differently in two call sites. On other
    backends the no-op fuses into the consumer.
    """
    p = jnp.matmul(x, y.T, precision=_HIGHEST)
    fi = jnp.finfo(p.dtype)
    return jax.lax.reduce_precision(p, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)


def anchor_residual(
    anchor: Float[Array, "R D"],
    basis: Sequence[Float[Array, "C D"]],
    present_anchor: Bool[Array, " R"] | None = None,
) -> Float[Array, "R C"]:
    """``d_ij = a_i.a_i - sum_r (a_i . q_jr)^2``: squared distance of anchor i to span(C_j).

    The pair kernel shared by every pairwise score (volume, span distance, retrieval): k - 1
    matrix products against the candidates' basis vectors and an elementwise sum of squares.
    An absent anchor (``present_anchor[i]`` False) gets ``d_ij = 1``, so ``det M_j d_ij`` is
    the Gram determinant of the candidate's present vectors alone.
    """
    d = _dot(anchor, anchor)[:, None]
    for q in basis:
        p = _gemm(anchor, q)
        d = d - p * p
    if present_anchor is not None:
        d = jnp.where(present_anchor[:, None], d, 1.0)
    return d


def gram_det_pairs(
    anchor: Float[Array, "R D"],
    basis: Sequence[Float[Array, "C D"]],
    det_m: Float[Array, " C"],
    cols: Int[Array, "R m"],
    present_anchor: Bool[Array, " R"] | None = None,
) -> Float[Array, "R m"]:
    """``det G_ij`` of anchor row i with the candidates ``cols[i]`` only, the anchor's step in
    D-space: ``det(M_j) |a_i - sum_r (a_i . q_jr) q_jr|^2`` (Gram-Schmidt twice, what
    :func:`gram_volume` does per item), float32-accurate at any volume, where
    :func:`anchor_residual`'s dot-product form is not. O(R m k D)."""
    r = _project_out(anchor[:, None, :], [q[cols] for q in basis])
    d = _dot(r, r)
    if present_anchor is not None:
        d = jnp.where(present_anchor[:, None], d, 1.0)
    return det_m[cols] * d


def _row_argmin(d: Float[Array, "R C"], block: int = 128) -> Array:
    """``jnp.argmin(d, axis=1)`` (first of equal minima) in two stages: the minimum of each
    block of 128 columns, the first block holding the row's minimum, the argmin inside it.

    XLA:CPU lowers ``argmin`` to a variadic (value, index) reduction that runs ~7x slower than
    a plain ``min`` over the same (2048, 2048) array (10 ms vs 1.4 ms on two cores; about 9 %
    of the k = 4 GEMM floor); the two-stage form reads the array once with ``min`` and runs
    the variadic reduction on (R, C / 128) and (R, 128) only.
    """
    r, c = d.shape
    nb = c // block
    if nb < 2:
        return jnp.argmin(d, axis=1)
    blocks = d[:, : nb * block].reshape(r, nb, block)
    first = jnp.argmin(jnp.min(blocks, axis=2), axis=1)
    inside = jnp.take_along_axis(blocks, first[:, None, None], axis=1)[:, 0]
    idx = first * block + jnp.argmin(inside, axis=1)
    if nb * block == c:
        return idx
    tail = nb * block + jnp.argmin(d[:, nb * block :], axis=1)
    at = jnp.take_along_axis  # the tail wins only when strictly smaller: first of equal minima
    return jnp.where(at(d, tail[:, None], 1)[:, 0] < at(d, idx[:, None], 1)[:, 0], tail, idx)


def residual_key(
    scores: Float[Array, "R C"], candidate_part: Float[Array, "1 C"]
) -> Float[Array, "R C"]:
    """``scores / candidate_part``, ``inf`` where the candidate part is 0: for a volume
    ``vol(C_j) dist(a_i, span C_j)`` (``candidate_part = vol(C_j)``) a monotone function of
    ``d_ij``, the quantity whose dot-product form loses precision when small. Selecting by it
    (:func:`refine_smallest`) rescores each anchor's nearest spans, not the candidates whose
    own volume is small (a hub's volume is small for every anchor, and accurate).
    """
    return jnp.where(candidate_part > 0, scores / candidate_part, jnp.inf)


def refine_smallest(
    scores: Float[Array, "R C"],
    exact: Callable[[Array], Array],
    m: int = 1,
    key: Float[Array, "R C"] | None = None,
) -> Float[Array, "R C"]:
    """``scores`` with the ``m`` entries of each row of smallest ``key`` (default: ``scores``)
    replaced by ``exact(cols)``.

    ``cols`` (R, m) are those entries' columns (``m = 1``: the first of equal minima);
    ``exact(cols) -> (R, m)`` rescores the pairs. Cost: one read of ``key`` (an elementwise
    expression of ``scores`` fuses into it), the O(R m) rescoring and the scatter (XLA:CPU
    writes it as one pass over the output); differentiable (the selection is a constant).
    """
    m = min(int(m), scores.shape[1])
    if m <= 0:
        return scores
    key = jax.lax.stop_gradient(scores if key is None else key)
    if m == 1:
        cols = _row_argmin(key)[:, None]
    else:
        cols = jax.lax.top_k(-key, m)[1]
    rows = jnp.arange(scores.shape[0])[:, None]
    return scores.at[rows, cols].set(exact(cols).astype(scores.dtype), unique_indices=True)


def refine_nearest_volumes(
    out: Float[Array, "R C"],
    finish: Callable[[Array, Array, Array], Array],
    det_m: Float[Array, "1 C"],
    fa: Float[Array, "R 1"],
    fc: Float[Array, "1 C"],
    pair_det: Callable[[Array], Array],
    refine: int,
) -> Float[Array, "R C"]:
    """``out = finish(det_s, fa, fc)`` with each row's ``refine`` nearest candidates (smallest
    ``d_ij``, :func:`residual_key`) rescored as ``finish(pair_det(cols), fa, fc[cols])``.

    The one refinement of the pairwise volumes (:func:`pairwise_volume`, the ``volume``
    retrieval score): ``finish`` maps scaled determinants and the :func:`pow2_rows` factors
    to the output (volume or determinant), ``pair_det(cols)`` is :func:`gram_det_pairs`.
    """
    key = residual_key(out, finish(det_m, jnp.ones((), out.dtype), fc))
    return refine_smallest(out, lambda c: finish(pair_det(c), fa, fc[0][c]), refine, key)


def gram_det_block(
    anchor: Float[Array, "R D"],
    basis: Sequence[Float[Array, "C D"]],
    det_m: Float[Array, " C"],
    present_anchor: Bool[Array, " R"] | None = None,
) -> Float[Array, "R C"]:
    """``det G_ij = det(M_j) d_ij`` of anchor rows against a block of candidates' terms
    (:class:`CandidateGram` ``basis`` and ``det``): the one kernel of every pairwise volume,
    dense, chunked or in retrieval."""
    return det_m[None, :] * anchor_residual(anchor, basis, present_anchor)


def _as_pair(chunk_size: int | tuple[int | None, int | None] | None):
    if chunk_size is None or isinstance(chunk_size, int):
        return chunk_size, chunk_size
    return tuple(chunk_size)


def to_blocks(xs, chunk: int):
    """Zero-pad the leading axis of every leaf of ``xs`` to a multiple of ``chunk`` and split it
    into ``(n_blocks, chunk, ...)``. Returns ``(blocks, n_blocks)``."""
    if chunk <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk}")
    b = jax.tree.leaves(xs)[0].shape[0]
    n_blocks = math.ceil(b / chunk)
    pad = n_blocks * chunk - b

    def split(x):
        x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
        return x.reshape(n_blocks, chunk, *x.shape[1:])

    return jax.tree.map(split, xs), n_blocks


def _chunked_map(fn, xs, chunk: int | None, axis_out: int):
    """Apply ``fn`` to blocks of ``chunk`` leading rows of the pytree ``xs`` with ``lax.map``.

    The outputs are concatenated back along ``axis_out``; the padding of the last block
    (:func:`to_blocks`) is sliced off.
    """
    b = jax.tree.leaves(xs)[0].shape[0]
    if chunk is None or chunk >= b:
        return fn(xs)
    blocks, n_blocks = to_blocks(xs, chunk)
    out = jax.lax.map(fn, blocks)  # (n_blocks, ..., chunk, ...)
    out = jnp.moveaxis(out, 0, axis_out)
    shape = list(out.shape)
    shape[axis_out : axis_out + 2] = [n_blocks * chunk]
    return jax.lax.slice_in_dim(out.reshape(shape), 0, b, axis=axis_out)


def _pairwise_blocks(block_fn, anchor, present_anchor, cols, chunk_size):
    """``block_fn(anchor_rows, present_rows, col_terms)`` over (row, column) blocks."""
    row_chunk, col_chunk = _as_pair(chunk_size)

    def rows_block(rows):
        a_rows, p_rows = rows
        return _chunked_map(lambda c: block_fn(a_rows, p_rows, c), cols, col_chunk, axis_out=1)

    return _chunked_map(rows_block, (anchor, present_anchor), row_chunk, axis_out=0)


def _scaled_gram_det(anchor, others, chunk_size, present_anchor, present_others):
    """``(det_s, fa, fc, det_m, pair_det)`` with ``det G = det_s (fa fc)^2``: the (B1, B2) Gram
    determinants of the :func:`pow2_rows`-scaled vectors, the (B1, 1) / (1, B2) factors, the
    (1, B2) ``det M_j``, and ``pair_det(cols)``, :func:`gram_det_pairs` of the same vectors."""
    validate_pairwise_inputs(anchor, others)
    pa = _check_present("present_anchor", present_anchor, anchor.shape[0])
    present = _check_present_others(present_others, others)
    anchor, fa = pow2_rows(anchor, pa)
    scaled = [pow2_rows(x, p) for x, p in zip(others, present, strict=True)]
    cand = candidate_gram(*[x for x, _ in scaled], present_others=present_others)

    def block(a_rows, p_rows, cols):
        return gram_det_block(a_rows, *cols, p_rows)

    det = _pairwise_blocks(block, anchor, pa, (cand.basis, cand.det), chunk_size)

    def pair_det(cols):
        return gram_det_pairs(anchor, cand.basis, cand.det, cols, pa)

    fc = _product([f for _, f in scaled])[None, :]
    return det, fa[:, None], fc, cand.det[None, :], pair_det


def pairwise_gram_det(
    anchor: Float[Array, "B1 D"],
    *others: Float[Array, "B2 D"],
    chunk_size: int | tuple[int | None, int | None] | None = None,
    present_anchor: Bool[Array, " B1"] | None = None,
    present_others: Sequence[Bool[Array, " B2"] | None] | None = None,
    refine: int = 1,
) -> Float[Array, "B1 B2"]:
    """Gram determinant ``det G_ij`` (squared volume) for every anchor i and candidate j.

    ``G_ij`` is the k x k Gram matrix of ``[anchor[i], others[0][j], ..., others[k-2][j]]``.
    Computed as ``det(M_j) * d_ij`` (module docstring): a D-space Gram-Schmidt per candidate,
    then k - 1 matrix products and an elementwise sum of squares per pair; memory O(B1 B2).

    Args:
      anchor: (B1, D).
      *others: k - 1 >= 1 arrays (B2, D); row j of each belongs to candidate j.
      chunk_size: ``int`` or ``(row_chunk, col_chunk)``: evaluate in blocks of that many anchors
        / candidates with ``lax.map`` so intermediates (and their gradients' residuals) stay
        within one block. ``None`` = one block.
      present_anchor: optional (B1,) bool, False where anchor i is missing.
      present_others: optional, per other modality a (B2,) bool mask or None. A missing vector
        drops out of the Gram matrix: ``det G_ij`` is the Gram determinant of the present
        vectors of the pair (its row and column are replaced by the identity's).
      refine: per anchor, the ``refine`` candidates of smallest ``d_ij`` (the nearest spans;
        :func:`residual_key`) are rescored per item, the anchor's step in D-space
        (:func:`gram_det_pairs` via :func:`refine_smallest`): float32-accurate at any
        volume, where the dot-product form of the other pairs is accurate to
        ``~ 4 sqrt(D) eps / d_ij`` relative (``docs/precision.md``). ``0``: off.

    Returns:
      (B1, B2) determinants (>= 0 up to rounding).
    """
    return pairwise_volume(
        anchor,
        *others,
        squared=True,
        chunk_size=chunk_size,
        present_anchor=present_anchor,
        present_others=present_others,
        refine=refine,
    )


def pairwise_volume(
    anchor: Float[Array, "B1 D"],
    *others: Float[Array, "B2 D"],
    squared: bool = False,
    gradient: GradientMode = "safe",
    chunk_size: int | tuple[int | None, int | None] | None = None,
    present_anchor: Bool[Array, " B1"] | None = None,
    present_others: Sequence[Bool[Array, " B2"] | None] | None = None,
    refine: int = 1,
) -> Float[Array, "B1 B2"]:
    """Volume of anchor i with candidate j's k - 1 vectors, for all pairs: ``(B1, B2)``.

    ``V_ij = sqrt(det G_ij)`` (see :func:`pairwise_gram_det`), the GRAM score: lower = better
    aligned. Equals the authors' ``volume_computation(anchor, *others)`` without building the
    (B1, B2, k, k) Gram tensor.

    Args:
      anchor: (B1, D) anchor-modality embeddings (L2-normalised for GRAM).
      *others: k - 1 >= 1 candidate modalities, each (B2, D).
      squared: return ``det G`` instead of its square root.
      gradient: ``"safe"`` (default; zero subgradient at zero volume, finite everywhere) or
        ``"faithful"`` (``sqrt(abs(det))``: NaN gradient at exactly zero volume).
      chunk_size: optional row / column block size (see :func:`pairwise_gram_det`).
      present_anchor, present_others: optional presence masks (see :func:`pairwise_gram_det`):
        the volume is then the volume spanned by the pair's present vectors only.
      refine: how many pairs per anchor are rescored per item (default 1: the candidate
        whose span is nearest, e.g. an aligned positive; see :func:`pairwise_gram_det`).
        With ``chunk_size`` too, the nearest of the whole row.
    """
    _check_gradient_mode(gradient)
    _check_refine(refine)
    det, fa, fc, det_m, pair_det = _scaled_gram_det(
        anchor, others, chunk_size, present_anchor, present_others
    )

    def finish(det, fa, fc):
        # The square root before the factors: the volume is representable long after det G.
        return det * fa * fc * fa * fc if squared else _sqrt(det, gradient) * fa * fc

    out = finish(det, fa, fc)
    if refine:
        out = refine_nearest_volumes(out, finish, det_m, fa, fc, pair_det, refine)
    return out


def masked_pairwise_volume(
    anchor: Float[Array, "B1 D"],
    others: Sequence[Float[Array, "B2 D"]],
    present_others: Sequence[Bool[Array, " B2"] | None] | None = None,
    present_anchor: Bool[Array, " B1"] | None = None,
    refine: int = 1,
) -> Float[Array, "B1 B2"]:
    """:func:`pairwise_volume` with the candidates as a list and presence masks (GramModel).

    ``V[i, j]`` is the volume spanned by anchor i and the PRESENT modalities of candidate j
    (with every other modality absent it is ``|a_i|``). Volumes of candidates with different
    numbers of present modalities have different dimension: both lie in [0, 1] for unit
    vectors and shrink with misalignment, but a (k-1)-volume is typically larger than a
    k-volume of the same item.
    """
    return pairwise_volume(
        anchor,
        *others,
        present_anchor=present_anchor,
        present_others=present_others,
        refine=refine,
    )


def span_basis(*others: Float[Array, "B2 D"], ridge: float = 1e-6) -> list[Float[Array, "B2 D"]]:
    """Per candidate, k - 1 vectors ``w_r`` with ``sum_r (a . w_r)^2 = |proj_span(C_j) a|^2``.

    Regularised Gram-Schmidt in D-space (twice, see :func:`candidate_gram`): ``r_r = c_r -
    sum_{q<r} (c_r . w_q) w_q`` and ``w_r = r_r / sqrt(|r_r|^2 + ridge)``. For a
    non-degenerate candidate this is an orthonormal basis of its span up to
    O(ridge / |r_r|^2); a direction the candidate does not span (a repeated or zero vector,
    ``|r_r|^2 ~ 0``) gets ``w_r ~ 0`` and drops out. Working on the vectors rather than
    inverting ``M_j = C_j C_j^T`` avoids squaring the condition number. Every step is smooth
    for ``ridge > 0``; ``ridge = 0`` is the exact basis of :func:`candidate_gram`.
    """
    return span_terms(*others, ridge=ridge)[0]


def span_terms(
    *others: Float[Array, "B2 D"], ridge: float = 1e-6
) -> tuple[list[Float[Array, "B2 D"]], Float[Array, "B2 n"]]:
    """``(w, shrink)``: :func:`span_basis`'s ``w_r`` and ``shrink_r = 1 - |w_r|^2 = ridge /
    (|r_r|^2 + ridge)`` (0 for ``ridge = 0``), exactly rather than from ``w_r . w_r``, so that
    :func:`span_distance_pairs` can write the regularised distance in D-space."""
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    w, pivots = _orthogonalise(others, [None] * len(others), ridge=ridge)
    shrink = [ridge / (p + ridge) if ridge > 0 else jnp.zeros_like(p) for p in pivots]
    return w, jnp.stack(shrink, -1)


def span_distance_pairs(
    anchor: Float[Array, "R D"],
    terms: tuple[Sequence[Float[Array, "C D"]], Float[Array, "C n"]],
    cols: Int[Array, "R m"],
) -> Float[Array, "R m"]:
    """``dist^2`` of anchor row i to the spans of candidates ``cols[i]`` in D-space.

    With unit ``q_r = w_r / |w_r|`` and ``c_r = a . q_r``, the regularised ``a.a - sum_r (a .
    w_r)^2`` is ``|a - sum_r c_r q_r|^2 + sum_r c_r^2 shrink_r``: a backward-stable residual
    (Gram-Schmidt twice) plus a non-negative term, with no difference of O(1) products.
    """
    w, shrink = terms
    sh = shrink[cols]  # (R, m, n)
    qs = []
    for r, wr in enumerate(w):
        keep = sh[..., r] < 1.0  # |w_r| > 0
        scale = jax.lax.rsqrt(jnp.where(keep, 1.0 - sh[..., r], 1.0))
        qs.append(jnp.where(keep[..., None], wr[cols] * scale[..., None], 0.0))
    a = anchor[:, None, :]
    res = _project_out(a, qs)
    extra = sum(_dot(a, q) ** 2 * sh[..., r] for r, q in enumerate(qs))
    return _dot(res, res) + extra


def span_distance_block(
    anchor: Float[Array, "R D"], terms, squared: bool = False, refine: int = 1
) -> Float[Array, "R C"]:
    """:func:`span_distance` of anchor rows against a block of candidates' :func:`span_terms`:
    :func:`anchor_residual` against ``w``, each row's ``refine`` nearest rescored in D-space
    (:func:`span_distance_pairs` via :func:`refine_smallest`)."""
    return _span_finish(anchor_residual(anchor, terms[0]), anchor, terms, squared, refine)


def _span_finish(d2, anchor, terms, squared: bool, refine: int):
    if refine:
        d2 = refine_smallest(d2, lambda c: span_distance_pairs(anchor, terms, c), refine)
    return jnp.maximum(d2, 0.0) if squared else safe_sqrt(d2)


def span_distance(
    anchor: Float[Array, "B1 D"],
    *others: Float[Array, "B2 D"],
    squared: bool = False,
    ridge: float = 1e-6,
    chunk_size: int | tuple[int | None, int | None] | None = None,
    refine: int = 1,
) -> Float[Array, "B1 B2"]:
    """Distance from anchor i to the span of candidate j's k - 1 vectors: ``(B1, B2)``.

    ``dist_ij^2 = a_i.a_i - sum_r (a_i . w_jr)^2`` (:func:`anchor_residual`) with ``w_j`` the
    regularised orthonormal basis of span(C_j) from :func:`span_basis`. For a non-degenerate
    candidate this is ``det G_ij / det M_j`` up to O(ridge) (so ``vol_ij = vol(C_j)
    dist_ij``); for a degenerate candidate (repeated or zero vectors) it is the distance to the
    span actually spanned, instead of 0 / 0. Ranking by this score removes the
    query-independent prior ``vol(C_j)`` that causes hubness in anchor -> candidate retrieval.

    Args:
      anchor: (B1, D).
      *others: k - 1 >= 1 arrays (B2, D).
      squared: return ``dist^2`` (clamped at 0).
      ridge: regulariser of the Gram-Schmidt normalisation (>= 0). It also sets the smallest
        distance the score tells apart: ``dist^2 >= ~ridge`` for an anchor in the span.
      chunk_size: optional row / column block size (see :func:`pairwise_gram_det`).
      refine: per anchor, the ``refine`` nearest candidates are rescored in D-space
        (:func:`span_distance_pairs`; the whole row's nearest, also with ``chunk_size``),
        as :func:`pairwise_volume` does. ``0``: off.
    """
    validate_pairwise_inputs(anchor, others)
    _check_refine(refine)
    terms = span_terms(*others, ridge=ridge)

    def block(a_rows, _, cols):
        return anchor_residual(a_rows, cols)

    d2 = _pairwise_blocks(block, anchor, None, terms[0], chunk_size)
    return _span_finish(d2, anchor, terms, squared, refine)


# ---------------------------------------------------------------------------------------------
# Simplex volumes: the simplex whose vertices are the k embeddings' endpoints
# ---------------------------------------------------------------------------------------------
#
# Vertices a, c_0, ..., c_{k-2}. Its (k-1)-volume is sqrt(det E) / (k-1)! with E the Gram
# matrix of k - 1 edge vectors from one vertex. The textbook choice, edges from the anchor
# (e_r = c_r - a, E = M - u 1^T - 1 u^T + (a.a) 1 1^T, u = C a), is the candidate's Gram plus
# a rank-2 update in u_ij: cheap, but summing O(1) entries to a determinant of size O(dist^2k)
# loses every digit on aligned tuples, as the adjugate form of the parallelotope did. Edges
# from the candidate's first vector instead, f_r = c_r - c_0 (r >= 1) and the anchor edge
# a - c_0, give the block form of the parallelotope's:
#
#     det E = det(F F^T) * |P (a - c_0)|^2 ,    P = projection off span(F),
#     |P (a - c_0)|^2 = a.a - sum_r (a . q_r)^2 - 2 a . b + b . b ,    b = P c_0,
#
# with q_r an orthonormal basis of span(F) and b computed per candidate in D-space (the same
# Gram-Schmidt as the volume), so det(F F^T) keeps relative accuracy however small the
# candidate's own simplex, and the pair step is the k - 2 products of anchor_residual plus one
# against b: k - 1 GEMMs, as the volume's.


class SimplexCandidate(NamedTuple):
    """Per-candidate terms of the pairwise simplex volume (k - 1 candidate vectors c_r).

    ``basis``: k - 2 arrays (B2, D), an orthonormal basis of span(c_r - c_0, r >= 1) (zero rows
    for dependent edges); ``base``: (B2, D), ``b = c_0`` minus its projection on that span;
    ``det``: (B2,), ``det(F F^T)`` of the candidate's own edges (1 for k = 2).
    """

    basis: list[Float[Array, "B2 D"]]
    base: Float[Array, "B2 D"]
    det: Float[Array, " B2"]


def simplex_candidate(*others: Float[Array, "B2 D"]) -> SimplexCandidate:
    """The candidate's edge basis, base vector and edge determinant (:class:`SimplexCandidate`),
    computed once per candidate in D-space (O(B2 k^2 D))."""
    c0 = others[0]
    edges = [c - c0 for c in others[1:]]
    basis, pivots = _orthogonalise(edges, [None] * len(edges), ridge=0.0)
    det = _product(pivots) if pivots else jnp.ones(c0.shape[:-1], c0.dtype)
    return SimplexCandidate(basis, _project_out(c0, basis), det)


def simplex_det_block(
    anchor: Float[Array, "R D"],
    basis: Sequence[Float[Array, "C D"]],
    base: Float[Array, "C D"],
    det_f: Float[Array, " C"],
) -> Float[Array, "R C"]:
    """``det E_ij = det(F_j F_j^T) |P_j (a_i - c_j0)|^2`` of anchor rows against a block of
    candidates' :class:`SimplexCandidate` terms: :func:`anchor_residual` against the edge
    basis, plus the cross term with ``b_j`` (one more GEMM) and ``b_j . b_j``."""
    d = anchor_residual(anchor, basis) - 2.0 * _gemm(anchor, base) + _dot(base, base)[None, :]
    return det_f[None, :] * jnp.maximum(d, 0.0)


def pairwise_simplex_det(
    anchor: Float[Array, "B1 D"],
    *others: Float[Array, "B2 D"],
    chunk_size: int | tuple[int | None, int | None] | None = None,
) -> Float[Array, "B1 B2"]:
    """``det E_ij``: the Gram determinant of the k - 1 edge vectors of the simplex with
    vertices ``anchor[i], others[0][j], ..., others[k-2][j]`` (for k = 2 the squared chord
    ``|a_i - c_j|^2``; for k = 3 ``|u|^2 |w|^2 - (u.w)^2``, four times the triangle's squared
    area). Edge-choice and float32 accuracy: see the comment above :class:`SimplexCandidate`.
    ``chunk_size`` as in :func:`pairwise_gram_det`."""
    validate_pairwise_inputs(anchor, others)
    cand = simplex_candidate(*others)

    def block(a_rows, _, cols):
        return simplex_det_block(a_rows, *cols)

    return _pairwise_blocks(block, anchor, None, tuple(cand), chunk_size)


def pairwise_simplex_volume(
    anchor: Float[Array, "B1 D"],
    *others: Float[Array, "B2 D"],
    squared: bool = False,
    gradient: GradientMode = "safe",
    chunk_size: int | tuple[int | None, int | None] | None = None,
) -> Float[Array, "B1 B2"]:
    """(k-1)-volume of the simplex spanned by the endpoints of anchor i and candidate j's
    k - 1 vectors, for all pairs: ``S_ij = sqrt(det E_ij) / (k-1)!`` (:func:`pairwise_simplex_det`).

    The geometric volume, normalisation included: the chord length ``|a - c|`` for k = 2,
    TRIANGLE's area ``1/2 sqrt(|u|^2 |w|^2 - (u.w)^2)`` for k = 3. Unlike the parallelotope
    volume it depends on the signs of the embeddings (``S(a; -c) != S(a; c)``): it is zero only
    when the endpoints coincide or are affinely dependent. Lower = better aligned.

    Args:
      anchor: (B1, D); *others: k - 1 >= 1 arrays (B2, D).
      squared: return ``S^2``.
      gradient: ``"safe"`` (zero subgradient at zero volume, finite everywhere; default) or
        ``"faithful"`` (``sqrt(abs(.))``).
      chunk_size: optional row / column block size (see :func:`pairwise_gram_det`).
    """
    _check_gradient_mode(gradient)
    det = pairwise_simplex_det(anchor, *others, chunk_size=chunk_size)
    norm = float(math.factorial(len(others)))
    return det / norm**2 if squared else _sqrt(det, gradient) / norm


def simplex_volume(
    vectors: Sequence[Float[Array, "*batch D"]],
    squared: bool = False,
    gradient: GradientMode = "safe",
) -> Float[Array, "*batch"]:
    """(k-1)-volume of the simplex whose vertices are the endpoints of k >= 2 vectors (each
    ``(..., D)``, broadcasting): ``sqrt(det(F F^T)) / (k-1)!`` with ``F`` the edges
    ``v_r - v_0``. All in D-space (Gram-Schmidt on the edges), so no float32 floor."""
    _validate_vectors(vectors)
    _check_gradient_mode(gradient)
    vectors = jnp.broadcast_arrays(*vectors)
    edges = [v - vectors[0] for v in vectors[1:]]
    _, pivots = _orthogonalise(edges, [None] * len(edges), ridge=0.0)
    det = _product(pivots)
    norm = float(math.factorial(len(edges)))
    return det / norm**2 if squared else _sqrt(det, gradient) / norm
