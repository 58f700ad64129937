"""The trainer: configs, the jitted sharded train step, Orbax checkpoints, the loop.

* :mod:`~gram_jax.training.config`: ``base_config``, ``load_config`` (file + overrides),
  ``validate`` (errors name the bad key).
* :mod:`~gram_jax.training.optim`: AdamW with warmup + cosine/linear decay, clipping,
  weight-decay mask, per-module learning rates (frozen towers).
* :mod:`~gram_jax.training.sharding`: ``(data, fsdp)`` mesh and parameter sharding rules.
* :mod:`~gram_jax.training.tasks`: model construction; embed / loss halves per objective.
* :mod:`~gram_jax.training.step`: train state and the one-jit train step (GradCache
  accumulation, non-finite guard).
* :mod:`~gram_jax.training.checkpoint`: async Orbax manager with corrupt-checkpoint fallback.
* :mod:`~gram_jax.training.evaluate`: held-out retrieval and linear probes.
* :mod:`~gram_jax.training.loop`: ``train(config, workdir)``.
"""

from gram_jax.training.config import ConfigError, base_config, load_config, validate

__all__ = ["ConfigError", "base_config", "load_config", "validate"]
