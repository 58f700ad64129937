"""A realistic TPU-pod GRAM configuration (checked on CPU by lowering + compiling the step).

Base-size encoders (ViT-B/12 trunks: 768 wide, 12 blocks) for text (64 tokens, 32k vocab),
224 x 224 images (16 x 16 patches: 196 tokens) and 512 x 128 log-mel audio (16 x 16 patches:
256 tokens); global batch 4096 sharded over a ``data x fsdp`` mesh (fsdp = 4: parameters and
optimiser moments split four ways, each data-parallel group of 4 chips holds one copy);
bf16 compute (parameters and the loss in float32); the ring loss (per-chip memory
O((B/n)^2), docs/design.md 4); GRAM's optimiser (AdamW 0.9/0.98, eps 1e-6, wd 0.01,
warmup 10 % then linear decay) with gradient clipping. On a v5e-256 the mesh is 64 x 4 and
every chip sees 16 examples per step.

Run on every host: ``python train.py --config configs/tpu_pod_base.py
--config.distributed.initialize=True --workdir gs://...`` (``jax.distributed.initialize``
discovers the pod). The dataset is synthetic_trimodal rendered at pod resolution; swap in
your own TFDS builder through ``data.name``.
"""

from gram_jax.training.config import base_config, modality


def get_config():
    c = base_config()
    c.name = "tpu_pod_base"
    c.model.modalities = {
        "text": modality("text", "base", vocab_size=32768),
        "image": modality("image", "base", patch_size=16),
        "audio": modality("audio", "base", n_mels=128, audio_patch=(16, 16)),
    }
    c.model.anchor = "text"
    c.model.embed_dim = 512
    c.model.dtype = "bfloat16"
    c.data.name = "synthetic_trimodal"
    c.data.builder = {
        "image_size": 224,
        "n_frames": 512,
        "n_mels": 128,
        "text_length": 64,
        "train_size": 100_000,
    }
    c.data.worker_count = 8
    c.loss.name = "gram"
    c.loss.impl = "ring"
    c.loss.label_smoothing = 0.1
    c.train.batch_size = 4096
    c.train.steps = 50_000
    c.train.log_every = 100
    c.train.checkpoint_every = 2_000
    c.train.keep_checkpoints = 3
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 5_000
    c.optim.schedule = "linear"
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.mesh.data = -1
    c.mesh.fsdp = 4
    c.mesh.params = "fsdp"
    c.eval.batch_size = 1024
    c.eval.max_examples = 8192
    c.train.eval_every = 5_000
    return c
