"""Global-batch contrastive losses on a device mesh: mesh helpers and a streaming pair engine.

**The engine.** Every contrastive loss in :mod:`gram_jax.losses` is a function of a score
matrix ``z = scale * s(R, C) + bias`` over a global batch of B items (rows ``R``: anchors,
columns ``C``: candidates; ``s`` = volume, dot product, ...) through a few per-row and per-column
statistics only:

    lse_i = logsumexp_j z_ij      pos_i = z_ii      tot_i = sum_j z_ij      pw_i = sum_j h(z_ij)

(and the same over i for each column j). The label-smoothed cross-entropy of the module
docstring of :mod:`gram_jax.losses` is ``CE_i = lse_i - (1 - eps) pos_i - eps tot_i / B``;
SigLIP is ``pw`` with ``h(z) = -log sigmoid(+-z)``; NT-Xent combines the LSEs of several score
matrices. All of them stream: a (row block, column block) tile updates the row statistics of its
rows and the column statistics of its columns (an online log-sum-exp with a running maximum), so
the B x B matrix never needs to exist. :func:`pair_stats` computes them with one of these drivers:

- ``dense`` (no ``axis_name``, no ``chunk_size``): one tile, plain autodiff.
- ``chunked`` (``chunk_size``, one device): ``lax.scan`` over row blocks and, inside, column
  blocks; memory ``O(chunk^2)`` for scores plus ``O(B)`` for the column statistics.
- ``all_gather`` (inside ``shard_map``): local rows x all-gathered columns for the row
  statistics, all-gathered rows x local columns for the column statistics; ``lax.all_gather``
  is differentiable (its transpose is a reduce-scatter), so plain autodiff gives the exact
  global gradient. Per device: ``O(B k D)`` gathered embeddings and ``O(B^2 / n)`` scores.
- ``ring`` (inside ``shard_map``): the column block (and the running statistics of ITS columns)
  travels around the axis with ``lax.ppermute``; device d computes tile (d, e) for every e
  exactly once, updating its own rows' statistics in place and the visiting block's column
  statistics, which return home after a full cycle. Both directions of the loss come out of
  one pass, so the compute equals the dense loss's. Per device: one ``(B/n) x (B/n)`` tile.

**Ring backward: custom VJP, not checkpoint.** Differentiating the ring scan with
``jax.checkpoint`` on the body keeps the scan carries of every step as residuals, and the carry
contains the visiting candidate block, so the residuals are all n blocks: ``O(B k D)`` per
device, the same embedding memory as all-gather (``impl="ring_checkpoint"`` implements it, for
the measurement). The default ``ring`` is a ``jax.custom_vjp`` in the FlashAttention style: the
forward keeps only the final ``lse`` of its rows and columns (``O(B/n)``); the backward runs a
second ring pass that recomputes each tile and its cotangent

    dL/dz_ij = g^lse_i p_ij + g^lse_j q_ij + g^pos_i [i = j] + g^tot_i + g^pw_i h'(z_ij) (+ cols)

(``p_ij = exp(z_ij - lse_i)`` the row softmax, ``q_ij = exp(z_ij - lse_j)`` the column one;
for the CE loss this is ``1/(2B) [p_ij - q_ij^smooth + q_ij - q_ij^smooth]``), pulls it back
through the score function with ``jax.vjp``, accumulates the row gradient locally and sends the
column gradient along WITH the block, so it too returns home after a full cycle. Residuals and
live memory: the local shards, the travelling block, its gradient and one tile.
``benchmarks/mesh_bench.py`` measures both.

**What travels for the volume.** GRAM's tile needs ``u_ij = C_j a_i`` (k - 1 GEMMs against the
candidate's vectors) and the candidate's ``M_j = C_j C_j^T``, ``adj(M_j)``, ``det(M_j)``. The
vectors must travel (the Gram alone does not give ``u``); the per-candidate Gram / adjugate /
determinant is recomputed at every hop instead of being sent. That costs ``O(b (k-1)^2 D)``
flops per hop against ``O(b^2 (k-1) D)`` for the tile (a fraction ``(k-1)/b``: < 0.2 % at
b = B/n = 2048), would save only ``(k-1)^2 + 1`` of ``(k-1) D + (k-1)^2 + 1`` floats per
candidate (nothing: they are extra bytes, < 1 % at D = 512), and keeps the backward's travelling
cotangent to the vectors alone (sent Gram/adjugate would need their own cotangents sent home
and chain-ruled through ``candidate_gram`` there). Per candidate a hop moves ``(k-1) D`` floats
forward, plus ``(k-1) D`` gradient floats and 5 column statistics backward.

**Faithful GRAM** (the authors' no-grad gather): the row statistics use ``z(R, sg(C))`` and the
column statistics ``z(sg(R), C)``; same values. Under all-gather this is a stop-gradient on the
gathered side; under the ring custom VJP the tile cotangent is split: the row-statistic part is
pulled back to the rows only, the column part to the columns only (the scale gets both).

**Calling convention.** Inside a user's own ``jax.shard_map`` over the data axis (with the
default ``check_vma=True``), pass ``axis_name``: the statistics are for the local rows and
columns, and the losses ``psum`` them into the global loss, identical on every device, whose
gradient is the exact global gradient. Replicated scalars (temperature, scale, bias) enter the
custom VJP as device-varying values, so JAX's own transpose of that cast ``psum``s their
gradient. :func:`global_loss` writes the shard_map for users who don't.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array

__all__ = [
    "Impl",
    "IMPLS",
    "make_mesh",
    "data_sharding",
    "replicated",
    "check_batch_divisible",
    "pair_stats",
    "global_loss",
]

Impl = Literal["all_gather", "ring", "ring_checkpoint"]
IMPLS = ("all_gather", "ring", "ring_checkpoint")  # the sharded drivers (with axis_name)
_STATS = ("lse", "pos", "tot", "pw")  # differentiable per-row / per-column statistics


# ---------------------------------------------------------------------------------------------
# Mesh helpers
# ---------------------------------------------------------------------------------------------


def make_mesh(
    data: int | None = None,
    fsdp: int = 1,
    model: int = 1,
    axis_types: AxisType | tuple[AxisType, ...] = AxisType.Auto,
    devices=None,
) -> Mesh:
    """A ``("data", "fsdp", "model")`` mesh over all devices of all processes.

    ``data`` defaults to ``len(devices) // (fsdp * model)``. ``axis_types`` is passed
    explicitly (``jax.make_mesh`` defaults to ``Explicit`` on recent JAX): ``Auto`` (default)
    lets plain ``jit`` code on sharded arrays compile with GSPMD propagation (the ``gspmd``
    driver); ``Explicit`` is fine for the ``shard_map`` drivers. ``jax.devices()`` lists every
    process's devices, so on a multi-host pod each host builds the same global mesh.
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or model < 1:
        raise ValueError(f"fsdp and model must be >= 1, got fsdp={fsdp}, model={model}")
    if data is None:
        if len(devices) % (fsdp * model):
            raise ValueError(
                f"{len(devices)} devices cannot be split into fsdp={fsdp} x model={model}"
            )
        data = len(devices) // (fsdp * model)
    if data * fsdp * model != len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x model={model} = {data * fsdp * model} devices, "
            f"but {len(devices)} are available"
        )
    if isinstance(axis_types, AxisType):
        axis_types = (axis_types,) * 3
    return jax.make_mesh(
        (data, fsdp, model), ("data", "fsdp", "model"), axis_types=tuple(axis_types),
        devices=devices,
    )  # fmt: skip


