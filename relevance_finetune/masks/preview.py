"""A contact sheet of a masks folder: a sample of its images with their masks' outlines, one PNG.

:func:`write_preview` is what ``relevance-finetune masks`` and ``train --masks tokencut:MODEL``
(or ``propagate:MASKS``) leave beside the masks as ``preview.png``, so that a user looks at them
before training on them. The sample is seeded (the same images every time) and spread over the
classes: one image of each class in turn until ``count``.
"""
from __future__ import annotations

import random
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage

from ..images import list_images, read_binary_mask, read_image
from ..viz import save_figure

__all__ = ["OUTLINE_COLOR", "PREVIEW", "draw_outline", "preview_sample", "write_preview"]

PREVIEW = "preview.png"  # beside the masks
OUTLINE_COLOR = (255, 0, 255)  # magenta: rare in photos
_COLUMNS = 6
_CELL_INCHES = 2.0
_THUMBNAIL = 192  # longest side of each image on the sheet, in pixels
_TITLE_WIDTH = 24  # characters per title line


def preview_sample(tree: dict[str, Sequence[Path]], count: int = 24, seed: int = 0) -> list[tuple[str, Path]]:
    """Up to ``count`` (class, image) pairs of ``tree`` (class -> images), seeded and spread over
    the classes: each class's images shuffled, then one of each class in turn."""
    rng = random.Random(seed)
    queues = {label: rng.sample(list(paths), len(paths)) for label, paths in tree.items()}
    sample: list[tuple[str, Path]] = []
    for turn in range(max((len(paths) for paths in queues.values()), default=0)):
        sample += [(label, paths[turn]) for label, paths in queues.items() if turn < len(paths)]
    return sample[:count]


def draw_outline(image: np.ndarray, mask: np.ndarray, width: int = 2,
                 color: tuple[int, int, int] = OUTLINE_COLOR) -> np.ndarray:
    """A copy of ``image`` (H, W, 3) uint8 with the inner edge of ``mask`` (H, W) bool painted
    ``width`` pixels wide in ``color``; a mask touching the image's border is outlined there too."""
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask of shape {mask.shape} for an image of shape {image.shape[:2]}")
    edge = mask & ~ndimage.binary_erosion(mask, iterations=width)
    drawn = image.copy()
    drawn[edge] = color
    return drawn


def _thumbnail(image: Path, mask: Path) -> tuple[np.ndarray, str]:
    """The image shrunk to :data:`_THUMBNAIL` with its mask's outline, and a note for the title:
    ``"no mask"``, or what could not be read (a blank cell for an unreadable image)."""
    try:
        pil = read_image(image)
    except (OSError, ValueError):
        return np.full((_THUMBNAIL, _THUMBNAIL, 3), 255, np.uint8), "unreadable image"
    pil.thumbnail((_THUMBNAIL, _THUMBNAIL), Image.Resampling.LANCZOS)
    pixels = np.asarray(pil)
    if not mask.is_file():
        return pixels, "no mask"
    try:
        binary = read_binary_mask(mask)
    except (OSError, ValueError):
        return pixels, "unreadable mask"
    shrunk = Image.fromarray(binary).resize((pil.width, pil.height), Image.Resampling.NEAREST)
    return draw_outline(pixels, np.asarray(shrunk, dtype=bool), width=max(1, round(max(pil.size) / 96))), ""


def write_preview(images: str | Path, masks: str | Path, path: str | Path | None = None, count: int = 24,
                  seed: int = 0) -> Path:
    """Draw a sample of ``images`` (``<class>/<name>.<ext>``) with the outlines of their masks in
    ``masks`` (``<class>/<name>.png``) as a PNG at ``path`` (default ``masks/preview.png``), written
    atomically; returns the path. Each image is titled with its class and file name, and says
    ``no mask`` where the folder has none for it."""
    images, masks = Path(images), Path(masks)
    sample = preview_sample(list_images(images), count, seed)
    if not sample:
        raise ValueError(f"{images} holds no images to preview")
    rows = -(-len(sample) // _COLUMNS)
    columns = min(len(sample), _COLUMNS)
    figure = Figure(figsize=(_CELL_INCHES * columns, (_CELL_INCHES + 0.4) * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = np.asarray(figure.subplots(rows, columns, squeeze=False)).ravel()
    for ax, (label, image) in zip(axes, sample):
        pixels, note = _thumbnail(image, masks / label / f"{image.stem}.png")
        ax.imshow(pixels, interpolation="nearest")
        title = f"{label}: {image.name}" + (f" ({note})" if note else "")
        ax.set_title(textwrap.fill(title, _TITLE_WIDTH), fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    return save_figure(figure, masks / PREVIEW if path is None else path)
