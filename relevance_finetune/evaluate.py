"""The paper's evaluations: robustness accuracy, the segmentation test and the perturbation test.

Robustness sets (Table 1, Table 2) are read from their published layouts into an
:class:`EvalSet` (image paths, the correct ImageNet-1k classes of each image, and the class
subset the standard protocol scores). Two protocols are scored from the same logits, and
each result names its protocol:

``standard``
    ImageNet-A/-R scored on their 200 logits (Hendrycks et al.); ObjectNet scored over the
    logits of the 113 overlapping classes' ImageNet classes, correct if the prediction is any
    ImageNet class mapped to the image's ObjectNet class.
``paper``
    As the RobustViT reference code: 1000-way argmax, correct if it is the true class (for
    ObjectNet: the first mapped ImageNet class).

The segmentation test (Table 3) reads ImageNet-segmentation's ``gtsegs_ijcv.mat`` and the
perturbation test (Appendix N) removes pixels by relevance order; both use
:mod:`relevance_finetune.metrics`. The shortcut suite scores ImageNet-W (watermark) and the
Backgrounds Challenge / ImageNet-9 (background). ``relevance-finetune evaluate`` runs one suite
for one or two sets of weights and writes ``<suite>.json`` and ``<suite>.md``.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo, create_transform
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .data import model_data_config
from .gae import attach_gae
from .metrics import DEFAULT_FRACTIONS, SegmentationMeter, area_under_curve, perturbation_curve
from .models import add_model_arguments, create_model, merge_model_kwargs

__all__ = [
    "CARTON_CLASS",
    "DATASETS",
    "IN9_CLASSES",
    "IN9_VARIANTS",
    "PAPER_NORMALIZATION",
    "PROTOCOLS",
    "ROBUSTNESS_DATASETS",
    "SEGMENTATION_METRICS",
    "SHORTCUT_DATASETS",
    "SUITES",
    "EvalSet",
    "ImageNetSegmentation",
    "EvalOptions",
    "add_arguments",
    "add_data_arguments",
    "add_table_arguments",
    "build_model",
    "evaluate_grid",
    "evaluate_imagenet9",
    "evaluate_imagenet_w",
    "evaluate_perturbation",
    "evaluate_robustness",
    "evaluate_segmentation",
    "evaluate_shortcut",
    "find_weights",
    "imagenet_synsets",
    "in9_superclasses",
    "load_eval_set",
    "load_imagenet9",
    "load_imagenet_v2",
    "load_objectnet",
    "load_set_a",
    "load_si_score",
    "load_wnid_folders",
    "metric_table",
    "options_from_args",
    "resolve_path",
    "robustness_table",
    "run",
    "run_suite",
    "segmentation_protocol",
    "shortcut_rows",
    "si_score_label_to_index",
    "table_models",
    "topk_correct",
    "watermark_transform",
    "write_table",
]

PROTOCOLS = ("standard", "paper")
SUITES = ("robustness", "segmentation", "perturbation", "shortcuts")
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


# -- class lists ---------------------------------------------------------------------------------
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


# -- loaders ---------------------------------------------------------------------------------------
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


def load_si_score(root: str | Path, name: str = "si-score", labels: Mapping[str, int] | None = None) -> EvalSet:
    """One SI-Score split: ``root/<label string>/<id>.jpg`` (non-directories skipped).

    ``labels`` maps label strings to 1k indices; missing ones are derived by
    :func:`si_score_label_to_index`.
    """
    dirs = _class_dirs(Path(root), f"{name} (SI-Score <label>/ folders)")
    labels = dict(labels or {})
    labels.update(si_score_label_to_index(d.name for d in dirs if d.name not in labels))
    return _collect(name, ((d, (labels[d.name],), d.name) for d in dirs))


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


def load_set_a(path: str | Path) -> set[int]:
    """Class indices listed in a text file: wnids or integers, separated by whitespace or commas."""
    index = {wnid: i for i, wnid in enumerate(imagenet_synsets())}
    tokens = [t for t in re.split(r"[\s,]+", Path(path).read_text()) if t]
    unknown = [t for t in tokens if not t.isdigit() and t not in index]
    if unknown or not tokens:
        raise ValueError(f"{path}: expected ImageNet wnids or class indices, "
                         f"got {'nothing' if not tokens else unknown[:5]}")
    return {int(t) if t.isdigit() else index[t] for t in tokens}


# -- images -----------------------------------------------------------------------------------------
class _ImageFiles(Dataset):
    """(transformed image, position) pairs of an :class:`EvalSet`."""

    def __init__(self, eval_set: EvalSet, transform: Callable) -> None:
        self.eval_set, self.transform = eval_set, transform

    def __len__(self) -> int:
        return len(self.eval_set)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.eval_set.paths[i]) as image:
            image = image.convert("RGB")
        b = self.eval_set.border
        if b:
            image = image.crop((b, b, image.width - b, image.height - b))
        return self.transform(image), i


def _loader(dataset: Dataset, batch_size: int, num_workers: int, max_images: int | None, seed: int) -> DataLoader:
    if max_images is not None and max_images < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        dataset = Subset(dataset, sorted(order[:max_images].tolist()))
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- robustness ---------------------------------------------------------------------------------------
def topk_correct(
        logits: torch.Tensor,
        targets: Sequence[tuple[int, ...]],
        subset: Sequence[int] | None,
        protocol: str,
        ks: Sequence[int] = (1, 5),
) -> dict[int, torch.Tensor]:
    """Per-image correctness ``{k: (B,) bool}`` under ``protocol`` (see the module docstring)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    logits = logits.float().cpu()
    classes = torch.arange(logits.shape[1])
    if protocol == "standard" and subset is not None:
        classes = torch.as_tensor(subset)
        logits = logits[:, classes]
        allowed = [set(t) for t in targets]
    else:
        allowed = [{t[0]} for t in targets]
    top = classes[logits.topk(min(max(ks), logits.shape[1]), dim=1).indices]
    hits = torch.tensor([[int(c) in a for c in row] for row, a in zip(top.tolist(), allowed)]).view(top.shape)
    return {k: hits[:, :k].any(dim=1) for k in ks}