def data_sharding(mesh: Mesh, axis_name: str = "data") -> NamedSharding:
    """Sharding of a batch: leading dimension split over ``axis_name``, the rest replicated."""
    return NamedSharding(mesh, P(axis_name))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding (parameters, temperature)."""
    return NamedSharding(mesh, P())


def check_batch_divisible(batch: int, mesh: Mesh | int, axis_name: str = "data") -> int:
    """Return the per-device batch ``batch / n``; ``ValueError`` unless ``n`` divides ``batch``.

    ``mesh`` is a :class:`Mesh` (``n`` = size of ``axis_name``) or the axis size itself.
    """
    n = mesh.shape[axis_name] if isinstance(mesh, Mesh) else int(mesh)
    if batch % n:
        raise ValueError(
            f"global batch {batch} does not divide over the {n} devices of mesh axis "
            f"{axis_name!r}: every device must hold the same number of items; use a global "
            f"batch that is a multiple of {n} (e.g. {batch - batch % n or n})"
        )
    return batch // n


# ---------------------------------------------------------------------------------------------
# Streaming statistics of one tile
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What to compute over the score matrix ``z = scale * score(rows, cols) + bias``.

    score: ``(rows block pytree, cols block pytree) -> (br, bc)`` raw scores.
    lse: compute the log-sum-exp (and the max / first argmax, for accuracies).
    pointwise: optional elementwise ``h(z, is_positive)`` whose row / column sums are ``pw``.
    cols: compute the column statistics too (not needed by SigLIP or self-similarities).
    mask_diagonal: leave ``z_ii`` out of the log-sum-exp and max (self-similarity matrices).
    faithful: row statistics differentiate the rows only, column statistics the columns only.
    n_valid: ids >= n_valid are padding (chunked driver): excluded from every statistic.
    positive: optional ``(rows, cols) -> (n,)`` score of row i with column i (matched items,
      both pytrees of n items), written over the positives' entries of every tile.
    """

    score: Callable[[Any, Any], Array]
    lse: bool = True
    pointwise: Callable[[Array, Array], Array] | None = None
    cols: bool = True
    mask_diagonal: bool = False
    faithful: bool = False
    n_valid: int | None = None
    positive: Callable[[Any, Any], Array] | None = None


