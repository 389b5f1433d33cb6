"""Image and mask files, and the input a model expects: the file layer under datasets and mask making.

Images are read fully decoded as 8-bit RGB (16-bit and float images scaled, transparency
flattened onto white, other modes refused: ``read_image``); masks are single-channel PNGs of
{0, 1} or {0, 255}, written atomically as 0/255. ``list_images`` reads a
``<root>/<class>/<name>.<ext>`` tree.
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
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # more than 8 bits a channel


def read_image(path: str | os.PathLike) -> Image.Image:
    """The fully decoded image at ``path`` as 8-bit RGB; ``ValueError`` naming the file if unreadable.

    ``RGB``, ``L``, ``1``, ``CMYK`` and ``P`` convert as PIL converts them; transparency (``RGBA``,
    ``LA``, ``P`` with a transparent colour) is composited onto white; 16-bit greyscale (``I;16``,
    ``I;16B``, ...) and 32-bit integers (``I``, values in [0, 65535], read as 16-bit) are divided by
    257; floats (``F``, values in [0, 1]) are multiplied by 255, each rounded to the nearest 8-bit
    value. Any other mode, or ``I``/``F`` values outside those ranges, raise ``ValueError`` naming
    the mode and the file.
    """
    try:
        with Image.open(path) as image:
            return _to_rgb(image)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB by the rules of :func:`read_image`."""
    mode = image.mode
    if mode in ("RGB", "L", "1", "CMYK") or (mode == "P" and "transparency" not in image.info):
        return image.convert("RGB")
    if mode in ("RGBA", "LA", "P"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    if mode in _WIDE_MODES:
        return Image.fromarray(_to_8_bits(np.asarray(image), mode)).convert("RGB")
    raise ValueError(f"image mode {mode!r} is not supported; expected one of "
                     f"RGB, RGBA, L, LA, 1, P, CMYK, {', '.join(_WIDE_MODES)}")


def _to_8_bits(pixels: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) 16-bit, 32-bit integer or float ``pixels`` as uint8 (see :func:`read_image`)."""
    low, high, expected = (0, 1, "floats in [0, 1]") if mode == "F" else (0, 65535, "16-bit values in [0, 65535]")
    if pixels.size and not (np.isfinite(pixels).all() and pixels.min() >= low and pixels.max() <= high):
        raise ValueError(f"image mode {mode!r} holds values in [{pixels.min():g}, {pixels.max():g}]; "
                         f"expected {expected}")
    if mode == "F":
        return np.rint(pixels * 255).astype(np.uint8)
    return ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)


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
