"""ImageNet-S (LUSSeg) semi-supervised masks: decoding and the paper's deterministic split.

ImageNet-S stores ``train-semi-segmentation/<wnid>/<name>.png`` with the class id encoded as
``R + 256 * G``; ids are 1-based rows of the 919-line categories file, 0 is background or
another category and 1000 an ignored region (background here). The images themselves are
read from ImageNet: ``<imagenet>/train/<wnid>/<name>.JPEG`` where ``wnid`` is the prefix of
``name`` (five classes were merged, so a mask folder can hold another class's images).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, NamedTuple, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "IGNORE_ID",
    "MERGED_WNIDS",
    "ImageNetSRecord",
    "ImageNetSSplit",
    "decode_imagenet_s_mask",
    "imagenet_s_foreground",
    "imagenet_s_records",
    "imagenet_s_split",
    "read_categories",
]

IGNORE_ID = 1000
# ImageNet-S merged five ImageNet classes into others: source wnid -> folder (target) wnid.
MERGED_WNIDS: dict[str, str] = {
    "n04356056": "n04355933",
    "n04493381": "n02808440",
    "n03642806": "n03832673",
    "n04008634": "n03773504",
    "n03887697": "n15075141",
}
Merged = Literal["skip", "keep"]


class ImageNetSRecord(NamedTuple):
    """One annotated image: its ImageNet image, its mask and the two wnids involved."""

    image: Path
    mask: Path
    wnid: str         # ImageNet class of the image (prefix of its file name)
    mask_wnid: str    # ImageNet-S folder of the mask (differs for merged classes)


@dataclass
class ImageNetSSplit:
    """The finetuning split: ``train`` (set A) and ``val`` records and their classes."""

    train: list[ImageNetSRecord]
    val: list[ImageNetSRecord]
    train_classes: list[str] = field(default_factory=list)
    val_classes: list[str] = field(default_factory=list)


def decode_imagenet_s_mask(path: str | os.PathLike) -> np.ndarray:
    """Class ids (H, W) int32 of an ImageNet-S PNG, ``R + 256 * G`` computed without overflow.

    Raises ``ValueError`` naming the file when it cannot be read or is not an RGB(A) PNG.
    """
    try:
        with Image.open(path) as image:
            if image.mode not in ("RGB", "RGBA"):
                raise ValueError(f"expected an RGB ImageNet-S mask, got mode {image.mode!r}")
            pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read ImageNet-S mask {path}: {error}") from error
    return pixels[..., 0] + 256 * pixels[..., 1]


def imagenet_s_foreground(ids: np.ndarray, class_id: int | None = None, path: str | os.PathLike = "") -> np.ndarray:
    """Boolean foreground (H, W) of decoded ids: neither 0 (background) nor 1000 (ignored).

    With ``class_id`` the foreground must carry that id; without, it may carry one id only
    (as the reference asserts). Raises ``ValueError`` naming ``path`` otherwise.
    """
    foreground = (ids != 0) & (ids != IGNORE_ID)
    found = np.unique(ids[foreground]).tolist()
    allowed = [class_id] if class_id is not None else found[:1]
    if found and found != allowed:
        expected = f"only id {class_id}" if class_id is not None else "a single class id"
        raise ValueError(f"ImageNet-S mask {path} holds foreground ids {found}, expected {expected}")
    return foreground


def read_categories(path: str | os.PathLike) -> dict[str, int]:
    """wnid -> 1-based ImageNet-S class id from a categories file (one wnid per line)."""
    wnids = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not wnids:
        raise ValueError(f"categories file {path} lists no wnids")
    return {wnid: index + 1 for index, wnid in enumerate(wnids)}


def _mask_root(root: Path) -> Path:
    nested = root / "train-semi-segmentation"
    return nested if nested.is_dir() else root


def _image_root(imagenet: Path) -> Path:
    nested = imagenet / "train"
    return nested if nested.is_dir() else imagenet


def _mask_entries(mask_root: Path, list_file: Path | None) -> list[tuple[str, str]]:
    """(mask folder wnid, file stem) pairs, from the list file or the mask folders."""
    if list_file is not None:
        entries = []
        for number, line in enumerate(Path(list_file).read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or parts[1].count("/") != 1:
                raise ValueError(
                    f"{list_file}:{number}: expected 'WNID/NAME.JPEG WNID/NAME.png', got {line!r}")
            folder, name = parts[1].split("/")
            entries.append((folder, Path(name).stem))
        return entries
    if not mask_root.is_dir():
        raise FileNotFoundError(f"ImageNet-S mask folder not found: {mask_root}")
    return [(folder.name, mask.stem)
            for folder in sorted(p for p in mask_root.iterdir() if p.is_dir())
            for mask in sorted(folder.glob("*.png"))]


def imagenet_s_records(
        root: str | os.PathLike,
        imagenet: str | os.PathLike,
        list_file: str | os.PathLike | None = None,
) -> dict[str, list[ImageNetSRecord]]:
    """All annotated images grouped by mask folder wnid, folders and names sorted.

    Parameters
    ----------
    root:
        ``ImageNetS919`` or its ``train-semi-segmentation`` folder.
    imagenet:
        The ImageNet root holding ``train/<wnid>/<name>.JPEG`` (or that ``train`` folder).
    list_file:
        Optional ``ImageNetSemi_im919_train.txt``; without it the mask folders are scanned.
    """
    mask_root, image_root = _mask_root(Path(root)), _image_root(Path(imagenet))
    groups: dict[str, list[ImageNetSRecord]] = {}
    for folder, stem in sorted(_mask_entries(mask_root, Path(list_file) if list_file else None)):
        wnid = stem.split("_")[0]
        record = ImageNetSRecord(
            image=image_root / wnid / f"{stem}.JPEG", mask=mask_root / folder / f"{stem}.png",
            wnid=wnid, mask_wnid=folder)
        groups.setdefault(folder, []).append(record)
    if not groups:
        raise ValueError(f"no ImageNet-S masks found in {list_file or mask_root}")
    return groups


def imagenet_s_split(
        root: str | os.PathLike,
        imagenet: str | os.PathLike,
        num_classes: int = 500,
        images_per_class: int = 3,
        val_per_class: int = 1,
        class_seed: int | None = None,
        exclude: Iterable[str] = (),
        merged: Merged = "skip",
        list_file: str | os.PathLike | None = None,
) -> ImageNetSSplit:
    """The paper's split: ``num_classes`` classes x ``images_per_class`` images, the rest as val.

    Classes are the mask folders sorted by wnid (``class_seed`` shuffles them to draw another
    split), minus ``exclude`` and, with ``merged='skip'`` (the reference), the ten wnids of the
    five merges: 919 - 5 = 914 classes, 500 for training and 414 for validation. Within a class
    the first images by name are taken.
    """
    groups = imagenet_s_records(root, imagenet, list_file)
    excluded = set(exclude)
    if merged == "skip":
        excluded |= set(MERGED_WNIDS) | set(MERGED_WNIDS.values())
    elif merged != "keep":
        raise ValueError(f"merged must be 'skip' or 'keep', got {merged!r}")
    classes = sorted(set(groups) - excluded)
    if class_seed is not None:
        classes = [classes[i] for i in np.random.default_rng(class_seed).permutation(len(classes))]
    if not 0 < num_classes <= len(classes):
        raise ValueError(f"num_classes={num_classes} but {len(classes)} ImageNet-S classes are available "
                         f"after excluding {len(excluded & set(groups))}")
    train_classes, val_classes = classes[:num_classes], classes[num_classes:]
    return ImageNetSSplit(
        train=_take(groups, train_classes, images_per_class),
        val=_take(groups, val_classes, val_per_class),
        train_classes=train_classes, val_classes=val_classes)


def _take(groups: dict[str, list[ImageNetSRecord]], classes: Sequence[str], count: int) -> list[ImageNetSRecord]:
    records = []
    for wnid in classes:
        if len(groups[wnid]) < count:
            raise ValueError(f"ImageNet-S class {wnid} has {len(groups[wnid])} masks, {count} requested")
        records.extend(groups[wnid][:count])
    return records
