"""Images with foreground masks: paired transforms and datasets.

Every dataset yields ``(image, mask, label)``: a normalised float image (3, H, W), a float mask
(1, H, W) in [0, 1] (binary unless ``soft_masks``) and an int class index. Layouts:

- ``MaskedImageFolder``: ``images/<class>/<name>.<ext>`` with ``masks/<class>/<name>.png``;
- ``MaskedCsvDataset``: a CSV manifest with the columns ``image,mask,label``;
- ``ImageNetSDataset``: ImageNet-S masks paired with ImageNet training images (the paper's split).

The file helpers (``read_image``, ``read_binary_mask``, ``write_mask``, ``list_images``) and the
model's input size live in :mod:`relevance_finetune.images` and are re-exported here; ImageNet-S
decoding lives in :mod:`relevance_finetune.masks.imagenet_s`.
"""
from __future__ import annotations

import csv
import functools
import math
import os
import re
import warnings
from collections import Counter
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

from .augment import usable_masks
from .masks.imagenet_s import Merged, decode_imagenet_s_mask, imagenet_s_foreground, imagenet_s_split, read_categories
from .images import (IMG_EXTENSIONS, list_images, model_data_config, model_input_size, read_binary_mask, read_image,
                     write_mask)

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
    "default_workers",
    "imagenet_class_index",
    "list_images",
    "model_data_config",
    "model_input_size",
    "paired_transforms",
    "read_binary_mask",
    "read_image",
    "write_mask",
]

REFERENCE_CROP_PCT = 224 / 256  # the reference resizes to 256 and crops 224
_WNID = re.compile(r"n\d{8}")
ClassIndex = Literal["auto", "folder", "imagenet"]


class Sample(NamedTuple):
    """One image, its mask file and its class index."""

    image: Path
    mask: Path
    label: int