def _init(spec: _Spec, b: int, dtype) -> dict[str, Array]:
    st = {"pos": jnp.zeros(b, dtype), "tot": jnp.zeros(b, dtype)}
    if spec.lse:
        st |= {
            "m": jnp.full(b, -jnp.inf, dtype),
            "s": jnp.zeros(b, dtype),
            "arg": jnp.full(b, np.iinfo(np.int32).max, jnp.int32),
        }
    if spec.pointwise is not None:
        st["pw"] = jnp.zeros(b, dtype)
    return st


def _masks(spec: _Spec, rid: Array, cid: Array) -> tuple[Array, Array | None, Array]:
    """(positive mask, validity mask or None, log-sum-exp mask) of a tile."""
    pos = rid[:, None] == cid[None, :]
    valid = None
    if spec.n_valid is not None:
        valid = (rid[:, None] < spec.n_valid) & (cid[None, :] < spec.n_valid)
    keep = valid if valid is not None else jnp.ones_like(pos)
    if spec.mask_diagonal:
        keep = keep & ~pos
    return pos, valid, keep


def _update(spec: _Spec, st: dict, z: Array, pos, valid, keep, other_ids: Array, axis: int):
    """Fold one tile into the running statistics of its rows (axis=1) or columns (axis=0)."""
    st = dict(st)
    zv = z if valid is None else jnp.where(valid, z, 0.0)
    st["pos"] = st["pos"] + jnp.sum(jnp.where(pos, zv, 0.0), axis)
    st["tot"] = st["tot"] + jnp.sum(zv, axis)
    if spec.pointwise is not None:
        h = spec.pointwise(z, pos)
        st["pw"] = st["pw"] + jnp.sum(h if valid is None else jnp.where(valid, h, 0.0), axis)
    if spec.lse:
        zm = jnp.where(keep, z, -jnp.inf)
        tmax = jax.lax.stop_gradient(jnp.max(zm, axis))
        targ = other_ids[jnp.argmax(zm, axis)].astype(jnp.int32)
        # First-index argmax across blocks visited in any order (matches jnp.argmax on ties).
        better = (tmax > st["m"]) | ((tmax == st["m"]) & (targ < st["arg"]))
        st["arg"] = jnp.where(better, targ, st["arg"])
        new_m = jnp.maximum(st["m"], tmax)
        # A finite reference keeps exp(-inf - -inf) = NaN out while a row is fully masked.
        ref = jax.lax.stop_gradient(jnp.where(jnp.isfinite(new_m), new_m, 0.0))
        st["s"] = st["s"] * jnp.exp(st["m"] - ref) + jnp.sum(
            jnp.exp(zm - jnp.expand_dims(ref, axis)), axis
        )
        st["m"] = new_m
    return st


def _finalize(spec: _Spec, st: dict) -> dict[str, Array]:
    out = {"pos": st["pos"], "tot": st["tot"]}
    if spec.pointwise is not None:
        out["pw"] = st["pw"]
    if spec.lse:
        out["lse"] = st["m"] + jnp.log(st["s"])
        out["max"] = jax.lax.stop_gradient(st["m"])
        out["logsum"] = jax.lax.stop_gradient(jnp.log(st["s"]))
        out["arg"] = st["arg"]
    return out


