"""The n-modal family on synthetic_trimodal with tiny encoders: the 2-CPU-core default.

Text is the anchor; image and audio are the candidates. A caption identifies its item only
through image AND audio together (gram_jax/data/synthetic.py), so text -> (image, audio)
retrieval is the measure that matters.

Variants, ``--config configs/synthetic.py:<arg>`` with ``<arg>`` comma-separated
``key=value``; ``python train.py`` runs the default, ``method=triangle`` (the best
GRAM-family recipe of ``experiments/nmodal_study.py``, README "Which loss should I use?")::

    configs/synthetic.py:method=gram           the authors' GRAM: volume loss, their no-grad
                                               gather (loss.gradient=faithful)
    configs/synthetic.py:method=gram_exact     the same loss with its exact gradient
    configs/synthetic.py:method=gram_infonce   GRAM + anchored InfoNCE, weight 0.5 each
    configs/synthetic.py:method=gram_handover  InfoNCE warm-up handing over to GRAM (200 steps)
    configs/synthetic.py:method=simplex        the simplex volume (sign-aware; docs/nmodal.md)
    configs/synthetic.py:method=triangle       TRIANGLE: the authors' area score and loss
    configs/synthetic.py:method=symile         Symile's multilinear inner product
    configs/synthetic.py:method=infonce        anchored InfoNCE: text-image + text-audio CLIP
                                               losses (ImageBind / LanguageBind style: no term
                                               sees image and audio together)
    configs/synthetic.py:method=infonce_all    InfoNCE over all pairs (image-audio too)
    configs/synthetic.py:method=siglip         SigLIP's sigmoid loss, anchored pairs
    configs/synthetic.py:method=comm           CoMM: fuses the tokens of all modalities, two
                                               "light" augmented views, NT-Xent between views
                                               (tau 0.1), weight decay 1e-4 on matrices
    configs/synthetic.py:scale=pod             the same method at TPU-pod size (below)

The run name is ``<method>_synthetic``. The GRAM-family losses use label smoothing 0.1 (the
authors'); so do both InfoNCE variants, so only the score differs.

Every method shares the data, encoders, seed, steps, batch and optimiser; only the loss (and
CoMM's model) changes. CoMM's retrieval reads its projected space: text-alone embeddings
against the single-modality image/audio embeddings and against the fused image+audio
embedding (``fused_cosine``).

``scale=pod``: base-size encoders (ViT-B/12 trunks: 768 wide, 12 blocks) for text (64 tokens,
32k vocab), 224 x 224 images (16 x 16 patches: 196 tokens) and 512 x 128 log-mel audio
(16 x 16 patches: 256 tokens); global batch 4096 sharded over a ``data x fsdp`` mesh (fsdp =
4: parameters and optimiser moments split four ways, each data-parallel group of 4 chips
holds one copy); bf16 compute (parameters and the loss in float32); the ring loss (per-chip
memory O((B/n)^2)); GRAM's optimiser (AdamW 0.9/0.98, eps 1e-6, wd 0.01, warmup 10 % then
linear decay) with gradient clipping. On a v5e-256 the mesh is 64 x 4 and every chip sees 16
examples per step. Checked on CPU by lowering and compiling the step (tests/test_training.py).
Run on every host: ``python train.py --config configs/synthetic.py:scale=pod
--config.distributed.initialize=True --workdir gs://...`` (``jax.distributed.initialize``
discovers the pod); swap in your own TFDS builder through ``data.name``.
"""

from gram_jax.training.config import base_config, modality, parse_arg

# Every loss of the study (experiments/nmodal_study.py) as a method: its config.loss keys.
# The rest of the config (data, encoders, optimiser, steps, batch) is the same for all.
LOSS_RECIPES: dict[str, dict] = {
    "gram": {"loss.name": "gram", "loss.gradient": "faithful"},  # the authors' GRAM
    "gram_exact": {"loss.name": "gram"},  # the same loss, its exact gradient
    "gram_infonce": {  # GRAM + an anchored-InfoNCE term at a constant weight
        "loss.name": "gram+infonce", "loss.infonce_weight": 0.5, "loss.infonce_weight_end": 0.5,
    },
    "gram_handover": {"loss.name": "gram+infonce"},  # InfoNCE warm-up 1 -> 0 over 200 steps
    "simplex": {"loss.name": "simplex"},
    "triangle": {"loss.name": "triangle"},
    "symile": {"loss.name": "symile"},
    # label smoothing 0.1 as GRAM's, so only the score differs
    "infonce": {"loss.name": "infonce", "loss.pairs": "anchored", "loss.label_smoothing": 0.1},
    "infonce_all": {"loss.name": "infonce", "loss.pairs": "all", "loss.label_smoothing": 0.1},
    "siglip": {"loss.name": "siglip"},
}  # fmt: skip
METHODS = (*LOSS_RECIPES, "comm")
DEFAULT_METHOD = "triangle"
SCALES = ("cpu", "pod")
# The schedule of each scale, side by side: dotted key -> (cpu, pod).
SCHEDULE = {
    "train.steps": (600, 50_000),
    "train.batch_size": (128, 4096),
    "train.log_every": (25, 100),
    "train.checkpoint_every": (200, 2_000),
    "optim.lr": (1e-3, 1e-4),
    "optim.warmup_steps": (50, 5_000),
    "optim.schedule": ("cosine", "linear"),
}


def comm(c) -> None:
    """CoMM's model, views and decay rule on ``c`` (its modalities and encoders unchanged)."""
    c.model.kind = "comm"
    c.model.fusion_width = 64
    c.model.fusion_depth = 1
    c.model.fusion_heads = 8
    c.model.projector_dims = (256, 128)
    c.loss.name = "comm"
    c.loss.nt_xent_temperature = 0.1
    c.data.two_views = True
    c.data.augment = "light"
    c.optim.weight_decay = 1e-4  # CoMM's decay rule: wd 1e-4 on matrices only


def _method(c, method: str) -> None:
    if method == "comm":
        comm(c)
    else:
        c.update_from_flattened_dict(LOSS_RECIPES[method])


def _pod(c) -> None:
    c.model.modalities = {
        "text": modality("text", "base", vocab_size=32768),
        "image": modality("image", "base", patch_size=16),
        "audio": modality("audio", "base", n_mels=128, audio_patch=(16, 16)),
    }
    c.model.embed_dim = 512
    c.model.dtype = "bfloat16"
    c.data.builder = {
        "image_size": 224,
        "n_frames": 512,
        "n_mels": 128,
        "text_length": 64,
        "train_size": 100_000,
    }
    c.data.worker_count = 8
    c.loss.impl = "ring"
    c.train.keep_checkpoints = 3
    c.train.eval_every = 5_000
    c.optim.clip_norm = 1.0
    c.mesh.data = -1
    c.mesh.fsdp = 4
    c.mesh.params = "fsdp"
    c.eval.batch_size = 1024
    c.eval.max_examples = 8192


def get_config(arg=None):
    arg = parse_arg(arg, {"method": METHODS, "scale": SCALES}, method=DEFAULT_METHOD, scale="cpu")
    c = base_config()
    c.name = f"{arg.method}_synthetic" + ("_pod" if arg.scale == "pod" else "")
    scale = SCALES.index(arg.scale)
    c.update_from_flattened_dict({key: values[scale] for key, values in SCHEDULE.items()})
    if arg.scale == "pod":
        _pod(c)
    _method(c, arg.method)
    return c
