"""GRAM volumes with missing modalities: ``masked_pairwise_volume``.

For an anchor ``a_i`` and a candidate ``j`` made of k - 1 modality vectors ``x^1_j .. x^m_j``
(m = k - 1), GRAM scores the pair by the k-volume ``sqrt(det G_ij)`` of the Gram matrix

    G_ij = [[ a.a    a.x^1   ...  a.x^m  ],
            [ x^1.a  x^1.x^1 ...  x^1.x^m],
            ...                            ]      (k x k; vectors are the rows of [a; X_j]).

When candidate j lacks modality m (``present_others[m][j] = False``), row and column m of
``G_ij`` are replaced by the identity row and column: every off-diagonal entry in them is set to
0 and the diagonal entry to 1. Permuting m to the last position gives the block matrix
``diag(G'_ij, 1)`` with ``G'_ij`` the Gram matrix of the PRESENT vectors only, so

    det(G_ij masked) = det(G'_ij) * 1 = det Gram(a, present x's of j),

i.e. the volume is exactly the volume spanned by the anchor and the candidate's present
modalities (a lower-dimensional volume: with unit vectors it is still in [0, 1], and with every
other modality absent it is ``||a|| = 1``). The absent vectors' values are never read, so any
placeholder (zeros) works and gets zero gradient.

Note the volumes of candidates with different numbers of present modalities are volumes of
different dimension: they are comparable in the sense that both lie in [0, 1] for unit vectors
and both shrink with misalignment, but a (k-1)-volume is typically larger than a k-volume of
the same item; document this when mixing them in one softmax.

The determinant of the small k x k matrices is expanded as a polynomial of the entries
(cofactor expansion, exact and differentiable everywhere, k <= 5) and ``sqrt`` uses a safe
derivative (0 where ``det <= 0``) so degenerate items do not produce NaN gradients. All dot
products run at ``precision=HIGHEST``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

__all__ = ["masked_pairwise_volume", "masked_pairwise_gram", "det_small", "safe_sqrt"]

_HIGHEST = jax.lax.Precision.HIGHEST


@jax.custom_jvp
def safe_sqrt(x: Array) -> Array:
    """``sqrt(max(x, 0))`` with derivative ``1 / (2 sqrt(x))`` for x > 0 and 0 otherwise."""
    return jnp.sqrt(jnp.maximum(x, 0.0))


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = safe_sqrt(x)
    pos = x > 0
    scale = jnp.where(pos, 0.5 / jnp.where(pos, y, 1.0), 0.0)
    return y, scale * dx


def _det_entries(m: list[list[Array]]) -> Array:
    """Determinant of a k x k matrix given as nested lists of equally-shaped arrays.

    Cofactor expansion along the first row with memoised minors: an exact polynomial in the
    entries, differentiable everywhere (also at singular matrices). Working on separate
    entry arrays (no stacked (..., k, k) tensor to slice) keeps the gradient graph small.
    """
    k = len(m)
    memo: dict[tuple[int, ...], Array] = {}

    def minor(cols: tuple[int, ...]) -> Array:  # rows are the last len(cols) rows
        if cols in memo:
            return memo[cols]
        r = k - len(cols)
        if len(cols) == 1:
            val = m[r][cols[0]]
        else:
            val = 0.0
            for idx, c in enumerate(cols):
                term = m[r][c] * minor(cols[:idx] + cols[idx + 1 :])
                val = val + term if idx % 2 == 0 else val - term
        memo[cols] = val
        return val

    return minor(tuple(range(k)))


def det_small(m: Float[Array, "*batch k k"]) -> Float[Array, "*batch"]:
    """Determinant of small stacked matrices (k <= 5 by cofactor expansion, else LU)."""
    k = m.shape[-1]
    if m.shape[-2] != k:
        raise ValueError(f"det_small expects square matrices, got shape {m.shape}")
    if k > 5:
        return jnp.linalg.det(m)
    return _det_entries([[m[..., i, j] for j in range(k)] for i in range(k)])


def _validate(anchor, others, present_others):
    if jnp.ndim(anchor) != 2:
        raise ValueError(f"anchor must be (B1, D), got shape {tuple(jnp.shape(anchor))}")
    if len(others) == 0:
        raise ValueError("masked_pairwise_volume needs at least one other modality")
    d = anchor.shape[1]
    b2 = None
    for i, x in enumerate(others):
        if jnp.ndim(x) != 2 or x.shape[1] != d:
            raise ValueError(f"others[{i}] must be (B2, {d}), got shape {tuple(jnp.shape(x))}")
        if b2 is None:
            b2 = x.shape[0]
        elif x.shape[0] != b2:
            raise ValueError(
                f"all others must have the same batch size B2, got {[o.shape for o in others]}"
            )
    if present_others is None:
        return [None] * len(others)
    if len(present_others) != len(others):
        raise ValueError(
            f"present_others has {len(present_others)} entries for {len(others)} modalities"
        )
    out = []
    for i, p in enumerate(present_others):
        if p is None:
            out.append(None)
            continue
        if jnp.shape(p) != (b2,):
            raise ValueError(f"present_others[{i}] must have shape ({b2},), got {jnp.shape(p)}")
        out.append(jnp.asarray(p).astype(bool))
    return out


def _masked_entries(anchor, others, present_others) -> list[list[Array]]:
    """The k x k masked Gram entries as nested lists of (B1, B2) arrays."""
    present = _validate(anchor, others, present_others)
    a = anchor.astype(jnp.float32)
    xs = [x.astype(jnp.float32) for x in others]
    b1, b2, k = a.shape[0], xs[0].shape[0], 1 + len(xs)
    pf = [None if p is None else p.astype(jnp.float32) for p in present]

    def keep(v, *ps):  # multiply by the presence of every listed modality
        for p in ps:
            if p is not None:
                v = v * p
        return v

    aa = jnp.einsum("id,id->i", a, a, precision=_HIGHEST)
    g: list[list[Array]] = [[None] * k for _ in range(k)]
    g[0][0] = jnp.broadcast_to(aa[:, None], (b1, b2))
    for m, x in enumerate(xs, start=1):
        ax = keep(jnp.einsum("id,jd->ij", a, x, precision=_HIGHEST), pf[m - 1])
        g[0][m] = g[m][0] = ax
        for n in range(m, k):
            dot = jnp.einsum("jd,jd->j", x, xs[n - 1], precision=_HIGHEST)
            if n == m:
                entry = dot if present[m - 1] is None else jnp.where(present[m - 1], dot, 1.0)
            else:
                entry = keep(dot, pf[m - 1], pf[n - 1])
            g[m][n] = g[n][m] = jnp.broadcast_to(entry[None], (b1, b2))
    return g


def masked_pairwise_gram(
    anchor: Float[Array, "b1 d"],
    others: Sequence[Float[Array, "b2 d"]],
    present_others: Sequence[Bool[Array, " b2"] | None] | None = None,
) -> Float[Array, "b1 b2 k k"]:
    """The masked Gram matrices of every (anchor i, candidate j) pair, (B1, B2, k, k).

    ``k = 1 + len(others)``; absent modalities get identity rows/columns (module docstring).
    """
    g = _masked_entries(anchor, others, present_others)
    return jnp.stack([jnp.stack(row, axis=-1) for row in g], axis=-2)


def masked_pairwise_volume(
    anchor: Float[Array, "b1 d"],
    others: Sequence[Float[Array, "b2 d"]],
    present_others: Sequence[Bool[Array, " b2"] | None] | None = None,
) -> Float[Array, "b1 b2"]:
    """``V[i, j] = sqrt(det G_ij)``: volume of anchor i with the PRESENT modalities of j.

    anchor (B1, D); others: k - 1 arrays (B2, D) (row j of each = candidate j);
    present_others: per other modality a (B2,) bool mask (True = present) or None (= all
    present). With every modality present this equals GRAM's pairwise volume (up to the
    safe ``sqrt``: ``max(det, 0)`` where the authors take ``|det|``, identical for valid Gram
    matrices, whose determinant is >= 0). k <= 5 uses the entry polynomial; larger k stacks
    the matrices and uses LU.
    """
    g = _masked_entries(anchor, others, present_others)
    if len(g) > 5:
        det = jnp.linalg.det(jnp.stack([jnp.stack(row, axis=-1) for row in g], axis=-2))
    else:
        det = _det_entries(g)
    return safe_sqrt(det)