def _logits(spec, scale, bias, rows, cols, pos):
    """``z = scale * score(rows, cols) + bias``, with ``spec.positive``'s per-item score on the
    tile's positives (``pos``: True where row id = column id)."""
    s = spec.score(rows, cols)
    if spec.positive is not None:
        # Each row's matched column (if it is in this tile), gathered so that the positives
        # are scored per item: O(br k D) beside the tile's O(br bc k D) products.
        idx = jnp.argmax(pos, axis=1)
        matched = jax.tree.map(lambda c: jnp.take(c, idx, axis=0), cols)
        s = jnp.where(pos, spec.positive(rows, matched)[:, None].astype(s.dtype), s)
    return scale * s + bias


def _tile_forward(spec, scale, bias, rows, cols, rid, cid, row_st, col_st):
    """Update (row_st, col_st) with the tile ``rows x cols`` (differentiable: plain autodiff).

    With ``faithful``, the row statistics see ``z(rows, sg(cols))`` and the column statistics
    ``z(sg(rows), cols)`` (same values; XLA shares the forward computation).
    """
    pos, valid, keep = _masks(spec, rid, cid)
    if spec.faithful:
        sg = jax.lax.stop_gradient
        z_row = _logits(spec, scale, bias, rows, sg(cols), pos)
        z_col = _logits(spec, scale, bias, sg(rows), cols, pos) if col_st is not None else None
    else:
        z_row = z_col = _logits(spec, scale, bias, rows, cols, pos)
    if row_st is not None:
        row_st = _update(spec, row_st, z_row, pos, valid, keep, cid, axis=1)
    if col_st is not None:
        col_st = _update(spec, col_st, z_col, pos, valid, keep, rid, axis=0)
    return row_st, col_st


def _dz(spec, z, pos, valid, keep, res: dict, axis: int) -> Array:
    """Cotangent of the tile from the cotangents ``res['g_*']`` of one direction's statistics.

    ``res`` holds the final ``lse`` (for the softmax) and ``g_lse``, ``g_pos``, ``g_tot``,
    ``g_pw`` indexed along the rows (axis=1) or the columns (axis=0).
    """

    def bc(v):
        return jnp.expand_dims(v, axis)

    g = bc(res["g_tot"]) + jnp.where(pos, bc(res["g_pos"]), 0.0)
    if spec.pointwise is not None:
        dh = jax.jvp(lambda t: spec.pointwise(t, pos), (z,), (jnp.ones_like(z),))[1]
        g = g + bc(res["g_pw"]) * dh
    if spec.lse:
        # softmax = exp(z - max - log sum): the rounded lse = max + log sum would cost every
        # probability a relative error ~ eps |lse| (1e-5 at |z| ~ 1 / tau ~ 14).
        p = jnp.exp(z - bc(res["max"]) - bc(res["logsum"]))
        g = g + bc(res["g_lse"]) * jnp.where(keep, p, 0.0)
    return g if valid is None else jnp.where(valid, g, 0.0)


def _tile_backward(spec, scale, bias, rows, cols, rid, cid, row_res, col_res):
    """Recompute a tile and pull its cotangent back: ``(g_scale, g_bias, g_rows, g_cols)``."""
    pos, valid, keep = _masks(spec, rid, cid)
    z, vjp = jax.vjp(lambda s, b, r, c: _logits(spec, s, b, r, c, pos), scale, bias, rows, cols)
    g_row = _dz(spec, z, pos, valid, keep, row_res, axis=1)
    if col_res is None:
        return vjp(g_row)
    g_col = _dz(spec, z, pos, valid, keep, col_res, axis=0)
    if not spec.faithful:
        return vjp(g_row + g_col)
    gs_r, gb_r, g_rows, _ = vjp(g_row)
    gs_c, gb_c, _, g_cols = vjp(g_col)
    return gs_r + gs_c, gb_r + gb_c, g_rows, g_cols


def _residual(st: dict | None, cot: dict) -> dict:
    """Pair the final ``max`` and ``logsum`` (the softmax's reference and normaliser) with the
    statistics' cotangents (zeros where a statistic is unused)."""
    zero = jnp.zeros_like(cot["pos"])
    out = {k: zero if st is None or k not in st else st[k] for k in ("max", "logsum")}
    for k in _STATS:
        out[f"g_{k}"] = cot.get(k, zero)
    return out


def _diff_part(st: dict) -> dict:
    return {k: st[k] for k in _STATS if k in st}


def _aux_part(st: dict) -> dict:
    return {k: st[k] for k in ("max", "logsum", "arg") if k in st}


# ---------------------------------------------------------------------------------------------
# Collectives helpers
# ---------------------------------------------------------------------------------------------


