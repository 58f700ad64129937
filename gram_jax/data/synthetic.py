"""``synthetic_trimodal``: the project's default dataset (image + audio + caption).

Each example is a set of latent factors rendered three ways:

* **image** ``(S, S, 3) uint8`` (default S = 32): ``count`` (1-3) objects of one ``shape``
  (circle, square, triangle, cross), one ``colour`` (red, green, blue, yellow) and one
  ``size`` (small, large), laid out in a row in the ``position`` half of the canvas (top,
  bottom). Nuisances: per-object jitter inside its slot, radius jitter +-5 %, colour jitter,
  background grey level and pixel noise. Shapes are supersampled 2x for clean edges.
* **audio** log-mel spectrogram ``(T, n_mels) float32`` (default (32, 32)) of a 0.53 s
  8 kHz clip: a note sequence whose ``pitch`` (deep 180 Hz, low 360, high 720, shrill 1440),
  ``timbre`` (pure = sine, buzzing = sawtooth-like harmonic stack, noisy = narrow noise band
  around the pitch) and ``tempo`` (slow / steady / fast = 2 / 4 / 8 notes per clip) encode
  three factors. Nuisances: detune +-3 %, rhythm phase, loudness, background noise. The
  spectrogram is computed in NumPy (Hann window 256, hop 128, HTK mel 50-4000 Hz, natural
  log of power + 1e-6); the pipeline standardises it per example.
* **text** ``(16,) int32`` token ids (0 = pad) from a two-template grammar naming *all
  eight factors*, e.g. ``"two large red circles at the top with a low buzzing tone beating
  quickly"`` or ``"a low buzzing tone beating quickly and two large red circles at the
  top"`` (14 tokens). Vocabulary: ``gram_jax/data/vocab.txt`` (line number = id).

Factor design and why no single modality determines the item
-------------------------------------------------------------
The caption names 5 image-only factors (4 x 4 x 3 x 2 x 2 = **192 image tuples**) and 3
audio-only factors (4 x 3 x 3 = **36 audio tuples**): 6,912 joint tuples. Each split's
factor tuples are drawn by a *balanced design* (``sample_factors``): every image tuple in
the split occurs ``>= 2`` times, each time with a different audio tuple, every audio tuple
occurs ``>= 2`` times with different image tuples, and no joint (image, audio) tuple occurs
twice while the split has at most 3,456 (= 6,912 / 2) items (larger splits, such as the
8,192-item train split, repeat joint tuples at most ``ceil(n / 6912)`` times).

Consequences for caption -> item retrieval within a split of n items (all factors
rendered perfectly recognisable):

================================  ===========================  ==========================
matcher                           candidates left per caption   best possible R@1
================================  ===========================  ==========================
chance                            n (1,024 for val/test)        1 / 1024 = 0.1 %
perfect image-only matcher        n / 192 = ~5.3 (>= 2 always)  ~19 %
perfect audio-only matcher        n / 36 = ~28.4 (>= 2 always)  ~3.5 %
perfect image + audio matcher     exactly 1                     100 %
================================  ===========================  ==========================

(For small splits, n < 384, only n // 2 image tuples are used so that the ">= 2" guarantee
still holds; the tests check these numbers on the factor labels.) This is the situation
GRAM's volume is built for: the text must be matched against image AND audio jointly.

Everything is coarse, cleanly rendered and mildly noisy so that tiny encoders learn it in
minutes on a CPU. Generation is vectorised NumPy: the default 8,192 / 1,024 / 1,024 splits
take a few seconds on 2 cores.

Example features: ``image``, ``audio``, ``text`` (and ``waveform`` (4224,) float32 when the
config sets ``with_waveform``), ``index`` (int32 position in the split), and
``factors/<name>`` int32 for the 8 factors plus ``factors/template`` (caption word order,
a nuisance).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import math

import numpy as np
import tensorflow_datasets as tfds

from gram_jax.data._tfds import LocalBuilder, bounded

# ---------------------------------------------------------------------------------------
# Factor space
# ---------------------------------------------------------------------------------------

IMAGE_FACTORS: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "cross"),
    "colour": ("red", "green", "blue", "yellow"),
    "count": ("one", "two", "three"),
    "size": ("small", "large"),
    "position": ("top", "bottom"),
}
AUDIO_FACTORS: dict[str, tuple[str, ...]] = {
    "pitch": ("deep", "low", "high", "shrill"),
    "timbre": ("pure", "buzzing", "noisy"),
    "tempo": ("slowly", "steadily", "quickly"),
}
FACTORS: dict[str, tuple[str, ...]] = {**IMAGE_FACTORS, **AUDIO_FACTORS}
N_IMAGE_TUPLES = math.prod(len(v) for v in IMAGE_FACTORS.values())  # 192
N_AUDIO_TUPLES = math.prod(len(v) for v in AUDIO_FACTORS.values())  # 36

_SHAPE_PLURAL = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
}
_COLOURS_RGB = np.array(
    [[0.92, 0.16, 0.12], [0.16, 0.80, 0.22], [0.20, 0.36, 0.96], [0.96, 0.88, 0.16]], np.float32
)
PITCH_HZ = np.array([180.0, 360.0, 720.0, 1440.0])
NOTES_PER_CLIP = np.array([2, 4, 8])

SAMPLE_RATE = 8000
N_FFT = 256
HOP = 128
MIN_TEXT_LENGTH = 14  # the longest caption the grammar produces


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """Words of ``vocab.txt``; the id of a word is its line number (0 = ``<pad>``)."""
    text = importlib.resources.files("gram_jax.data").joinpath("vocab.txt").read_text()
    return tuple(w for w in text.splitlines() if w)


@functools.cache
def _word_ids() -> dict[str, int]:
    return {w: i for i, w in enumerate(vocabulary())}


def encode_caption(words: list[str], length: int) -> np.ndarray:
    """Token ids ``(length,) int32`` of ``words``, right-padded with 0."""
    ids = _word_ids()
    if len(words) > length:
        raise ValueError(f"caption of {len(words)} words does not fit text_length={length}")
    out = np.zeros(length, np.int32)
    out[: len(words)] = [ids.get(w, ids["<unk>"]) for w in words]
    return out


def decode_caption(tokens) -> str:
    """Inverse of ``encode_caption``: the words of the non-pad ids, space separated."""
    vocab = vocabulary()
    return " ".join(vocab[int(t)] for t in np.asarray(tokens) if int(t) != 0)


def caption_words(f: dict[str, int], template: int) -> list[str]:
    """Words naming all 8 factors of one example; ``template`` 0/1 picks the word order."""
    shape = IMAGE_FACTORS["shape"][f["shape"]]
    noun = shape if f["count"] == 0 else _SHAPE_PLURAL[shape]
    image = [
        IMAGE_FACTORS["count"][f["count"]],
        IMAGE_FACTORS["size"][f["size"]],
        IMAGE_FACTORS["colour"][f["colour"]],
        noun,
        "at",
        "the",
        IMAGE_FACTORS["position"][f["position"]],
    ]
    audio = [
        "a",
        AUDIO_FACTORS["pitch"][f["pitch"]],
        AUDIO_FACTORS["timbre"][f["timbre"]],
        "tone",
        "beating",
        AUDIO_FACTORS["tempo"][f["tempo"]],
    ]
    return image + ["with"] + audio if template == 0 else audio + ["and"] + image


# ---------------------------------------------------------------------------------------
# Balanced factor design
# ---------------------------------------------------------------------------------------


def _balanced_slots(n: int, n_values: int, rng: np.random.Generator) -> np.ndarray:
    """n draws from ``range(n_values)`` in which each used value occurs >= 2 times (n >= 2)."""
    used = rng.permutation(n_values)[: max(1, min(n_values, n // 2))]
    return rng.permutation(np.resize(used, n))


def _unique_pairs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Image / audio tuple ids for n items with no repeated joint tuple (n <= joint / 2)."""
    img = _balanced_slots(n, N_IMAGE_TUPLES, rng)
    aud = _balanced_slots(n, N_AUDIO_TUPLES, rng)
    # Repair repeated joint tuples by swapping audio slots: swaps keep every degree (how often
    # each image / audio tuple occurs) unchanged. At density <= 1/2 this converges in a few
    # rounds.
    for _ in range(1000):
        _, first = np.unique(img * N_AUDIO_TUPLES + aud, return_index=True)
        dup = np.setdiff1d(np.arange(n), first)
        if dup.size == 0:
            return img, aud
        for d, p in zip(dup, rng.integers(0, n, size=dup.size), strict=True):
            aud[d], aud[p] = aud[p], aud[d]
    raise RuntimeError("could not build a duplicate-free factor design")  # pragma: no cover


