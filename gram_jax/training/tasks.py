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

The loss comes from the registry :data:`gram_jax.losses.LOSSES` (``config.loss.name``): its
entry says which arguments the config gives it, which learnable scalars it receives
(temperature, SigLIP's scale and bias) and whether it takes two views; :func:`make_task` picks
the task from it.

Distributed loss (``loss.impl``): ``"gspmd"`` evaluates the loss on the globally sharded
arrays under ``jit``; ``"all_gather"``, ``"ring"`` and ``"ring_checkpoint"`` run it inside
``jax.shard_map`` over the batch axes with ``axis_name=("data", "fsdp")`` and the
implementation keyword of ``gram_jax.losses``, so a device holds O(B/n x B) or O((B/n)^2)
scores.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
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
    TowerModel,
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
    """The NNX model of a config (``TowerModel`` or ``CoMMModel``), parameters from ``seed``."""
    rngs = nnx.Rngs(config.seed if seed is None else seed)
    m = config.model
    encoders = _encoders(config, rngs)
    if m.kind == "comm":
        hidden, out = tuple(m.projector_dims)
        return CoMMModel(
            encoders,
            fusion_width=m.fusion_width,
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
    model = TowerModel(
        encoders,
        m.embed_dim,
        m.anchor,
        rngs=rngs,
        temperature_init=m.temperature_init,
        matching_head=matching,
    )
    if losses.get_loss(config.loss.name).params == "scale_bias":
        # SigLIP learns its own logit scale and bias; stored beside the model's temperature.
        model.siglip = SigLIPScaleBias()
    return model


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


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


def _loss_fn(config: ml_collections.ConfigDict, mesh: Mesh | None) -> Callable:
    """The registered loss with its config arguments bound, sharded as ``loss.impl`` says."""
    c = config.loss
    spec = losses.get_loss(c.name)
    if c.impl != "gspmd" and mesh is None:
        raise ConfigError(f"config.loss.impl: {c.impl!r} needs a device mesh")
    fn = functools.partial(spec.fn, **{arg: c[key] for arg, key in spec.args.items()})
    return _sharded(fn, mesh, c.impl)


def _loss_params(config: ml_collections.ConfigDict, model: nnx.Module) -> dict[str, jax.Array]:
    """The learnable scalars the registered loss receives (``LossSpec.params``)."""
    params = losses.get_loss(config.loss.name).params
    if params == "scale_bias":
        scale, bias = model.siglip()
        return {"scale": scale, "bias": bias}
    if params == "temperature":
        return {"temperature": _temperature(config, model)}
    return {}


def _loss_inputs(config: ml_collections.ConfigDict, rng, step) -> dict[str, jax.Array]:
    """The step's PRNG key and / or number of completed steps, if the registered loss asks
    (``LossSpec.inputs``)."""
    inputs = losses.get_loss(config.loss.name).inputs
    return {name: v for name, v in (("key", rng), ("step", step)) if name in inputs}


def _temperature(config: ml_collections.ConfigDict, model: GramModel) -> jax.Array:
    """The model's learnable temperature, or the constant ``model.temperature_init`` when
    ``model.learn_temperature`` is False."""
    if config.model.learn_temperature:
        return model.temperature()
    return jnp.asarray(config.model.temperature_init, jnp.float32)


@dataclasses.dataclass
class Task(abc.ABC):
    """Base: see the module docstring."""

    config: ml_collections.ConfigDict
    mesh: Mesh | None = None

    @abc.abstractmethod
    def embed(self, model: nnx.Module, batch: dict) -> Any:
        """The model's outputs for ``batch`` that :meth:`loss` consumes."""

    @abc.abstractmethod
    def loss(
        self, model: nnx.Module, emb: Any, batch: dict, rng, step: jax.Array | int = 0
    ) -> tuple[jax.Array, dict]:
        """``(scalar loss, metrics)`` of the embeddings of one (micro)batch; ``rng`` is the
        step's PRNG key, ``step`` the number of completed training steps."""

    def model_inputs(self, batch: dict) -> dict:
        """The batch entries the model reads (modalities and their ``<m>_mask``)."""
        names = set(self.config.model.modalities.keys())
        keep = names | {f"{m}_mask" for m in names}
        return {k: v for k, v in batch.items() if k in keep}


@dataclasses.dataclass
class GramTask(Task):
    """GramModel towers with a one-view registered loss (``gram``, ``infonce``, ``siglip``,
    ...) on (anchor, others), + optional DAM."""

    def __post_init__(self):
        self._fn = _loss_fn(self.config, self.mesh)

    def embed(self, model: GramModel, batch: dict) -> Any:
        out = model(self.model_inputs(batch))
        emb = {"z": out["embeddings"]}
        if self.config.loss.dam_weight > 0:
            emb["enc"] = out["encoder_outputs"]
        return emb

    def loss(
        self, model: GramModel, emb: Any, batch: dict, rng, step: jax.Array | int = 0
    ) -> tuple[jax.Array, dict]:
        z = emb["z"]
        anchor = z[model.anchor]
        others = [z[m] for m in model.others]
        loss, metrics = self._fn(
            anchor,
            others,
            **_loss_params(self.config, model),
            **_loss_inputs(self.config, rng, step),
        )
        metrics = dict(metrics)
        w = self.config.loss.dam_weight
        if w > 0:
            outputs = {
                "embeddings": z,
                "encoder_outputs": emb["enc"],
            }
            # Hard negatives are drawn from the volumes; no gradient flows through sampling.
            vol = jax.lax.stop_gradient(model.pairwise_volume(outputs))
            dam, dam_metrics = losses.dam_loss(
                rng,
                vol,
                jax.lax.stop_gradient(_temperature(self.config, model)),
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
    """GramModel towers on two augmented views with a two-view registered loss
    (:func:`gram_jax.losses.cross_self_loss`) on the per-modality lists of each view."""

    def __post_init__(self):
        self._fn = _loss_fn(self.config, self.mesh)

    def embed(self, model: GramModel, batch: dict) -> Any:
        z1 = model(self.model_inputs(batch["view1"]))["embeddings"]
        z2 = model(self.model_inputs(batch["view2"]))["embeddings"]
        return {"z1": z1, "z2": z2}

    def loss(
        self, model: GramModel, emb: Any, batch: dict, rng, step: jax.Array | int = 0
    ) -> tuple[jax.Array, dict]:
        mods = model.modalities
        view1, view2 = [emb["z1"][m] for m in mods], [emb["z2"][m] for m in mods]
        loss, metrics = self._fn(view1, view2, **_loss_params(self.config, model))
        return loss, dict(metrics)


@dataclasses.dataclass
class CoMMTask(Task):
    """CoMMModel on two augmented views with a registered ``comm``-model loss
    (:func:`gram_jax.losses.comm_loss`) on the P mask patterns' embeddings of each view."""

    def __post_init__(self):
        self._fn = _loss_fn(self.config, self.mesh)

    def embed(self, model: CoMMModel, batch: dict) -> Any:
        # (P, B, d) per view -> (B, P, d): the batch must lead for microbatching.
        z1 = model(self.model_inputs(batch["view1"]))["embeddings"]
        z2 = model(self.model_inputs(batch["view2"]))["embeddings"]
        return {"z1": jnp.swapaxes(z1, 0, 1), "z2": jnp.swapaxes(z2, 0, 1)}

    def loss(
        self, model: CoMMModel, emb: Any, batch: dict, rng, step: jax.Array | int = 0
    ) -> tuple[jax.Array, dict]:
        # (B, P, d) -> P arrays (B, d): the batch still leads, so shard_map splits it.
        view1 = [emb["z1"][:, p] for p in range(emb["z1"].shape[1])]
        view2 = [emb["z2"][:, p] for p in range(emb["z2"].shape[1])]
        loss, metrics = self._fn(view1, view2, **_loss_params(self.config, model))
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
    """The task of a config: its model kind and whether its registered loss takes two views."""
    if config.model.kind == "comm":
        return CoMMTask(config, mesh)
    if losses.get_loss(config.loss.name).two_views:
        return CrossSelfTask(config, mesh)
    return GramTask(config, mesh)
