"""GRAM's volume loss on Trifeature (k = 2: the volume is sin of the angle between the two).

Two unimodal towers (comm_trifeature's encoders + linear heads to 128-d), GRAM contrastive loss
(learnable temperature init 0.07, label smoothing 0.1, as the authors), one augmented view per
pair. Data, optimiser, batch and probes as ``configs/comm_trifeature.py``; probe features are
the concatenated pooled encoder outputs (as the Cross baselines).
"""

import importlib.util
import pathlib


def _comm_config():
    path = pathlib.Path(__file__).with_name("comm_trifeature.py")
    spec = importlib.util.spec_from_file_location("_comm_trifeature", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _comm_config()
    c.name = "gram_trifeature"
    c.model.kind = "gram"
    c.model.embed_dim = 128
    c.model.temperature_init = 0.07
    c.data.two_views = False
    c.loss.name = "gram"
    c.loss.label_smoothing = 0.1
    c.eval.probe_features = "encoders"
    return c
