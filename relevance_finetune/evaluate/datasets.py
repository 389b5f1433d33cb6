"""The evaluation datasets: one loader per benchmark, in its published layout, and the label mappings.

Robustness sets are read into an :class:`EvalSet` (image paths, the correct ImageNet-1k classes
of each image, and the class subset the standard protocol scores); :data:`DATASETS` names where
each lives under ``--data-root``. The label mappings turn a benchmark's classes into ImageNet-1k
indices: timm's synset lists (ImageNet-A/-R subsets), ObjectNet's mapping files, SI-Score's label
strings (:func:`si_score_label_to_index`) and the IN-9 superclasses (:func:`in9_superclasses`).
"""
from __future__ import annotations

import functools
import json
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import ImageNetInfo
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = [
    "CARTON_CLASS",
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "IN9_CLASSES",
    "IN9_VARIANTS",
    "OBJECTNET_BORDER",
    "ROBUSTNESS_DATASETS",
    "SHORTCUT_DATASETS",
    "DatasetSpec",
    "EvalSet",
    "ImageNetSegmentation",
    "eval_loader",
    "imagenet_synsets",
    "in9_superclasses",
    "load_eval_set",
    "load_imagenet9",
    "load_imagenet_v2",
    "load_objectnet",
    "load_set_a",
    "load_si_score",
    "load_wnid_folders",
    "resolve_path",
    "si_score_label_to_index",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives under ``--data-root``, its table title and how to read it."""
    path: str
    title: str
    kind: str  # loader: 'val' | 'a' | 'r' | 'sketch' | 'v2' | 'objectnet' | 'si' | 'mat' | 'w' | 'in9'


DATASETS: dict[str, DatasetSpec] = {
    "imagenet": DatasetSpec("imagenet/val", "INet val", "val"),
    "imagenet-a": DatasetSpec("imagenet-a", "INet-A", "a"),
    "imagenet-r": DatasetSpec("imagenet-r", "INet-R", "r"),
    "sketch": DatasetSpec("sketch", "Sketch", "sketch"),
    "imagenet-v2": DatasetSpec("imagenetv2-matched-frequency-format-val", "INet-v2", "v2"),
    "objectnet": DatasetSpec("objectnet-1.0", "ObjNet", "objectnet"),
    "si-location": DatasetSpec("si-score/location20_area02_min0pc", "SI-location", "si"),
    "si-rotation": DatasetSpec("si-score/rotation", "SI-rotation", "si"),
    "si-size": DatasetSpec("si-score/area", "SI-size", "si"),
    "segmentation": DatasetSpec("gtsegs_ijcv.mat", "ImageNet-segmentation", "mat"),
    "imagenet-w": DatasetSpec("imagenet/val", "IN-W", "w"),
    "imagenet-9": DatasetSpec("bg_challenge", "IN-9", "in9"),
}
SHORTCUT_DATASETS = tuple(name for name, spec in DATASETS.items() if spec.kind in ("w", "in9"))
ROBUSTNESS_DATASETS = tuple(name for name, spec in DATASETS.items()
                            if spec.kind != "mat" and name not in SHORTCUT_DATASETS)
OBJECTNET_BORDER = 2  # pixels cropped on each side (the official evaluation template)
CARTON_CLASS = 478  # 'carton': the class ImageNet-W's watermark pulls predictions towards (Li et al. 2023)
IN9_CLASSES = ("00_dog", "01_bird", "02_wheeled vehicle", "03_reptile", "04_carnivore", "05_insect",
               "06_musical instrument", "07_primate", "08_fish")
IN9_VARIANTS = ("original", "only_fg", "only_bg_b", "only_bg_t", "no_fg", "mixed_same", "mixed_rand", "mixed_next")
# ImageNet-1k indices of each IN-9 superclass: the WordNet descendants of dog, bird, wheeled vehicle,
# reptile, carnivore, insect, musical instrument, primate and fish (Xiao et al. 2020, in_to_in9.json)
_IN9_MEMBERS = (
    "151-170 173-268",
    "7-24 87-100 127-146",
    "407-408 428 436 444 468 511 547 555 561 565 569 573 586 603 609 612 627 656 661 665 670-671 675 690 705 "
    "717 734 751 757 791 802-803 817 820 829 847 864 866-867 870 880",
    "33-68",
    "269-280 286-299 356-362 387-388",
    "300-326",
    "401-402 420 432 486 494 513 541 546 558 566 577 579 593-594 641-642 683-684 687 699 776 822 875 881 889",
    "365-384",
    "0-6 389-397",
)


# -- class lists and label mappings -----------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _timm_info_lines(filename: str) -> tuple[str, ...]:
    data = pkgutil.get_data("timm.data", f"_info/{filename}")
    return tuple(data.decode("utf-8").split())


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k wnids in class-index order (timm's package data)."""
    return list(_timm_info_lines("imagenet_synsets.txt"))


def _subset_indices(kind: str) -> tuple[int, ...]:
    """Sorted 1k indices of the ImageNet-A (``'a'``) or ImageNet-R (``'r'``) classes."""
    return tuple(int(i) for i in _timm_info_lines(f"imagenet_{kind}_indices.txt"))


def in9_superclasses() -> torch.Tensor:
    """(1000,) long tensor: the IN-9 superclass of each ImageNet-1k class, -1 for the 630 in none."""
    table = torch.full((1000,), -1, dtype=torch.long)
    for superclass, members in enumerate(_IN9_MEMBERS):
        for item in members.split():
            first, _, last = item.partition("-")
            table[int(first):int(last or first) + 1] = superclass
    return table


def _normalise_label(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text.strip().lower())


@functools.lru_cache(maxsize=1)
def _imagenet_synonyms() -> tuple[tuple[str, ...], ...]:
    info = ImageNetInfo("imagenet-1k")
    return tuple(tuple(_normalise_label(s) for s in info.index_to_description(i).split(","))
                 for i in range(info.num_classes()))


def si_score_label_to_index(labels: Iterable[str]) -> dict[str, int]:
    """Map SI-Score label strings (e.g. ``'bagel'``) to ImageNet-1k indices from timm's names.

    A label matches a class when it equals (ignoring case, ``_``, ``-``) the class's first
    lemma in ``ImageNetInfo().index_to_description``; failing that, any of its comma-separated
    synonyms. A label that matches no class or several raises ``ValueError``: pass an explicit
    JSON mapping (``--si-score-labels``) for it.
    """
    synonyms = _imagenet_synonyms()
    mapping, problems = {}, []
    for label in labels:
        key = _normalise_label(label)
        matches = [i for i, names in enumerate(synonyms) if names[0] == key]
        matches = matches or [i for i, names in enumerate(synonyms) if key in names]
        if len(matches) == 1:
            mapping[label] = matches[0]
        else:
            problems.append(f"{label!r} ({'no ImageNet class' if not matches else f'classes {matches}'})")
    if problems:
        raise ValueError("SI-Score labels without a unique ImageNet class: " + ", ".join(problems)
                         + "; give them in a JSON file {label: index} via --si-score-labels")
    return mapping


def load_set_a(path: str | Path) -> set[int]:
    """Class indices listed in a text file: wnids or integers, separated by whitespace or commas."""
    index = {wnid: i for i, wnid in enumerate(imagenet_synsets())}
    tokens = [t for t in re.split(r"[\s,]+", Path(path).read_text()) if t]
    unknown = [t for t in tokens if not t.isdigit() and t not in index]
    if unknown or not tokens:
        raise ValueError(f"{path}: expected ImageNet wnids or class indices, "
                         f"got {'nothing' if not tokens else unknown[:5]}")
    return {int(t) if t.isdigit() else index[t] for t in tokens}


# -- loaders ----------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """Images of one evaluation set and what counts as correct for each.

    ``targets[i]`` are the correct 1k classes of image ``i`` (first = the class the ``paper``
    protocol uses); ``classes[i]`` names its dataset class (wnid, ObjectNet label, ...);
    ``subset`` lists the logits the ``standard`` protocol scores (None: all 1000).
    """
    name: str
    paths: list[Path]
    targets: list[tuple[int, ...]]
    classes: list[str]
    subset: tuple[int, ...] | None = None
    border: int = 0

    def __len__(self) -> int:
        return len(self.paths)


def _class_dirs(root: Path, what: str) -> list[Path]:
    """Sub-directories of ``root`` (files such as README.txt or CSVs are skipped)."""
    if not root.is_dir():
        raise FileNotFoundError(f"{what}: expected a directory at {root}")
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not dirs:
        raise ValueError(f"{what}: expected one sub-directory per class in {root}, found none")
    return dirs


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _collect(name: str, folders: Iterable[tuple[Path, tuple[int, ...], str]], **kwargs) -> EvalSet:
    paths, targets, classes = [], [], []
    for folder, target, label in folders:
        images = _images(folder)
        paths += images
        targets += [target] * len(images)
        classes += [label] * len(images)
    if not paths:
        raise ValueError(f"{name}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in its class folders")
    return EvalSet(name, paths, targets, classes, **kwargs)


def load_wnid_folders(root: str | Path, name: str = "imagenet", subset: str | None = None) -> EvalSet:
    """ImageNet val, ImageNet-Sketch (``subset=None``), ImageNet-A (``'a'``) or -R (``'r'``).

    Layout: ``root/<wnid>/<image>``; for A/R every folder must be one of timm's 200 subset wnids.
    """
    synsets = imagenet_synsets()
    index = {wnid: i for i, wnid in enumerate(synsets)}
    allowed = set(_subset_indices(subset)) if subset else set(range(len(synsets)))
    family = f"ImageNet-{subset.upper()}" if subset else "ImageNet-1k"
    what = f"{name} (<wnid>/ folders of the {len(allowed)} {family} classes)"
    folders = []
    for folder in _class_dirs(Path(root), what):
        cls = index.get(folder.name)
        if cls is None or cls not in allowed:
            raise ValueError(f"{what}: folder {folder} is not one of the expected wnids")
        folders.append((folder, (cls,), folder.name))
    return _collect(name, folders, subset=tuple(sorted(allowed)) if subset else None)


def load_imagenet_v2(root: str | Path, name: str = "imagenet-v2") -> EvalSet:
    """ImageNet-v2: ``root/<class index 0..999>/<image>`` (folders sorted numerically)."""
    what = f"{name} (integer class folders 0..999)"
    dirs = _class_dirs(Path(root), what)
    bad = [d.name for d in dirs if not d.name.isdigit() or int(d.name) >= 1000]
    if bad:
        raise ValueError(f"{what}: unexpected folders {bad[:5]} in {root}")
    dirs.sort(key=lambda d: int(d.name))
    return _collect(name, ((d, (int(d.name),), d.name) for d in dirs))


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected the mapping file {path}")
    return json.loads(path.read_text())


def load_objectnet(root: str | Path, name: str = "objectnet") -> EvalSet:
    """ObjectNet 1.0 restricted to the classes that overlap ImageNet-1k.

    Layout: ``root/images/<folder>/*.png`` and ``root/mappings/``. The mapping chain is folder
    -> ObjectNet label (``folder_to_objectnet_label.json``) -> ImageNet label names
    (``objectnet_to_imagenet_1k.json``, joined by "; ") -> 0-based line numbers of
    ``imagenet_to_label_2012_v2`` -> class indices (``pytorch_to_imagenet_2012_id.json``,
    ``{"<index>": <line>}``). Folders whose label has no ImageNet class are skipped.
    """
    root = Path(root)
    maps = root / "mappings"
    what = f"{name} (ObjectNet 1.0 with images/ and mappings/)"
    folder_to_label = _read_json(maps / "folder_to_objectnet_label.json", what)
    label_to_names = _read_json(maps / "objectnet_to_imagenet_1k.json", what)
    index_to_line = _read_json(maps / "pytorch_to_imagenet_2012_id.json", what)
    lines_file = maps / "imagenet_to_label_2012_v2"
    if not lines_file.is_file():
        raise FileNotFoundError(f"{what}: expected the mapping file {lines_file}")
    line_of = {label.strip(): i for i, label in enumerate(lines_file.read_text().splitlines())}
    index_of_line = {int(line): int(index) for index, line in index_to_line.items()}
    folders = []
    for folder in _class_dirs(root / "images", what):
        if folder.name not in folder_to_label:
            raise ValueError(f"{what}: folder {folder} is missing from folder_to_objectnet_label.json")
        label = folder_to_label[folder.name]
        if label not in label_to_names:
            continue  # one of the ObjectNet classes without an ImageNet counterpart
        targets = []
        for imagenet_name in label_to_names[label].split("; "):
            if imagenet_name not in line_of or line_of[imagenet_name] not in index_of_line:
                raise ValueError(f"{what}: ImageNet label {imagenet_name!r} (for {label!r}) is not in "
                                 f"imagenet_to_label_2012_v2 / pytorch_to_imagenet_2012_id.json")
            targets.append(index_of_line[line_of[imagenet_name]])
        folders.append((folder, tuple(targets), label))
    subset = tuple(sorted({t for _, targets, _ in folders for t in targets}))
    return _collect(name, folders, subset=subset, border=OBJECTNET_BORDER)


def load_si_score(root: str | Path, name: str = "si-score", labels: Mapping[str, int] | None = None) -> EvalSet:
    """One SI-Score split: ``root/<label string>/<id>.jpg`` (non-directories skipped).

    ``labels`` maps label strings to 1k indices; missing ones are derived by
    :func:`si_score_label_to_index`.
    """
    dirs = _class_dirs(Path(root), f"{name} (SI-Score <label>/ folders)")
    labels = dict(labels or {})
    labels.update(si_score_label_to_index(d.name for d in dirs if d.name not in labels))
    return _collect(name, ((d, (labels[d.name],), d.name) for d in dirs))


def load_imagenet9(root: str | Path, name: str = "imagenet-9") -> dict[str, EvalSet]:
    """The IN-9 variants present under ``root``: ``root/<variant>/val/<NN_class>/*`` (Xiao et al. 2020).

    Targets are superclass indices 0..8 (the folders' order); folders that are not image variants
    (``fg_mask``, a README) are skipped.
    """
    root = Path(root)
    what = f"{name} (<variant>/val/ with the 9 class folders {IN9_CLASSES[0]} .. {IN9_CLASSES[-1]})"
    variants = [v for v in IN9_VARIANTS if (root / v / "val").is_dir()]
    if not variants:
        raise FileNotFoundError(f"{what}: no variant folder ({', '.join(IN9_VARIANTS)}) in {root}")
    sets = {}
    for variant in variants:
        dirs = _class_dirs(root / variant / "val", what)
        if tuple(d.name for d in dirs) != IN9_CLASSES:
            raise ValueError(f"{what}: {root / variant / 'val'} holds {[d.name for d in dirs]}")
        sets[variant] = _collect(f"{name}/{variant}", ((d, (i,), d.name) for i, d in enumerate(dirs)))
    return sets


class ImageNetSegmentation(Dataset):
    """ImageNet-segmentation (Guillaumin et al.) from ``gtsegs_ijcv.mat`` (MATLAB v7.3 / HDF5).

    Yields ``(image, mask)``: the image resized to ``size`` (no crop) and normalised with
    ``mean``/``std``, the (H, W) uint8 mask resized nearest. ``/value/img`` and ``/value/gt``
    hold (N, 1) object references; the mask sits behind two references.
    """

    def __init__(self, path: str | Path, size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> None:
        import h5py
        from torchvision import transforms
        self.path, self.size = Path(path), (int(size[0]), int(size[1]))
        what = f"{self.path} (gtsegs_ijcv.mat with /value/img and /value/gt)"
        if not self.path.is_file():
            raise FileNotFoundError(f"expected the ImageNet-segmentation file {what}")
        with h5py.File(self.path, "r") as f:
            missing = [k for k in ("value/img", "value/gt") if k not in f]
            if missing:
                raise ValueError(f"{what}: missing datasets {missing}")
            n_img, n_gt = f["value/img"].shape[0], f["value/gt"].shape[0]
        if n_img != n_gt or n_img == 0:
            raise ValueError(f"{what}: expected as many masks as images, got {n_img} images and {n_gt} masks")
        self.length = n_img
        self.transform = transforms.Compose([
            transforms.Resize(self.size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.ToTensor(), transforms.Normalize(mean, std)])
        self._file = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._file is None:  # opened lazily: once per DataLoader worker
            import h5py
            self._file = h5py.File(self.path, "r")
        f = self._file
        image = np.array(f[f["value/img"][i, 0]]).transpose(2, 1, 0)  # (3, W, H) -> (H, W, 3)
        mask = np.array(f[f[f["value/gt"][i, 0]][0, 0]]).T  # (W, H) -> (H, W)
        mask = Image.fromarray(mask.astype(np.uint8)).resize(self.size[::-1], Image.NEAREST)
        return self.transform(Image.fromarray(image.astype(np.uint8))), torch.from_numpy(np.array(mask))


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, max_images: int | None, seed: int) -> DataLoader:
    """``dataset`` in order, or a random subset of at most ``max_images`` (seeded, kept in order)."""
    if max_images is not None and max_images < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        dataset = Subset(dataset, sorted(order[:max_images].tolist()))
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)


def resolve_path(name: str, data_root: str | Path | None, overrides: Mapping[str, str | Path] | None = None) -> Path:
    """Location of dataset ``name``: ``overrides[name]`` or ``data_root / DATASETS[name].path``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    if overrides and name in overrides:
        return Path(overrides[name])
    if data_root is None:
        raise ValueError(f"dataset {name!r} needs --data-root or --dataset-dir {name}=PATH")
    return Path(data_root) / DATASETS[name].path


def load_eval_set(name: str, root: str | Path, si_labels: Mapping[str, int] | None = None) -> EvalSet:
    """Read robustness dataset ``name`` (a key of :data:`DATASETS`) from ``root``."""
    kind = DATASETS[name].kind if name in DATASETS else None
    if kind in ("val", "sketch"):
        return load_wnid_folders(root, name)
    if kind in ("a", "r"):
        return load_wnid_folders(root, name, subset=kind)
    if kind == "v2":
        return load_imagenet_v2(root, name)
    if kind == "objectnet":
        return load_objectnet(root, name)
    if kind == "si":
        return load_si_score(root, name, si_labels)
    raise ValueError(f"{name!r} is not a robustness dataset; expected one of {ROBUSTNESS_DATASETS}")
