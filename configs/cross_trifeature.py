"""CoMM's "Cross" baseline on Trifeature: CLIP-style InfoNCE between the two unimodal towers.

Same data, encoders, optimiser, batch and probes as
``configs/comm_trifeature.py``; the model is two towers with linear heads to a shared
128-d space and the loss is the symmetric CLIP InfoNCE with a learnable temperature (init
0.07, no label smoothing), as the authors' ``CLIPLoss`` (docs/authors_code.md 11). One augmented
view per pair. Probe features: the concatenated pooled encoder outputs (the authors' Cross
features are concat(e_1, e_2)).
"""

import pathlib

from gram_jax.training.config import config_from_file


def get_config():
    c = config_from_file(pathlib.Path(__file__).with_name("comm_trifeature.py"))
    c.name = "cross_trifeature"
    c.model.kind = "gram"
    c.model.embed_dim = 128
    c.model.temperature_init = 0.07
    c.model.learn_temperature = True
    c.data.two_views = False
    c.loss.name = "infonce"
    c.loss.label_smoothing = 0.0
    c.eval.probe_features = "encoders"
    return c
