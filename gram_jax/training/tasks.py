"""Model construction and the two halves of every training objective.

A :class:`Task` splits the objective into

* ``embed(model, batch) -> emb``: the per-example forward pass, a pytree whose leaves have the
  batch as their LEADING axis (GRAM: ``{"z": {modality: (B, D)}}``; CoMM: ``{"z1", "z2"}``
  of shape (B, P, d) for the two views and P = k + 1 mask patterns);
* ``loss(model, emb, batch, rng) -> (loss, metrics)``: the contrastive loss over the WHOLE
  (global) batch of embeddings; it may read parameters of its own (temperature, SigLIP
  scale and bias, the DAM matching head).

The split is what makes gradient accumulation keep the negatives global
(:mod:`gram_jax.training.step`): embeddings of all microbatches are computed first, the loss
and its gradient with respect to them are taken once over the global batch, then each
microbatch's encoder gradient is its vector-Jacobian product with that cotangent
(GradCache, Gao et al. 2021).

Distributed loss (``loss.impl``): ``"gspmd"`` evaluates the loss on the globally sharded
arrays under ``jit``; ``"all_gather"`` and ``"ring"`` run it inside ``jax.shard_map`` over the
batch axes with ``axis_name=("data", "fsdp")`` and the implementation keyword of
``gram_jax.losses``, so a device holds O(B/n x B) or O((B/n)^2) scores.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from gram_jax import losses
from gram_jax.models import (
    CoMMModel,
    GramModel,
    MatchingHead,
    SigLIPScaleBias,
    build_encoder,
    l2_normalize,
)
from gram_jax.training.config import ConfigError
from gram_jax.training.sharding import DATA_AXES

__all__ = ["Task", "GramTask", "CrossSelfTask", "CoMMTask", "build_model", "make_task"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _encoders(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    dtype = _DTYPES[config.model.dtype]
    out = {}
    for name, mod in config.model.modalities.items():
        overrides = dict(mod.get("overrides", {}) or {})
        overrides.setdefault("dtype", dtype)
        try:
            out[name] = build_encoder(mod.kind, mod.preset, rngs=rngs, **overrides)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config.model.modalities.{name}: {e}") from None
    return out


def build_model(config: ml_collections.ConfigDict, seed: int | None = None) -> nnx.Module:
    """The NNX model of a config (``GramModel`` or ``CoMMModel``), parameters from ``seed``."""
    rngs = nnx.Rngs(config.seed if seed is None else seed)
    m = config.model
    encoders = _encoders(config, rngs)
    if m.kind == "comm":
        hidden, out = tuple(m.projector_dims)
        return CoMMModel(
            encoders,
            fusion_dim=m.fusion_width,
            num_heads=m.fusion_heads,
            num_layers=m.fusion_depth,
            projector_hidden=hidden,
            projector_out=out,
            dtype=_DTYPES[m.dtype],
            rngs=rngs,
        )
    matching = None
    if config.loss.dam_weight > 0:
        others = [n for n in encoders if n != m.anchor]
        matching = MatchingHead(
            encoders[m.anchor].width,
            [encoders[n].width for n in others],
            num_heads=m.matching_heads,
            depth=m.matching_depth,
            dtype=_DTYPES[m.dtype],
            rngs=rngs,
        )
    model = GramModel(
        encoders,
        m.embed_dim,
        m.anchor,
        rngs=rngs,
        temperature_init=m.temperature_init,
        matching_head=matching,
    )
    if config.loss.name == "siglip":
        # SigLIP learns its own logit scale and bias; stored beside the model's temperature.
        model.siglip = SigLIPScaleBias()
    return model


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


def _check_impl_supported(fn: Callable, impl: str, name: str) -> None:
    if impl == "gspmd":
        return
    params = inspect.signature(fn).parameters
    if "axis_name" not in params or "impl" not in params:
        raise ConfigError(
            f"config.loss.impl: {impl!r} needs gram_jax.losses.{name} to accept axis_name= and "
            "impl= (the mesh-loss API); this installation's version does not"
        )


def _sharded(fn: Callable, mesh: Mesh, impl: str) -> Callable:
    """``fn(*arrays, **kw)`` over the global batch, computed per shard inside ``shard_map``.

    Array arguments are batch-sharded (``P(("data", "fsdp"))``), the loss (and diagnostics)
    come back replicated; scalars (temperature ...) are passed replicated.
    """
    if impl == "gspmd":
        return fn

    def run(arrays, scalars):
        def local(arrays, scalars):
            return fn(*arrays, **scalars, axis_name=DATA_AXES, impl=impl)

        return jax.shard_map(local, mesh=mesh, in_specs=(P(DATA_AXES), P()), out_specs=P())(
            arrays, scalars
        )

    return lambda *arrays, **scalars: run(arrays, scalars)


@dataclasses.dataclass
class Task(abc.ABC):
    """Base: see the module docstring."""

    config: ml_collections.ConfigDict
    mesh: Mesh | None = None

    @abc.abstractmethod
    def embed(self, model: nnx.Module, batch: dict) -> Any:
        """The model's outputs for ``batch`` that :meth:`loss` consumes."""

    @abc.abstractmethod
    def loss(self, model: nnx.Module, emb: Any, batch: dict, rng) -> tuple[jax.Array, dict]:
        """``(scalar loss, metrics)`` of the embeddings of one (micro)batch."""

    def model_inputs(self, batch: dict) -> dict:
        """The batch entries the model reads (modalities and their ``<m>_mask``)."""
        names = set(self.config.model.modalities.keys())
        keep = names | {f"{m}_mask" for m in names}
        return {k: v for k, v in batch.items() if k in keep}