def _summarise(correct: Mapping[int, np.ndarray], keep: np.ndarray | None = None) -> dict[str, float | None]:
    keep = np.ones_like(correct[1], dtype=bool) if keep is None else keep
    n = int(keep.sum())
    return {"n": n, **{f"top{k}": 100.0 * float(c[keep].mean()) if n else None  # None: no images
                       for k, c in correct.items()}}


@torch.no_grad()
def evaluate_robustness(
        model: nn.Module,
        eval_set: EvalSet,
        protocols: Sequence[str] = PROTOCOLS,
        set_a: set[int] | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        max_images: int | None = None,
        seed: int = 0,
        data_config: Mapping[str, Any] | None = None,
        progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Top-1/top-5 of ``model`` on ``eval_set`` under each protocol.

    Returns ``{protocol: {protocol, top1, top5, n, per_class: {class: {n, top1, top5}},
    set_a, set_b}}`` in percent; the set A/B entries (by each image's first target) only with
    ``set_a``. Preprocessing is timm's eval transform for ``data_config`` (default: the model's).
    """
    num_classes = getattr(model, "num_classes", None)
    if num_classes != 1000:
        raise ValueError(f"robustness sets are scored on ImageNet-1k logits; the model has {num_classes} classes")
    config = dict(data_config or model_data_config(model))
    transform = create_transform(**config, is_training=False)
    loader = _loader(_ImageFiles(eval_set, transform), batch_size, num_workers, max_images, seed)
    device = _device_of(model)
    model.eval()
    positions, hits = [], {p: {1: [], 5: []} for p in protocols}
    for images, index in tqdm(loader, desc=eval_set.name, disable=not progress):
        logits = model(images.to(device))
        targets = [eval_set.targets[i] for i in index.tolist()]
        positions += index.tolist()
        for protocol in protocols:
            for k, c in topk_correct(logits, targets, eval_set.subset, protocol).items():
                hits[protocol][k].append(c.numpy())
    classes = np.array([eval_set.classes[i] for i in positions])
    first = np.array([eval_set.targets[i][0] for i in positions])
    results = {}
    for protocol in protocols:
        correct = {k: np.concatenate(v) for k, v in hits[protocol].items()}
        result = {"protocol": protocol, **_summarise(correct), "per_class": {
            str(c): _summarise(correct, classes == c) for c in sorted(set(classes))}}
        if set_a is not None:
            in_a = np.isin(first, sorted(set_a))
            result["set_a"], result["set_b"] = _summarise(correct, in_a), _summarise(correct, ~in_a)
        results[protocol] = result
    return results


# -- segmentation test ------------------------------------------------------------------------------
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


PAPER_NORMALIZATION = (0.5, 0.5, 0.5)  # the reference's mean and std, for every model


def segmentation_protocol(options: "EvalOptions") -> str:
    """``'paper'`` when only the paper protocol is asked for, else ``'standard'`` (the model's own)."""
    return "paper" if tuple(options.protocols) == ("paper",) else "standard"


def evaluate_segmentation(
        model: nn.Module,
        path: str | Path,
        batch_size: int = 32,
        num_workers: int = 4,
        max_images: int | None = None,
        seed: int = 0,
        data_config: Mapping[str, Any] | None = None,
        progress: bool = True,
        protocol: str = "standard",
) -> dict[str, Any]:
    """Segmentation and localisation metrics (percent) of the model's GAE maps for its predicted class.

    ``protocol`` ``'standard'`` normalises with the model's mean and std (``data_config``,
    default: the model's timm config); ``'paper'`` with mean = std = 0.5 for every model, as the
    reference code. The result names the protocol and the mean and std used.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    config = dict(data_config or model_data_config(model))
    if protocol == "paper":
        config["mean"] = config["std"] = PAPER_NORMALIZATION
    dataset = ImageNetSegmentation(path, config["input_size"][-2:], config["mean"], config["std"])
    loader = _loader(dataset, batch_size, num_workers, max_images, seed)
    device, meter = _device_of(model), SegmentationMeter()
    with attach_gae(model) as gae:
        for images, masks in tqdm(loader, desc="segmentation", disable=not progress):
            meter.update(gae.explain(images.to(device)), masks)
    return {**meter.compute(), "protocol": protocol,
            "mean": [float(m) for m in config["mean"]], "std": [float(v) for v in config["std"]]}


# -- perturbation test ------------------------------------------------------------------------------
def evaluate_perturbation(
        model: nn.Module,
        eval_set: EvalSet,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        batch_size: int = 32,
        num_workers: int = 4,
        max_images: int | None = None,
        seed: int = 0,
        data_config: Mapping[str, Any] | None = None,
        progress: bool = True,
) -> dict[str, Any]:
    """Positive and negative perturbation curves (percent top-1 vs the first target) and their AUC.

    Relevance is GAE for the predicted class; removed pixels are set to black (``-mean/std``
    after normalisation), as the reference zeroes them before normalising.
    """
    config = dict(data_config or model_data_config(model))
    fill = [-m / s for m, s in zip(config["mean"], config["std"])]
    transform = create_transform(**config, is_training=False)
    loader = _loader(_ImageFiles(eval_set, transform), batch_size, num_workers, max_images, seed)
    device = _device_of(model)
    totals = {mode: torch.zeros(len(fractions)) for mode in ("positive", "negative")}
    count = 0
    for images, index in tqdm(loader, desc=f"perturbation {eval_set.name}", disable=not progress):
        images = images.to(device)
        labels = torch.tensor([eval_set.targets[i][0] for i in index.tolist()], device=device)
        with attach_gae(model) as gae:  # detached again so the perturbed forwards keep fused attention
            relevance = gae.explain(images)
        for mode in totals:
            totals[mode] += perturbation_curve(model, images, labels, relevance, fractions, mode, fill) * len(labels)
        count += len(labels)
    result: dict[str, Any] = {"dataset": eval_set.name, "images": count}
    for mode, total in totals.items():
        accuracy = (total / max(count, 1)).tolist()
        result[mode] = {"fractions": list(fractions), "accuracy": accuracy,
                        "auc": area_under_curve(fractions, accuracy)}
    return result


# -- shortcut evaluations -----------------------------------------------------------------------------
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


def in9_superclasses() -> torch.Tensor:
    """(1000,) long tensor: the IN-9 superclass of each ImageNet-1k class, -1 for the 630 in none."""
    table = torch.full((1000,), -1, dtype=torch.long)
    for superclass, members in enumerate(_IN9_MEMBERS):
        for item in members.split():
            first, _, last = item.partition("-")
            table[int(first):int(last or first) + 1] = superclass
    return table


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


class _Pair:
    """Both transforms of one image, so clean and watermarked copies share a decode."""

    def __init__(self, first: Callable, second: Callable) -> None:
        self.first, self.second = first, second

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first(image), self.second(image)


def watermark_transform(config: Mapping[str, Any]) -> Callable:
    """timm's eval transform for ``config`` with ImageNet-W's watermark inserted before ``Normalize``.

    The watermark is ``imagenet_w.AddWatermark(crop size)`` (``pip install "relevance-finetune[eval]"``),
    applied after the resize and crop and before normalisation, as Li et al. (2023) do.
    """
    try:
        from imagenet_w import AddWatermark
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("ImageNet-W needs the imagenet-w package: "
                                  "pip install 'relevance-finetune[eval]'") from error
    from torchvision import transforms
    steps = list(create_transform(**config, is_training=False).transforms)
    at = next((i for i, t in enumerate(steps) if isinstance(t, transforms.Normalize)), None)
    if at is None:
        raise ValueError(f"expected timm's eval transform to end with Normalize, got {steps}")
    steps.insert(at, AddWatermark(int(config["input_size"][-2])))
    return transforms.Compose(steps)


def _require_imagenet_head(model: nn.Module, what: str) -> None:
    num_classes = getattr(model, "num_classes", None)
    if num_classes != 1000:
        raise ValueError(f"{what} is scored on ImageNet-1k logits; the model has {num_classes} classes")


@torch.no_grad()
def evaluate_imagenet_w(
        model: nn.Module,
        eval_set: EvalSet,
        batch_size: int = 64,
        num_workers: int = 4,
        max_images: int | None = None,
        seed: int = 0,
        data_config: Mapping[str, Any] | None = None,
        progress: bool = True,
) -> dict[str, Any]:
    """ImageNet-W (Li et al., CVPR 2023): 1000-way top-1 on ImageNet val with and without the watermark.

    Returns percentages: ``clean_top1``, ``watermarked_top1``, ``in_w_gap`` (watermarked - clean),
    the same three on the carton class's images (``carton_gap``: how much more often a carton is
    recognised when watermarked; None without carton images), the mean carton probability
    (``clean_p_carton``, ``watermarked_p_carton``, ``delta_p_carton``), ``images`` and
    ``carton_images``.
    """
    _require_imagenet_head(model, "ImageNet-W")
    config = dict(data_config or model_data_config(model))
    transform = _Pair(create_transform(**config, is_training=False), watermark_transform(config))
    loader = _loader(_ImageFiles(eval_set, transform), batch_size, num_workers, max_images, seed)
    device = _device_of(model)
    model.eval()
    hits, carton_prob, labels = {"clean": [], "watermarked": []}, {"clean": [], "watermarked": []}, []
    for (clean, marked), index in tqdm(loader, desc=eval_set.name, disable=not progress):
        target = torch.tensor([eval_set.targets[i][0] for i in index.tolist()])
        labels.append(target)
        for key, images in (("clean", clean), ("watermarked", marked)):
            logits = model(images.to(device)).float().cpu()
            hits[key].append(logits.argmax(dim=1) == target)
            carton_prob[key].append(logits.softmax(dim=1)[:, CARTON_CLASS])
    carton = torch.cat(labels) == CARTON_CLASS
    result: dict[str, Any] = {"dataset": eval_set.name, "images": len(carton), "carton_images": int(carton.sum())}
    for key in hits:
        correct, prob = torch.cat(hits[key]).double(), torch.cat(carton_prob[key]).double()
        result[f"{key}_top1"] = 100.0 * float(correct.mean())
        result[f"{key}_carton_top1"] = 100.0 * float(correct[carton].mean()) if carton.any() else None
        result[f"{key}_p_carton"] = 100.0 * float(prob.mean())
    result["in_w_gap"] = result["watermarked_top1"] - result["clean_top1"]
    result["carton_gap"] = (None if result["clean_carton_top1"] is None
                            else result["watermarked_carton_top1"] - result["clean_carton_top1"])
    result["delta_p_carton"] = result["watermarked_p_carton"] - result["clean_p_carton"]
    return result


@torch.no_grad()
def evaluate_imagenet9(
        model: nn.Module,
        root: str | Path,
        batch_size: int = 64,
        num_workers: int = 4,
        max_images: int | None = None,
        seed: int = 0,
        data_config: Mapping[str, Any] | None = None,
        progress: bool = True,
) -> dict[str, Any]:
    """Backgrounds Challenge / ImageNet-9 (Xiao et al., ICLR 2021): top-1 on each variant present.

    The 1000-way argmax is mapped to its IN-9 superclass (:func:`in9_superclasses`; a class in
    none counts as wrong), as the authors score ImageNet models. Images (224 x 224 in the release)
    are resized to the model's input size, without a crop, and normalised with its mean and std.
    Returns ``{variant: {top1, n}}`` in percent and ``bg_gap`` = mixed_same - mixed_rand (None
    unless both are present).
    """
    from torchvision import transforms
    _require_imagenet_head(model, "ImageNet-9")
    config = dict(data_config or model_data_config(model))
    transform = transforms.Compose([
        transforms.Resize(tuple(config["input_size"][-2:]),
                          interpolation=transforms.InterpolationMode(config.get("interpolation", "bilinear"))),
        transforms.ToTensor(), transforms.Normalize(config["mean"], config["std"])])
    superclass, device = in9_superclasses(), _device_of(model)
    model.eval()
    result: dict[str, Any] = {}
    for variant, eval_set in load_imagenet9(root).items():
        loader = _loader(_ImageFiles(eval_set, transform), batch_size, num_workers, max_images, seed)
        correct = []
        for images, index in tqdm(loader, desc=eval_set.name, disable=not progress):
            predicted = superclass[model(images.to(device)).argmax(dim=1).cpu()]
            correct.append(predicted == torch.tensor([eval_set.targets[i][0] for i in index.tolist()]))
        correct = torch.cat(correct).double()
        result[variant] = {"top1": 100.0 * float(correct.mean()), "n": len(correct)}
    both = "mixed_same" in result and "mixed_rand" in result
    result["bg_gap"] = result["mixed_same"]["top1"] - result["mixed_rand"]["top1"] if both else None
    return result


def evaluate_shortcut(model: nn.Module, name: str, path: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run shortcut dataset ``name`` (``'imagenet-w'`` or ``'imagenet-9'``) from ``path``."""
    if name == "imagenet-w":
        return evaluate_imagenet_w(model, load_wnid_folders(path, name), **kwargs)
    if name == "imagenet-9":
        return evaluate_imagenet9(model, path, **kwargs)
    raise ValueError(f"{name!r} is not a shortcut dataset; expected one of {SHORTCUT_DATASETS}")


def shortcut_rows(results: Mapping[str, Any]) -> dict[str, float | None]:
    """One run's shortcut results as ``{row title: value}`` for :func:`metric_table`."""
    rows: dict[str, float | None] = {}
    if "imagenet-w" in results:
        w = results["imagenet-w"]
        rows.update({"IN-1k top-1": w["clean_top1"], "IN-W top-1": w["watermarked_top1"],
                     "IN-W gap": w["in_w_gap"], "Carton gap": w["carton_gap"]})
    if "imagenet-9" in results:
        in9 = results["imagenet-9"]
        rows.update({f"IN-9 {v}": in9[v]["top1"] for v in IN9_VARIANTS if v in in9})
        rows["BG-gap"] = in9["bg_gap"]
    return rows


# -- tables -------------------------------------------------------------------------------------------
def _markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, delta: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if delta is None else f"{value:.1f} ({value - delta:+.1f})"


def robustness_table(
        rows: Sequence[tuple[Sequence[str], Mapping[str, Mapping[str, Any]] | None]],
        datasets: Sequence[str],
        row_header: Sequence[str] = ("Model",),
        protocol: str = "standard",
        metrics: Sequence[str] = ("top1", "top5"),
        split: str | None = None,
        baselines: Sequence[int | None] | None = None,
) -> str:
    """Markdown table in the layout of the paper's Tables 1, 2 and 4.

    ``rows`` are ``(label cells, {dataset: {protocol: result}})``; results may be None or lack a
    dataset (shown as "-"). ``split`` picks ``'set_a'``/``'set_b'``. ``baselines[i]``, a row index
    or None, makes row ``i`` show each value's change against that row, as Table 2 does.
    """
    def value(results, dataset, metric):
        entry = (results or {}).get(dataset, {}).get(protocol)
        if entry is None or (split and split not in entry):
            return None
        return (entry[split] if split else entry)[metric]

    names = {"top1": "R@1", "top5": "R@5"}
    header = list(row_header) + [f"{DATASETS[d].title if d in DATASETS else d} {names.get(m, m)}"
                                 for d in datasets for m in metrics]
    baselines = baselines or [None] * len(rows)
    body = []
    for (labels, results), b in zip(rows, baselines):
        base = None if b is None else rows[b][1]
        cells = [_fmt(value(results, d, m), None if base is None else value(base, d, m))
                 for d in datasets for m in metrics]
        body.append(list(labels) + cells)
    return _markdown(header, body)


def metric_table(columns: Mapping[str, Mapping[str, float] | None], metrics: Mapping[str, str],
                 corner: str = "Metric") -> str:
    """Markdown table with one row per metric (``{key: title}``) and one column per run (Table 3)."""
    header = [corner] + list(columns)
    rows = [[title] + [_fmt((result or {}).get(key)) for result in columns.values()]
            for key, title in metrics.items()]
    return _markdown(header, rows)


SEGMENTATION_METRICS = {"pixel_acc": "Pixel acc.", "miou": "mIoU", "map": "mAP", "mass_accuracy": "Mass acc.",
                        "rank_accuracy": "Rank acc.", "pointing_game": "Pointing game"}


def _perturbation_rows(result: Mapping[str, Any]) -> dict[str, float]:
    flat = {}
    for mode in ("positive", "negative"):
        flat[f"{mode} AUC"] = result[mode]["auc"]
        for fraction, accuracy in zip(result[mode]["fractions"], result[mode]["accuracy"]):
            flat[f"{mode} {fraction:.0%}"] = accuracy
    return flat


# -- running ------------------------------------------------------------------------------------------
WEIGHT_FILES = ("model.safetensors", "best.safetensors")  # an export folder, a training run folder


def find_weights(path: str | Path) -> Path:
    """``path`` itself for a file; in a folder, its ``model.safetensors`` or else ``best.safetensors``."""
    path = Path(path)
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"no weights at {path}: expected a file, or a folder holding one of {WEIGHT_FILES}")