def _vary(tree, axis_name: str):
    """Mark values as device-varying over ``axis_name`` (no-op numerically).

    Scan carries that start as constants must have the same (varying) type as after a
    ``ppermute`` under ``check_vma=True``; adding a varying zero works whether or not the value
    is already varying and whether or not the shard_map checks types (``lax.pcast`` raises on
    an already-varying value and its name differs across JAX versions).
    """
    zero = jax.lax.axis_index(axis_name) * 0
    return jax.tree.map(lambda x: x + zero.astype(x.dtype), tree)


def _shift(tree, axis_name: str, n: int):
    """Send every device's value to the next device on the ring (d -> d + 1 mod n)."""
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), tree)


def _leading(tree) -> int:
    return jax.tree.leaves(tree)[0].shape[0]


def _dtype(scale, rows):
    return jnp.result_type(scale, *jax.tree.leaves(rows))


# ---------------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------------


def _dense(spec, scale, bias, rows, cols):
    br, bc = _leading(rows), _leading(cols)
    dt = _dtype(scale, rows)
    row_st, col_st = _tile_forward(
        spec, scale, bias, rows, cols, jnp.arange(br), jnp.arange(bc),
        _init(spec, br, dt), _init(spec, bc, dt) if spec.cols else None,
    )  # fmt: skip
    return _finalize(spec, row_st), _finalize(spec, col_st) if spec.cols else None


def _all_gather(spec, axis_name, scale, bias, rows, cols):
    n = jax.lax.axis_size(axis_name)
    d = jax.lax.axis_index(axis_name)
    br, bc = _leading(rows), _leading(cols)
    dt = _dtype(scale, rows)
    sg = jax.lax.stop_gradient if spec.faithful else (lambda x: x)
    gather = lambda t: jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name, tiled=True), t)
    rid = d * br + jnp.arange(br)
    cid = d * bc + jnp.arange(bc)
    # The faithful stop-gradient is applied to the gathered side explicitly; the tile itself
    # runs in exact mode (each call feeds one direction only).
    exact = dataclasses.replace(spec, faithful=False)
    row_st, _ = _tile_forward(
        exact, scale, bias, rows, sg(gather(cols)), rid, jnp.arange(n * bc),
        _vary(_init(spec, br, dt), axis_name), None,
    )  # fmt: skip
    col_st = None
    if spec.cols:
        _, col_st = _tile_forward(
            exact, scale, bias, sg(gather(rows)), cols, jnp.arange(n * br), cid,
            None, _vary(_init(spec, bc, dt), axis_name),
        )  # fmt: skip
        col_st = _finalize(spec, col_st)
    return _finalize(spec, row_st), col_st


def _ring_forward(spec, axis_name, scale, bias, rows, cols, checkpoint=False):
    n = jax.lax.axis_size(axis_name)
    d = jax.lax.axis_index(axis_name)
    br, bc = _leading(rows), _leading(cols)
    dt = _dtype(scale, rows)
    rid = d * br + jnp.arange(br)
    row_st = _vary(_init(spec, br, dt), axis_name)
    col_st = _vary(_init(spec, bc, dt), axis_name) if spec.cols else None

    def compute(carry, s):
        row_st, blk, col_st = carry
        src = (d - s) % n  # after s hops, device d holds the block of device d - s
        cid = src * bc + jnp.arange(bc)
        row_st, col_st = _tile_forward(spec, scale, bias, rows, blk, rid, cid, row_st, col_st)
        return row_st, blk, col_st

    def hop(carry, s):
        row_st, blk, col_st = compute(carry, s)
        return (row_st, *_shift((blk, col_st), axis_name, n)), None

    if checkpoint:
        hop = jax.checkpoint(hop)
    carry, _ = jax.lax.scan(hop, (row_st, cols, col_st), jnp.arange(n - 1))
    row_st, _, col_st = compute(carry, n - 1)
    # The last block seen is device d + 1's: one more hop of its statistics sends them home.
    col_st = _shift(col_st, axis_name, n)
    return _finalize(spec, row_st), _finalize(spec, col_st) if spec.cols else None


