"""Device mesh and sharding rules for the trainer.

Mesh: ``("data", "fsdp", "model")`` (model = 1 here) with Auto axis types (the train step is
plain GSPMD ``jax.jit`` with explicit in/out shardings; jax_stack.md's Explicit-axis trap does
not apply).

* The batch is sharded over BOTH axes (``P(("data", "fsdp"))``): FSDP is data parallelism whose
  parameters are additionally split over ``fsdp``, so every device sees B / n_devices rows.
* Parameters (``mesh.params``): ``"replicated"`` (``P()``), or ``"fsdp"``: each parameter with
  at least ``mesh.fsdp_min_size`` elements is split along its largest dimension divisible by
  the fsdp axis size; XLA all-gathers it for the forward pass and reduce-scatters its
  gradient. ``mesh.rules = ((regex, spec), ...)`` overrides per path (first match), spec
  ``"replicated"`` or one axis name / ``None`` per dimension, as a tuple (``("fsdp", None)``)
  or a comma list (``"fsdp,None"``).
* Optimizer moments follow their parameter's sharding (same shapes, same rule); scalars
  (step counts) are replicated.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gram_jax import distributed
from gram_jax.training.config import ConfigError, path_rules
from gram_jax.training.optim import param_paths

__all__ = ["DATA_AXES", "make_mesh", "batch_spec", "param_specs", "tree_shardings"]

DATA_AXES = ("data", "fsdp")


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
    """The ``(data, fsdp, model=1)`` mesh of :func:`gram_jax.distributed.make_mesh` (Auto
    axes) over all global devices; ``mesh.data = -1`` takes the devices fsdp leaves."""
    n = len(jax.devices() if devices is None else devices)
    fsdp = int(config.mesh.fsdp)
    data = None if int(config.mesh.data) == -1 else int(config.mesh.data)
    try:
        return distributed.make_mesh(data, fsdp, devices=devices)
    except ValueError as e:
        msg = f"config.mesh: {e} (data={config.mesh.data}, fsdp={fsdp}, {n} devices)"
        raise ConfigError(msg) from None


def batch_spec() -> P:
    """Leading (batch) dimension split over every device."""
    return P(DATA_AXES)


def _parse_spec(spec: str | tuple, ndim: int, key: str) -> P:
    """A rule's spec (``"replicated"``, ``"fsdp,None"`` or ``("fsdp", None)``) as a P."""
    if spec in ("replicated", "", ()):
        return P()
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    if len(parts) > ndim:
        raise ConfigError(f"config.mesh.rules: spec {spec!r} has more entries than ndim {ndim}")
    axes = []
    for p in parts:
        if p in (None, "None", "none", ""):
            axes.append(None)
        elif p in DATA_AXES:
            axes.append(p)
        else:
            raise ConfigError(f"config.mesh.rules: unknown mesh axis {p!r} in ({key!r}, {spec!r})")
    return P(*axes)


def param_specs(config: ml_collections.ConfigDict, params: Any, mesh: Mesh) -> Any:
    """PartitionSpec per parameter leaf (see the module docstring)."""
    rules = path_rules("mesh.rules", config.mesh.rules)
    fsdp_size = mesh.shape["fsdp"]
    mode = config.mesh.params
    min_size = int(config.mesh.fsdp_min_size)

    def spec(path: str, x) -> P:
        shape = tuple(np.shape(x))
        for pat, text in rules:
            if pat.search(path):
                s = _parse_spec(text, len(shape), pat.pattern)
                for dim, ax in zip(shape, s, strict=False):
                    if ax is not None and dim % mesh.shape[ax]:
                        raise ConfigError(
                            f"config.mesh.rules: {pat.pattern} shards {path} {shape} over "
                            f"{ax} (size {mesh.shape[ax]}), which does not divide {dim}"
                        )
                return s
        if mode == "replicated" or fsdp_size == 1 or math.prod(shape) < min_size:
            return P()
        # Largest dimension divisible by the fsdp size (ties: the first).
        best = None
        for d, dim in enumerate(shape):
            if dim % fsdp_size == 0 and (best is None or dim > shape[best]):
                best = d
        if best is None:
            return P()
        return P(*([None] * best + ["fsdp"]))

    return jax.tree.map(spec, param_paths(params), params)


def tree_shardings(specs: Any, mesh: Mesh) -> Any:
    """NamedShardings from a tree of PartitionSpecs."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
