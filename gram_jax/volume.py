"""Volumes of k-dimensional parallelotopes spanned by modality embeddings (GRAM).

For k >= 2 vectors stacked as the rows of ``A`` (k x D), the k-volume is

    vol = sqrt(det(G)),    G = A A^T  (the k x k Gram matrix).

GRAM (Cicchetti et al., ICLR 2025) scores the alignment of one item's k modality embeddings by
this volume: small volume = aligned. Retrieval and the contrastive loss need it for every
(anchor i, candidate j) pair, where the anchor is one modality (text) of item i and the
candidate is the other k - 1 modalities of item j.

**How it is computed here.** Write ``a`` for the anchor, ``C`` for the (k-1) x D stack of the
candidate's vectors, ``M = C C^T`` and ``u = C a``. The block (Schur) determinant gives

    det G = (a . a) det(M) - u^T adj(M) u,

with ``adj(M)`` the adjugate (``det(M) M^-1`` written as cofactors, so it exists and is exact when
``M`` is singular). ``M``, ``adj(M)`` and ``det(M)`` depend on the candidate only; ``u`` for all
pairs is k - 1 matrix products of (B1, D) x (D, B2). The rest is an elementwise polynomial over
(B1, B2): no (B1, B2, k, k) tensor and no per-pair LU (the authors' code does both).

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
``sqrt(abs(det))`` exactly, NaN gradient included.

All Gram dot products run at ``precision=HIGHEST``: TF32/bf16-rounded products move MSR-VTT R@1
by up to 0.4 points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = [
    "GradientMode",
    "gram_volume",
    "pairwise_volume",
    "pairwise_gram_det",
    "span_distance",
    "span_basis",
    "candidate_gram",
    "safe_sqrt",
    "validate_pairwise_inputs",
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


def _check_gradient_mode(gradient: str) -> None:
    if gradient not in ("safe", "faithful"):
        raise ValueError(f"gradient must be 'safe' or 'faithful', got {gradient!r}")


def _sqrt(x: Array, gradient: GradientMode) -> Array:
    _check_gradient_mode(gradient)
    if gradient == "safe":
        return safe_sqrt(x)
    return jnp.sqrt(jnp.abs(x))


# ---------------------------------------------------------------------------------------------
# Small symmetric matrices: polynomial determinant and adjugate
# ---------------------------------------------------------------------------------------------


def _minor_det(entries, rows: tuple[int, ...], cols: tuple[int, ...], memo: dict) -> Array:
    """Determinant of the submatrix ``rows x cols`` by Laplace expansion along its first row.

    ``entries[r][c]`` are the matrix entries as separate arrays, so the expansion is a graph of
    elementwise ops (no gathers); ``memo`` shares every sub-minor between all the cofactors that
    need it, so the whole adjugate of an n x n matrix costs O(n 2^(2n)) ops instead of O(n!).
    """
    key = (rows, cols)
    if key in memo:
        return memo[key]
    if len(rows) == 1:
        out = entries[rows[0]][cols[0]]
    elif len(rows) == 2:
        (r0, r1), (c0, c1) = rows, cols
        out = entries[r0][c0] * entries[r1][c1] - entries[r0][c1] * entries[r1][c0]
    else:
        out = None
        for j, c in enumerate(cols):
            term = entries[rows[0]][c] * _minor_det(
                entries, rows[1:], cols[:j] + cols[j + 1 :], memo
            )
            out = term if out is None else (out - term if j % 2 else out + term)
    memo[key] = out
    return out


def _det_and_adjugate(m: Float[Array, "*batch n n"]) -> tuple[Array, Array]:
    """``det(M)`` and ``adj(M)`` (``adj(M) M = det(M) I``) as polynomials in the entries.

    Cofactor (Laplace) expansion with shared minors; small n only. Unlike LU it is exact at
    singular matrices, and the gradient of the determinant is the cofactor matrix.
    """
    n = m.shape[-1]
    entries = [[m[..., r, c] for c in range(n)] for r in range(n)]
    memo: dict = {}
    full = tuple(range(n))
    det = _minor_det(entries, full, full, memo)
    if n == 1:
        return det, jnp.ones_like(m)
    rows = []
    for i in range(n):
        # adj[i, j] = (-1)^(i+j) * minor_{j, i}
        row = []
        for j in range(n):
            minor = _minor_det(entries, full[:j] + full[j + 1 :], full[:i] + full[i + 1 :], memo)
            row.append(-minor if (i + j) % 2 else minor)
        rows.append(jnp.stack(row, -1))
    return det, jnp.stack(rows, -2)


def _det_poly(m: Float[Array, "*batch n n"]) -> Float[Array, "*batch"]:
    """Determinant as a polynomial in the entries (see :func:`_det_and_adjugate`)."""
    n = m.shape[-1]
    full = tuple(range(n))
    return _minor_det([[m[..., r, c] for c in range(n)] for r in range(n)], full, full, {})


def _adjugate(m: Float[Array, "*batch n n"]) -> Float[Array, "*batch n n"]:
    """Adjugate ``adj(M)`` from cofactors (exact when singular)."""
    return _det_and_adjugate(m)[1]


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


# ---------------------------------------------------------------------------------------------
# Per-item volumes
# ---------------------------------------------------------------------------------------------


def _dot(x: Array, y: Array) -> Array:
    return jnp.einsum("...d,...d->...", x, y, precision=_HIGHEST)


def gram_volume(
    *vectors: Float[Array, "*batch D"],
    squared: bool = False,
    gradient: GradientMode = "safe",
) -> Float[Array, "*batch"]:
    """Volume of the parallelotope spanned by k >= 2 vectors, each ``(..., D)``, broadcasting.

    ``vol = sqrt(det(A A^T))`` with ``A`` the k x D stack of ``vectors``; the vectors are used as
    given (GRAM normalises embeddings first, so ``0 <= vol <= 1``). With ``squared=True``
    returns ``det(A A^T)`` (the Gram determinant, a polynomial: smooth gradient everywhere).

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
    anchor, others = vectors[0], vectors[1:]
    n = len(others)
    # M (candidate Gram) and u (anchor-candidate dots), per broadcast item.
    m = jnp.stack(
        [jnp.stack([_dot(others[r], others[c]) for c in range(n)], -1) for r in range(n)], -2
    )
    u = [_dot(anchor, o) for o in others]
    det_m, adj = _det_and_adjugate(m)
    det = _schur_det(_dot(anchor, anchor), det_m, adj, u)
    return det if squared else _sqrt(det, gradient)