def _ring_backward(spec, axis_name, scale, bias, rows, cols, row_res, col_res):
    n = jax.lax.axis_size(axis_name)
    d = jax.lax.axis_index(axis_name)
    br, bc = _leading(rows), _leading(cols)
    rid = d * br + jnp.arange(br)
    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)
    acc = _vary((zeros(scale), zeros(bias), zeros(rows)), axis_name)
    g_cols = _vary(zeros(cols), axis_name)

    def compute(carry, s):
        (gs, gb, g_rows), blk, c_res, g_blk = carry
        src = (d - s) % n
        cid = src * bc + jnp.arange(bc)
        ts, tb, tr, tc = _tile_backward(spec, scale, bias, rows, blk, rid, cid, row_res, c_res)
        g_blk = jax.tree.map(jnp.add, g_blk, tc)
        return (gs + ts, gb + tb, jax.tree.map(jnp.add, g_rows, tr)), blk, c_res, g_blk

    def hop(carry, s):
        acc, blk, c_res, g_blk = compute(carry, s)
        return (acc, *_shift((blk, c_res, g_blk), axis_name, n)), None

    carry, _ = jax.lax.scan(hop, (acc, cols, col_res, g_cols), jnp.arange(n - 1))
    (gs, gb, g_rows), _, _, g_blk = compute(carry, n - 1)
    # The column gradient travelled with its block; one more hop brings it home.
    g_cols = _shift(g_blk, axis_name, n)
    return gs, gb, g_rows, g_cols


def _recompute_vjp(forward, backward, scale, bias, rows, cols):
    """Run ``forward`` under a custom VJP whose backward recomputes the tiles (``backward``).

    Residuals: the inputs and the final ``max`` and ``logsum`` (lse = max + logsum) of the rows
    and columns, ``O(b)``.
    """

    @jax.custom_vjp
    def run(scale, bias, rows, cols):
        row_st, col_st = forward(scale, bias, rows, cols)
        return _split(row_st), _split(col_st)

    def fwd(scale, bias, rows, cols):
        row_st, col_st = forward(scale, bias, rows, cols)
        res = (scale, bias, rows, cols, _aux_part(row_st), col_st and _aux_part(col_st))
        return (_split(row_st), _split(col_st)), res

    def bwd(res, cot):
        scale, bias, rows, cols, row_aux, col_aux = res
        (row_cot, _), (col_cot, _) = cot
        col_res = None if col_cot is None else _residual(col_aux, col_cot)
        return backward(scale, bias, rows, cols, _residual(row_aux, row_cot), col_res)

    run.defvjp(fwd, bwd)
    (row_d, row_a), (col_d, col_a) = run(scale, bias, rows, cols)
    return {**row_d, **row_a}, (None if col_d is None else {**col_d, **col_a})


def _split(st):
    if st is None:
        return None, None
    return _diff_part(st), _aux_part(st)


def _chunk_blocks(tree, chunk: int, n_blocks: int):
    pad = n_blocks * chunk - _leading(tree)

    def f(x):
        x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
        return x.reshape(n_blocks, chunk, *x.shape[1:])

    return jax.tree.map(f, tree)


def _unchunk(tree, b: int):
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:b], tree)


def _chunked_forward(spec, chunk, scale, bias, rows, cols):
    br, bc = _leading(rows), _leading(cols)
    nr, nc = math.ceil(br / chunk), math.ceil(bc / chunk)
    dt = _dtype(scale, rows)
    rows_b, cols_b = _chunk_blocks(rows, chunk, nr), _chunk_blocks(cols, chunk, nc)
    col_all = jax.tree.map(lambda x: jnp.stack([x] * nc), _init(spec, chunk, dt))
    ids = jnp.arange(chunk)

    def over_rows(col_all, xr):
        r, rblk = xr

        def over_cols(row_st, xc):
            c, cblk, cst = xc
            row_st, cst = _tile_forward(
                spec, scale, bias, rblk, cblk, r * chunk + ids, c * chunk + ids, row_st, cst
            )
            return row_st, cst

        row_st, col_all = jax.lax.scan(
            over_cols, _init(spec, chunk, dt), (jnp.arange(nc), cols_b, col_all)
        )
        return col_all, row_st

    col_all, row_all = jax.lax.scan(over_rows, col_all, (jnp.arange(nr), rows_b))
    row_st = _finalize(spec, _unchunk(row_all, br))
    col_st = _finalize(spec, _unchunk(col_all, bc)) if spec.cols else None
    return row_st, col_st


