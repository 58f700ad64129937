"""A user's own TFDS builder, registered from a config file, trains end to end."""

import json
import textwrap

import pytest

from gram_jax.data import register_dataset
from gram_jax.training.config import load_config

# What the README's "Train on your own data" section tells a user to write.
USER_CONFIG = '''
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from gram_jax.data import LocalBuilder, register_dataset
from gram_jax.training.config import base_config, modality


@dataclasses.dataclass
class PairsConfig(tfds.core.BuilderConfig):
    size: int = 96


class ToyPairs(LocalBuilder, skip_registration=True):
    """Two 'modalities' that are noisy linear views of one latent vector."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [PairsConfig(name="default")]

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "left": tfds.features.Tensor(shape=(8,), dtype=np.float32),
                "right": tfds.features.Tensor(shape=(12,), dtype=np.float32),
                "index": tfds.features.Scalar(dtype=np.int32),
            }),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0), "test": self._generate_examples(1)}

    def _generate_examples(self, seed):
        rng = np.random.default_rng(seed)
        proj = np.random.default_rng(42).standard_normal((2, 6, 12)).astype(np.float32)
        for i in range(self.builder_config.size):
            z = rng.standard_normal(6).astype(np.float32)
            yield i, {"left": z @ proj[0, :, :8], "right": z @ proj[1], "index": i}


register_dataset("toy_pairs", ToyPairs, PairsConfig)


def get_config():
    c = base_config()
    c.data.name = "toy_pairs"
    c.model.modalities = {
        "left": modality("features", "tiny", in_features=8, depth=0),
        "right": modality("features", "tiny", in_features=12, depth=0),
    }
    c.model.anchor = "left"
    c.train.batch_size = 16
    c.train.steps = 4
    c.train.checkpoint_every = 4
    c.train.progress_bar = False
    c.optim.warmup_steps = 1
    c.eval.batch_size = 32
    return c
'''


def test_user_builder_registered_in_a_config_file_trains(tmp_path):
    from gram_jax.training.loop import train

    path = tmp_path / "my_config.py"
    path.write_text(textwrap.dedent(USER_CONFIG))
    overrides = [f"data.data_dir={tmp_path / 'data'}", "data.builder={'size': 64}"]
    config = load_config(str(path), overrides)
    # Loading the file twice (e.g. a restart in the same process) must not clash.
    config = load_config(str(path), overrides)
    train(config, tmp_path / "run")
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["chance/R@1"] == pytest.approx(100 / 64)
    assert 0.0 <= final["retrieval/left_to_rest/volume/R@1"] <= 100.0
    assert (tmp_path / "data" / "toy_pairs").is_dir()


def test_register_dataset_rejects_builtin_names_and_non_builders():
    from gram_jax.data import LocalBuilder

    with pytest.raises(ValueError, match="built-in"):
        register_dataset("trifeature", LocalBuilder, object)
    with pytest.raises(TypeError, match="DatasetBuilder"):
        register_dataset("mine", dict, object)
