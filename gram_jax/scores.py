"""Pair scores of an anchor against k - 1 candidate modalities: the one table.

A score ``s(a_i, C_j)`` is split into per-candidate terms, computed once per candidate, and a
block kernel that scores anchor rows against a block of candidates' terms. Retrieval
(:mod:`gram_jax.metrics`, dense or chunked), the GRAM loss (:mod:`gram_jax.losses`: the terms
made once per device and streamed through the engine's tiles) and ``config.eval.scores`` all
read :data:`SCORES`, so a pair scores alike everywhere. Two exceptions are by design, both
for float32 accuracy on aligned tuples (``docs/precision.md``): the contrastive losses score
their positives, the diagonal, per item (:func:`volume_item`); the ``volume`` and
``span_distance`` blocks rescore each row's nearest candidate per item (``refine``), per
block, so a chunked retrieval may rescore more pairs than a dense one (those differ from
their dot-product value in the last bits, by at most the float32 floor).

========== ===================================================== ============ ===============
name       score                                                 better       terms
========== ===================================================== ============ ===============
volume     GRAM's parallelotope volume ``sqrt(det G_ij)``        lower        basis, det M_j
span_dist  distance of ``a_i`` to span(C_j)                      lower        ridge basis
cosine     ``a_i . c_j0`` (the first candidate modality only)    higher       c_0
simplex    simplex (k-1)-volume ``sqrt(det E_ij) / (k-1)!``      lower        edge basis ...
symile     Symile's MIP ``sum_d a_id prod_m c_jmd``              higher       prod_m c_m
========== ===================================================== ============ ===============

(``span_distance`` is the table's name of ``span_dist``.) The volumes are those of
:mod:`gram_jax.volume`; :func:`register_score` adds one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

from jaxtyping import Array, Float

from gram_jax.registry import Registry
from gram_jax.volume import (
    GradientMode,
    _dot,
    _gemm,
    _product,
    _project_out,
    _sqrt,
    candidate_gram,
    gram_det_block,
    gram_det_pairs,
    pow2_rows,
    refine_nearest_volumes,
    safe_sqrt,
    simplex_candidate,
    simplex_det_block,
    span_distance_block,
    span_terms,
)

__all__ = [
    "ScoreSpec",
    "SCORES",
    "register_score",
    "get_score",
    "pair_score",
    "volume_terms",
    "volume_block",
    "volume_item",
]


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    """``terms(others) -> pytree`` (leading axis = candidate), ``block(anchor_rows, terms) ->
    (R, C)`` scores, and the orientation ``lower_is_better``."""

    terms: Callable[[Sequence[Array]], Any]
    block: Callable[[Array, Any], Array]
    lower_is_better: bool


SCORES: Registry[ScoreSpec] = Registry("score")


def register_score(name: str, spec: ScoreSpec) -> ScoreSpec:
    """Add a retrieval / loss score under ``name`` (a built-in name cannot be replaced)."""
    return SCORES.add(name, spec)


def get_score(name: str) -> ScoreSpec:
    """The :class:`ScoreSpec` of ``name`` (:class:`~gram_jax.registry.UnknownName` naming the
    registered ones)."""
    return SCORES[name]


def pair_score(name: str) -> Callable[[Array, Sequence[Array]], Array]:
    """``(anchor rows (R, D), candidate rows: k - 1 arrays (C, D)) -> (R, C)``: the score as a
    function of raw embeddings, for :func:`gram_jax.distributed.pair_stats`."""
    spec = get_score(name)
    return lambda a, others: spec.block(a, spec.terms(list(others)))


def volume_terms(others):
    # Volumes are homogeneous in each vector: score power-of-two-scaled rows and scale back, so
    # huge inputs do not overflow the squared determinant (factor exactly 1 for ordinary rows).
    scaled, factors = zip(*(pow2_rows(x) for x in others), strict=True)
    cand = candidate_gram(*scaled)
    return cand.basis, cand.det, _product(factors)


def volume_block(
    anchor: Float[Array, "R D"], terms, gradient: GradientMode = "safe", refine: int = 1
) -> Float[Array, "R C"]:
    """Volumes of anchor rows against a block of candidates' :func:`volume_terms`, each row's
    ``refine`` nearest rescored per item, as :func:`gram_jax.volume.pairwise_volume` does
    (:func:`gram_jax.volume.refine_nearest_volumes`)."""
    basis, det, fc = terms
    anchor, fa = pow2_rows(anchor)
    fa, fc, det_m = fa[:, None], fc[None, :], det[None, :]

    def finish(det, fa, fc):
        return _sqrt(det, gradient) * fa * fc

    out = finish(gram_det_block(anchor, basis, det), fa, fc)
    if refine:
        pair_det = functools.partial(gram_det_pairs, anchor, basis, det)
        out = refine_nearest_volumes(out, finish, det_m, fa, fc, pair_det, refine)
    return out


def volume_item(
    anchor: Float[Array, "N D"], terms, gradient: GradientMode = "safe"
) -> Float[Array, " N"]:
    """``vol(a_i, C_i)`` of each anchor with ITS candidate's terms (``terms`` of N candidates):
    the anchor's step in D-space (:func:`gram_jax.volume.gram_volume`'s), so an aligned
    positive keeps float32 accuracy where the pairwise form's dot products cannot."""
    basis, det, fc = terms
    anchor, fa = pow2_rows(anchor)
    r = _project_out(anchor, basis)
    return _sqrt(det * _dot(r, r), gradient) * fa * fc


def _simplex_block(anchor: Float[Array, "R D"], terms) -> Float[Array, "R C"]:
    basis, base, det = terms
    norm = float(math.factorial(len(basis) + 1))  # (k-1)!, k - 1 = len(basis) + 1
    return safe_sqrt(simplex_det_block(anchor, basis, base, det)) / norm


register_score("volume", ScoreSpec(volume_terms, volume_block, True))
register_score(
    "span_distance",
    ScoreSpec(lambda o: span_terms(*o), span_distance_block, True),
)
register_score("cosine", ScoreSpec(lambda o: o[0], _gemm, False))
register_score("simplex", ScoreSpec(lambda o: tuple(simplex_candidate(*o)), _simplex_block, True))
register_score("symile", ScoreSpec(_product, _gemm, False))