def _chunked_backward(spec, chunk, scale, bias, rows, cols, row_res, col_res):
    br, bc = _leading(rows), _leading(cols)
    nr, nc = math.ceil(br / chunk), math.ceil(bc / chunk)
    rows_b, cols_b = _chunk_blocks(rows, chunk, nr), _chunk_blocks(cols, chunk, nc)
    row_res_b = _chunk_blocks(row_res, chunk, nr)
    col_res_b = None if col_res is None else _chunk_blocks(col_res, chunk, nc)
    ids = jnp.arange(chunk)
    zeros = lambda t: jax.tree.map(jnp.zeros_like, t)

    def over_rows(carry, xr):
        gs, gb, g_cols_b = carry
        r, rblk, rres = xr

        def over_cols(carry, xc):
            gs, gb, g_r = carry
            c, cblk, cres, g_c = xc
            ts, tb, tr, tc = _tile_backward(
                spec, scale, bias, rblk, cblk, r * chunk + ids, c * chunk + ids, rres, cres
            )
            return (gs + ts, gb + tb, jax.tree.map(jnp.add, g_r, tr)), jax.tree.map(
                jnp.add, g_c, tc
            )

        (gs, gb, g_r), g_cols_b = jax.lax.scan(
            over_cols, (gs, gb, zeros(rblk)), (jnp.arange(nc), cols_b, col_res_b, g_cols_b)
        )
        return (gs, gb, g_cols_b), g_r

    (gs, gb, g_cols_b), g_rows_b = jax.lax.scan(
        over_rows, (zeros(scale), zeros(bias), zeros(cols_b)), (jnp.arange(nr), rows_b, row_res_b)
    )
    return gs, gb, _unchunk(g_rows_b, br), _unchunk(g_cols_b, bc)


def _chunked(spec, chunk, scale, bias, rows, cols):
    """Single-device tiled driver with the recomputing custom VJP."""
    br, bc = _leading(rows), _leading(cols)
    if br != bc:
        raise ValueError(f"the chunked driver needs a square score matrix, got {(br, bc)}")
    if br % chunk:
        # The last tile is zero-padded; padding rows / columns are masked out of everything.
        spec = dataclasses.replace(spec, n_valid=br)
    return _recompute_vjp(
        lambda *a: _chunked_forward(spec, chunk, *a),
        lambda *a: _chunked_backward(spec, chunk, *a),
        scale, bias, rows, cols,
    )  # fmt: skip


def pair_stats(
    score: Callable[[Any, Any], Array],
    rows,
    cols,
    scale: Array | float,
    bias: Array | float = 0.0,
    *,
    axis_name: str | None = None,
    impl: Impl = "all_gather",
    chunk_size: int | None = None,
    lse: bool = True,
    pointwise: Callable[[Array, Array], Array] | None = None,
    cols_stats: bool = True,
    mask_diagonal: bool = False,
    faithful: bool = False,
    positive: Callable[[Any, Any], Array] | None = None,
) -> tuple[dict[str, Array], dict[str, Array] | None]:
    """Row and column statistics of ``z = scale * score(rows, cols) + bias`` over a global batch.

    Args:
      score: ``(rows block, cols block) -> (br, bc)`` raw pair scores; ``rows`` / ``cols`` are
        pytrees whose leaves have the item index as leading dimension.
      rows, cols: the (local, with ``axis_name``) items; item i of ``rows`` is the positive of
        item i of ``cols`` (global indices ``axis_index * b + arange(b)``).
      scale, bias: differentiable scalars.
      axis_name: mesh axis the batch is sharded on (call inside ``shard_map``), or None.
      impl: ``"all_gather"``, ``"ring"`` (custom VJP) or ``"ring_checkpoint"``.
      chunk_size: single-device tile size (``lax.scan`` over tiles with a custom VJP).
      lse: compute ``lse`` / ``max`` / ``arg`` (the log-sum-exp, max and first argmax).
      pointwise: elementwise ``h(z, is_positive)``; its sums give ``pw``.
      cols_stats: compute the column statistics as well.
      mask_diagonal: exclude ``z_ii`` from ``lse`` / ``max`` / ``arg``.
      faithful: row statistics differentiate ``rows`` only, column statistics ``cols`` only.
      positive: optional ``(rows, cols) -> (n,)``, the same score evaluated per matched item
        (row i with column i; both pytrees of n items). It replaces ``score`` on the positives
        ``z_ii`` in every driver: a score whose pairwise form loses precision where it matters
        most (the volume of an aligned positive) gets the positives from its per-item form.

    Returns:
      ``(row_stats, col_stats)``: dicts of ``(b,)`` arrays for the local rows / columns with
      keys ``pos`` (``z_ii``), ``tot`` (sum), and if requested ``pw``, ``lse``, ``max`` and
      ``logsum`` (no gradient; ``lse = max + logsum``) and ``arg`` (int32 global index of the
      first maximum); col_stats is None unless ``cols_stats``.
    """
    # Python-number scale / bias take the embeddings' dtype (jnp.asarray would give float64
    # under x64 and promote the statistics).
    dt = jnp.result_type(*jax.tree.leaves(rows), *jax.tree.leaves(cols))
    scale, bias = (x if hasattr(x, "dtype") else jnp.asarray(x, dt) for x in (scale, bias))
    spec = _Spec(
        score=score, lse=lse, pointwise=pointwise, cols=cols_stats,
        mask_diagonal=mask_diagonal, faithful=faithful, positive=positive,
    )  # fmt: skip
    # Checked even where unused (no axis_name), so a typo never waits for the mesh run.
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    if axis_name is None:
        if chunk_size is None:
            return _dense(spec, scale, bias, rows, cols)
        if chunk_size >= max(_leading(rows), _leading(cols)):
            return _dense(spec, scale, bias, rows, cols)
        return _chunked(spec, chunk_size, scale, bias, rows, cols)
    if chunk_size is not None:
        raise ValueError(
            "chunk_size is the single-device tiling; with axis_name use impl='ring', whose "
            "tiles are already (B/n) x (B/n)"
        )
    if _leading(rows) != _leading(cols):
        raise ValueError("rows and cols must hold the same number of local items")
    if impl == "all_gather":
        return _all_gather(spec, axis_name, scale, bias, rows, cols)
    if impl == "ring":
        # Replicated scalars become varying before the custom VJP: the transpose of that cast
        # psums their per-device gradients.
        scale, bias = _vary((scale, bias), axis_name)
        return _recompute_vjp(
            lambda *a: _ring_forward(spec, axis_name, *a),
            lambda *a: _ring_backward(spec, axis_name, *a),
            scale, bias, rows, cols,
        )  # fmt: skip
    return _ring_forward(spec, axis_name, scale, bias, rows, cols, checkpoint=True)