@dataclasses.dataclass
class GramTask(Task):
    """GramModel towers with the ``gram``, ``infonce`` or ``siglip`` loss (+ optional DAM)."""

    def __post_init__(self):
        c = self.config.loss
        fns = {
            "gram": losses.gram_contrastive_loss,
            "infonce": losses.infonce_loss,
            "siglip": losses.siglip_loss,
        }
        self._fn = fns[c.name]
        _check_impl_supported(self._fn, c.impl, self._fn.__name__)
        if c.impl != "gspmd" and self.mesh is None:
            raise ConfigError(f"config.loss.impl: {c.impl!r} needs a device mesh")

    def embed(self, model: GramModel, batch: dict) -> Any:
        out = model(self.model_inputs(batch))
        emb = {"z": out["embeddings"]}
        if self.config.loss.dam_weight > 0:
            emb["enc"] = out["encoder_outputs"]
        return emb

    def _base_loss(self, model, anchor, others):
        c = self.config.loss
        if c.name == "siglip":
            scale, bias = model.siglip()
            fn = _sharded(self._fn, self.mesh, c.impl)
            return fn(anchor, others, scale=scale, bias=bias)
        tau = model.temperature()
        kw = {"label_smoothing": c.label_smoothing}
        if c.name == "gram":
            kw["gradient"] = c.gradient
        else:
            kw["pairs"] = c.pairs
        fn = _sharded(functools.partial(self._fn, **kw), self.mesh, c.impl)
        return fn(anchor, others, temperature=tau)

    def loss(self, model: GramModel, emb: Any, batch: dict, rng) -> tuple[jax.Array, dict]:
        z = emb["z"]
        anchor = z[model.anchor]
        others = [z[m] for m in model.others]
        loss, metrics = self._base_loss(model, anchor, others)
        metrics = dict(metrics)
        if "temperature" not in metrics:
            metrics["temperature"] = model.temperature()
        w = self.config.loss.dam_weight
        if w > 0:
            outputs = {
                "embeddings": z,
                "encoder_outputs": emb["enc"],
                "present": {m: jnp.ones(anchor.shape[:1], bool) for m in z},
            }
            # Hard negatives are drawn from the volumes; no gradient flows through sampling.
            vol = jax.lax.stop_gradient(model.pairwise_volume(outputs))
            dam, dam_metrics = losses.dam_loss(
                rng,
                vol,
                jax.lax.stop_gradient(model.temperature()),
                lambda ai, ci: model.match_logits(outputs, ai, ci),
            )
            metrics["loss/contrastive"] = loss
            metrics["loss/dam"] = dam
            metrics["dam/accuracy"] = dam_metrics["dam/accuracy"]
            loss = loss + w * dam
        metrics["loss"] = loss
        return loss, metrics

    def eval_embed(self, model: GramModel, batch: dict) -> dict[str, jax.Array]:
        """``{modality: (B, D)}`` unit embeddings for retrieval."""
        return model(self.model_inputs(batch))["embeddings"]

    def features(self, model: GramModel, batch: dict) -> jax.Array:
        """Linear-probe features, in modality order, by ``eval.probe_features``:
        ``"embeddings"``: the concatenated unit embeddings (B, k D); ``"encoders"``: the
        concatenated pooled encoder outputs (B, sum_m W_m), the probe features of CoMM's
        Cross / Cross+Self baselines."""
        out = model(self.model_inputs(batch))
        if self.config.eval.probe_features == "encoders":
            parts = [out["encoder_outputs"][m].pooled.astype(jnp.float32) for m in model.modalities]
        else:
            parts = [out["embeddings"][m] for m in model.modalities]
        return jnp.concatenate(parts, axis=-1)


