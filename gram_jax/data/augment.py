"""Per-modality augmentations: pure NumPy on one example, driven by an explicit Generator.

The pipeline derives each example's Generator from (seed, epoch, record index, view), so
augmentation is deterministic, independent of worker count and resumable from a
checkpoint. Inputs are already converted (see ``gram_jax.modalities``): images float32 (H, W, 3) in
[0, 1]; audio log-mel float32 (T, n_mels) standardised; text int32 (L,) ids, 0 = pad;
features float32 (F,); waveform float32 (S,). Each kind's default augmentation is part of
its registration in ``gram_jax.modalities``; an :class:`Augment` preset changes some of them.

Defaults follow CoMM (docs/authors_code.md section 8) with two deliberate deviations: no hue
jitter and no grayscale by default (they destroy the colour factors that synthetic_trimodal
captions and the Trifeature synergy label depend on), and a milder crop (0.3-1), which the
CPU study of comm.md section 9 found to learn faster.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ColourJitter:
    """With probability ``p``: brightness, contrast and saturation scaled by factors drawn from
    ``U(1 - s, 1 + s)`` for ``s`` = ``brightness``, ``contrast``, ``saturation``, then (if
    ``hue``) the hue turned by ``U(-hue, hue)`` of a full turn (a rotation of the YIQ chroma
    plane), as torchvision's ``RandomApply([ColorJitter(...)], p)``."""

    p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.0

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            return x
        x = x * rng.uniform(1 - self.brightness, 1 + self.brightness)
        g = _gray(x)
        x = (x - g.mean()) * rng.uniform(1 - self.contrast, 1 + self.contrast) + g.mean()
        g = _gray(x)[..., None]
        x = (x - g) * rng.uniform(1 - self.saturation, 1 + self.saturation) + g
        if self.hue:
            theta = rng.uniform(-self.hue, self.hue) * 2 * np.pi
            c, s = np.cos(theta), np.sin(theta)
            rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], np.float32)
            x = x @ (_FROM_YIQ @ rot @ _TO_YIQ).T.astype(np.float32)
        return x