def sample_factors(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Factor labels ``{name: (n,) int32}`` of a split of n items (balanced design, above)."""
    joint = N_IMAGE_TUPLES * N_AUDIO_TUPLES
    if n < 2:
        raise ValueError(f"a synthetic_trimodal split needs at least 2 items, got {n}")
    if n <= joint // 2:
        img, aud = _unique_pairs(n, rng)
    else:
        # Large splits: whole copies of the joint space plus a random subset of it; every
        # tuple then occurs floor(n/joint) or one more times (each image tuple >= 18 times).
        reps, rest = divmod(n, joint)
        ids = np.concatenate(
            [np.tile(np.arange(joint), reps), rng.choice(joint, size=rest, replace=False)]
        )
        ids = rng.permutation(ids)
        img, aud = np.divmod(ids, N_AUDIO_TUPLES)
    out = {}
    image_f = np.unravel_index(img, [len(v) for v in IMAGE_FACTORS.values()])
    audio_f = np.unravel_index(aud, [len(v) for v in AUDIO_FACTORS.values()])
    for name, values in zip(IMAGE_FACTORS, image_f, strict=True):
        out[name] = values.astype(np.int32)
    for name, values in zip(AUDIO_FACTORS, audio_f, strict=True):
        out[name] = values.astype(np.int32)
    return out


# ---------------------------------------------------------------------------------------
# Image rendering (vectorised over examples)
# ---------------------------------------------------------------------------------------


def render_images(
    f: dict[str, np.ndarray], size: int, rng: np.random.Generator, supersample: int = 2
) -> np.ndarray:
    """Render ``(n, size, size, 3) uint8`` images of the image factors in ``f``."""
    n = len(f["shape"])
    s = size / 32.0
    radius = np.where(f["size"] == 1, 4.8 * s, 3.0 * s) * rng.uniform(0.95, 1.05, n)
    count = f["count"] + 1
    slot_w = size / count
    k = np.arange(3)[None, :]
    active = k < count[:, None]  # (n, 3)
    jx = np.maximum(0.0, slot_w / 2 - radius - 0.5)[:, None]
    cx = (k + 0.5) * slot_w[:, None] + rng.uniform(-1, 1, (n, 3)) * jx
    jy = np.maximum(0.0, size / 4 - radius - 0.5)
    cy = np.where(f["position"] == 0, size / 4, 3 * size / 4) + rng.uniform(-1, 1, n) * jy
    cy = np.repeat(cy[:, None], 3, axis=1)

    grid = (np.arange(size * supersample) + 0.5) / supersample  # pixel units
    dx = grid[None, None, None, :] - cx[:, :, None, None]  # (n, 3, 1, G)
    dy = grid[None, None, :, None] - cy[:, :, None, None]  # (n, 3, G, 1)
    r = radius[:, None, None, None]
    ax, ay = np.abs(dx), np.abs(dy)
    shape = f["shape"][:, None, None, None]
    circle = dx * dx + dy * dy <= r * r
    square = np.maximum(ax, ay) <= 0.84 * r
    triangle = (dy >= -r) & (dy <= 0.75 * r) & (ax <= (dy + r) / 1.75)
    cross = ((ax <= 0.34 * r) & (ay <= r)) | ((ay <= 0.34 * r) & (ax <= r))
    mask = np.select([shape == 0, shape == 1, shape == 2], [circle, square, triangle], cross)
    mask = mask & active[:, :, None, None]
    g = size
    cover = mask.reshape(n, 3, g, supersample, g, supersample).mean(axis=(3, 5))
    alpha = 1.0 - np.prod(1.0 - cover, axis=1)  # (n, g, g)

    colour = _COLOURS_RGB[f["colour"]] + rng.uniform(-0.05, 0.05, (n, 3))
    bg = 0.2 + rng.uniform(-0.05, 0.05, (n, 1, 1, 1)) + rng.normal(0, 0.02, (n, g, g, 1))
    img = bg * (1 - alpha[..., None]) + colour[:, None, None, :] * alpha[..., None]
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Audio synthesis and log-mel (vectorised over examples)
# ---------------------------------------------------------------------------------------


def n_samples(n_frames: int) -> int:
    """Waveform length whose framing (window 256, hop 128, no padding) gives n_frames."""
    return (n_frames - 1) * HOP + N_FFT


def synthesize_audio(
    f: dict[str, np.ndarray], n_frames: int, rng: np.random.Generator
) -> np.ndarray:
    """Waveforms ``(n, n_samples(n_frames)) float32`` in about [-1, 1] of the audio factors."""
    n = len(f["pitch"])
    length = n_samples(n_frames)
    t = np.arange(length) / SAMPLE_RATE
    f0 = PITCH_HZ[f["pitch"]] * rng.uniform(0.97, 1.03, n)  # (n,)
    # Each timbre is synthesised only for the rows that use it (the harmonic stack and the
    # filtered noise are the expensive parts).
    tone = np.zeros((n, length), np.float32)
    rows = f["timbre"] == 0
    tone[rows] = np.sin(2 * np.pi * f0[rows, None] * t[None, :])
    rows = np.flatnonzero(f["timbre"] == 1)
    if rows.size:
        phase = (2 * np.pi * f0[rows, None] * t[None, :]).astype(np.float32)
        buzz = np.zeros((rows.size, length), np.float32)
        for h in range(1, 12):
            ok = (h * f0[rows] < 0.45 * SAMPLE_RATE)[:, None]
            buzz += np.where(ok, np.sin(h * phase) / h, np.float32(0.0))
        tone[rows] = buzz / 1.2
    rows = np.flatnonzero(f["timbre"] == 2)
    if rows.size:
        # Narrow noise band around f0: filter white noise in the frequency domain.
        spec = np.fft.rfft(rng.normal(size=(rows.size, length)).astype(np.float32), axis=1)
        freqs = np.fft.rfftfreq(length, 1 / SAMPLE_RATE)
        f0r = f0[rows, None]
        band = np.exp(-0.5 * ((freqs[None, :] - f0r) / (0.12 * f0r)) ** 2)
        noisy = np.fft.irfft(spec * band, n=length, axis=1)
        tone[rows] = noisy / (noisy.std(axis=1, keepdims=True) * 1.6 + 1e-8)

    # Rhythm: notes sounding for the first 55 % of each period, 4 ms ramps, random phase.
    period = length / NOTES_PER_CLIP[f["tempo"]]  # samples
    pos = np.arange(length)[None, :] + rng.uniform(0, 1, n)[:, None] * period[:, None]
    pos = np.mod(pos, period[:, None])
    on = 0.55 * period[:, None]
    ramp = 32.0
    env = np.clip(np.minimum(pos / ramp, (on - pos) / ramp), 0.0, 1.0)
    amp = rng.uniform(0.5, 1.0, (n, 1))
    wave = amp * env * tone + rng.normal(0, 0.01, (n, length))
    return wave.astype(np.float32)


@functools.cache
def mel_filterbank(
    n_mels: int,
    n_fft: int = N_FFT,
    sample_rate: int = SAMPLE_RATE,
    fmin: float = 50.0,
    fmax: float = 4000.0,
) -> np.ndarray:
    """HTK-mel triangular filters ``(n_fft // 2 + 1, n_mels) float32``."""

    def hz_to_mel(hz):
        return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)

    def mel_to_hz(mel):
        return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)

    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    freqs = np.fft.rfftfreq(n_fft, 1 / sample_rate)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None, :] - lo) / (mid - lo)
    down = (hi - freqs[None, :]) / (hi - mid)
    fb = np.maximum(0.0, np.minimum(up, down))  # (n_mels, n_bins)
    # Slaney-style area normalisation keeps wide high-frequency filters from dominating.
    fb *= 2.0 / (hi - lo)
    return fb.T.astype(np.float32)


