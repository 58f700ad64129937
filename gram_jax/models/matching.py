"""Data-anchor matching (DAM / ITM) head, for ``gram_jax.losses.dam_loss``.

GRAM scores an (anchor, candidate) pair by running the anchor (text) tokens through BERT with
cross-attention to the candidate's condition sequence (all video and audio tokens), then
``Linear(W, W) -> GELU(erf) -> LayerNorm(eps=1e-12) -> Linear(W, 2)`` on the CLS output
(docs/authors_code.md 3). This head is a small version of that:

    q   = [c ; LN(A a)]                         (B, 1 + La, W)   c: learned CLS query
    kv  = concat_m LN_m(C_m x_m) + e_m           (B, sum Lc_m, W) e_m: learned type embedding
    q  <- Block(q; kv)  (depth times)            self-attn over q (anchor mask), cross-attn
                                                 to kv (candidate masks), MLP; pre-LN
    logits = Linear(LN(GELU(Linear(LN_f(q)_0))))  (B, 2);   class 1 = "match"

Candidates with several modalities (GRAM's video + audio condition) pass a sequence of token
arrays; each modality gets its own input projection and type embedding, as GRAM's
``Linear + LN + type embedding`` per modality.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from gram_jax.models.layers import TransformerBlock, prepend_cls

__all__ = ["MatchingHead"]


class MatchingHead(nnx.Module):
    """Cross-attention matching head giving (B, 2) match logits for (anchor, candidate) pairs.

    Args: ``anchor_width`` (width of the anchor tokens), ``candidate_widths`` (int or one int
    per candidate modality), ``width`` (head width, default ``anchor_width``), ``num_heads``,
    ``depth`` (cross-attention blocks), ``mlp_ratio``.
    """

    def __init__(
        self,
        anchor_width: int,
        candidate_widths: int | Sequence[int],
        *,
        width: int | None = None,
        num_heads: int = 4,
        depth: int = 1,
        mlp_ratio: float = 4.0,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if isinstance(candidate_widths, int):
            candidate_widths = (candidate_widths,)
        candidate_widths = tuple(candidate_widths)
        if not candidate_widths:
            raise ValueError("MatchingHead needs at least one candidate modality width")
        width = anchor_width if width is None else width
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.width = width
        self.num_candidates = len(candidate_widths)
        self.anchor_in = nnx.Linear(anchor_width, width, **kw)
        self.anchor_ln = nnx.LayerNorm(width, **kw)
        self.cand_in = nnx.List([nnx.Linear(cw, width, **kw) for cw in candidate_widths])
        self.cand_ln = nnx.List([nnx.LayerNorm(width, **kw) for _ in candidate_widths])
        normal = nnx.initializers.normal(0.02)
        self.type_embed = nnx.Param(
            normal(rngs.params(), (len(candidate_widths), width), param_dtype)
        )
        self.cls_token = nnx.Param(normal(rngs.params(), (1, 1, width), param_dtype))
        self.blocks = nnx.List(
            [
                TransformerBlock(
                    width,
                    num_heads,
                    int(round(mlp_ratio * width)),
                    cross_attention=True,
                    num_layers=depth,
                    **kw,
                )
                for _ in range(depth)
            ]
        )
        self.ln_f = nnx.LayerNorm(width, **kw)
        self.fc = nnx.Linear(width, width, **kw)
        self.fc_ln = nnx.LayerNorm(width, epsilon=1e-12, **kw)
        self.out = nnx.Linear(width, 2, **kw)

    def __call__(
        self,
        anchor_tokens: Float[Array, "b la wa"],
        anchor_mask: Bool[Array, "b la"] | None,
        candidate_tokens: Float[Array, "b lc wc"] | Sequence[Float[Array, "b lc wc"]],
        candidate_mask: Bool[Array, "b lc"] | Sequence[Bool[Array, "b lc"] | None] | None,
    ) -> Float[Array, "b 2"]:
        if not isinstance(candidate_tokens, list | tuple):
            candidate_tokens = [candidate_tokens]
            candidate_mask = [candidate_mask]
        elif candidate_mask is None:
            candidate_mask = [None] * len(candidate_tokens)
        if len(candidate_tokens) != self.num_candidates or len(candidate_mask) != len(
            candidate_tokens
        ):
            raise ValueError(
                f"MatchingHead was built for {self.num_candidates} candidate modalities, got "
                f"{len(candidate_tokens)} token arrays and {len(candidate_mask)} masks"
            )
        if jnp.ndim(anchor_tokens) != 3:
            raise ValueError(f"anchor_tokens must be (B, La, W), got {jnp.shape(anchor_tokens)}")
        b = anchor_tokens.shape[0]
        if anchor_mask is None:
            anchor_mask = jnp.ones(anchor_tokens.shape[:2], bool)
        kv, kv_mask = [], []
        for i, (tok, msk) in enumerate(zip(candidate_tokens, candidate_mask, strict=True)):
            if jnp.ndim(tok) != 3 or tok.shape[0] != b:
                raise ValueError(
                    f"candidate_tokens[{i}] must be (B={b}, Lc, W), got {jnp.shape(tok)}"
                )
            h = self.cand_ln[i](self.cand_in[i](tok))
            kv.append(h + self.type_embed[...][i].astype(h.dtype))
            kv_mask.append(jnp.ones(tok.shape[:2], bool) if msk is None else msk.astype(bool))
        context = jnp.concatenate(kv, axis=1)
        context_mask = jnp.concatenate(kv_mask, axis=1)
        q = self.anchor_ln(self.anchor_in(anchor_tokens))
        q, q_mask = prepend_cls(self.cls_token[...], q, anchor_mask)
        for block in self.blocks:
            q = block(q, key_mask=q_mask, context=context, context_mask=context_mask)
        pooled = self.ln_f(q)[:, 0]
        h = self.fc_ln(jax.nn.gelu(self.fc(pooled), approximate=False))
        return self.out(h).astype(jnp.float32)