def _schur_det(aa: Array, det_m: Array, adj: Array, u: Sequence[Array]) -> Array:
    """``aa * det(M) - u^T adj(M) u`` with ``u`` given as k - 1 broadcastable arrays.

    The quadratic form is written out term by term (adj is symmetric) so XLA fuses it into one
    elementwise pass over the (B1, B2) grid instead of materialising a (B1, B2, k-1) stack.
    """
    n = len(u)
    quad = 0.0
    for r in range(n):
        quad = quad + adj[..., r, r] * u[r] * u[r]
        for c in range(r + 1, n):
            quad = quad + 2.0 * adj[..., r, c] * u[r] * u[c]
    return aa * det_m - quad


# ---------------------------------------------------------------------------------------------
# Pairwise volumes: anchor i against candidate j
# ---------------------------------------------------------------------------------------------


def candidate_gram(
    *others: Float[Array, "B2 D"],
) -> tuple[Float[Array, "B2 n n"], Float[Array, "B2 n n"], Float[Array, " B2"]]:
    """Per-candidate ``M_j = C_j C_j^T``, its adjugate and determinant (n = k - 1).

    These depend on the candidate only, so they are computed once per candidate (O(B2 n^2 D))
    and reused against every anchor; the ring loss sends them along with the vectors.
    """
    n = len(others)
    m = jnp.stack(
        [jnp.stack([_dot(others[r], others[c]) for c in range(n)], -1) for r in range(n)], -2
    )
    det_m, adj = _det_and_adjugate(m)
    return m, adj, det_m


