"""CoMM's "Cross+Self" baseline on Trifeature (docs/authors_code.md 11).

Two unimodal towers (comm_trifeature's encoders + linear heads to 128-d) on two augmented
views of each pair; loss :func:`gram_jax.losses.cross_self_loss` = cross-modal NT-Xent +
SimCLR NT-Xent per modality between the views (tau 0.1, ssl_scale 1). Data, optimiser,
batch and probes as ``configs/comm_trifeature.py``; probe features are the concatenated
pooled encoder outputs.
"""

import pathlib

from gram_jax.training.config import config_from_file


def get_config():
    c = config_from_file(pathlib.Path(__file__).with_name("comm_trifeature.py"))
    c.name = "cross_self_trifeature"
    c.model.kind = "gram"
    c.model.embed_dim = 128
    c.data.two_views = True
    c.loss.name = "cross_self"
    c.loss.comm_temperature = 0.1
    c.eval.probe_features = "encoders"
    return c
