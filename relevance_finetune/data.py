"""Images with foreground masks: paired transforms and datasets.

Every dataset yields ``(image, mask, label)``: a normalised float image (3, H, W), a float mask
(1, H, W) in [0, 1] (binary unless ``soft_masks``) and an int class index. Layouts:

- ``MaskedImageFolder``: ``images/<class>/<name>.<ext>`` with ``masks/<class>/<name>.png``;
- ``MaskedCsvDataset``: a CSV manifest with the columns ``image,mask,label``;
- ``ImageNetSDataset``: ImageNet-S masks paired with ImageNet training images (the paper's split).
"""
from __future__ import annotations

import csv
import functools
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data import ImageNetInfo, resolve_model_data_config
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode

from ._files import atomic_path
from .masks.imagenet_s import (
    Merged, decode_imagenet_s_mask, imagenet_s_foreground, imagenet_s_split, read_categories)

__all__ = [
    "IMG_EXTENSIONS",
    "ImageNetSDataset",
    "MaskedCsvDataset",
    "MaskedDataset",
    "MaskedImageFolder",
    "PairedTransform",
    "Sample",
    "UnknownWnidError",
    "class_indices",
    "imagenet_class_index",
    "list_images",
    "model_data_config",
    "model_input_size",
    "paired_transforms",
    "read_binary_mask",
    "read_image",
    "write_mask",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
REFERENCE_CROP_PCT = 224 / 256  # the reference resizes to 256 and crops 224
_WNID = re.compile(r"n\d{8}")
ClassIndex = Literal["auto", "folder", "imagenet"]


class Sample(NamedTuple):
    """One image, its mask file and its class index."""

    image: Path
    mask: Path
    label: int


# -- files -------------------------------------------------------------------------------------
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


# -- class indices -----------------------------------------------------------------------------
class UnknownWnidError(ValueError):
    """A class name looks like a wnid but ImageNet-1k has no such class."""
@functools.lru_cache(maxsize=1)
def imagenet_class_index() -> dict[str, int]:
    """ImageNet-1k wnid -> class index, from timm's ``ImageNetInfo``."""
    return {wnid: index for index, wnid in enumerate(ImageNetInfo("imagenet-1k").label_names())}


def class_indices(names: Sequence[str], class_index: ClassIndex = "auto") -> dict[str, int]:
    """Class name -> index: ``'folder'`` sorted order, ``'imagenet'`` the ImageNet-1k index.

    ``'auto'`` picks ``'imagenet'`` when every name looks like a wnid (``n`` + 8 digits).
    Raises ``UnknownWnidError`` (a ``ValueError``) for a wnid that ImageNet-1k does not have.
    """
    names = sorted(set(names))
    if class_index == "auto":
        class_index = "imagenet" if names and all(_WNID.fullmatch(n) for n in names) else "folder"
    if class_index == "folder":
        return {name: index for index, name in enumerate(names)}
    if class_index != "imagenet":
        raise ValueError(f"class_index must be 'auto', 'folder' or 'imagenet', got {class_index!r}")
    known = imagenet_class_index()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UnknownWnidError(f"unknown ImageNet-1k wnid(s) {unknown[:5]}")
    return {name: known[name] for name in names}


# -- transforms --------------------------------------------------------------------------------
def model_input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) the model was built for: ``patch_embed.img_size``, else its timm data config."""
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        return tuple(int(s) for s in img_size)
    return tuple(resolve_model_data_config(model)["input_size"][1:])


def model_data_config(model: nn.Module) -> dict:
    """timm's data config of ``model`` (mean, std, crop, interpolation) at the size it was built for."""
    return {**resolve_model_data_config(model), "input_size": (3, *model_input_size(model))}


