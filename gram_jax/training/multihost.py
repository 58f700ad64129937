"""Joining the multi-controller runtime: ``jax.distributed.initialize`` from the config or the
environment that ``python -m gram_jax.launch`` sets.

Three ways a process learns its place, highest priority first:

1. ``config.distributed``: ``coordinator_address`` / ``num_processes`` / ``process_id``
   (``""`` / ``0`` / ``-1`` = unset) and ``initialize=True``;
2. the launcher's environment: ``JAX_COORDINATOR_ADDRESS`` (read by JAX itself),
   ``GRAM_JAX_NUM_PROCESSES``, ``GRAM_JAX_PROCESS_ID``; its presence alone turns
   initialisation on;
3. JAX's cluster auto-detection for whatever is still unset: Cloud TPU pod slices (metadata
   server / GKE), SLURM (``SLURM_JOB_ID``, ``SLURM_NTASKS``, ``SLURM_PROCID``, ...),
   Open MPI, Kubernetes.

``GRAM_JAX_HEARTBEAT_TIMEOUT`` (seconds; JAX's default is 100) bounds how long the processes
wait for a peer that died without a word (``kill -9``, a lost host): after it the
coordination service declares the peer dead and the survivors exit non-zero with an error
naming its task (process) id.
"""

from __future__ import annotations

import os

import jax

__all__ = ["ENV_NUM_PROCESSES", "ENV_PROCESS_ID", "ENV_HEARTBEAT", "initialize", "first_then_rest"]

ENV_NUM_PROCESSES = "GRAM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "GRAM_JAX_PROCESS_ID"
ENV_HEARTBEAT = "GRAM_JAX_HEARTBEAT_TIMEOUT"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def initialize(distributed) -> bool:
    """``jax.distributed.initialize`` with the settings above; returns whether it ran (it
    does not when neither the config nor the launcher asks for it, or when the runtime is
    already initialised, e.g. a second ``train`` in one process)."""
    num = _env_int(ENV_NUM_PROCESSES)
    pid = _env_int(ENV_PROCESS_ID)
    if not (distributed.initialize or num is not None) or jax.distributed.is_initialized():
        return False
    kw = {}
    if distributed.coordinator_address:
        kw["coordinator_address"] = distributed.coordinator_address
    if distributed.num_processes > 0:
        kw["num_processes"] = distributed.num_processes
    elif num is not None:
        kw["num_processes"] = num
    if distributed.process_id >= 0:
        kw["process_id"] = distributed.process_id
    elif pid is not None:
        kw["process_id"] = pid
    heartbeat = _env_int(ENV_HEARTBEAT)
    if heartbeat is not None:
        kw["heartbeat_timeout_seconds"] = heartbeat
    jax.distributed.initialize(**kw)
    return True


def first_then_rest(fn):
    """``fn()`` on process 0 first, then (after a barrier) on the others: a dataset that must
    be generated on first use is written once, not concurrently by every process."""
    if jax.process_count() == 1:
        return fn()
    from orbax.checkpoint import multihost as ocp_multihost

    out = fn() if jax.process_index() == 0 else None
    ocp_multihost.sync_global_processes("gram_jax_first_then_rest")
    return out if jax.process_index() == 0 else fn()