@dataclasses.dataclass(frozen=True)
class ImageAug:
    """Random resized crop (bilinear) + horizontal flip + colour jitter (+ optional grayscale)."""

    crop_scale: tuple[float, float] = (0.3, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: ColourJitter = ColourJitter()
    grayscale_p: float = 0.0

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w, _ = x.shape
        if self.crop_scale != (1.0, 1.0):
            x = _random_resized_crop(x, rng, self.crop_scale, self.crop_ratio, h, w)
        if rng.random() < self.flip_p:
            x = x[:, ::-1]
        x = self.jitter(x, rng)
        if rng.random() < self.grayscale_p:
            x = np.repeat(_gray(x)[..., None], 3, axis=-1)
        return np.clip(x, 0.0, 1.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class AudioAug:
    """Circular time shift, SpecAugment-style time/frequency masks (to 0), Gaussian noise.

    ``time_masks`` / ``freq_masks``: ``(count, max_width)``; each of the ``count`` masks is
    applied with probability ``mask_p`` and zeroes ``U{0, ..., max_width}`` consecutive frames
    (mel bins) at a uniform position.
    """

    max_shift: int = 4
    time_masks: tuple[int, int] = (1, 4)
    freq_masks: tuple[int, int] = (1, 4)
    mask_p: float = 0.5
    noise_std: float = 0.1

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = np.roll(x, rng.integers(-self.max_shift, self.max_shift + 1), axis=0)
        x = x.copy()
        for axis, (count, width) in enumerate((self.time_masks, self.freq_masks)):
            _zero_stripes(np.moveaxis(x, axis, 0), rng, count, width, self.mask_p)
        if self.noise_std:
            x = x + rng.normal(0.0, self.noise_std, x.shape)
        return x.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TextAug:
    """Token dropout: each non-pad token is removed with probability ``dropout``.

    The kept tokens are compacted to the left and re-padded, so ``ids != 0`` stays the
    mask; at least one token is always kept.
    """

    dropout: float = 0.1

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        tokens = x[x != 0]
        if tokens.size == 0:
            return x
        keep = rng.random(tokens.size) >= self.dropout
        if not keep.any():
            keep[rng.integers(tokens.size)] = True
        out = np.zeros_like(x)
        out[: keep.sum()] = tokens[keep]
        return out


@dataclasses.dataclass(frozen=True)
class FeatureAug:
    """CoMM/MultiBench ``noise`` and ``drop`` for vectors, each applied with probability p.

    noise: + N(0, noise_std^2) on every entry; drop: zero a random U(0, drop_max) fraction
    of the entries.
    """

    noise_std: float = 0.1
    noise_p: float = 0.5
    drop_max: float = 0.8
    drop_p: float = 0.5

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = x.astype(np.float32, copy=True)
        if rng.random() < self.drop_p:
            frac = rng.uniform(0.0, self.drop_max)
            x[rng.random(x.shape) < frac] = 0.0
        if rng.random() < self.noise_p:
            x = x + rng.normal(0.0, self.noise_std, x.shape).astype(np.float32)
        return x


@dataclasses.dataclass(frozen=True)
class WaveformAug:
    """Circular time shift by up to ``max_shift`` samples + Gaussian noise."""

    max_shift: int = 512
    noise_std: float = 0.01

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = np.roll(x, rng.integers(-self.max_shift, self.max_shift + 1))
        return (x + rng.normal(0.0, self.noise_std, x.shape)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Augment:
    """Augmentation per modality kind, with optional per-modality overrides.

    ``kinds`` maps a kind's data name (``ModalityKind.data_kind``: ``"image"`` also for
    ``cnn``) to an augmentation or ``None`` (not augmented); a kind not listed gets its
    registered default (``gram_jax.modalities``) when ``defaults`` is True, else none.
    ``overrides`` maps a modality name (e.g. ``"image2"``) to an augmentation or ``None``.
    """

    kinds: tuple[tuple[str, object], ...] = ()
    overrides: tuple[tuple[str, object], ...] = ()
    defaults: bool = True

    def for_modality(self, name: str, kind):
        """The augmentation callable for modality ``name`` of registered ``kind`` (or None).

        ``kind`` is a ``gram_jax.modalities.ModalityKind`` (its ``data_kind`` and default
        ``augment`` are read).
        """
        over = dict(self.overrides)
        if name in over:
            return over[name]
        table = dict(self.kinds)
        if kind.data_kind in table:
            return table[kind.data_kind]
        return kind.augment if self.defaults else None


def per_kind(**kinds) -> Augment:
    """``Augment`` with the given kinds' augmentations (others: registered defaults)."""
    return Augment(kinds=tuple(kinds.items()))


PRESETS = {
    "none": None,
    "default": Augment(),
    # CoMM section-9 "light": crop 0.3-1 + flip only for images; mild everything else.
    "light": per_kind(
        image=ImageAug(jitter=ColourJitter(p=0.0)),
        audio=AudioAug(max_shift=2, mask_p=0.0, noise_std=0.05),
        text=TextAug(dropout=0.05),
        features=FeatureAug(drop_p=0.0),
    ),
    # SimCLR as in the CoMM repository (includes hue jitter and grayscale).
    "simclr": per_kind(
        image=ImageAug(crop_scale=(0.08, 1.0), jitter=ColourJitter(hue=0.1), grayscale_p=0.2)
    ),
}


def resolve(augment) -> Augment | None:
    """``None`` / preset name / ``Augment`` / ``{modality: aug}`` -> ``Augment`` or None."""
    if augment is None or isinstance(augment, Augment):
        return augment
    if isinstance(augment, str):
        if augment not in PRESETS:
            raise ValueError(
                f"unknown augmentation preset {augment!r}; expected one of {sorted(PRESETS)}"
            )
        return PRESETS[augment]
    if isinstance(augment, dict):
        return Augment(overrides=tuple(augment.items()), defaults=False)
    raise ValueError(
        f"augment must be None, a preset name, an Augment or a dict, got {type(augment).__name__}"
    )


# ---------------------------------------------------------------------------------------
# Image helpers
# ---------------------------------------------------------------------------------------


def _bilinear(x: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    h, w = x.shape[:2]
    ys = np.clip(ys, 0, h - 1)
    xs = np.clip(xs, 0, w - 1)
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[:, None, None]
    wx = (xs - x0)[None, :, None]
    top = x[y0][:, x0] * (1 - wx) + x[y0][:, x1] * wx
    bot = x[y1][:, x0] * (1 - wx) + x[y1][:, x1] * wx
    return top * (1 - wy) + bot * wy


def _random_resized_crop(x, rng, scale, ratio, out_h, out_w):
    h, w = x.shape[:2]
    area = h * w
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw, ch = np.sqrt(a * r), np.sqrt(a / r)
        if cw <= w and ch <= h:
            break
    else:
        ch, cw = float(h), float(w)
    y0 = rng.uniform(0, h - ch)
    x0 = rng.uniform(0, w - cw)
    ys = y0 + (np.arange(out_h) + 0.5) * ch / out_h - 0.5
    xs = x0 + (np.arange(out_w) + 0.5) * cw / out_w - 0.5
    return _bilinear(x, ys, xs)


# RGB -> YIQ; its first row is the luma _gray uses.
_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32
)
_FROM_YIQ = np.linalg.inv(_TO_YIQ)


def _gray(x):
    return x @ _TO_YIQ[0]


# ---------------------------------------------------------------------------------------
# Audio helpers
# ---------------------------------------------------------------------------------------


def _zero_stripes(x: np.ndarray, rng, count: int, width: int, p: float) -> None:
    """In place, ``count`` times with probability p: zero ``U{0..width}`` consecutive entries
    along axis 0 of ``x`` at a uniform position (``x`` is a view with the masked axis moved
    first, so the caller's array is written)."""
    n = x.shape[0]
    for _ in range(count):
        if rng.random() < p:
            wdt = rng.integers(0, width + 1)
            lo = rng.integers(0, max(1, n - wdt + 1))
            x[lo : lo + wdt] = 0.0
