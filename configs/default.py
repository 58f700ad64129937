"""GRAM on synthetic_trimodal with tiny encoders: the 2-CPU-core default (< 10 min).

Text is the anchor; image and audio are the candidates. A caption identifies its item only
through image AND audio together (gram_jax/data/synthetic.py), so text -> (image, audio)
retrieval by volume is the measure that matters.
"""

from gram_jax.training.config import base_config


def get_config():
    c = base_config()
    c.name = "default"
    c.loss.name = "gram"
    c.train.steps = 600
    c.train.batch_size = 128
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 50
    c.optim.schedule = "cosine"
    c.train.log_every = 25
    c.train.checkpoint_every = 200
    return c