def _gemm(x: Array, y: Array) -> Array:
    """``x @ y.T`` at HIGHEST precision, kept as a product of its own (see below).

    The ``reduce_precision`` to the array's own format is the identity on the values. It stops
    XLA:CPU from fusing the GEMM and the elementwise polynomial that consumes it into one
    YNNPACK kernel, which runs 1.4-1.7x slower than a plain GEMM followed by a separate
    elementwise loop (measured on 2 cores: pairwise_volume at B = 2048, k = 4 goes from
    ~1.5x to ~1.1x the bare matrix products; ``benchmarks/volume_bench.py``). On other
    backends the no-op fuses into the consumer.
    """
    p = jnp.matmul(x, y.T, precision=_HIGHEST)
    fi = jnp.finfo(p.dtype)
    return jax.lax.reduce_precision(p, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)


def _pairwise_det_block(anchor: Array, others: Sequence[Array], adj: Array, det_m: Array) -> Array:
    u = [_gemm(anchor, o) for o in others]  # k-1 GEMMs, (B1, B2)
    aa = _dot(anchor, anchor)[:, None]
    return _schur_det(aa, det_m[None, :], adj[None], u)


def _as_pair(chunk_size: int | tuple[int | None, int | None] | None):
    if chunk_size is None or isinstance(chunk_size, int):
        return chunk_size, chunk_size
    return tuple(chunk_size)


def _chunked_map(fn, xs, chunk: int | None, axis_out: int):
    """Apply ``fn`` to blocks of ``chunk`` leading rows of the pytree ``xs`` with ``lax.map``.

    The outputs are concatenated back along ``axis_out``; the last block is zero-padded and the
    padding sliced off.
    """
    b = jax.tree.leaves(xs)[0].shape[0]
    if chunk is None or chunk >= b:
        return fn(xs)
    if chunk <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk}")
    n_chunks = math.ceil(b / chunk)
    pad = n_chunks * chunk - b

    def split(x):
        x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
        return x.reshape(n_chunks, chunk, *x.shape[1:])

    out = jax.lax.map(fn, jax.tree.map(split, xs))  # (n_chunks, ..., chunk, ...)
    out = jnp.moveaxis(out, 0, axis_out)
    shape = list(out.shape)
    shape[axis_out : axis_out + 2] = [n_chunks * chunk]
    return jax.lax.slice_in_dim(out.reshape(shape), 0, b, axis=axis_out)


def pairwise_gram_det(
    anchor: Float[Array, "B1 D"],
    *others: Float[Array, "B2 D"],
    chunk_size: int | tuple[int | None, int | None] | None = None,
) -> Float[Array, "B1 B2"]:
    """Gram determinant ``det G_ij`` (squared volume) for every anchor i and candidate j.

    ``G_ij`` is the k x k Gram matrix of ``[anchor[i], others[0][j], ..., others[k-2][j]]``.
    Computed as ``(a_i.a_i) det(M_j) - u_ij^T adj(M_j) u_ij`` (module docstring): k - 1 matrix
    products and an elementwise polynomial; memory O(B1 B2) for the output plus O(B1 B2) live
    intermediates per fused pass.

    Args:
      anchor: (B1, D).
      *others: k - 1 >= 1 arrays (B2, D); row j of each belongs to candidate j.
      chunk_size: ``int`` or ``(row_chunk, col_chunk)``: evaluate in blocks of that many anchors
        / candidates with ``lax.map`` so intermediates (and their gradients' residuals) stay
        within one block. ``None`` = one block.

    Returns:
      (B1, B2) determinants (>= 0 up to rounding).
    """
    validate_pairwise_inputs(anchor, others)
    row_chunk, col_chunk = _as_pair(chunk_size)
    _, adj, det_m = candidate_gram(*others)

    def rows_block(a_rows):
        def cols_block(cols):
            cand, adj_c, det_c = cols
            return _pairwise_det_block(a_rows, cand, adj_c, det_c)

        return _chunked_map(cols_block, (list(others), adj, det_m), col_chunk, axis_out=1)

    return _chunked_map(rows_block, anchor, row_chunk, axis_out=0)