# ---------------------------------------------------------------------------------------------
# Driver for users who do not write their own shard_map
# ---------------------------------------------------------------------------------------------


def global_loss(
    loss_fn: Callable[..., tuple[Array, dict]],
    mesh: Mesh,
    impl: Literal["gspmd", "all_gather", "ring", "ring_checkpoint"] = "ring",
    axis_name: str = "data",
    **loss_kwargs,
) -> Callable[..., tuple[Array, dict]]:
    """Wrap a loss of :mod:`gram_jax.losses` to run on a batch sharded over ``mesh``.

    Returns ``f(*args) -> (loss, metrics)`` taking the loss's GLOBAL positional arguments
    (array leaves with ``ndim >= 1`` are batches, split on their leading dimension over
    ``axis_name``; scalars such as the temperature are replicated). Differentiate or ``jit``
    it as usual.

    - ``"gspmd"``: the dense single-device loss under ``jit`` with the batch constrained to
      ``P(axis_name)``; XLA's partitioner inserts the collectives (the B x B scores are
      materialised, sharded).
    - ``"all_gather"`` / ``"ring"`` / ``"ring_checkpoint"``: ``jax.shard_map`` over the mesh,
      calling ``loss_fn(*local_args, axis_name=axis_name, impl=impl, **loss_kwargs)``.

    Raises ``ValueError`` if a batch does not divide the size of ``axis_name``.
    """
    n = mesh.shape[axis_name]

    def specs(args):
        def leaf_spec(x):
            if jnp.ndim(x) >= 1:
                check_batch_divisible(jnp.shape(x)[0], n, axis_name)
                return P(axis_name)
            return P()

        return jax.tree.map(leaf_spec, args)

    if impl == "gspmd":
        auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * mesh.devices.ndim)

        def gspmd(*args):
            sp = specs(args)
            args = jax.tree.map(
                lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(auto, s)), args, sp
            )
            return loss_fn(*args, **loss_kwargs)

        return gspmd
    if impl not in IMPLS:
        raise ValueError(f"impl must be 'gspmd' or one of {IMPLS}, got {impl!r}")

    def sharded(*args):
        local = lambda *a: loss_fn(*a, axis_name=axis_name, impl=impl, **loss_kwargs)
        fn = jax.shard_map(local, mesh=mesh, in_specs=specs(args), out_specs=P())
        return fn(*args)

    return sharded
