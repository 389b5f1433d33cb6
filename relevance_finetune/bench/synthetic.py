"""Procedural spurious images: the class is the object's pattern, a shortcut in the background agrees.

Every image is a foreground object, a glyph of random shape, position, size and two random
colours (of random contrast: some objects are hard to read), filled with the pattern of its
class (stripes of a class-specific angle and period, or a checkerboard): the class evidence lives
inside the object. Outside it lies a shortcut of one of ``num_classes`` values, of a family:

- ``hue``: the background's hue (with a random smooth brightness gradient);
- ``texture``: the background's texture, oriented waves of a class-specific angle and period
  in two random colours (their hue carries nothing);
- ``mark``: a small plate of class-specific colour and symbol (a third of the image side)
  stamped in the top-left corner, like a watermark or a logo (an object reaching the corner
  covers it); the background hue is random.

In the biased training distribution the shortcut is the class's with probability ``p``; out of
distribution it is independent of the class; adversarially it is always another class's. Exact
foreground masks come with every image (the shortcut is never inside them); generation is
deterministic per seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["CLASS_NAMES", "FAMILIES", "NUM_CLASSES", "SpuriousConfig", "make_split", "render_image"]

Array = np.ndarray
Distribution = Literal["biased", "independent", "adversarial"]
Family = Literal["hue", "texture", "mark"]
FAMILIES: tuple[Family, ...] = ("hue", "texture", "mark")


def _disk(u: Array, v: Array) -> Array:
    return u ** 2 + v ** 2 < 0.9


def _square(u: Array, v: Array) -> Array:
    return np.maximum(abs(u), abs(v)) < 0.8


def _triangle(u: Array, v: Array) -> Array:
    return (v < 0.8) & (abs(u) < 0.55 * (v + 0.9))


def _plus(u: Array, v: Array) -> Array:
    return ((abs(u) < 0.3) & (abs(v) < 0.95)) | ((abs(v) < 0.3) & (abs(u) < 0.95))


def _ring(u: Array, v: Array) -> Array:
    r2 = u ** 2 + v ** 2
    return (r2 < 0.95) & (r2 > 0.3)


def _diamond(u: Array, v: Array) -> Array:
    return abs(u) + abs(v) < 1.0


def _cross(u: Array, v: Array) -> Array:
    return ((abs(u - v) < 0.4) | (abs(u + v) < 0.4)) & (np.maximum(abs(u), abs(v)) < 0.9)


def _bars(u: Array, v: Array) -> Array:
    return ((abs(v - 0.5) < 0.25) | (abs(v + 0.5) < 0.25)) & (abs(u) < 0.9)


def _tee(u: Array, v: Array) -> Array:
    return ((abs(v + 0.65) < 0.28) & (abs(u) < 0.9)) | ((abs(u) < 0.28) & (abs(v) < 0.92))


def _frame(u: Array, v: Array) -> Array:
    m = np.maximum(abs(u), abs(v))
    return (m < 0.9) & (m > 0.45)


SHAPES: tuple[Callable[[Array, Array], Array], ...] = (
    _disk, _square, _triangle, _plus, _ring, _diamond, _cross, _bars, _tee, _frame)
NUM_SHAPES = len(SHAPES)
CLASS_NAMES = tuple(f"stripes {45 * (c % 4)}° /{4 if c < 4 else 7}px" for c in range(8)) + (
    "checker 3px", "checker 6px")
NUM_CLASSES = len(CLASS_NAMES)


@dataclass(frozen=True)
class SpuriousConfig:
    """Size of the images and strength of the cues."""

    num_classes: int = 10
    image_size: int = 64
    object_size: tuple[float, float] = (0.22, 0.38)  # half-extent as a fraction of the image
    noise: float = 0.08
    contrast: tuple[float, float] = (0.05, 0.6)  # brightness gap between the object's two colours
    family: Family = "hue"  # the kind of shortcut

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= NUM_CLASSES:
            raise ValueError(f"num_classes must lie in [2, {NUM_CLASSES}], got {self.num_classes}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")


def _hue(index: int, num_classes: int, size: int, rng: np.random.Generator) -> Array:
    """Background of hue ``index`` with a random smooth brightness gradient."""
    hue = index / num_classes
    base = 0.5 + 0.3 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3])))
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    slope = rng.uniform(-0.3, 0.3, size=2)
    return base[:, None, None] * (1 + slope[0] * x + slope[1] * y)[None]


def _waves(index: int, size: int, rng: np.random.Generator) -> Array:
    """Texture ``index``: band-pass noise of one of 5 angles x 2 periods (3 and 5 waves per
    image side, coarser than any object pattern), thresholded, in two random colours."""
    period = size / (3 if index >= 5 else 5)
    angle = np.pi * (index % 5) / 5
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    along = fx * np.cos(angle) + fy * np.sin(angle)
    across = -fx * np.sin(angle) + fy * np.cos(angle)
    spectrum = np.exp(-((np.abs(along) - 1 / period) ** 2 + across ** 2) / (2 * (0.25 / period) ** 2))
    noise = np.fft.ifft2(np.fft.fft2(rng.normal(size=(size, size))) * spectrum).real
    colours = rng.uniform(0.15, 0.85, size=(2, 3))
    waves = (noise > 0)[None]
    return np.where(waves, colours[0, :, None, None], colours[1, :, None, None])


def _mark_pattern(index: int) -> Array:
    """The (4, 4) boolean symbol of class ``index``: fixed, distinct for every class."""
    bits = np.random.default_rng(20221128 + index).permutation(16) < 7
    return bits.reshape(4, 4)


def _stamp(image: Array, mask: Array, index: int, num_classes: int) -> Array:
    """Stamp the mark of ``index`` in the top-left corner, like a watermark: a plate a third of
    the image side in the class's hue with the class's 4x4 symbol cut out in black; an object
    that reaches the corner covers it."""
    size = image.shape[-1]
    cell = max(1, size // 12)
    side = 4 * cell
    plate = np.zeros((size, size), bool)
    plate[:side, :side] = True
    symbol = np.zeros((size, size), bool)
    symbol[:side, :side] = np.kron(_mark_pattern(index), np.ones((cell, cell), bool))
    colour = 0.5 + 0.5 * np.cos(2 * np.pi * (index / num_classes + np.array([0.0, 1 / 3, 2 / 3])))
    marked = np.where(plate[None], colour[:, None, None], image)
    marked = np.where(symbol[None], 0.0, marked)
    return np.where(mask[None], image, marked)


def _pattern(label: int, size: int, rng: np.random.Generator) -> Array:
    """The class's texture in [0, 1]: stripes (4 angles x 2 periods) or a checkerboard (2 sizes)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    shift = rng.uniform(0, 8, size=2)
    x, y = x + shift[0], y + shift[1]
    if label >= 8:
        period = 3.0 if label == 8 else 6.0
        return ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float32)
    angle = np.pi * (label % 4) / 4
    period = 4.0 if label < 4 else 7.0
    return (np.sin((x * np.cos(angle) + y * np.sin(angle)) * 2 * np.pi / period) > 0).astype(np.float32)