# -- loading -----------------------------------------------------------------------------------
def default_workers(most: int = 4) -> int:
    """Data-loading worker processes by default: ``most``, or the CPUs this process may use if fewer
    (more workers than CPUs only contend, and PyTorch warns)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity
        cpus = os.cpu_count() or 1
    return min(most, cpus)


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

    What was left out, for a run's summary: ``skipped`` (messages of bad inputs), ``unmasked``
    and ``unmasked_by_class`` (images without a mask, in total and per class name, for layouts
    that may leave them out) and ``dropped_classes`` (named classes with no sample left, which
    a warning lists).
    """

    def __init__(self, transform: Transform | None = None, skip_bad: bool = False) -> None:
        self.transform = transform
        self.skip_bad = skip_bad
        self.skipped: list[str] = []
        self.samples: list[Sample] = []
        self.unmasked = 0
        self.unmasked_by_class: dict[str, int] = {}
        self.dropped_classes: list[str] = []

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
        self._warn_dropped_classes(source)

    def _warn_dropped_classes(self, source: str | os.PathLike) -> None:
        """Set ``dropped_classes`` (named classes without a sample) and warn about them."""
        labels = {sample.label for sample in self.samples}
        mapping = getattr(self, "class_to_idx", None) or {}
        self.dropped_classes = sorted(name for name, index in mapping.items() if index not in labels)
        if self.dropped_classes:
            shown = ", ".join(f"{name} ({self.unmasked_by_class.get(name, 0)} image(s) without a mask)"
                              for name in self.dropped_classes[:10])
            warnings.warn(f"{type(self).__name__}({source}): {len(self.dropped_classes)} of {len(mapping)} classes "
                          f"have no usable image and are left out of training: {shown}"
                          f"{', ...' if len(self.dropped_classes) > 10 else ''} (all in .dropped_classes)",
                          stacklevel=4)

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

    def unusable_masks(self, indices: Sequence[int] | None = None) -> dict[str, list[Path]]:
        """The mask files (of the samples at ``indices``, default all) that are ``'empty'`` (no object)
        or ``'full'`` (no background), read untransformed: not usable in the sense of
        :func:`relevance_finetune.augment.usable_masks`."""
        found: dict[str, list[Path]] = {"empty": [], "full": []}
        for index in range(len(self.samples)) if indices is None else indices:
            sample = self.samples[index]
            mask = torch.from_numpy(self.read_mask(sample))[None]
            if not usable_masks(mask)[0]:
                found["full" if mask.any() else "empty"].append(sample.mask)
        return found

    def relabel(self, class_to_idx: Mapping[str, int]) -> None:
        """Index the named classes as ``class_to_idx`` does (e.g. a model's own class order).

        Raises ``ValueError`` naming the classes that ``class_to_idx`` lacks.
        """
        current = getattr(self, "class_to_idx", None) or {}
        missing = sorted(set(current) - set(class_to_idx))
        if missing:
            raise ValueError(f"{type(self).__name__}: class(es) {missing[:5]} are not among "
                             f"{sorted(class_to_idx)[:10]}")
        name_of = {index: name for name, index in current.items()}
        relabelled = {sample: sample._replace(label=class_to_idx[name_of[sample.label]]) for sample in self.samples}
        self._samples_relabelled(relabelled)
        self.samples = [relabelled[sample] for sample in self.samples]
        self.class_to_idx = {name: class_to_idx[name] for name in current}

    def _samples_relabelled(self, relabelled: Mapping[Sample, Sample]) -> None:
        """Hook for a dataset that keys records by sample: ``relabelled`` maps each old sample to its new one."""

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
        Leave images without a mask out (e.g. the ``masks`` command wrote none for them); counted
        in ``unmasked`` and ``unmasked_by_class``. A class left with no image is listed in
        ``dropped_classes`` and a warning. Without it, an image without a mask raises
        ``FileNotFoundError`` naming it and the flag.

    A ``masks`` folder that does not exist, or in which no image has a mask, raises
    ``FileNotFoundError`` naming it.
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
        if not self.masks_dir.is_dir():
            raise FileNotFoundError(f"mask folder not found: {self.masks_dir} (expected "
                                    f"{self.masks_dir}/<class>/<name>.png for the images in {self.images_dir})")
        self.class_to_idx = self._class_indices(sorted(tree), class_index, self.images_dir)
        self.classes = sorted(self.class_to_idx)
        samples, unmasked = [], []
        for name, paths in tree.items():
            if name not in self.class_to_idx:
                continue
            if not paths:
                self._reject(ValueError(f"class folder {self.images_dir / name} holds no images"))
            for path in paths:
                mask = self.masks_dir / name / f"{path.stem}.png"
                if mask.is_file():
                    samples.append(Sample(path, mask, self.class_to_idx[name]))
                else:
                    unmasked.append((name, path, mask))
        self._leave_out_unmasked(unmasked, len(samples) + len(unmasked), skip_unmasked)
        self._set_samples(samples, self.images_dir)

    def _leave_out_unmasked(self, unmasked: list[tuple[str, Path, Path]], total: int, skip_unmasked: bool) -> None:
        """Count the (class, image, expected mask) without a mask file; reject them unless ``skip_unmasked``."""
        if unmasked and len(unmasked) == total:
            raise FileNotFoundError(f"none of the {total} images in {self.images_dir} has a mask in {self.masks_dir} "
                                    f"(expected e.g. {unmasked[0][2]}): is that the masks folder?")
        self.unmasked = len(unmasked)
        self.unmasked_by_class = dict(Counter(name for name, _, _ in unmasked))
        if not skip_unmasked:
            for _, path, mask in unmasked:
                self._reject(FileNotFoundError(
                    f"no mask for image {path}: expected {mask} ({len(unmasked)} of {total} images have none; "
                    "skip_unmasked=True, `train --skip-unmasked` (or `evaluate --skip-unmasked`), leaves them out)"))


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
