"""The trainer's evaluation cannot report NaN embeddings as hits (issue 12.5)."""

import textwrap

import numpy as np
import pytest

from gram_jax.data.embeddings import split_rows
from gram_jax.training.config import load_config

# Two "modalities" of one latent vector, GRAM heads on them (configs/gram_embeddings.py, small).
CONFIG = """
from gram_jax.training.config import base_config, modality


def get_config():
    c = base_config()
    feats = dict(in_features=8, width=16, depth=0)
    c.model.modalities = {
        "text": modality("features", "tiny", **feats),
        "video": modality("features", "tiny", **feats),
    }
    c.model.anchor = "text"
    c.model.embed_dim = 8
    c.data.name = "embeddings"
    c.data.builder = {"npz_path": NPZ, "test_fraction": 0.25, "seed": 0}
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.augment = "none"
    c.loss.name = "gram"
    c.train.batch_size = 16
    c.train.steps = 2
    c.train.checkpoint_every = 2
    c.train.progress_bar = False
    c.optim.warmup_steps = 1
    c.eval.batch_size = 16
    c.eval.scores = ("volume", "cosine")
    return c
"""


def test_nan_text_rows_in_the_test_split_are_an_error_not_a_perfect_score(tmp_path):
    from gram_jax.training.loop import train

    rng = np.random.default_rng(0)
    z = rng.standard_normal((64, 8)).astype(np.float32)
    text, video = z + 0.1 * rng.standard_normal(z.shape), z.copy()
    test = split_rows(64, "test", 0.25, 0)
    text[test] = np.nan  # training never sees them; only the evaluation does
    npz = tmp_path / "mine.npz"
    np.savez(npz, text=text.astype(np.float32), video=video)
    path = tmp_path / "my_config.py"
    path.write_text(textwrap.dedent(CONFIG).replace("NPZ", repr(str(npz))))
    config = load_config(str(path), [f"data.data_dir={tmp_path / 'data'}"])
    with pytest.raises(ValueError, match=rf"'test' split.*'text'.*{len(test)} of {len(test)} rows"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "final_metrics.json").exists()
