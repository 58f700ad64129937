"""Data layer: local TFDS builders, their design properties, and the Grain pipelines."""

import os
import sys

import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec

from gram_jax import data
from gram_jax.data import augment, embeddings, registry, show, synthetic, trifeature

tfds.disable_progress_bar()

SYN = dict(train_size=256, validation_size=64, test_size=128)
# A reduced Trifeature configuration (1,000 32x32 images) for the builder tests; the
# default configuration's counts are checked on the index arrays, which need no rendering.
TRI = dict(render_size=32, base_size=20, texture_scale=4, num_per_combination=1, max_pairs=500)
NPZ = "msrvtt884_gram_step0.npz"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="session")
def syn_dir(data_dir):
    return registry.prepare("synthetic_trimodal", data_dir, **SYN)


@pytest.fixture(scope="session")
def tri_dir(data_dir):
    return registry.prepare("trifeature", data_dir, **TRI)


@pytest.fixture(scope="session")
def syn_test(data_dir, syn_dir):
    return data.load_source("synthetic_trimodal", "test", data_dir, **SYN)


def _batches(it, n):
    return [jax.tree.map(np.asarray, next(it)) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert jax.tree.structure(x) == jax.tree.structure(y)
        jax.tree.map(np.testing.assert_array_equal, x, y)


# ---------------------------------------------------------------------------------------
# synthetic_trimodal
# ---------------------------------------------------------------------------------------


def test_synthetic_builder_shapes_and_reload(data_dir, syn_dir):
    assert syn_dir.name == "1.0.0" and (syn_dir / "dataset_info.json").is_file()
    assert "tensorflow" not in sys.modules
    for split, n in (("train", 256), ("validation", 64), ("test", 128)):
        src = tfds.data_source(
            f"synthetic_trimodal/{syn_dir.parent.name}", split=split, data_dir=os.fspath(data_dir)
        )
        assert len(src) == n
        rec = src[n - 1]
        assert rec["image"].shape == (32, 32, 3) and rec["image"].dtype == np.uint8
        assert rec["audio"].shape == (32, 32) and rec["audio"].dtype == np.float32
        assert rec["text"].shape == (16,) and rec["text"].dtype == np.int32
        assert rec["index"] == n - 1  # records are stored in index order
        assert set(synthetic.FACTORS) <= {k.split("/")[1] for k in rec if "/" in k}
    # prepare is idempotent and leaves no temporary directory behind.
    assert registry.prepare("synthetic_trimodal", data_dir, **SYN) == syn_dir
    assert not [p for p in os.listdir(data_dir) if p.startswith(".incomplete")]


def test_synthetic_labels_deterministic(syn_test):
    a = synthetic.generate_split(128, seed=0, split="test")
    b = synthetic.generate_split(128, seed=0, split="test")
    c = synthetic.generate_split(128, seed=1, split="test")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[f"factors/{k}"], c[f"factors/{k}"]) for k in synthetic.FACTORS)
    # The stored dataset holds exactly these examples.
    for i in (0, 77, 127):
        rec = syn_test[i]
        np.testing.assert_array_equal(rec["image"], a["image"][i])
        np.testing.assert_array_equal(rec["text"], a["text"][i])
        for k in synthetic.FACTORS:
            assert rec[f"factors/{k}"] == a[f"factors/{k}"][i]


def _tuples(f):
    img = np.ravel_multi_index(
        [f[k] for k in synthetic.IMAGE_FACTORS], [len(v) for v in synthetic.IMAGE_FACTORS.values()]
    )
    aud = np.ravel_multi_index(
        [f[k] for k in synthetic.AUDIO_FACTORS], [len(v) for v in synthetic.AUDIO_FACTORS.values()]
    )
    return img, aud


