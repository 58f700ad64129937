"""The modality-kind registry: a user's depth-map kind, registered from a config file, trains
end to end; kinds are never guessed; the video kind has a working data path."""

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gram_jax import data, modalities
from gram_jax.models import ImageConfig, build_encoder
from gram_jax.training.config import ConfigError, load_config, validate

# Everything a user writes to add depth maps: a kind (conversion, augmentation, abstract spec,
# encoder + its config dataclass) and a dataset carrying it, in one config file.
USER_CONFIG = '''
import dataclasses

import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from flax import nnx

from gram_jax import register_modality
from gram_jax.data import LocalBuilder, register_dataset
from gram_jax.models import EncoderConfig, EncoderOutput
from gram_jax.training.config import base_config, modality


@dataclasses.dataclass(frozen=True)
class DepthConfig(EncoderConfig):
    patch_size: int = 4
    max_depth: float = 10.0  # metres: depths are divided by it


class DepthEncoder(nnx.Module):
    """(B, H, W, 1) depth -> p x p patch tokens (B, N, W), mean-pooled."""

    def __init__(self, cfg: DepthConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.width = cfg.width
        self.embed = nnx.Linear(cfg.patch_size**2, cfg.width, rngs=rngs)
        self.norm = nnx.LayerNorm(cfg.width, rngs=rngs)

    def __call__(self, x, mask=None):
        b, h, w, _ = x.shape
        p = self.cfg.patch_size
        x = x.reshape(b, h // p, p, w // p, p).transpose(0, 1, 3, 2, 4)
        tokens = self.norm(self.embed(x.reshape(b, -1, p * p)))
        valid = jnp.ones(tokens.shape[:2], bool)
        return EncoderOutput(tokens, valid, tokens.mean(1), grid=(h // p, w // p))


def convert_depth(name, value):
    x = np.asarray(value, np.float32)
    if x.ndim != 2:
        raise ValueError(f"modality {name!r}: expected an (H, W) depth map, got {x.shape}")
    return (x / 10.0)[..., None]


def depth_spec(shape, dtype):
    return (*shape, 1), np.float32


@dataclasses.dataclass(frozen=True)
class DepthAug:
    flip_p: float = 0.5
    noise_std: float = 0.01

    def __call__(self, x, rng):
        if rng.random() < self.flip_p:
            x = x[:, ::-1]
        return (x + rng.normal(0.0, self.noise_std, x.shape)).astype(np.float32)


register_modality(
    "depth",
    encoder=DepthEncoder,
    config=DepthConfig,
    convert=convert_depth,
    spec=depth_spec,
    augment=DepthAug(),
)


@dataclasses.dataclass
class RGBDConfig(tfds.core.BuilderConfig):
    size: int = 64


class ToyRGBD(LocalBuilder, skip_registration=True):
    """An 8 x 8 colour image and its depth map, both rendered from one latent (x, depth)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [RGBDConfig(name="default")]

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "rgb": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
                "depth": tfds.features.Tensor(shape=(8, 8), dtype=np.float32),
                "index": tfds.features.Scalar(dtype=np.int32),
            }),
            metadata=tfds.core.MetadataDict(modalities={"rgb": "image", "depth": "depth"}),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0), "test": self._generate_examples(1)}

    def _generate_examples(self, seed):
        rng = np.random.default_rng(seed)
        cols = np.arange(8)
        for i in range(self.builder_config.size):
            edge, far = rng.integers(1, 8), rng.uniform(1.0, 9.0)
            near = cols[None, :] < edge
            rgb = np.where(near[..., None], [200, 40, 40], [30, 30, 160]).repeat(8, 0)
            depth = np.where(near, 1.0, far).repeat(8, 0).astype(np.float32)
            yield i, {"rgb": rgb.astype(np.uint8), "depth": depth, "index": i}


register_dataset("toy_rgbd", ToyRGBD, RGBDConfig)


def get_config():
    c = base_config()
    c.data.name = "toy_rgbd"
    c.data.augment = "default"
    c.model.modalities = {
        "rgb": modality("image", "tiny", patch_size=4, depth=0),
        "depth": modality("depth", "tiny", patch_size=4),
    }
    c.model.anchor = "rgb"
    c.train.batch_size = 16
    c.train.steps = 3
    c.train.checkpoint_every = 3
    c.train.progress_bar = False
    c.optim.warmup_steps = 1
    c.eval.batch_size = 32
    return c
'''


@pytest.fixture
def depth_config(tmp_path):
    path = tmp_path / "rgbd_config.py"
    path.write_text(textwrap.dedent(USER_CONFIG))
    overrides = [f"data.data_dir={tmp_path / 'data'}"]
    config = load_config(str(path), overrides)
    # Loading the file twice (a restart in the same process) re-registers without clashing.
    config = load_config(str(path), overrides)
    yield config
    modalities.KINDS.pop("depth", None)
    data.DATASETS.pop("toy_rgbd", None)


