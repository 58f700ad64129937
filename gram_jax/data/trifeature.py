"""``trifeature``: the bimodal Trifeatures data of CoMM's controlled experiment.

A re-implementation (no code copied) of the generator described in
``docs/authors_code.md`` section 9 (Hermann & Lampinen 2020, as used by Dufumier et al. 2025):

* 10 shapes x 10 textures x 10 colours = 1,000 (shape, texture, colour) combinations.
  Combinations are enumerated shape -> texture -> colour; a 0/1 array ``[0]*200 + [1]*800``
  shuffled by a fresh ``default_rng(seed)`` (seed 42) marks the 200 **held-out test
  combinations** (0). The 800 train combinations are rendered 3 times, the test ones once:
  **2,400 train and 200 test images** with disjoint triplets (compositional hold-out).
  Images are ordered like the authors' ``sorted(os.listdir)`` of
  ``{shape}_{texture}_{colour}[_{k}].png``; ``index`` is the position in that order.
* Rendering: the binary shape template (``base_size``) is rotated by a1 in [-45, 45)
  (bilinear, canvas grows), pasted at a random offset of a ``render_size`` canvas, multiplied
  by a procedural texture (drawn at twice the render size with a random phase, rotated by a2
  with nearest neighbour, centre-cropped), then ``rgb = m * colour + (1 - m) * grey(0.5)``,
  truncated to uint8. Default: native 64 x 64 with base 36 and texture scale 6 (the CPU
  plan of comm.md section 9); ``render_size=224, base_size=128, texture_scale=10`` is the
  original scale. All 10 textures are closed-form index arithmetic on the pixel grid.
* Pairs (the two "modalities" are two images): ordered pairs (i, j) of one split with
  ``shape_i == shape_j`` (self-pairs allowed); the *biased* variant also requires
  ``colour_j == M(texture_i)``. ``M`` comes from its own fresh ``default_rng(seed)``
  (first draw: a permutation of the colours), never from the rendering RNG (comm.md section
  10 pitfall), so every run and every split sees the same mapping; for seed 42 it is the
  authors' mapping solid->cyan, stripes->purple, grid->red, hexgrid->ocean, dots->yellow,
  noise->blue, triangles->pink, zigzags->white, rain->green, pluses->orange.
  ``max_pairs`` (10,000) pairs are drawn without replacement from the allowed ones with the
  same generator. Labels: ``share`` = shape, ``unique1`` / ``unique2`` = texture of image 1 /
  2, ``synergy`` = 1[colour_2 == M(texture_1)].

For seed 42 this reproduces the authors' sets exactly (per-shape test counts
19/26/20/19/25/15/19/18/19/20):

==================  ===============  ======  ==================  ==========
pair split          allowed pairs    used    synergy positives   self-pairs
==================  ===============  ======  ==================  ==========
``train``           576,846          10,000  10.3 %              39
``train_biased``    57,636           10,000  100 %               40
``test``            4,094            4,094   9.9 %               200
``test_biased``     404              404     100 %               22
==================  ===============  ======  ==================  ==========

Storage: the TFDS splits ``images_train`` / ``images_test`` hold every image once
(``image`` uint8, ``index``, ``factors/{shape,texture,colour}``); the pair splits hold only
index pairs and labels (``index``, ``index1``, ``index2``, ``label/*``). Writing both images
into every pair would store ~24.5k pairs x 2 images (~600 MB at 64 px, ~7 GB at 224 px)
instead of 2,600 images (~32 MB / ~390 MB). ``TrifeaturePairSource`` joins the two on read
into ``{"image1", "image2", "index", "label/*"}`` records.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import scipy.ndimage
import tensorflow_datasets as tfds

from gram_jax.data._tfds import LocalBuilder, bounded

SHAPES = (
    "triangle",
    "square",
    "plus",
    "circle",
    "tee",
    "rhombus",
    "pentagon",
    "star",
    "fivesquare",
    "trapezoid",
)
TEXTURES = (
    "solid",
    "stripes",
    "grid",
    "hexgrid",
    "dots",
    "noise",
    "triangles",
    "zigzags",
    "rain",
    "pluses",
)
COLOURS = ("red", "green", "blue", "yellow", "pink", "cyan", "purple", "ocean", "orange", "white")
COLOURS_RGB = np.array(
    [
        (1, 0, 0),
        (0, 1, 0),
        (0, 0, 1),
        (1, 1, 0),
        (1, 0.4, 1),
        (0, 1, 1),
        (0.3, 0, 0.5),
        (0.1, 0.4, 0.5),
        (1, 0.6, 0),
        (1, 1, 1),
    ],
    np.float64,
)
BACKGROUND = 0.5
PAIR_SPLITS = ("train", "train_biased", "test", "test_biased")
IMAGE_SPLITS = ("images_train", "images_test")
LABELS = (
    "share",
    "unique1",
    "unique2",
    "synergy",
    "shape1",
    "texture1",
    "colour1",
    "shape2",
    "texture2",
    "colour2",
)


# ---------------------------------------------------------------------------------------
# Templates and textures
# ---------------------------------------------------------------------------------------


def _polygon(vertices: np.ndarray, s: int) -> np.ndarray:
    """Even-odd point-in-polygon test on the pixel centres of an s x s grid."""
    i, j = np.mgrid[0:s, 0:s] + 0.5
    inside = np.zeros((s, s), bool)
    vy, vx = vertices[:, 0], vertices[:, 1]
    for k in range(len(vertices)):
        y0, x0, y1, x1 = vy[k], vx[k], vy[k - 1], vx[k - 1]
        crosses = (y0 > i) != (y1 > i)
        x_at = (x1 - x0) * (i - y0) / np.where(y1 == y0, 1e-9, y1 - y0) + x0
        inside ^= crosses & (j < x_at)
    return inside


def shape_template(shape: int, s: int) -> np.ndarray:
    """Binary ``(s, s) float64`` mask of shape ``SHAPES[shape]`` (formulas of comm.md 4a)."""
    i, j = np.mgrid[0:s, 0:s]
    h = s // 2
    name = SHAPES[shape]
    if name == "square":
        m = np.ones((s, s), bool)
    elif name == "circle":
        m = (i + 0.5 - h) ** 2 + (j + 0.5 - h) ** 2 < h**2
    elif name == "triangle":
        m = np.abs(j - h) - i // 2 < 1
    elif name in ("plus", "tee"):
        band = (j >= h - s // 6) & (j <= h + s // 6)
        other = (i >= h - s // 6) & (i <= h + s // 6) if name == "plus" else i < s // 3
        m = band | other
    elif name == "rhombus":
        v = j - h + i // 2
        m = (v > 0) & (v < h)
    elif name == "pentagon":
        top = int(0.4 * s)
        x_off = (i - top) // 3.1
        m = np.where(i < top, np.abs(j - h) - 1.25 * i < 1, (x_off < j) & (j < s - x_off))
    elif name == "star":
        ang = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, s / 2, 0.4 * s / 2)
        centre = np.array([s / 2 + 0.06 * s, s / 2])
        verts = np.stack([centre[0] + rad * np.sin(ang), centre[1] + rad * np.cos(ang)], 1)
        m = _polygon(verts, s)
    elif name == "fivesquare":
        c = s // 3
        a, b = np.minimum(i // c, 2), np.minimum(j // c, 2)
        m = (a + b) % 2 == 0
    elif name == "trapezoid":
        m = (i // 3.1 < j) & (j < s - i // 3.1)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(name)
    return m.astype(np.float64)


def texture_pattern(texture: int, size: int, scale: int, rng: np.random.Generator) -> np.ndarray:
    """Binary ``(size, size) float64`` texture ``TEXTURES[texture]`` with a random phase."""
    sc = scale
    lw, slw = max(1, sc // 3), max(1, sc // 5)
    oy, ox = rng.integers(0, sc, size=2)
    i, j = np.mgrid[0:size, 0:size]
    y, x = i + oy, j + ox
    ym, xm = y % sc, x % sc
    name = TEXTURES[texture]
    if name == "solid":
        m = np.ones((size, size), bool)
    elif name == "stripes":
        m = ym < lw
    elif name == "grid":
        m = (ym < lw) | (xm < lw)
    elif name == "hexgrid":
        y17 = np.floor(1.73 * y).astype(int)
        m = ((x + y17) % sc < slw) | ((x - y17) % sc < slw) | (ym < slw)
    elif name == "dots":
        m = (xm - sc // 2) ** 2 + (ym - sc // 2) ** 2 < (3 * sc // 7) ** 2
    elif name == "noise":
        m = rng.random((size, size)) < 0.5
    elif name == "triangles":
        m = ym // 2 - np.abs(xm - sc // 2) > 0
    elif name == "zigzags":
        xz = np.where((y // sc) % 2 == 1, sc - 1 - xm, xm)
        m = (ym // 2 < xz) & (xz < sc - sc // 2 + ym // 2)
    elif name == "rain":
        # Bernoulli(.05) drops, each a vertical streak of sc - sc // 3 pixels downwards.
        drops = (rng.random((size, size)) < 0.05).astype(np.int32)
        length = sc - sc // 3
        c = np.cumsum(drops, axis=0)
        shifted = np.vstack([np.zeros((length, size), np.int32), c[:-length]])
        m = (c - shifted) > 0
    elif name == "pluses":
        # Rows of "+" marks; every other row of cells is shifted by half a cell.
        xs = np.where((y // sc) % 2 == 1, (x + sc // 2) % sc, xm)
        u, v = np.abs(xs - sc // 2), np.abs(ym - sc // 2)
        hw, arm = max(0.5, 0.15 * sc), max(1, sc // 2 - 1)
        m = ((u <= hw) & (v <= arm)) | ((v <= hw) & (u <= arm))
    else:  # pragma: no cover
        raise ValueError(name)
    return m.astype(np.float64)


def render(
    shape: int,
    texture: int,
    colour: int,
    rng: np.random.Generator,
    *,
    render_size: int = 64,
    base_size: int = 36,
    texture_scale: int = 6,
) -> np.ndarray:
    """One ``(render_size, render_size, 3) uint8`` stimulus."""
    tmpl = scipy.ndimage.rotate(
        shape_template(shape, base_size), rng.integers(-45, 45), order=1, reshape=True
    )
    tmpl = np.clip(tmpl, 0.0, 1.0)
    h, w = tmpl.shape
    if h > render_size or w > render_size:
        raise ValueError(f"base_size {base_size} does not fit render_size {render_size}")
    canvas = np.zeros((render_size, render_size))
    oy = rng.integers(0, max(1, render_size - h))
    ox = rng.integers(0, max(1, render_size - w))
    canvas[oy : oy + h, ox : ox + w] = tmpl
    tex = texture_pattern(texture, 2 * render_size, texture_scale, rng)
    tex = scipy.ndimage.rotate(tex, rng.integers(-45, 45), order=0, reshape=False)
    lo = render_size // 2
    tex = tex[lo : lo + render_size, lo : lo + render_size]
    m = (canvas * tex)[..., None]
    rgb = m * COLOURS_RGB[colour] + (1 - m) * BACKGROUND
    return (rgb * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Splits and pairs (no rendering needed)
# ---------------------------------------------------------------------------------------


def image_factors(
    seed: int = 42, num_per_combination: int = 3, num_test_combinations: int = 200
) -> dict[str, np.ndarray]:
    """Factor arrays ``{split: (n, 3) int (shape, texture, colour)}`` in file-name order."""
    rng = np.random.default_rng(seed)
    is_train = np.array([0] * num_test_combinations + [1] * (1000 - num_test_combinations))
    rng.shuffle(is_train)
    combos = list(itertools.product(range(10), range(10), range(10)))

    def fname(c, k):
        stem = f"{SHAPES[c[0]]}_{TEXTURES[c[1]]}_{COLOURS[c[2]]}"
        return stem + ("" if k is None else f"_{k}") + ".png"

    train = [
        (c, k)
        for c, t in zip(combos, is_train, strict=True)
        if t
        for k in range(num_per_combination)
    ]
    test = [(c, None) for c, t in zip(combos, is_train, strict=True) if not t]
    out = {}
    for split, items in (("train", train), ("test", test)):
        items = sorted(items, key=lambda it: fname(*it))
        out[split] = np.array([c for c, _ in items], np.int64).reshape(-1, 3)
    return out


def synergy_mapping(seed: int = 42) -> np.ndarray:
    """``M[texture] -> colour`` from a fresh ``default_rng(seed)`` (its first draw)."""
    return np.random.default_rng(seed).permutation(10)


def sample_pairs(
    factors: np.ndarray, *, biased: bool, seed: int = 42, max_pairs: int = 10_000
) -> tuple[np.ndarray, int]:
    """``((P, 2) int image-index pairs, number of allowed pairs)`` for one image split."""
    rng = np.random.default_rng(seed)
    mapping = rng.permutation(10)  # same draw as ``synergy_mapping``: keeps the stream aligned
    ok = factors[:, 0][:, None] == factors[:, 0][None, :]
    if biased:
        ok &= mapping[factors[:, 1]][:, None] == factors[:, 2][None, :]
    allowed = np.argwhere(ok)
    n = min(max_pairs, len(allowed))
    return allowed[rng.choice(len(allowed), n, replace=False)], len(allowed)


def pair_labels(
    factors: np.ndarray, pairs: np.ndarray, mapping: np.ndarray
) -> dict[str, np.ndarray]:
    """``{label name: (P,) int32}`` for pairs (see ``LABELS``)."""
    f1, f2 = factors[pairs[:, 0]], factors[pairs[:, 1]]
    out = {
        "share": f1[:, 0],
        "unique1": f1[:, 1],
        "unique2": f2[:, 1],
        "synergy": (mapping[f1[:, 1]] == f2[:, 2]),
        "shape1": f1[:, 0],
        "texture1": f1[:, 1],
        "colour1": f1[:, 2],
        "shape2": f2[:, 0],
        "texture2": f2[:, 1],
        "colour2": f2[:, 2],
    }
    return {k: v.astype(np.int32) for k, v in out.items()}


# ---------------------------------------------------------------------------------------
# TFDS builder and the joined pair source
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrifeatureConfig(tfds.core.BuilderConfig):
    """Builder configuration; ``prepare(..., **fields)`` derives the config name."""

    render_size: int = 64
    base_size: int = 36
    texture_scale: int = bounded(6, low=3)
    num_per_combination: int = bounded(3, low=1)
    num_test_combinations: int = bounded(200, low=1, high=999)
    max_pairs: int = bounded(10_000, low=1)
    seed: int = 42

    def validate(self) -> None:
        if self.base_size * 1.42 > self.render_size:
            raise ValueError(
                f"base_size {self.base_size} rotated by 45 degrees does not fit "
                f"render_size {self.render_size}"
            )


class Trifeature(LocalBuilder):
    """TFDS builder of ``trifeature`` (see the module docstring)."""

    BUILDER_CONFIGS = [TrifeatureConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        r = c.render_size
        feats = {
            # Image splits.
            "image": tfds.features.Tensor(shape=(r, r, 3), dtype=np.uint8, optional=True),
            "factors/shape": tfds.features.Scalar(dtype=np.int32, optional=True),
            "factors/texture": tfds.features.Scalar(dtype=np.int32, optional=True),
            "factors/colour": tfds.features.Scalar(dtype=np.int32, optional=True),
            # Pair splits.
            "index1": tfds.features.Scalar(dtype=np.int32, optional=True),
            "index2": tfds.features.Scalar(dtype=np.int32, optional=True),
            **{f"label/{k}": tfds.features.Scalar(dtype=np.int32, optional=True) for k in LABELS},
            "index": tfds.features.Scalar(dtype=np.int32),
        }
        # One FeaturesDict for both kinds of split (TFDS has one feature spec per dataset):
        # the other kind's fields are optional and stored as None, so pair records carry
        # no pixels.
        return self.local_info(
            "Bimodal Trifeatures (CoMM controlled experiment).",
            feats,
            modalities={"image1": "image", "image2": "image"},
            shapes=list(SHAPES),
            textures=list(TEXTURES),
            colours=list(COLOURS),
            mapping=synergy_mapping(c.seed).tolist(),
        )

    def record_features(self) -> dict:
        """Features of a pair record (``TrifeaturePairSource``): two images + labels."""
        feats = self.info.features
        return {
            "image1": feats["image"],
            "image2": feats["image"],
            **{f"label/{k}": feats[f"label/{k}"] for k in LABELS},
            "index": feats["index"],
        }

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        factors = image_factors(c.seed, c.num_per_combination, c.num_test_combinations)
        gens = {f"images_{s}": self._generate_images(factors[s], s) for s in ("train", "test")}
        mapping = synergy_mapping(c.seed)
        for split in PAIR_SPLITS:
            base = split.split("_")[0]
            pairs, _ = sample_pairs(
                factors[base], biased=split.endswith("biased"), seed=c.seed, max_pairs=c.max_pairs
            )
            gens[split] = self._generate_pairs(pairs, pair_labels(factors[base], pairs, mapping))
        return gens

    def _empty(self, kind: str) -> dict:
        if kind == "image":
            return {"index1": None, "index2": None, **{f"label/{k}": None for k in LABELS}}
        return {
            "image": None,
            "factors/shape": None,
            "factors/texture": None,
            "factors/colour": None,
        }

    def _generate_images(self, factors: np.ndarray, split: str):
        c = self.builder_config
        # Rendering RNG: independent of the split/pair/mapping RNG (comm.md section 10).
        rng = np.random.default_rng([c.seed, 1, 0 if split == "train" else 1])
        pad = self._empty("image")
        for idx, (s, t, col) in enumerate(factors):
            img = render(
                int(s),
                int(t),
                int(col),
                rng,
                render_size=c.render_size,
                base_size=c.base_size,
                texture_scale=c.texture_scale,
            )
            yield (
                idx,
                {
                    "image": img,
                    "factors/shape": s,
                    "factors/texture": t,
                    "factors/colour": col,
                    "index": idx,
                    **pad,
                },
            )

    def _generate_examples(self, pairs: np.ndarray, labels: dict[str, np.ndarray]):
        return self._generate_pairs(pairs, labels)

    def _generate_pairs(self, pairs: np.ndarray, labels: dict[str, np.ndarray]):
        pad = self._empty("pair")
        for k, (i, j) in enumerate(pairs):
            yield (
                k,
                {
                    "index": k,
                    "index1": i,
                    "index2": j,
                    **{f"label/{n}": v[k] for n, v in labels.items()},
                    **pad,
                },
            )


class TrifeaturePairSource:
    """Random-access source of Trifeature pairs joined with their images.

    ``source[k]`` is ``{"image1": (R, R, 3) uint8, "image2": ..., "index": int,
    "label/<name>": int}`` for the names in ``LABELS``. Picklable (holds two ArrayRecord
    sources), so grain worker processes can use it.
    """

    modalities = {"image1": "image", "image2": "image"}

    def __init__(self, pairs, images):
        self._pairs = pairs
        self._images = images

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, k):
        p = self._pairs[k]
        out = {
            "image1": self._images[int(p["index1"])]["image"],
            "image2": self._images[int(p["index2"])]["image"],
            "index": p["index"],
        }
        out.update({f"label/{n}": p[f"label/{n}"] for n in LABELS})
        return out

    def __repr__(self) -> str:
        return f"TrifeaturePairSource(num_pairs={len(self)}, num_images={len(self._images)})"