def pairwise_volume(
    anchor: Float[Array, "B1 D"],
    *others: Float[Array, "B2 D"],
    squared: bool = False,
    gradient: GradientMode = "safe",
    chunk_size: int | tuple[int | None, int | None] | None = None,
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
    """
    _check_gradient_mode(gradient)
    det = pairwise_gram_det(anchor, *others, chunk_size=chunk_size)
    return det if squared else _sqrt(det, gradient)


def span_basis(*others: Float[Array, "B2 D"], ridge: float = 1e-6) -> list[Float[Array, "B2 D"]]:
    """Per candidate, k - 1 vectors ``w_r`` with ``sum_r (a . w_r)^2 = |proj_span(C_j) a|^2``.

    Regularised Gram-Schmidt in D-space: ``r_0 = c_0``, ``r_r = c_r - sum_{q<r} (c_r . w_q) w_q``
    and ``w_r = r_r / sqrt(|r_r|^2 + ridge)``. For a non-degenerate candidate this is an
    orthonormal basis of its span up to O(ridge / |r_r|^2); a direction the candidate does not
    span (a repeated or zero vector, ``|r_r|^2 ~ 0``) gets ``w_r ~ 0`` and drops out. Working
    on the vectors rather than inverting ``M_j = C_j C_j^T`` avoids squaring the condition
    number: ``(M + ridge I)^-1`` in float32 is wrong by O(1) for a candidate with two equal
    vectors. Every step is smooth for ``ridge > 0``.
    """
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    basis: list[Array] = []
    for c in others:
        r = c
        for w in basis:
            r = r - _dot(r, w)[:, None] * w
        basis.append(r * jax.lax.rsqrt(_dot(r, r) + ridge)[:, None])
    return basis


def span_distance(
    anchor: Float[Array, "B1 D"],
    *others: Float[Array, "B2 D"],
    squared: bool = False,
    ridge: float = 1e-6,
    chunk_size: int | tuple[int | None, int | None] | None = None,
) -> Float[Array, "B1 B2"]:
    """Distance from anchor i to the span of candidate j's k - 1 vectors: ``(B1, B2)``.

    ``dist_ij^2 = a_i.a_i - sum_r (a_i . w_jr)^2`` with ``w_j`` the regularised orthonormal
    basis of span(C_j) from :func:`span_basis` (k - 1 matrix products, like the volume). For a
    non-degenerate candidate this is ``det G_ij / det M_j`` up to O(ridge) (so
    ``vol_ij = vol(C_j) dist_ij``); for a degenerate candidate (repeated or zero vectors) it is
    the distance to the span actually spanned, instead of 0 / 0. Ranking by this score removes
    the query-independent prior ``vol(C_j)`` that causes hubness in anchor -> candidate
    retrieval.

    Args:
      anchor: (B1, D).
      *others: k - 1 >= 1 arrays (B2, D).
      squared: return ``dist^2`` (clamped at 0).
      ridge: regulariser of the Gram-Schmidt normalisation (>= 0; 0 only for candidates known
        to be non-degenerate).
      chunk_size: optional row / column block size (see :func:`pairwise_gram_det`).
    """
    validate_pairwise_inputs(anchor, others)
    basis = span_basis(*others, ridge=ridge)
    row_chunk, col_chunk = _as_pair(chunk_size)

    def rows_block(a_rows):
        aa = _dot(a_rows, a_rows)[:, None]

        def cols_block(ws):
            d2 = aa
            for w in ws:
                p = _gemm(a_rows, w)
                d2 = d2 - p * p
            return d2

        return _chunked_map(cols_block, basis, col_chunk, axis_out=1)

    d2 = _chunked_map(rows_block, anchor, row_chunk, axis_out=0)
    return jnp.maximum(d2, 0.0) if squared else safe_sqrt(d2)