@dataclass(frozen=True)
class PairedTransform:
    """Resize, crop and flip an image and its mask with the same parameters, then normalise.

    Call with a PIL image and a (H, W) bool mask; returns a float image (3, h, w) and a float
    mask (1, h, w). Masks are resized nearest (binary) unless ``soft_masks`` (bilinear, as the
    reference). Training: ``crop='resize_crop'`` resizes to ``size / crop_pct`` (square, as the
    reference) and crops at random; ``'random_resized'`` is a ``RandomResizedCrop``.
    Evaluation: shorter side to ``size / crop_pct``, centre crop.
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: bool = False
    crop: Literal["resize_crop", "random_resized"] = "resize_crop"
    crop_pct: float = REFERENCE_CROP_PCT
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    interpolation: str = "bicubic"
    soft_masks: bool = False

    def __post_init__(self) -> None:
        if self.crop not in ("resize_crop", "random_resized"):
            raise ValueError(f"crop must be 'resize_crop' or 'random_resized', got {self.crop!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must lie in (0, 1], got {self.crop_pct}")

    def _resize(self, image: torch.Tensor, mask: torch.Tensor, size: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        mask_mode = InterpolationMode.BILINEAR if self.soft_masks else InterpolationMode.NEAREST_EXACT
        return (TF.resize(image, size, InterpolationMode(self.interpolation), antialias=True),
                TF.resize(mask, size, mask_mode, antialias=self.soft_masks))

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image = TF.pil_to_tensor(image)
        mask = torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None]
        if image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"image {tuple(image.shape[-2:])} and mask {tuple(mask.shape[-2:])} sizes differ")
        height, width = self.size
        if self.train and self.crop == "random_resized":
            top, left, h, w = T.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
            image, mask = self._resize(TF.crop(image, top, left, h, w), TF.crop(mask, top, left, h, w),
                                       [height, width])
        else:
            scaled = [math.floor(s / self.crop_pct) for s in self.size]
            if not self.train and height == width:
                scaled = scaled[:1]  # shorter side, keep the aspect ratio
            image, mask = self._resize(image, mask, scaled)
            room_h, room_w = image.shape[-2] - height, image.shape[-1] - width
            if self.train:
                top, left = (int(torch.randint(0, r + 1, ())) for r in (room_h, room_w))
            else:
                top, left = round(room_h / 2), round(room_w / 2)
            image, mask = TF.crop(image, top, left, height, width), TF.crop(mask, top, left, height, width)
        if self.train and float(torch.rand(())) < self.hflip:
            image, mask = TF.horizontal_flip(image), TF.horizontal_flip(mask)
        image = TF.normalize(image.float() / 255, list(self.mean), list(self.std))
        return image, mask.clamp(0, 1)


def paired_transforms(
        model: nn.Module | Mapping[str, Any],
        train: bool = False,
        *,
        input_size: int | Sequence[int] | None = None,
        normalization: Literal["model", "half"] = "model",
        **kwargs,
) -> PairedTransform:
    """The paired train or eval transform for a timm model (or a timm data config dict).

    Size, mean/std and interpolation come from ``timm.data.resolve_model_data_config(model)``
    (size from ``patch_embed.img_size`` when the model has one); ``input_size`` overrides the
    size, ``normalization='half'`` uses the reference's mean = std = 0.5. Other keyword
    arguments go to :class:`PairedTransform` (``crop``, ``crop_pct``, ``scale``, ``hflip``,
    ``soft_masks``, ...).
    """
    if isinstance(model, nn.Module):
        config = resolve_model_data_config(model)
        size = model_input_size(model)
    else:
        config = dict(model)
        size = tuple(config["input_size"][-2:])
    if input_size is not None:
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size[-2:])
    if normalization == "half":
        mean = std = (0.5, 0.5, 0.5)
    elif normalization == "model":
        mean, std = tuple(config["mean"]), tuple(config["std"])
    else:
        raise ValueError(f"normalization must be 'model' or 'half', got {normalization!r}")
    kwargs.setdefault("interpolation", config.get("interpolation", "bicubic"))
    return PairedTransform(size=size, mean=mean, std=std, train=train, **kwargs)


def _to_tensors(image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return TF.pil_to_tensor(image).float() / 255, torch.as_tensor(mask, dtype=torch.float32)[None]


# -- datasets ----------------------------------------------------------------------------------
Transform = Callable[[Image.Image, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


class MaskedDataset(Dataset):
    """Base of the masked datasets: a list of :class:`Sample` and a paired transform.

    Bad input raises ``ValueError``/``FileNotFoundError`` naming the file: structural problems
    (a missing mask, an unknown wnid, an empty folder) when the dataset is built, unreadable
    files and mismatched masks when a sample is loaded. With ``skip_bad`` every pair is checked
    when the dataset is built, bad ones are left out with one warning, and their messages are
    kept in ``skipped``.
    """

    def __init__(self, transform: Transform | None = None, skip_bad: bool = False) -> None:
        self.transform = transform
        self.skip_bad = skip_bad
        self.skipped: list[str] = []
        self.samples: list[Sample] = []

    def _reject(self, error: Exception) -> None:
        if not self.skip_bad:
            raise error
        self.skipped.append(str(error))

    def _class_indices(self, names: Sequence[str], class_index: ClassIndex, source: str | os.PathLike) -> dict[str, int]:
        """:func:`class_indices`; with ``skip_bad`` unknown wnids are rejected and left out."""
        try:
            return class_indices(names, class_index)
        except UnknownWnidError as error:
            self._reject(UnknownWnidError(f"{source}: {error}"))
            known = imagenet_class_index()
            return {name: known[name] for name in names if name in known}

    def _set_samples(self, samples: Sequence[Sample], source: str | os.PathLike) -> None:
        """Keep ``samples`` (checked with ``skip_bad``); warn about what was skipped."""
        kept = []
        for sample in samples:
            if self.skip_bad:
                try:
                    self.load(sample)
                except (ValueError, FileNotFoundError) as error:
                    self._reject(error)
                    continue
            kept.append(sample)
        if self.skipped:
            warnings.warn(f"{type(self).__name__}({source}): skipped {len(self.skipped)} bad input(s), "
                          f"first: {self.skipped[0]} (all in .skipped)", stacklevel=3)
        if not kept:
            raise ValueError(f"{type(self).__name__}: no usable samples in {source}")
        self.samples = kept

    def read_mask(self, sample: Sample) -> np.ndarray:
        """The (H, W) bool foreground of ``sample``."""
        return read_binary_mask(sample.mask)

    def load(self, sample: Sample) -> tuple[Image.Image, np.ndarray]:
        """The checked (RGB image, bool mask) pair of ``sample``, untransformed."""
        image, mask = read_image(sample.image), self.read_mask(sample)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask {sample.mask} is {mask.shape[1]}x{mask.shape[0]} but image "
                             f"{sample.image} is {image.width}x{image.height} (width x height)")
        return image, mask

    @property
    def label_names(self) -> list[str] | None:
        """Class names in index order when the indices are 0..K-1 of named classes (folder order), else None."""
        mapping = getattr(self, "class_to_idx", None)
        if not mapping or sorted(mapping.values()) != list(range(len(mapping))):
            return None
        return sorted(mapping, key=mapping.get)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        sample = self.samples[index]
        image, mask = (self.transform or _to_tensors)(*self.load(sample))
        return image, mask, sample.label


class MaskedImageFolder(MaskedDataset):
    """``images/<class>/<name>.<ext>`` with ``masks/<class>/<name>.png`` (0/1 or 0/255).

    Parameters
    ----------
    root:
        Folder holding ``images/`` and ``masks/``; or give ``images`` and ``masks`` folders.
    transform:
        A paired transform (see :func:`paired_transforms`); None gives unnormalised tensors.
    class_index:
        ``'folder'`` (sorted folder order), ``'imagenet'`` (ImageNet-1k index of wnid folders)
        or ``'auto'`` (``'imagenet'`` when all folders are wnids).
    skip_bad:
        Leave bad input out with a warning instead of raising.
    skip_unmasked:
        Leave images without a mask out silently (e.g. TokenCut skipped them); counted in
        ``unmasked``.
    """

    def __init__(
            self,
            root: str | os.PathLike | None = None,
            transform: Transform | None = None,
            *,
            images: str | os.PathLike | None = None,
            masks: str | os.PathLike | None = None,
            class_index: ClassIndex = "auto",
            skip_bad: bool = False,
            skip_unmasked: bool = False,
            extensions: Sequence[str] = IMG_EXTENSIONS,
    ) -> None:
        super().__init__(transform, skip_bad)
        if root is None and (images is None or masks is None):
            raise TypeError("MaskedImageFolder needs root, or both images and masks folders")
        self.images_dir = Path(images) if images is not None else Path(root) / "images"
        self.masks_dir = Path(masks) if masks is not None else Path(root) / "masks"
        tree = list_images(self.images_dir, extensions)
        self.class_to_idx = self._class_indices(sorted(tree), class_index, self.images_dir)
        self.classes = sorted(self.class_to_idx)
        self.unmasked = 0
        samples = []
        for name, paths in tree.items():
            if name not in self.class_to_idx:
                continue
            if not paths:
                self._reject(ValueError(f"class folder {self.images_dir / name} holds no images"))
            for path in paths:
                mask = self.masks_dir / name / f"{path.stem}.png"
                if mask.is_file():
                    samples.append(Sample(path, mask, self.class_to_idx[name]))
                elif skip_unmasked:
                    self.unmasked += 1
                else:
                    self._reject(FileNotFoundError(f"no mask for image {path}: expected {mask}"))
        self._set_samples(samples, self.images_dir)


class MaskedCsvDataset(MaskedDataset):
    """A CSV manifest with the header ``image,mask,label``; paths relative to ``root``.

    ``root`` defaults to the CSV's folder. Labels are integers, or class names mapped by
    ``class_index`` as in :class:`MaskedImageFolder` (``classes`` then lists them).
    """

    def __init__(
            self,
            manifest: str | os.PathLike,
            transform: Transform | None = None,
            *,
            root: str | os.PathLike | None = None,
            class_index: ClassIndex = "auto",
            skip_bad: bool = False,
    ) -> None:
        super().__init__(transform, skip_bad)
        manifest = Path(manifest)
        root = Path(root) if root is not None else manifest.parent
        with open(manifest, newline="") as file:
            reader = csv.DictReader(file)
            missing = {"image", "mask", "label"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{manifest} lacks the column(s) {sorted(missing)}; "
                                 f"expected the header image,mask,label, got {reader.fieldnames}")
            rows = [(number, row) for number, row in enumerate(reader, 2)]
        labels = [row["label"].strip() for _, row in rows]
        self.classes: list[str] | None = None
        if all(re.fullmatch(r"\d+", label) for label in labels):
            to_index = {label: int(label) for label in labels}
        else:
            to_index = self.class_to_idx = self._class_indices(labels, class_index, manifest)
            self.classes = sorted(to_index)
        samples = []
        for (number, row), label in zip(rows, labels):
            image, mask = root / row["image"].strip(), root / row["mask"].strip()
            absent = [p for p in (image, mask) if not p.is_file()]
            if absent:
                self._reject(FileNotFoundError(f"{manifest}:{number}: file not found: {absent[0]}"))
            elif label in to_index:  # else an unknown wnid, already reported
                samples.append(Sample(image, mask, to_index[label]))
        self._set_samples(samples, manifest)


class ImageNetSDataset(MaskedDataset):
    """ImageNet-S masks with their ImageNet training images, one side of the paper's split.

    Parameters
    ----------
    root:
        ``ImageNetS919`` (or its ``train-semi-segmentation`` folder).
    imagenet:
        ImageNet root with ``train/<wnid>/<name>.JPEG``.
    split:
        ``'train'`` (set A: ``num_classes`` x ``images_per_class``) or ``'val'`` (``val_per_class``
        image(s) of every other class).
    categories_file:
        ``ImageNetS_categories_im919.txt``; when given, a mask must hold its own class id.
    num_classes, images_per_class, val_per_class, class_seed, exclude, merged, list_file:
        See :func:`relevance_finetune.masks.imagenet_s.imagenet_s_split`.

    Labels are ImageNet-1k indices of the image's wnid.
    """

    def __init__(
            self,
            root: str | os.PathLike,
            imagenet: str | os.PathLike,
            split: Literal["train", "val"] = "train",
            transform: Transform | None = None,
            *,
            num_classes: int = 500,
            images_per_class: int = 3,
            val_per_class: int = 1,
            class_seed: int | None = None,
            exclude: Sequence[str] = (),
            merged: Merged = "skip",
            list_file: str | os.PathLike | None = None,
            categories_file: str | os.PathLike | None = None,
            skip_bad: bool = False,
    ) -> None:
        super().__init__(transform, skip_bad)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split = imagenet_s_split(
            root, imagenet, num_classes=num_classes, images_per_class=images_per_class,
            val_per_class=val_per_class, class_seed=class_seed, exclude=exclude, merged=merged,
            list_file=list_file)
        self.category_ids = read_categories(categories_file) if categories_file is not None else None
        known = imagenet_class_index()
        samples = []
        for record in self.split.train if split == "train" else self.split.val:
            if record.wnid not in known:
                self._reject(ValueError(f"unknown ImageNet-1k wnid {record.wnid!r} of mask {record.mask}"))
            elif self.category_ids is not None and record.mask_wnid not in self.category_ids:
                self._reject(ValueError(f"ImageNet-S folder {record.mask_wnid!r} of mask {record.mask} "
                                        f"is not in {categories_file}"))
            elif not record.mask.is_file():
                self._reject(FileNotFoundError(f"ImageNet-S mask not found: {record.mask}"))
            elif not record.image.is_file():
                self._reject(FileNotFoundError(f"no ImageNet image for mask {record.mask}: "
                                               f"expected {record.image}"))
            else:
                samples.append(Sample(record.image, record.mask, known[record.wnid]))
        self._set_samples(samples, root)

    def read_mask(self, sample: Sample) -> np.ndarray:
        class_id = self.category_ids[sample.mask.parent.name] if self.category_ids is not None else None
        return imagenet_s_foreground(decode_imagenet_s_mask(sample.mask), class_id, sample.mask)