def build_model(name: str, checkpoint: str | Path | None = None, device: str | torch.device = "cpu",
                **kwargs: Any) -> nn.Module:
    """``models.create_model`` with pretrained weights when the name has them and no checkpoint is given.

    ``checkpoint`` may be a weights file, an export folder or a ``relevance-finetune train`` run folder;
    ``kwargs`` go to ``timm.create_model``.
    """
    pretrained = checkpoint is None and (
        name.startswith(("local-dir:", "hf-hub:")) or timm.is_model_pretrained(name))
    weights = None if checkpoint is None else find_weights(checkpoint)
    return create_model(name, pretrained=pretrained, checkpoint=weights, **kwargs).to(device).eval()


@dataclass
class EvalOptions:
    """Everything a suite needs besides the model."""
    data_root: str | None = None
    dataset_dirs: dict[str, str] = field(default_factory=dict)
    datasets: Sequence[str] | None = None
    protocols: Sequence[str] = PROTOCOLS
    set_a: set[int] | None = None
    si_labels: dict[str, int] | None = None
    fractions: Sequence[float] = DEFAULT_FRACTIONS
    batch_size: int = 64
    num_workers: int = 4
    max_images: int | None = None
    seed: int = 0
    progress: bool = True


def _dataset_names(suite: str, options: EvalOptions) -> list[str]:
    if suite == "segmentation":
        return ["segmentation"]
    if options.datasets:
        return list(options.datasets)
    if suite == "perturbation":
        return ["imagenet"]
    candidates = SHORTCUT_DATASETS if suite == "shortcuts" else ROBUSTNESS_DATASETS
    present = [n for n in candidates if resolve_path(n, options.data_root, options.dataset_dirs).exists()]
    if not present:
        expected = ", ".join(f"{n}: {resolve_path(n, options.data_root, options.dataset_dirs)}" for n in candidates)
        raise FileNotFoundError(f"no {suite} dataset found; expected any of {expected}")
    return present


