"""GRAM's volume loss on Trifeature (k = 2: the volume is sin of the angle between the two).

Two unimodal towers (comm_trifeature's encoders + linear heads to 128-d), GRAM contrastive loss
(learnable temperature init 0.07, label smoothing 0.1, as the authors), one augmented view per
pair. Data, optimiser, batch and probes as ``configs/comm_trifeature.py``; probe features are
the concatenated pooled encoder outputs (as the Cross baselines).
"""

import pathlib

from gram_jax.training.config import config_from_file


def get_config():
    c = config_from_file(pathlib.Path(__file__).with_name("comm_trifeature.py"))
    c.name = "gram_trifeature"
    c.model.kind = "gram"
    c.model.embed_dim = 128
    c.model.temperature_init = 0.07
    c.data.two_views = False
    c.loss.name = "gram"
    c.loss.label_smoothing = 0.1
    c.eval.probe_features = "encoders"
    return c