def render_image(
        label: int,
        background: int,
        config: SpuriousConfig,
        rng: np.random.Generator,
) -> tuple[Array, Array]:
    """One (3, S, S) float image in [0, 1] and its (S, S) boolean foreground mask, with shortcut
    value ``background`` of ``config.family``."""
    size = config.image_size
    half = rng.uniform(*config.object_size) * size
    aspect = rng.uniform(0.87, 1.15)
    hx, hy = half * aspect, half / aspect
    cx = rng.uniform(hx, size - hx)
    cy = rng.uniform(hy, size - hy)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    mask = SHAPES[rng.integers(NUM_SHAPES)]((x - cx) / hx, (y - cy) / hy)
    if config.family == "texture":
        image = _waves(background, size, rng)
    else:  # a mark lies on a background of random hue
        hue = background if config.family == "hue" else rng.integers(config.num_classes)
        image = _hue(hue, config.num_classes, size, rng)
    light = rng.uniform(0.3, 1.0, size=3)
    dark = np.clip(light - rng.uniform(*config.contrast), 0, 1)  # low contrast: a hard object
    colours = np.stack([light, dark])
    pattern = _pattern(label, size, rng)[None]
    texture = colours[0, :, None, None] * pattern + colours[1, :, None, None] * (1 - pattern)
    image = np.where(mask[None], texture, image)
    if config.family == "mark":
        image = _stamp(image, mask, background, config.num_classes)
    image = image + rng.normal(0, config.noise, size=image.shape)
    return np.clip(image, 0, 1).astype(np.float32), mask


def _backgrounds(labels: Array, distribution: Distribution, p: float, k: int, rng: np.random.Generator) -> Array:
    other = (labels + rng.integers(1, k, size=len(labels))) % k
    if distribution == "adversarial":
        return other
    if distribution == "independent":
        return rng.integers(0, k, size=len(labels))
    return np.where(rng.random(len(labels)) < p, labels, other)


def make_split(
        n: int,
        distribution: Distribution,
        p: float = 0.9,
        config: SpuriousConfig = SpuriousConfig(),
        seed: int = 0,
        classes: tuple[int, ...] | None = None,
) -> TensorDataset:
    """``n`` images with labels balanced over ``classes`` (default: all).

    Returns a ``TensorDataset`` of (images (n, 3, S, S) float in [0, 1], masks (n, S, S) float,
    labels (n,) long, shortcut values (n,) long).
    """
    if distribution not in ("biased", "independent", "adversarial"):
        raise ValueError(f"unknown distribution {distribution!r}")
    rng = np.random.default_rng(seed)
    classes = tuple(range(config.num_classes)) if classes is None else tuple(classes)
    labels = np.array(classes)[np.arange(n) % len(classes)]
    rng.shuffle(labels)
    backgrounds = _backgrounds(labels, distribution, p, config.num_classes, rng)
    rendered = [render_image(int(c), int(b), config, rng) for c, b in zip(labels, backgrounds)]
    images = torch.from_numpy(np.stack([r[0] for r in rendered]))
    masks = torch.from_numpy(np.stack([r[1] for r in rendered])).float()
    return TensorDataset(images, masks, torch.from_numpy(labels).long(), torch.from_numpy(backgrounds).long())