def run_suite(model: nn.Module, suite: str, options: EvalOptions) -> dict[str, Any]:
    """Run ``suite`` for one model: ``{dataset: result}`` (robustness: ``{dataset: {protocol: ...}}``)."""
    common = dict(batch_size=options.batch_size, num_workers=options.num_workers,
                  max_images=options.max_images, seed=options.seed, progress=options.progress)
    results = {}
    for name in _dataset_names(suite, options):
        path = resolve_path(name, options.data_root, options.dataset_dirs)
        if suite == "segmentation":
            results[name] = evaluate_segmentation(model, path, **common, protocol=segmentation_protocol(options))
        elif suite == "shortcuts":
            results[name] = evaluate_shortcut(model, name, path, **common)
        elif suite == "perturbation":
            results[name] = evaluate_perturbation(
                model, load_eval_set(name, path, options.si_labels), options.fractions, **common)
        else:
            results[name] = evaluate_robustness(
                model, load_eval_set(name, path, options.si_labels), options.protocols, options.set_a, **common)
    return results


def evaluate_grid(
        grid: Sequence[tuple[Sequence[str], str | None, str | Path | None]],
        suite: str,
        options: EvalOptions,
        device: str | torch.device = "cpu",
) -> list[tuple[tuple[str, ...], dict[str, Any] | None]]:
    """Evaluate every ``(label cells, model name, checkpoint)`` row of a paper table.

    A row without a model name, or whose checkpoint does not exist, is reported and yields
    ``None`` (shown as "-"), so a table fills in as the finetunes finish.
    """
    rows = []
    for labels, name, checkpoint in grid:
        if name is None or (checkpoint is not None and not Path(checkpoint).exists()):
            print(f"skipping {' / '.join(labels)}: " + (
                "no model name given" if name is None else f"no checkpoint at {checkpoint}"))
            rows.append((tuple(labels), None))
            continue
        model = build_model(name, checkpoint, device)
        rows.append((tuple(labels), run_suite(model, suite, options)))
        del model
    return rows


