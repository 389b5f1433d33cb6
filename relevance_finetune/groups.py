"""Group-labelled data: Waterbirds, CelebA, a ``group`` column for CSV manifests and a ``path,group`` file.

A group is a class crossed with a spurious attribute; worst-group accuracy
(:func:`relevance_finetune.metrics.group_accuracy`) is measured over groups. Every dataset here yields
what :class:`relevance_finetune.data.MaskedDataset` yields, ``(image, mask, label)``, and adds
``groups`` (a (N,) long tensor in sample order), ``group_names`` ({id: name}) and ``group_counts``
({id: images}).

- ``WaterbirdsDataset``: the release of Sagawa et al. (GroupDRO's ``waterbird_complete95_forest2water2``
  or WILDS' ``waterbirds_v1.0``, which share the layout): ``metadata.csv`` with ``img_filename, y,
  split, place`` (also ``img_id, place_filename``, unused); ``y`` 1 waterbird, ``place`` 1 water,
  group = 2 * y + place; masks are CUB's soft segmentations (``CUB_200_2011/segmentations/<img_filename
  as .png>``) thresholded at 0.5.
- ``CelebADataset``: ``list_attr_celeba.txt``, ``list_eval_partition.txt`` and ``img_align_celeba/``;
  y = Blond_Hair, group = 2 * y + Male; no masks of its own (a folder of ``img_align_celeba/<stem>.png``,
  e.g. made by TokenCut).
- ``GroupedCsvDataset``: a :class:`~relevance_finetune.data.MaskedCsvDataset` with a ``group`` column.

``split`` is 0 train, 1 val, 2 test (or those names).
"""
from __future__ import annotations

import csv
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from .data import MaskedCsvDataset, MaskedDataset, Sample, Transform
from .images import read_image

__all__ = [
    "CELEBA_GROUPS",
    "GROUP_FORMATS",
    "MASK_THRESHOLD",
    "SPLITS",
    "WATERBIRDS_COLUMNS",
    "WATERBIRDS_FOLDERS",
    "WATERBIRDS_GROUPS",
    "CelebADataset",
    "GroupedCsvDataset",
    "WaterbirdsDataset",
    "csv_dataset",
    "group_ids",
    "read_group_file",
    "read_soft_mask",
    "split_code",
    "waterbirds_root",
]

SPLITS = {"train": 0, "val": 1, "test": 2}
WATERBIRDS_COLUMNS = ("img_filename", "y", "split", "place")  # read; the release also has img_id, place_filename
WATERBIRDS_FOLDERS = ("waterbird_complete95_forest2water2", "waterbirds_v1.0")  # GroupDRO's and WILDS' names
WATERBIRDS_GROUPS = {0: "landbird on land", 1: "landbird on water", 2: "waterbird on land", 3: "waterbird on water"}
CELEBA_GROUPS = {0: "not blond, female", 1: "not blond, male", 2: "blond, female", 3: "blond, male"}
MASK_THRESHOLD = 0.5  # a soft segmentation (0-255) is foreground where value / 255 >= this


def split_code(split: int | str) -> int:
    """0, 1 or 2 of ``split`` (``'train'``, ``'val'``, ``'test'`` or the code)."""
    code = SPLITS.get(split, split) if isinstance(split, str) else split
    if code not in (0, 1, 2):
        raise ValueError(f"split must be 'train', 'val', 'test' or 0, 1, 2, got {split!r}")
    return int(code)


def group_ids(values: Sequence[str], source: str | os.PathLike) -> tuple[list[int], dict[int, str]]:
    """Group ids of ``values`` (integers, or names numbered in sorted order) and their names."""
    values = [v.strip() for v in values]
    if any(not v for v in values):
        raise ValueError(f"{source}: an empty group (line {values.index('') + 2})")
    if all(re.fullmatch(r"\d+", v) for v in values):
        ids = [int(v) for v in values]
        return ids, {i: str(i) for i in sorted(set(ids))}
    names = sorted(set(values))
    return [names.index(v) for v in values], dict(enumerate(names))


