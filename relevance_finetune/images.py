"""Image and mask files, and the input a model expects: the file layer under datasets and mask making.

Images are read fully decoded as RGB; masks are single-channel PNGs of {0, 1} or {0, 255}, written
atomically as 0/255. ``list_images`` reads a ``<root>/<class>/<name>.<ext>`` tree.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from timm.data import resolve_model_data_config
from torch import nn

from ._files import atomic_path

__all__ = ["IMG_EXTENSIONS", "list_images", "model_data_config", "model_input_size", "read_binary_mask", "read_image",
           "write_mask"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def read_image(path: str | os.PathLike) -> Image.Image:
    """The fully decoded RGB image at ``path``; ``ValueError`` naming the file if unreadable."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def read_binary_mask(path: str | os.PathLike) -> np.ndarray:
    """A (H, W) bool mask from a single-channel PNG holding {0, 1} or {0, 255}.

    Greyscale, palette and 1-bit PNGs are accepted, and RGB(A) ones whose colour channels are
    equal. Raises ``ValueError`` naming the file for anything else.
    """
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read mask {path}: {error}") from error
    if pixels.ndim == 3:
        if not (pixels[..., :3] == pixels[..., :1]).all():
            raise ValueError(f"mask {path} is a colour image; expected one channel of 0/1 or 0/255")
        pixels = pixels[..., 0]
    if pixels.dtype == bool:
        return pixels
    values = set(np.unique(pixels).tolist())
    if values <= {0, 1}:
        return pixels == 1
    if values <= {0, 255}:
        return pixels == 255
    shown = sorted(values)[:6]
    raise ValueError(f"mask {path} holds values {shown}{'...' if len(values) > 6 else ''}; "
                     "expected {0, 1} or {0, 255}")


def write_mask(mask: np.ndarray, path: str | os.PathLike) -> None:
    """Write a (H, W) bool mask as a 0/255 PNG atomically (temporary file, then ``os.replace``)."""
    with atomic_path(path) as temporary:
        Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255, mode="L").save(
            temporary, format="PNG")


def list_images(root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS) -> dict[str, list[Path]]:
    """Images of a ``<root>/<class>/<name>.<ext>`` tree: class folder -> sorted image paths.

    Every class folder is listed (an empty one maps to ``[]``). Raises ``FileNotFoundError`` if
    ``root`` is missing and ``ValueError`` if it holds no class folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} holds no class folders; expected {root}/<class>/<name>.<ext>")
    suffixes = tuple(e.lower() for e in extensions)
    return {folder.name: sorted(p for p in folder.iterdir()
                                if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."))
            for folder in folders}


def model_input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) the model was built for: ``patch_embed.img_size``, else its timm data config."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        return tuple(int(s) for s in img_size)
    return tuple(resolve_model_data_config(model)["input_size"][1:])


def model_data_config(model: nn.Module) -> dict:
    """timm's data config of ``model`` (mean, std, crop, interpolation) at the size it was built for."""
    return {**resolve_model_data_config(model), "input_size": (3, *model_input_size(model))}
