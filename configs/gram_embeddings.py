"""GRAM projection heads on frozen precomputed embeddings (the quickest way to try GRAM).

Each modality is a vector of an ``.npz`` file with aligned rows (default: the MSR-VTT test
embeddings of GRAM's step-0 checkpoint, ``text``/``video``/``audio`` of shape (884, 512)).
The "encoders" are the 512-d inputs themselves through one linear map + LayerNorm (the
``features`` encoder with depth 0), then GRAM's bias-free projection head; the volume loss
aligns them. Point ``--config.data.builder.npz_path`` at your own file (any keys; set
``model.modalities`` to match, ``in_features`` to the vector size).

Variant ``configs/gram_embeddings.py:subtitles=True``: the fixture's fourth modality
(``subtitles``) as a third candidate, k = 4 (the setting of ``experiments/nmodal_study.py``).
"""

import pathlib

from gram_jax.training.config import base_config, modality, parse_arg

FIXTURE = (
    pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "msrvtt884_gram_step0.npz"
)


def get_config(arg=None):
    arg = parse_arg(arg, subtitles=False)
    c = base_config()
    c.name = "gram_embeddings"
    feats = dict(in_features=512, width=256, depth=0)
    c.model.modalities = {
        "text": modality("features", "tiny", **feats),
        "video": modality("features", "tiny", **feats),
        "audio": modality("features", "tiny", **feats),
    }
    if arg.subtitles:
        c.model.modalities["subtitles"] = modality("features", "tiny", **feats)
    c.model.anchor = "text"
    c.model.embed_dim = 256
    c.data.name = "embeddings"
    c.data.builder = {"npz_path": str(FIXTURE), "test_fraction": 0.25, "seed": 0}
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.augment = "none"
    c.loss.name = "gram"
    c.train.batch_size = 64
    c.train.steps = 300
    c.train.checkpoint_every = 100
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 30
    c.eval.batch_size = 64
    return c