def read_group_file(path: str | os.PathLike) -> tuple[dict[str, int], dict[int, str]]:
    """A CSV with the header ``path,group``: relative image path -> group id, and the group names."""
    path = Path(path)
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        missing = sorted({"path", "group"} - set(reader.fieldnames or ()))
        if missing:
            raise ValueError(f"{path} lacks the column(s) {missing}; expected the header path,group, "
                             f"got {reader.fieldnames}")
        rows = [(row["path"].strip(), row["group"]) for row in reader]
    if not rows:
        raise ValueError(f"{path} lists no images")
    repeated = [p for p, n in Counter(p for p, _ in rows).items() if n > 1]
    if repeated:
        raise ValueError(f"{path} lists {repeated[0]!r} more than once")
    ids, names = group_ids([group for _, group in rows], path)
    return {Path(p).as_posix(): i for (p, _), i in zip(rows, ids)}, names


def read_soft_mask(path: str | os.PathLike, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """The (H, W) bool foreground of a soft 8-bit segmentation: value / 255 >= ``threshold``.

    A mask holding only 0 and 1 is read as it is (1 foreground).
    """
    try:
        with Image.open(path) as image:
            values = np.asarray(image.convert("L"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read mask {path}: {error}") from error
    return values >= (threshold * 255 if values.max(initial=0) > 1 else 1)


class _Groups:
    """``groups``, ``group_counts`` and ``group_names`` of a masked dataset that records its samples' groups."""

    group_names: dict[int, str]
    _group_of: dict[Sample, int]
    samples: list[Sample]

    @property
    def groups(self) -> torch.Tensor:
        """(N,) long: the group of each sample, in sample order."""
        return torch.tensor([self._group_of[sample] for sample in self.samples], dtype=torch.long)

    def _samples_relabelled(self, relabelled: Mapping[Sample, Sample]) -> None:
        self._group_of = {relabelled.get(sample, sample): group for sample, group in self._group_of.items()}

    @property
    def group_counts(self) -> dict[int, int]:
        """Group id -> samples, in id order."""
        return dict(sorted(Counter(self.groups.tolist()).items()))


class GroupedCsvDataset(_Groups, MaskedCsvDataset):
    """A CSV manifest ``image,mask,label,group``: :class:`MaskedCsvDataset` with a group per row.

    Groups are integers, or names numbered in sorted order (``group_names`` holds them).
    """

    def __init__(self, manifest: str | os.PathLike, transform: Transform | None = None, **kwargs) -> None:
        super().__init__(manifest, transform, **kwargs)
        manifest = Path(manifest)
        root = Path(kwargs.get("root") or manifest.parent)
        with open(manifest, newline="") as file:
            reader = csv.DictReader(file)
            if "group" not in (reader.fieldnames or ()):
                raise ValueError(f"{manifest} has no group column; expected the header image,mask,label,group")
            rows = list(reader)
        ids, self.group_names = group_ids([row["group"] for row in rows], manifest)
        by_files = {(root / row["image"].strip(), root / row["mask"].strip()): i for row, i in zip(rows, ids)}
        self._group_of = {sample: by_files[sample.image, sample.mask] for sample in self.samples}


def csv_dataset(manifest: str | os.PathLike, transform: Transform | None = None, **kwargs) -> MaskedCsvDataset:
    """A :class:`GroupedCsvDataset` when the manifest has a ``group`` column, else a :class:`MaskedCsvDataset`."""
    with open(manifest, newline="") as file:
        header = next(csv.reader(file), [])
    grouped = "group" in (name.strip() for name in header)
    return (GroupedCsvDataset if grouped else MaskedCsvDataset)(manifest, transform, **kwargs)


class _Row(NamedTuple):
    """One image of a group-labelled table: its path relative to the data root, class, group and split."""

    path: str
    label: int
    group: int
    split: int


class _GroupTable(_Groups, MaskedDataset):
    """One split of a table of ``_Row``s; masks at ``<masks>/<path as .png>`` (None: the whole image)."""

    classes: list[str]
    locate = staticmethod(Path)  # the data folder of a path the user gives

    def __init__(self, root: Path, rows: Sequence[_Row], split: int | str, masks: str | os.PathLike | None,
                 transform: Transform | None, skip_bad: bool, skip_unmasked: bool, source: Path) -> None:
        super().__init__(transform, skip_bad)
        self._group_of = {}
        self.root, self.split = root, split_code(split)
        self.masks_dir = Path(masks) if masks is not None else None
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        chosen = [row for row in rows if row.split == self.split]
        if not chosen:
            raise ValueError(f"{source} has no image of split {self.split} ({_split_name(self.split)})")
        self.training_group_counts = dict(sorted(Counter(row.group for row in rows if row.split == 0).items()))
        samples, missing, unmasked = [], [], 0
        for row in chosen:
            image = root / row.path
            mask = (self.masks_dir / row.path).with_suffix(".png") if self.masks_dir is not None else image
            if not image.is_file():
                missing.append(f"image {image}")
            elif not mask.is_file() and skip_unmasked:
                unmasked += 1
            elif not mask.is_file():
                missing.append(f"segmentation {mask}")
            else:
                samples.append(Sample(image, mask, row.label))
                self._group_of[samples[-1]] = row.group
        if missing and not skip_bad:
            raise FileNotFoundError(f"{len(missing)} of the {len(chosen)} {_split_name(self.split)} images in {source} "
                                    f"lack their file, first: {missing[0]} (--skip-bad leaves them out)")
        self.skipped.extend(f"missing {what}" for what in missing)
        self.unmasked = unmasked
        if unmasked:
            warnings.warn(f"{type(self).__name__}({source}): {unmasked} image(s) without a mask left out", stacklevel=3)
        self._set_samples(samples, source)

    def read_mask(self, sample: Sample) -> np.ndarray:
        return read_soft_mask(sample.mask)

    def load(self, sample: Sample) -> tuple[Image.Image, np.ndarray]:
        if self.masks_dir is not None:
            return super().load(sample)
        image = read_image(sample.image)
        return image, np.ones((image.height, image.width), dtype=bool)


def _split_name(code: int) -> str:
    return {value: name for name, value in SPLITS.items()}[code]


def _binary(value: str, column: str, where: str, allowed: Mapping[str, int]) -> int:
    if value.strip() not in allowed:
        raise ValueError(f"{where}: {column} {value.strip()!r} is not one of {', '.join(allowed)}")
    return allowed[value.strip()]


def waterbirds_root(path: str | os.PathLike) -> Path:
    """The Waterbirds folder (the one with ``metadata.csv``): ``path`` itself, or the release folder in it."""
    path = Path(path)
    for folder in (path, *(path / name for name in WATERBIRDS_FOLDERS)):
        if (folder / "metadata.csv").is_file():
            return folder
    raise FileNotFoundError(f"no Waterbirds metadata.csv in {path} (nor in {path}/{WATERBIRDS_FOLDERS[0]} or "
                            f"{path}/{WATERBIRDS_FOLDERS[1]})")


def _waterbirds_rows(metadata: Path) -> list[_Row]:
    with open(metadata, newline="") as file:
        reader = csv.DictReader(file)
        missing = [c for c in WATERBIRDS_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{metadata} lacks the column(s) {missing}; a Waterbirds metadata.csv has "
                             f"img_id,img_filename,y,split,place,place_filename, got {reader.fieldnames}")
        rows = []
        for line, row in enumerate(reader, 2):
            where = f"{metadata}:{line}"
            y = _binary(row["y"], "y", where, {"0": 0, "1": 1})
            place = _binary(row["place"], "place", where, {"0": 0, "1": 1})
            split = _binary(row["split"], "split", where, {"0": 0, "1": 1, "2": 2})
            rows.append(_Row(row["img_filename"].strip(), y, 2 * y + place, split))
    if not rows:
        raise ValueError(f"{metadata} lists no images")
    return rows


class WaterbirdsDataset(_GroupTable):
    """One split of Waterbirds (Sagawa et al. 2020); labels 0 landbird, 1 waterbird; group = 2 * y + place.

    Parameters
    ----------
    root:
        The release folder (with ``metadata.csv``), or a folder holding it under either release's name.
    split:
        ``'train'`` / 0, ``'val'`` / 1 or ``'test'`` / 2.
    masks:
        CUB's ``segmentations`` folder (soft maps thresholded at :data:`MASK_THRESHOLD`), or another
        folder of masks at the same relative paths; None: every mask is the whole image (accuracy only).
    skip_bad:
        Leave images whose image or segmentation file is missing (or unreadable) out, with a warning;
        without it they are counted and refused.

    ``training_group_counts``: the group sizes of the training split of the same ``metadata.csv``
    (the weights of the training-proportion-weighted mean).
    """

    classes = ["landbird", "waterbird"]
    group_names = WATERBIRDS_GROUPS
    locate = staticmethod(waterbirds_root)

    def __init__(self, root: str | os.PathLike, split: int | str = "train", transform: Transform | None = None, *,
                 masks: str | os.PathLike | None = None, skip_bad: bool = False, skip_unmasked: bool = False) -> None:
        root = waterbirds_root(root)
        super().__init__(root, _waterbirds_rows(root / "metadata.csv"), split, masks, transform, skip_bad,
                         skip_unmasked, root / "metadata.csv")


def _celeba_rows(root: Path) -> list[_Row]:
    attributes, partition = root / "list_attr_celeba.txt", root / "list_eval_partition.txt"
    for path in (attributes, partition, root / "img_align_celeba"):
        if not path.exists():
            raise FileNotFoundError(f"CelebA: {path} not found (expected list_attr_celeba.txt, "
                                    "list_eval_partition.txt and img_align_celeba/ in one folder)")
    lines = attributes.read_text().splitlines()
    names = lines[1].split() if len(lines) > 1 else []
    absent = [name for name in ("Blond_Hair", "Male") if name not in names]
    if absent:
        raise ValueError(f"{attributes} lacks the attribute(s) {absent} on its second line")
    blond, male = names.index("Blond_Hair") + 1, names.index("Male") + 1
    coded = {"-1": 0, "1": 1}
    values = {}
    for line, text in enumerate(lines[2:], 3):
        fields = text.split()
        if fields:
            where = f"{attributes}:{line}"
            if len(fields) != len(names) + 1:
                raise ValueError(f"{where}: {len(fields) - 1} attributes, expected {len(names)}")
            values[fields[0]] = (_binary(fields[blond], "Blond_Hair", where, coded),
                                 _binary(fields[male], "Male", where, coded))
    rows = []
    for line, text in enumerate(partition.read_text().splitlines(), 1):
        fields = text.split()
        if not fields:
            continue
        where = f"{partition}:{line}"
        if len(fields) != 2 or fields[0] not in values:
            raise ValueError(f"{where}: expected '<image> <split>' of an image in {attributes.name}, got {text!r}")
        split = _binary(fields[1], "split", where, {"0": 0, "1": 1, "2": 2})
        y, is_male = values[fields[0]]
        rows.append(_Row(f"img_align_celeba/{fields[0]}", y, 2 * y + is_male, split))
    return rows


class CelebADataset(_GroupTable):
    """One split of CelebA for hair colour: labels 0 not blond, 1 blond (Blond_Hair); group = 2 * y + Male.

    ``masks``: a folder of ``img_align_celeba/<stem>.png`` masks (CelebA has none: ``train --masks
    tokencut:MODEL`` makes them); None: the whole image. Other parameters as :class:`WaterbirdsDataset`.
    """

    classes = ["not blond", "blond"]
    group_names = CELEBA_GROUPS

    def __init__(self, root: str | os.PathLike, split: int | str = "train", transform: Transform | None = None, *,
                 masks: str | os.PathLike | None = None, skip_bad: bool = False, skip_unmasked: bool = False) -> None:
        root = Path(root)
        super().__init__(root, _celeba_rows(root), split, masks, transform, skip_bad, skip_unmasked,
                         root / "list_eval_partition.txt")


GROUP_FORMATS: dict[str, type[_GroupTable]] = {"waterbirds": WaterbirdsDataset, "celeba": CelebADataset}