def log_mel(wave: np.ndarray, n_mels: int) -> np.ndarray:
    """``(n, S)`` waveforms -> ``(n, T, n_mels) float32`` log-mel power, T = 1 + (S-256)//128."""
    n_frames = 1 + (wave.shape[1] - N_FFT) // HOP
    idx = np.arange(n_frames)[:, None] * HOP + np.arange(N_FFT)[None, :]
    frames = wave[:, idx] * np.hanning(N_FFT).astype(np.float32)  # (n, T, N_FFT)
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
    mel = power.astype(np.float32) @ mel_filterbank(n_mels)
    return np.log(mel + 1e-6).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Whole examples
# ---------------------------------------------------------------------------------------

SPLITS = ("train", "validation", "test")


def generate_split(
    n: int,
    *,
    seed: int,
    split: str,
    image_size: int = 32,
    n_frames: int = 32,
    n_mels: int = 32,
    text_length: int = 16,
    with_waveform: bool = False,
    chunk: int = 1024,
) -> dict[str, np.ndarray]:
    """All arrays of one split: ``image``, ``audio``, ``text``, ``index``, ``factors/*``.

    Deterministic in (seed, split, n and the shape arguments).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    f = sample_factors(n, rng)
    template = rng.integers(0, 2, n).astype(np.int32)
    images, audios, waves = [], [], []
    for lo in range(0, n, chunk):
        fc = {k: v[lo : lo + chunk] for k, v in f.items()}
        images.append(render_images(fc, image_size, rng))
        wave = synthesize_audio(fc, n_frames, rng)
        audios.append(log_mel(wave, n_mels))
        if with_waveform:
            waves.append(wave)
    text = np.stack(
        [
            encode_caption(
                caption_words({k: int(v[i]) for k, v in f.items()}, int(template[i])), text_length
            )
            for i in range(n)
        ]
    )
    out = {
        "image": np.concatenate(images),
        "audio": np.concatenate(audios),
        "text": text,
        "index": np.arange(n, dtype=np.int32),
    }
    if with_waveform:
        out["waveform"] = np.concatenate(waves)
    out.update({f"factors/{k}": v for k, v in f.items()})
    out["factors/template"] = template
    return out


@dataclasses.dataclass
class SyntheticTrimodalConfig(tfds.core.BuilderConfig):
    """Builder configuration; ``prepare(..., **fields)`` derives the config name."""

    train_size: int = bounded(8192, low=2)
    validation_size: int = bounded(1024, low=2)
    test_size: int = bounded(1024, low=2)
    image_size: int = bounded(32, low=16)
    n_frames: int = bounded(32, low=8)
    n_mels: int = bounded(32, low=8)
    text_length: int = bounded(16, low=MIN_TEXT_LENGTH)
    with_waveform: bool = False
    seed: int = 0


class SyntheticTrimodal(LocalBuilder):
    """TFDS builder of ``synthetic_trimodal`` (see the module docstring)."""

    BUILDER_CONFIGS = [SyntheticTrimodalConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        feats = {
            "image": tfds.features.Tensor(shape=(c.image_size, c.image_size, 3), dtype=np.uint8),
            "audio": tfds.features.Tensor(shape=(c.n_frames, c.n_mels), dtype=np.float32),
            "text": tfds.features.Tensor(shape=(c.text_length,), dtype=np.int32),
            "index": tfds.features.Scalar(dtype=np.int32),
        }
        modalities = {"image": "image", "audio": "audio", "text": "text"}
        if c.with_waveform:
            feats["waveform"] = tfds.features.Tensor(
                shape=(n_samples(c.n_frames),), dtype=np.float32
            )
            modalities["waveform"] = "waveform"
        for name in [*FACTORS, "template"]:
            feats[f"factors/{name}"] = tfds.features.Scalar(dtype=np.int32)
        return self.local_info(
            __doc__.split("\n\n")[0],
            feats,
            modalities=modalities,
            factors={k: list(v) for k, v in FACTORS.items()},
            vocabulary=list(vocabulary()),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        c = self.builder_config
        return {
            split: self._generate_examples(split=split, n=getattr(c, f"{split}_size"))
            for split in SPLITS
        }

    def _generate_examples(self, split: str, n: int):
        c = self.builder_config
        arrays = generate_split(
            n,
            seed=c.seed,
            split=split,
            image_size=c.image_size,
            n_frames=c.n_frames,
            n_mels=c.n_mels,
            text_length=c.text_length,
            with_waveform=c.with_waveform,
        )
        for i in range(n):
            yield i, {k: v[i] for k, v in arrays.items()}