@pytest.mark.parametrize("n", [16, 128, 1024, 3456, 8192])
def test_synthetic_no_single_modality_determines_the_item(n):
    img, aud = _tuples(synthetic.sample_factors(n, np.random.default_rng(n)))
    joint = img * synthetic.N_AUDIO_TUPLES + aud
    img_matches = (img[:, None] == img[None, :]).sum(1)  # items an image-only matcher keeps
    aud_matches = (aud[:, None] == aud[None, :]).sum(1)
    joint_matches = (joint[:, None] == joint[None, :]).sum(1)
    assert img_matches.min() >= 2 and aud_matches.min() >= 2
    if n <= 3456:
        assert joint_matches.max() == 1  # image + audio identify the item
    else:
        assert joint_matches.max() <= -(-n // (192 * 36))
    if n == 1024:  # the numbers documented in the module docstring
        assert img_matches.mean() == pytest.approx(1024 / 192, abs=0.3)
        assert aud_matches.mean() == pytest.approx(1024 / 36, abs=0.5)
        assert len(np.unique(img)) == 192 and len(np.unique(aud)) == 36


def test_synthetic_captions_name_all_factors(syn_test):
    vocab = set(synthetic.vocabulary())
    assert synthetic.vocabulary()[0] == "<pad>"
    for i in range(0, 128, 9):
        rec = syn_test[i]
        words = synthetic.decode_caption(rec["text"]).split()
        assert "<unk>" not in words and set(words) <= vocab
        for name, values in synthetic.FACTORS.items():
            word = values[rec[f"factors/{name}"]]
            assert any(w == word or w.startswith(word) for w in words), (name, words)
        mask_len = int((rec["text"] != 0).sum())
        assert mask_len == len(words) == 14


def test_synthetic_renders_factors():
    a = synthetic.generate_split(64, seed=3, split="train")
    img = a["image"].astype(np.float32) / 255
    fg = np.abs(img - img[:, :1, :1]).max(-1) > 0.25  # pixels far from the background
    top = fg[:, :16].sum((1, 2)) > fg[:, 16:].sum((1, 2))
    np.testing.assert_array_equal(top, a["factors/position"] == 0)
    area = fg.sum((1, 2))
    for shape in range(4):  # more / larger objects cover more pixels
        sel = a["factors/shape"] == shape
        big = sel & (a["factors/size"] == 1) & (a["factors/count"] == 2)
        small = sel & (a["factors/size"] == 0) & (a["factors/count"] == 0)
        if big.any() and small.any():
            assert area[big].min() > area[small].max()
    # Pitch moves the spectral peak up the mel axis.
    peak = a["audio"].mean(1).argmax(-1)
    pure = a["factors/timbre"] == 0
    means = [
        peak[pure & (a["factors/pitch"] == p)].mean()
        for p in range(4)
        if (pure & (a["factors/pitch"] == p)).any()
    ]
    assert np.all(np.diff(means) > 0)


# ---------------------------------------------------------------------------------------
# trifeature
# ---------------------------------------------------------------------------------------


def test_trifeature_default_counts_match_the_authors():
    f = trifeature.image_factors()
    assert len(f["train"]) == 2400 and len(f["test"]) == 200
    np.testing.assert_array_equal(
        np.bincount(f["test"][:, 0]), [19, 26, 20, 19, 25, 15, 19, 18, 19, 20]
    )
    train_triplets = {tuple(x) for x in f["train"]}
    assert not train_triplets & {tuple(x) for x in f["test"]}  # compositional hold-out
    assert len(train_triplets) == 800
    mapping = trifeature.synergy_mapping()
    # solid->cyan, stripes->purple, grid->red, ... (comm.md section 4a)
    np.testing.assert_array_equal(mapping, [5, 6, 0, 7, 3, 2, 4, 9, 1, 8])
    expected = {
        ("train", False): (576_846, 10_000, 0.1026, 39),
        ("train", True): (57_636, 10_000, 1.0, 40),
        ("test", False): (4_094, 4_094, 0.0987, 200),
        ("test", True): (404, 404, 1.0, 22),
    }
    for (split, biased), (allowed, used, pos, selfp) in expected.items():
        pairs, n_allowed = trifeature.sample_pairs(f[split], biased=biased)
        labels = trifeature.pair_labels(f[split], pairs, mapping)
        assert (n_allowed, len(pairs)) == (allowed, used)
        assert labels["synergy"].mean() == pytest.approx(pos, abs=5e-4)
        assert (pairs[:, 0] == pairs[:, 1]).sum() == selfp
        np.testing.assert_array_equal(labels["shape1"], labels["shape2"])  # same shape
        assert len({tuple(p) for p in pairs}) == len(pairs)  # without replacement


def test_trifeature_builder(data_dir, tri_dir):
    assert "tensorflow" not in sys.modules
    f = trifeature.image_factors(num_per_combination=1)
    images = data.load_source("trifeature", "images_train", data_dir, **TRI)
    assert len(images) == 800
    rec = images[17]
    assert rec["image"].shape == (32, 32, 3) and rec["image"].dtype == np.uint8
    assert (rec["factors/shape"], rec["factors/texture"], rec["factors/colour"]) == tuple(
        f["train"][17]
    )
    for split, n in (("train", 500), ("train_biased", 500), ("test", 500), ("test_biased", 404)):
        src = data.load_source("trifeature", split, data_dir, **TRI)
        assert isinstance(src, trifeature.TrifeaturePairSource)
        assert len(src) == n
        base = f[split.split("_")[0]]
        for k in (0, len(src) - 1):
            p = src[k]
            assert p["image1"].shape == p["image2"].shape == (32, 32, 3)
            assert p["label/share"] == p["label/shape1"] == p["label/shape2"]
            raw = tfds.data_source(
                f"trifeature/{tri_dir.parent.name}", split=split, data_dir=os.fspath(data_dir)
            )[k]
            i, j = raw["index1"], raw["index2"]
            assert tuple(base[i]) == (p["label/shape1"], p["label/texture1"], p["label/colour1"])
            assert tuple(base[j]) == (p["label/shape2"], p["label/texture2"], p["label/colour2"])
            if split.endswith("biased"):
                assert p["label/synergy"] == 1
    biased = data.load_source("trifeature", "train_biased", data_dir, **TRI)
    mapping = trifeature.synergy_mapping()
    assert all(
        mapping[biased[k]["label/texture1"]] == biased[k]["label/colour2"]
        for k in range(0, 500, 50)
    )


def test_trifeature_textures_are_distinct():
    rng = np.random.default_rng(0)
    pats = [trifeature.texture_pattern(t, 64, 6, rng) for t in range(10)]
    for a in range(10):
        for b in range(a + 1, 10):
            assert not np.array_equal(pats[a], pats[b])
    fills = [p.mean() for p in pats]
    assert fills[0] == 1.0 and all(0.03 < x < 0.97 for x in fills[1:])
    for s in range(10):
        m = trifeature.shape_template(s, 36)
        assert 0.15 < m.mean() <= 1.0


# ---------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------


def test_embeddings_builder_and_memory_source_agree(data_dir, fixtures_dir):
    npz = fixtures_dir / NPZ
    raw = np.load(npz)
    for split in ("train", "test"):
        disk = data.load_source(
            "embeddings", split, data_dir, npz_path=npz, test_fraction=0.25, seed=3
        )
        mem = data.NpzEmbeddingSource(npz, split, test_fraction=0.25, seed=3)
        assert len(disk) == len(mem) == (221 if split == "test" else 663)
        for i in (0, len(mem) - 1):
            row = mem[i]["index"]
            assert disk[i]["index"] == row
            for k in ("text", "video", "audio", "subtitles"):
                np.testing.assert_array_equal(disk[i][k], raw[k][row])
                np.testing.assert_array_equal(mem[i][k], raw[k][row])
    rows = [embeddings.split_rows(884, s, 0.25, 3) for s in ("train", "test")]
    assert not set(rows[0]) & set(rows[1]) and len(set(rows[0]) | set(rows[1])) == 884
    assert not np.array_equal(rows[1], embeddings.split_rows(884, "test", 0.25, 4))
    batch = next(data.make_iterator(mem, batch_size=32, augment="default"))
    assert batch["text"].shape == (32, 512) and batch["text"].dtype == np.float32
    assert batch["index"].dtype == np.int32


# ---------------------------------------------------------------------------------------
# Grain pipeline
# ---------------------------------------------------------------------------------------


def test_batch_format(syn_test):
    it = data.make_iterator(syn_test, batch_size=16, seed=0, augment="default")
    b = next(it)
    assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["audio"].shape == (16, 32, 32) and b["audio"].dtype == np.float32
    assert b["text"].shape == (16, 16) and b["text"].dtype == np.int32
    assert b["text_mask"].dtype == bool
    np.testing.assert_array_equal(b["text_mask"], b["text"] != 0)
    assert b["text_mask"].sum(1).min() >= 1
    for k in synthetic.FACTORS:
        assert b[f"label/{k}"].shape == (16,) and b[f"label/{k}"].dtype == np.int32
    plain = next(data.make_iterator(syn_test, batch_size=16, seed=0, shuffle=False))
    assert abs(plain["audio"].mean()) < 1e-3 and plain["audio"].std() == pytest.approx(1, 1e-3)
    np.testing.assert_array_equal(plain["index"], np.arange(16))
    np.testing.assert_array_equal(plain["image"][3] * 255, syn_test[3]["image"])


def test_epochs_shuffle_and_determinism(syn_test):
    it = data.make_iterator(syn_test, batch_size=32, seed=5, num_epochs=2)
    idx = np.concatenate([b["index"] for b in it])
    assert len(idx) == 256
    e1, e2 = idx[:128], idx[128:]
    assert sorted(e1) == sorted(e2) == list(range(128)) and not np.array_equal(e1, e2)
    again = np.concatenate(
        [b["index"] for b in data.make_iterator(syn_test, batch_size=32, seed=5, num_epochs=2)]
    )
    np.testing.assert_array_equal(idx, again)
    other = np.concatenate(
        [b["index"] for b in data.make_iterator(syn_test, batch_size=32, seed=6, num_epochs=1)]
    )
    assert not np.array_equal(other, e1)


def test_two_views(data_dir, tri_dir):
    src = data.load_source("trifeature", "train", data_dir, **TRI)
    b = next(data.make_iterator(src, batch_size=8, augment="light", two_views=True))
    assert set(b["view1"]) == set(b["view2"]) == {"image1", "image2"}
    assert b["view1"]["image1"].shape == (8, 32, 32, 3)
    assert not np.allclose(b["view1"]["image1"], b["view2"]["image1"])
    assert not np.allclose(b["view1"]["image1"], b["view1"]["image2"])
    assert {"label/share", "label/unique1", "label/unique2", "label/synergy", "index"} <= set(b)


def test_resume_exactly_from_state(syn_test):
    kw = dict(batch_size=48, seed=2, num_epochs=3, augment="default", two_views=True)
    it = data.make_iterator(syn_test, **kw)
    _batches(it, 3)  # crosses the first epoch boundary (128 examples)
    state = it.get_state()
    expected = _batches(it, 3)
    fresh = data.make_iterator(syn_test, **kw)
    fresh.set_state(state)
    _assert_batches_equal(_batches(fresh, 3), expected)


def test_resume_through_orbax(syn_test, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    kw = dict(batch_size=16, seed=9, num_epochs=None, augment="default")
    it = data.make_iterator(syn_test, **kw)
    _batches(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = _batches(it, 2)
    fresh = data.make_iterator(syn_test, **kw)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_batches_equal(_batches(fresh, 2), expected)


def test_batches_on_an_8_device_mesh(syn_test):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    it = data.make_iterator(syn_test, batch_size=16, seed=0, mesh=mesh, augment="light")
    ref = next(data.make_iterator(syn_test, batch_size=16, seed=0, augment="light"))
    b = next(it)
    want = NamedSharding(mesh, PartitionSpec("data"))
    for key, x in b.items():
        assert isinstance(x, jax.Array), key
        assert x.sharding.is_equivalent_to(want, x.ndim), key
        assert x.shape == ref[key].shape
        assert len(x.addressable_shards) == 8
        assert x.addressable_shards[0].data.shape[0] == 2
        np.testing.assert_array_equal(np.asarray(x), ref[key])
    # A 2-D mesh: batch split over "data", replicated over "model".
    mesh2 = jax.make_mesh((4, 2), ("data", "model"))
    b2 = next(data.make_iterator(syn_test, batch_size=8, mesh=mesh2))
    assert b2["image"].sharding.spec == PartitionSpec("data")
    assert b2["image"].addressable_shards[0].data.shape == (2, 32, 32, 3)


def test_sharding_by_process_is_disjoint_and_complete(syn_test):
    seen = []
    for p in range(2):
        it = data.make_iterator(syn_test, batch_size=16, seed=1, process_index=p, process_count=2)
        batches = list(it)
        assert all(b["index"].shape == (8,) for b in batches)
        seen.append(np.concatenate([b["index"] for b in batches]))
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == set(range(128))


def test_order_independent_of_worker_count(syn_test):
    kw = dict(batch_size=32, seed=4, augment="default")
    a = _batches(data.make_iterator(syn_test, **kw), 2)
    b = _batches(data.make_iterator(syn_test, worker_count=1, **kw), 2)
    _assert_batches_equal(a, b)


def test_colour_jitter_and_spec_masks_do_what_they_say():
    img = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    off = augment.ColourJitter(p=0.0)
    assert off(img, np.random.default_rng(0)) is img
    still = augment.ColourJitter(p=1.0, brightness=0.0, contrast=0.0, saturation=0.0)
    np.testing.assert_allclose(still(img, np.random.default_rng(0)), img, atol=1e-6)
    grey = np.repeat(img[..., :1], 3, axis=-1)  # no chroma: saturation and hue leave it grey
    out = augment.ColourJitter(p=1.0, brightness=0.0, contrast=0.0, hue=0.5)(
        grey, np.random.default_rng(1)
    )
    np.testing.assert_allclose(out, grey, atol=1e-5)
    # SpecAugment: every zero is a whole masked frame (row) or mel bin (column), at most
    # count stripes of at most max_width each; everything else is untouched.
    spec = 1.0 + np.random.default_rng(1).random((32, 24)).astype(np.float32)
    aug = augment.AudioAug(
        max_shift=0, time_masks=(2, 5), freq_masks=(3, 4), mask_p=1.0, noise_std=0.0
    )
    masked_rows = masked_cols = 0
    for seed in range(20):
        out = aug(spec, np.random.default_rng(seed))
        zero = out == 0.0
        rows, cols = zero.all(axis=1), zero.all(axis=0)
        np.testing.assert_array_equal(zero, rows[:, None] | cols[None, :])
        np.testing.assert_array_equal(out[~zero], spec[~zero])
        assert rows.sum() <= 2 * 5 and cols.sum() <= 3 * 4
        masked_rows, masked_cols = masked_rows + rows.sum(), masked_cols + cols.sum()
    assert masked_rows > 0 and masked_cols > 0


def test_augmentations_are_deterministic_and_label_safe():
    rng = lambda: np.random.default_rng([1, 2, 3])  # noqa: E731
    img = np.random.default_rng(0).random((32, 32, 3)).astype(np.float32)
    out = augment.ImageAug()(img, rng())
    np.testing.assert_array_equal(out, augment.ImageAug()(img, rng()))
    assert out.shape == img.shape and out.dtype == np.float32 and 0 <= out.min()
    assert not np.allclose(out, img)
    spec = np.random.default_rng(1).normal(size=(32, 32)).astype(np.float32)
    a = augment.AudioAug()(spec, rng())
    assert a.shape == spec.shape and not np.allclose(a, spec)
    toks = np.array([5, 6, 7, 8, 9, 10, 0, 0], np.int32)
    d = augment.TextAug(dropout=0.5)(toks, rng())
    kept = d[d != 0]
    assert 1 <= kept.size <= 6 and (d[kept.size :] == 0).all()
    assert set(kept) <= set(toks[toks != 0])
    assert list(kept) == sorted(kept)  # order preserved
    all_gone = augment.TextAug(dropout=1.0)(toks, rng())
    assert (all_gone != 0).sum() == 1
    v = np.ones(100, np.float32)
    fv = augment.FeatureAug(noise_p=0.0, drop_p=1.0, drop_max=0.8)(v, rng())
    assert 0 < (fv == 0).sum() < 80 and set(np.unique(fv)) <= {0.0, 1.0}


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


class _ListSource(list):
    pass


def test_bad_inputs_raise_clear_errors(data_dir, syn_test, syn_dir):
    with pytest.raises(ValueError, match="unknown dataset"):
        data.prepare("nope", data_dir)
    with pytest.raises(ValueError, match="unknown config field"):
        data.prepare("synthetic_trimodal", data_dir, train_sise=5)
    with pytest.raises(ValueError, match="train_size must be >= 2"):
        data.prepare("synthetic_trimodal", data_dir, train_size=0)
    with pytest.raises(ValueError, match="unknown split"):
        data.load_source("synthetic_trimodal", "dev", data_dir, **SYN)
    with pytest.raises(ValueError, match="npz_path"):
        data.prepare("embeddings", data_dir)
    with pytest.raises(ValueError, match="empty"):
        data.make_iterator(_ListSource(), batch_size=4)
    with pytest.raises(ValueError, match="larger than the split"):
        data.make_iterator(syn_test, batch_size=256)
    with pytest.raises(ValueError, match="process count"):
        data.make_iterator(syn_test, batch_size=9, process_index=0, process_count=2)
    mesh = jax.make_mesh((8,), ("data",))
    with pytest.raises(ValueError, match="mesh's data axis size 8"):
        data.make_iterator(syn_test, batch_size=12, mesh=mesh)
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        data.make_iterator(syn_test, batch_size=16, mesh=mesh, data_axis="batch")
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        data.make_iterator(syn_test, batch_size=4, modalities={"video": "image"})
    with pytest.raises(ValueError, match="unknown kind"):
        data.make_iterator(syn_test, batch_size=4, modalities={"image": "pixels"})
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        data.make_iterator(syn_test, batch_size=4, augment="strong")
    with pytest.raises(ValueError, match="augmentation for unknown modality"):
        data.make_iterator(syn_test, batch_size=4, augment={"video": augment.ImageAug()})
    bad = _ListSource([{"image": np.zeros((8, 8), np.uint8), "index": 0}] * 4)
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) image"):
        next(data.make_iterator(bad, batch_size=2, modalities={"image": "image"}))
    with pytest.raises(ValueError, match="text_length must be >= 14"):
        data.prepare("synthetic_trimodal", data_dir, text_length=8)
    with pytest.raises(ValueError, match="does not fit"):
        data.prepare("trifeature", data_dir, render_size=32, base_size=36)
    with pytest.raises(ValueError, match=r"num_test_combinations must be in \[1, 999\], got 0"):
        data.prepare("trifeature", data_dir, num_test_combinations=0)
    with pytest.raises(ValueError, match="n_mels must be an int, got 2.5"):
        data.prepare("synthetic_trimodal", data_dir, n_mels=2.5)


def test_show_writes_a_png(tmp_path, data_dir, syn_dir, tri_dir):
    out = show.main(
        [
            "synthetic_trimodal",
            "--out",
            str(tmp_path / "s.png"),
            "--n",
            "3",
            "--split",
            "test",
            "--data-dir",
            str(data_dir),
            "--config",
            *[f"{k}={v}" for k, v in SYN.items()],
        ]
    )
    assert out.stat().st_size > 5_000 and out.read_bytes()[:4] == b"\x89PNG"
    out = show.main(
        [
            "trifeature",
            "--out",
            str(tmp_path / "t.png"),
            "--n",
            "2",
            "--data-dir",
            str(data_dir),
            "--config",
            *[f"{k}={v}" for k, v in TRI.items()],
        ]
    )
    assert out.stat().st_size > 5_000