@dataclasses.dataclass
class CrossSelfTask(GramTask):
    """GramModel towers on two augmented views with :func:`gram_jax.losses.cross_self_loss`
    (temperature ``loss.comm_temperature``; single device / GSPMD only)."""

    def __post_init__(self):
        if self.config.loss.impl != "gspmd":
            raise ConfigError("config.loss.impl: 'cross_self' supports only 'gspmd'")
        if self.config.loss.dam_weight > 0:
            raise ConfigError("config.loss.dam_weight: the DAM term needs the 'gram' loss")

    def embed(self, model: GramModel, batch: dict) -> Any:
        z1 = model(self.model_inputs(batch["view1"]))["embeddings"]
        z2 = model(self.model_inputs(batch["view2"]))["embeddings"]
        return {"z1": z1, "z2": z2}

    def loss(self, model: GramModel, emb: Any, batch: dict, rng) -> tuple[jax.Array, dict]:
        mods = model.modalities
        return losses.cross_self_loss(
            [emb["z1"][m] for m in mods],
            [emb["z2"][m] for m in mods],
            self.config.loss.comm_temperature,
        )


@dataclasses.dataclass
class CoMMTask(Task):
    """CoMMModel on two augmented views with :func:`gram_jax.losses.comm_loss`."""

    def __post_init__(self):
        c = self.config.loss
        if c.impl != "gspmd":
            _check_impl_supported(losses.comm_loss, c.impl, "comm_loss")

    def embed(self, model: CoMMModel, batch: dict) -> Any:
        # (P, B, d) per view -> (B, P, d): the batch must lead for microbatching.
        z1 = model(self.model_inputs(batch["view1"]))["embeddings"]
        z2 = model(self.model_inputs(batch["view2"]))["embeddings"]
        return {"z1": jnp.swapaxes(z1, 0, 1), "z2": jnp.swapaxes(z2, 0, 1)}

    def loss(self, model: CoMMModel, emb: Any, batch: dict, rng) -> tuple[jax.Array, dict]:
        c = self.config.loss
        z1 = jnp.swapaxes(emb["z1"], 0, 1)
        z2 = jnp.swapaxes(emb["z2"], 0, 1)
        if c.impl == "gspmd":
            loss, metrics = losses.comm_loss(list(z1), list(z2), c.comm_temperature)
        else:
            # shard_map splits the leading axis: hand it (B, P, d) and swap back inside.
            def local(a, b, **kw):
                return losses.comm_loss(
                    list(jnp.swapaxes(a, 0, 1)), list(jnp.swapaxes(b, 0, 1)), **kw
                )

            loss, metrics = _sharded(local, self.mesh, c.impl)(
                emb["z1"], emb["z2"], temperature=c.comm_temperature
            )
        return loss, dict(metrics)

    def eval_embed(self, model: CoMMModel, batch: dict) -> dict[str, jax.Array]:
        """Unit embeddings in CoMM's projected space for retrieval.

        Each modality alone (its single-modality mask pattern), plus ``"<a>+<b>..."``: the
        fused embedding of every modality except the anchor (a candidate for the anchor).

        The projector's BatchNorm normalises each pattern with that pattern's statistics over
        the evaluation batch, as in training (one projector call per pattern). Its running
        averages are not used: they mix the 2 (k + 1) calls of every training step (single
        modalities and all), whose means differ, so one pattern normalised with them keeps a
        pattern-wide offset that dominates every cosine (held-out retrieval fell to chance on
        synthetic_trimodal). The embeddings therefore depend on the evaluation batch: keep
        ``eval.batch_size`` large (the padded last batch repeats its last row). The model's
        running averages are left unchanged.
        """
        mods = list(model.modalities)
        anchor = self.config.model.anchor
        k = len(mods)
        patterns = [[i == j for j in range(k)] for i in range(k)]
        rest = [m for m in mods if m != anchor]
        patterns.append([m != anchor for m in mods])
        model = nnx.clone(model)  # batch-statistics calls update the BN averages of a copy
        out = model(
            self.model_inputs(batch), patterns=jnp.asarray(patterns), use_running_average=False
        )
        z = l2_normalize(out["embeddings"])
        emb = {m: z[i] for i, m in enumerate(mods)}
        emb["+".join(rest)] = z[k]
        return emb

    def features(self, model: CoMMModel, batch: dict) -> jax.Array:
        """Linear-probe features: the pre-projector fused vector with every modality (what
        CoMM's linear probe reads, whatever ``eval.probe_features`` says)."""
        return model.features(self.model_inputs(batch))


def make_task(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Task:
    """The task of a config (``model.kind``)."""
    if config.model.kind == "comm":
        return CoMMTask(config, mesh)
    if config.loss.name == "cross_self":
        return CrossSelfTask(config, mesh)
    return GramTask(config, mesh)