@pytest.mark.slow
def test_depth_kind_from_a_config_file_trains_end_to_end(depth_config, tmp_path):
    from gram_jax.training.loop import load_split, make_train_iterator, train
    from gram_jax.training.step import example_shapes

    # The abstract batch comes from the dataset's declared features + the kind's spec, and
    # agrees with what the pipeline yields (no hand-written shape table).
    shapes = example_shapes(depth_config)
    assert {k: (s.shape, s.dtype) for k, s in shapes.items()} == {
        "rgb": ((8, 8, 3), jnp.float32),
        "depth": ((8, 8, 1), jnp.float32),
    }
    batch = next(make_train_iterator(depth_config, None, load_split(depth_config, "train")))
    for key, s in shapes.items():
        assert batch[key].shape == (16, *s.shape) and batch[key].dtype == s.dtype
    # The registered augmentation ran: the stored maps are constant down each column, the
    # noise makes them vary.
    assert float(np.asarray(batch["depth"]).std(axis=1).min()) > 0.0

    train(depth_config, tmp_path / "run")
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["chance/R@1"] == pytest.approx(100 / 64)
    assert 0.0 <= final["retrieval/rgb_to_rest/volume/R@1"] <= 100.0


def test_registered_kind_is_checked_by_config_validation(depth_config):
    depth_config.model.modalities.depth.kind = "lidar"
    with pytest.raises(ConfigError, match=r"config\.model\.modalities\.depth\.kind: 'lidar'"):
        validate(depth_config)


def test_register_modality_rejects_builtins_and_non_configs():
    with pytest.raises(ValueError, match="built-in"):
        modalities.register_modality(
            "image", encoder=nnx.Module, config=ImageConfig, convert=np.asarray
        )
    with pytest.raises(TypeError, match="EncoderConfig subclass"):
        modalities.register_modality("mine", encoder=nnx.Module, config=dict, convert=np.asarray)
    assert "mine" not in modalities.KINDS


def test_spec_defaults_to_converting_zeros_and_like_reuses_a_data_path():
    def to_channels(name, value):
        return np.asarray(value, np.float16)[..., None].repeat(2, -1)

    try:
        kind = modalities.register_modality(
            "test_pairs", encoder=nnx.Module, config=ImageConfig, convert=to_channels
        )
        assert kind.example_spec("x", (5, 3), np.int32) == {"x": ((5, 3, 2), np.dtype("float16"))}
        gray = modalities.register_modality(
            "test_text_like", encoder=nnx.Module, config=ImageConfig, like="text"
        )
        assert gray.data_kind == "text" and gray.claims is None  # claims are never inherited
        assert set(gray.example_spec("t", (7,), np.int64)) == {"t", "t_mask"}
    finally:
        modalities.KINDS.pop("test_pairs", None)
        modalities.KINDS.pop("test_text_like", None)


def test_ambiguous_arrays_raise_asking_for_the_kind():
    depth_map = np.random.default_rng(0).uniform(0, 5, (8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"config\.model\.modalities\.depth\.kind"):
        data.infer_modalities({"depth": depth_map, "index": 0})
    rgb = np.zeros((8, 8, 3), np.uint8)
    source = [{"depth": depth_map, "rgb": rgb, "index": i} for i in range(4)]
    with pytest.raises(ValueError, match="cannot infer the modality kind of record field 'depth'"):
        data.make_iterator(source, batch_size=2)
    # Unambiguous arrays are still inferred; declared kinds are used as given.
    assert data.infer_modalities({"rgb": source[0]["rgb"], "ids": np.arange(5)}) == {
        "rgb": "image",
        "ids": "text",
    }
    it = data.make_iterator(source, batch_size=2, modalities={"depth": "audio"})
    assert next(it)["depth"].shape == (2, 8, 8)


def test_video_kind_has_a_data_path_to_its_encoder():
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (4, 2, 8, 8, 3), dtype=np.uint8)
    source = [{"clip": clips[i], "index": i} for i in range(4)]
    assert data.infer_modalities(source[0]) == {"clip": "video"}
    batch = next(data.make_iterator(source, batch_size=4, shuffle=False, augment="default"))
    np.testing.assert_allclose(batch["clip"], clips / 255.0, rtol=1e-6)  # no default aug
    assert modalities.example_spec("video", "clip", (2, 8, 8, 3), np.uint8) == {
        "clip": ((2, 8, 8, 3), np.dtype(np.float32))
    }
    enc = build_encoder("video", "tiny", patch_size=4, depth=1)
    out = jax.jit(lambda x: enc(x))(jnp.asarray(batch["clip"]))
    assert out.tokens.shape == (4, 2 * 4, 64) and out.grid == (2, 2, 2)
    assert bool(jnp.all(jnp.isfinite(out.pooled)))