def add_table_arguments(parser: argparse.ArgumentParser, models: Mapping[str, str | None]) -> None:
    """Arguments of the ``examples/table*.py`` scripts: checkpoints, model names, output, data."""
    parser.add_argument("--checkpoints", default="checkpoints",
                        help="finetuned weights as CHECKPOINTS/<model>/<method>/model.safetensors")
    parser.add_argument("--model-name", action="append", default=[], metavar="MODEL=NAME",
                        help=f"timm name for a table's model (defaults: {dict(models)})")
    parser.add_argument("--only", nargs="+", default=None, metavar="MODEL", choices=list(models),
                        help="evaluate only these of the table's models")
    parser.add_argument("--out", required=True, help="markdown file to write (JSON next to it)")
    add_data_arguments(parser)


def table_models(args: argparse.Namespace, models: Mapping[str, str | None]) -> dict[str, str | None]:
    """The table's model names with ``--model-name MODEL=NAME`` overrides, restricted to ``--only``."""
    names = dict(models)
    for item in args.model_name:
        key, sep, name = item.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--model-name expects MODEL=NAME with MODEL in {list(names)}, got {item!r}")
        names[key] = name
    return {key: name for key, name in names.items() if args.only is None or key in args.only}


def write_table(path: str | Path, markdown: str, rows: Sequence[tuple[Sequence[str], Any]]) -> None:
    """Write a table's markdown to ``path`` and its raw results to ``path`` with ``.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown)
    path.with_suffix(".json").write_text(json.dumps([{"row": list(labels), "results": results}
                                                      for labels, results in rows], indent=2))
    print(markdown)


def _suite_markdown(suite: str, runs: Mapping[str, Mapping[str, Any]], protocols: Sequence[str],
                    split: bool) -> str:
    datasets = list(next(iter(runs.values())))
    if suite == "segmentation":
        results = {label: r["segmentation"] for label, r in runs.items()}
        first = next(iter(results.values()))
        return (f"Preprocessing: `{first['protocol']}` (mean {first['mean']}, std {first['std']})\n\n"
                + metric_table(results, SEGMENTATION_METRICS))
    if suite == "shortcuts":
        rows = {label: shortcut_rows(r) for label, r in runs.items()}
        return metric_table(rows, {k: k for k in next(iter(rows.values()))})
    if suite == "perturbation":
        parts = []
        for d in datasets:
            rows = {label: _perturbation_rows(r[d]) for label, r in runs.items()}
            parts.append(f"### {d}\n\n" + metric_table(rows, {k: k for k in next(iter(rows.values()))}))
        return "\n".join(parts)
    rows = [((label,), r) for label, r in runs.items()]
    baselines = [None] + [0] * (len(rows) - 1)
    splits = (None, "set_a", "set_b") if split else (None,)
    parts = []
    for protocol in protocols:
        for s in splits:
            title = f"Protocol: {protocol}" + (f", set {s[-1].upper()} classes" if s else "")
            parts.append(f"### {title}\n\n" + robustness_table(
                rows, datasets, ("Run",), protocol, split=s, baselines=baselines))
    return "\n".join(parts)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Dataset and loader options shared by ``evaluate`` and the example scripts."""
    parser.add_argument("--data-root", default=None,
                        help="folder holding the datasets under their default names (see docs/reproduction.md)")
    parser.add_argument("--dataset-dir", action="append", default=[], metavar="NAME=PATH",
                        help=f"location of one dataset, overriding --data-root; NAME in {sorted(DATASETS)}")
    parser.add_argument("--protocol", choices=PROTOCOLS + ("both",), default="both",
                        help="robustness scoring protocol (default: both, each result says which); "
                             "segmentation: 'paper' normalises with mean = std = 0.5 as the reference, "
                             "otherwise with the model's own mean and std")
    parser.add_argument("--set-a", default=None, metavar="FILE",
                        help="wnids or class indices of the finetune's classes: results split into set A / set B")
    parser.add_argument("--si-score-labels", default=None, metavar="JSON",
                        help="{label string: ImageNet index} for SI-Score folders (default: matched to timm's names)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-images", type=int, default=None,
                        help="evaluate a seeded random subset of at most this many images per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def options_from_args(args: argparse.Namespace, datasets: Sequence[str] | None = None) -> EvalOptions:
    """:class:`EvalOptions` from the flags of :func:`add_data_arguments` (and ``--fractions``)."""
    dirs = {}
    for item in args.dataset_dir:
        name, sep, path = item.partition("=")
        if not sep or name not in DATASETS:
            raise ValueError(f"--dataset-dir expects NAME=PATH with NAME in {sorted(DATASETS)}, got {item!r}")
        dirs[name] = path
    return EvalOptions(
        data_root=args.data_root, dataset_dirs=dirs, datasets=datasets,
        protocols=PROTOCOLS if args.protocol == "both" else (args.protocol,),
        set_a=load_set_a(args.set_a) if args.set_a else None,
        si_labels=json.loads(Path(args.si_score_labels).read_text()) if args.si_score_labels else None,
        fractions=tuple(getattr(args, "fractions", None) or DEFAULT_FRACTIONS),
        batch_size=args.batch_size, num_workers=args.workers, max_images=args.max_images,
        seed=args.seed, progress=not args.no_progress)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``relevance-finetune evaluate``."""
    parser.add_argument("--model", required=True,
                        help="any timm.create_model name, local-dir:DIR or hf-hub:ORG/NAME")
    parser.add_argument("--checkpoint", default=None, help="weights to load (.safetensors, checkpoint, or export dir)")
    add_model_arguments(parser)
    parser.add_argument("--compare", default=None, metavar="PATH",
                        help="second weights for the same model: before/after columns")
    parser.add_argument("--labels", nargs=2, default=("before", "after"), metavar=("BEFORE", "AFTER"),
                        help="column names for --checkpoint and --compare")
    parser.add_argument("--suite", choices=SUITES, default="robustness")
    parser.add_argument("--datasets", nargs="+", default=None, choices=sorted(DATASETS), metavar="NAME",
                        help="robustness/perturbation/shortcuts datasets (default: every set of the suite "
                             "present; perturbation: imagenet)")
    parser.add_argument("--fractions", type=float, nargs="+", default=None,
                        help="perturbation: shares of pixels removed (default 0.1 .. 0.9)")
    parser.add_argument("--out", required=True, help="output folder for <suite>.json and <suite>.md")
    add_data_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``relevance-finetune evaluate``."""
    options = options_from_args(args, args.datasets)
    weights = {args.labels[0]: args.checkpoint}
    if args.compare:
        weights[args.labels[1]] = args.compare
    runs = {}
    for label, checkpoint in weights.items():
        model = build_model(args.model, checkpoint, args.device,
                            **merge_model_kwargs(args.model_kwargs, img_size=args.img_size))
        runs[label] = run_suite(model, args.suite, options)
        del model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"suite": args.suite, "model": args.model, "protocols": list(options.protocols),
              "set_a": args.set_a, "weights": weights, "runs": runs}
    (out / f"{args.suite}.json").write_text(json.dumps(report, indent=2))
    markdown = f"## {args.suite}: {args.model}\n\n" + _suite_markdown(
        args.suite, runs, options.protocols, options.set_a is not None)
    (out / f"{args.suite}.md").write_text(markdown)
    print(markdown)
    return 0


def __getattr__(name: str) -> Any:
    """Re-export the reliance probes of :mod:`relevance_finetune.probes` (imported on first use)."""
    try:
        probes = importlib.import_module(f"{__package__}.probes")
    except ModuleNotFoundError as error:
        if error.name != f"{__package__}.probes":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from error
    if name in getattr(probes, "__all__", ()):
        return getattr(probes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
