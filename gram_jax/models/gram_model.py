"""``TowerModel``: per-modality encoders + projection heads with a named anchor modality.

    z_m = ProjectionHead_m(Encoder_m(x_m).pooled)        (B, D), ||z_m|| = 1

One tower per modality, scored by whichever loss the task uses (GRAM volume, InfoNCE,
SigLIP, Cross+Self); ``GramModel`` is its former name, kept as an alias. The anchor (text in
GRAM) is row 0 of every Gram matrix; the other modalities form the candidates. Every example
has every modality: there is no presence mask (a zero vector standing in for a missing
modality would score as a perfect volume-0 match).

Inputs are a dict ``{modality: array, "<modality>_mask": bool (B, L) (optional)}``; any other
key raises ``ValueError`` (filter batches with :meth:`TowerModel.select_inputs`). Modalities
of the model missing from the inputs are skipped, except the anchor, which is required.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flax import nnx
from jaxtyping import Array, Float, Int

from gram_jax.models.encoders import EncoderOutput
from gram_jax.models.heads import LearnableTemperature, ProjectionHead
from gram_jax.models.matching import MatchingHead
from gram_jax.volume import pairwise_volume

__all__ = ["GramModel", "TowerModel", "split_inputs"]


def split_inputs(
    inputs: Mapping[str, Any], modalities: Sequence[str]
) -> tuple[dict[str, Array], dict[str, Array]]:
    """Split a batch dict into (modality arrays, ``<modality>_mask`` arrays).

    Raises ``ValueError`` on a key that is neither a known modality nor its ``_mask``.
    """
    arrays, masks = {}, {}
    for key, value in inputs.items():
        if key in modalities:
            arrays[key] = value
        elif key.endswith("_mask") and key[: -len("_mask")] in modalities:
            masks[key[: -len("_mask")]] = value
        else:
            raise ValueError(
                f"unknown modality key {key!r}; this model has modalities {list(modalities)} "
                "(and optional '<modality>_mask' keys)"
            )
    return arrays, masks


class TowerModel(nnx.Module):
    """Modality encoders + projection heads to a shared ``embed_dim``, anchor ``anchor``.

    Args:
      encoders: modality name -> encoder (any module returning :class:`EncoderOutput` and
        exposing ``.width``).
      embed_dim: shared embedding dimension D.
      anchor: the anchor modality (a key of ``encoders``).
      temperature_init: initial value of the learnable temperature (``self.temperature()``).
      matching_head: optional :class:`MatchingHead` for the DAM loss (``self.matching``).
    """

    def __init__(
        self,
        encoders: Mapping[str, nnx.Module],
        embed_dim: int,
        anchor: str,
        *,
        rngs: nnx.Rngs,
        temperature_init: float = 0.07,
        matching_head: MatchingHead | None = None,
    ):
        if not encoders:
            raise ValueError("TowerModel needs at least one encoder")
        if anchor not in encoders:
            raise ValueError(f"anchor {anchor!r} is not one of the encoders {list(encoders)}")
        self.modalities = tuple(encoders)
        self.anchor = anchor
        self.others = tuple(m for m in self.modalities if m != anchor)
        self.embed_dim = embed_dim
        self.encoders = nnx.Dict(dict(encoders))
        self.heads = nnx.Dict(
            {m: ProjectionHead(enc.width, embed_dim, rngs=rngs) for m, enc in encoders.items()}
        )
        self.temperature = LearnableTemperature(temperature_init)
        self.matching = matching_head

    def select_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of ``batch`` this model consumes (modalities and their ``_mask``)."""
        keep = set(self.modalities) | {f"{m}_mask" for m in self.modalities}
        return {k: v for k, v in batch.items() if k in keep}

    def __call__(self, inputs: Mapping[str, Array]) -> dict[str, Any]:
        """Encode and project every modality in ``inputs``.

        Returns ``{"embeddings": {m: (B, D)}, "encoder_outputs": {m: EncoderOutput}}``.
        """
        arrays, masks = split_inputs(inputs, self.modalities)
        if self.anchor not in arrays:
            raise ValueError(f"the anchor modality {self.anchor!r} is missing from the inputs")
        embeddings, outputs = {}, {}
        for m in self.modalities:
            if m not in arrays:
                continue
            out: EncoderOutput = self.encoders[m](arrays[m], masks.get(m))
            embeddings[m] = self.heads[m](out.pooled)
            outputs[m] = out
        return {"embeddings": embeddings, "encoder_outputs": outputs}

    def pairwise_volume(
        self,
        outputs: Mapping[str, Any],
        *,
        anchor_embeddings: Float[Array, "b1 d"] | None = None,
        other_embeddings: Mapping[str, Float[Array, "b2 d"]] | None = None,
    ) -> Float[Array, "b1 b2"]:
        """Volumes (B1, B2) of anchor i with the other modalities of candidate j.

        Uses ``outputs`` from :meth:`__call__`. ``anchor_embeddings`` / ``other_embeddings``
        override the respective entries (e.g. stop-gradient or all-gathered copies).
        """
        emb = outputs["embeddings"]
        others = [m for m in self.others if m in emb]
        if not others:
            raise ValueError("pairwise_volume needs at least one non-anchor modality")
        a = emb[self.anchor] if anchor_embeddings is None else anchor_embeddings
        xs = [emb[m] if other_embeddings is None else other_embeddings[m] for m in others]
        return pairwise_volume(a, *xs)

    def match_logits(
        self,
        outputs: Mapping[str, Any],
        anchor_idx: Int[Array, " p"],
        candidate_idx: Int[Array, " p"],
    ) -> Float[Array, "p 2"]:
        """DAM logits (P, 2) of pairs (anchor ``anchor_idx[p]``, candidate ``candidate_idx[p]``).

        The candidate is the concatenated token sequences of every other modality (padding
        tokens masked out). Needs ``matching_head``.
        """
        if self.matching is None:
            raise ValueError("this TowerModel was built without a matching_head")
        enc = outputs["encoder_outputs"]
        a = enc[self.anchor]
        others = [m for m in self.others if m in enc]
        toks, msks = [], []
        for m in others:
            o = enc[m]
            toks.append(o.tokens[candidate_idx])
            msks.append(o.token_mask[candidate_idx])
        return self.matching(a.tokens[anchor_idx], a.token_mask[anchor_idx], toks, msks)


# The former name, from when the model served only the GRAM loss.
GramModel = TowerModel
