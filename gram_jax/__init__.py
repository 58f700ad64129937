"""gram-jax: multimodal representation alignment in JAX.

GRAM (Gramian Representation Alignment Measure, ICLR 2025) scores how well k >= 2 modality
embeddings of one item agree by the volume of the parallelotope they span,
``vol = sqrt(det(A A^T))`` over the L2-normalised embeddings stacked in ``A`` (k x D): small
volume = aligned. CoMM (ICLR 2025) aligns a fused multimodal embedding of two augmented views
with each other and with each single-modality view.

Pure functions (jit / vmap / grad / shard_map safe):

- volumes: :func:`gram_volume`, :func:`pairwise_volume`, :func:`pairwise_gram_det`,
  :func:`span_distance`, :func:`safe_sqrt`
- losses: :func:`gram_contrastive_loss`, :func:`dam_loss`, :func:`infonce_loss`,
  :func:`siglip_loss`, :func:`comm_loss`, :func:`cross_self_loss`, :func:`nt_xent`;
  :func:`register_loss` makes a new one trainable from a config (``gram_jax.losses.LOSSES``)
- retrieval: :func:`retrieval_metrics`, :func:`retrieval_scores`, :func:`chunked_retrieval`
- meshes: :func:`make_mesh`, :func:`data_sharding`, :func:`replicated`,
  :func:`check_batch_divisible`, :func:`global_loss` (every loss also takes ``axis_name=...,
  impl="all_gather" | "ring" | "ring_checkpoint"`` inside a user's own ``jax.shard_map``)

Models (Flax NNX), data (TFDS + Grain) and the trainer live in ``gram_jax.models``,
``gram_jax.data`` and ``gram_jax.training``.
"""

from gram_jax._lazy import lazy_exports as _lazy_exports
from gram_jax.distributed import (
    check_batch_divisible,
    data_sharding,
    global_loss,
    make_mesh,
    replicated,
)
from gram_jax.losses import (
    comm_loss,
    cross_self_loss,
    dam_loss,
    gram_contrastive_loss,
    infonce_loss,
    l2_normalize,
    log_temperature_init,
    nt_xent,
    register_loss,
    sample_hard_negatives,
    siglip_loss,
    smoothed_cross_entropy,
    temperature_from_log,
)
from gram_jax.metrics import (
    chunked_retrieval,
    metrics_from_ranks,
    positive_ranks,
    retrieval_metrics,
    retrieval_scores,
)
from gram_jax.volume import (
    candidate_gram,
    gram_volume,
    pairwise_gram_det,
    pairwise_volume,
    safe_sqrt,
    span_distance,
)

__version__ = "0.1.0"

__all__ = [
    "candidate_gram",
    "check_batch_divisible",
    "chunked_retrieval",
    "comm_loss",
    "cross_self_loss",
    "dam_loss",
    "data_sharding",
    "global_loss",
    "gram_contrastive_loss",
    "gram_volume",
    "infonce_loss",
    "l2_normalize",
    "log_temperature_init",
    "make_mesh",
    "metrics_from_ranks",
    "nt_xent",
    "pairwise_gram_det",
    "pairwise_volume",
    "positive_ranks",
    "register_loss",
    "replicated",
    "retrieval_metrics",
    "retrieval_scores",
    "safe_sqrt",
    "sample_hard_negatives",
    "siglip_loss",
    "smoothed_cross_entropy",
    "span_distance",
    "temperature_from_log",
]


# register_modality lives with the models and data layers (Flax, TFDS): import on use so
# that `import gram_jax` stays the light functional core.
__getattr__ = _lazy_exports(__name__, {"register_modality": "gram_jax.modalities"})
