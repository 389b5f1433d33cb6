"""The evaluation suites: robustness accuracy, the segmentation test, the perturbation test and shortcuts.

Two robustness protocols are scored from the same logits, and each result names its protocol:

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
Backgrounds Challenge / ImageNet-9 (background). The folder suite (:mod:`.folder`) scores the user's
own classes; the waterbirds suite (:mod:`.waterbirds`) scores the Waterbirds test split by group.
:func:`run_suite` runs one suite for one model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from ..gae import attach_gae
from ..images import model_data_config, read_image
from ..metrics import DEFAULT_FRACTIONS, SegmentationMeter, area_under_curve, perturbation_curve
from .datasets import (CARTON_CLASS, ROBUSTNESS_DATASETS, SHORTCUT_DATASETS, EvalSet, ImageNetSegmentation,
                       eval_loader, in9_superclasses, load_eval_set, load_imagenet9, load_wnid_folders, resolve_path)
from .folder import FolderSplit, evaluate_folder
from .waterbirds import evaluate_waterbirds

__all__ = [
    "PAPER_NORMALIZATION",
    "PROTOCOLS",
    "SUITES",
    "EvalOptions",
    "evaluate_imagenet9",
    "evaluate_imagenet_w",
    "evaluate_perturbation",
    "evaluate_robustness",
    "evaluate_segmentation",
    "evaluate_shortcut",
    "run_suite",
    "segmentation_protocol",
    "topk_correct",
    "watermark_transform",
]

PROTOCOLS = ("standard", "paper")


SUITES = ("robustness", "segmentation", "perturbation", "shortcuts", "folder", "waterbirds")
PAPER_NORMALIZATION = (0.5, 0.5, 0.5)  # the reference's mean and std, for every model


# -- images -----------------------------------------------------------------------------------
class _ImageFiles(Dataset):
    """(transformed image, position) pairs of an :class:`EvalSet`."""

    def __init__(self, eval_set: EvalSet, transform: Callable) -> None:
        self.eval_set, self.transform = eval_set, transform

    def __len__(self) -> int:
        return len(self.eval_set)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = read_image(self.eval_set.paths[i])
        b = self.eval_set.border
        if b:
            image = image.crop((b, b, image.width - b, image.height - b))
        return self.transform(image), i


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- robustness -------------------------------------------------------------------------------
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
    loader = eval_loader(_ImageFiles(eval_set, transform), batch_size, num_workers, max_images, seed)
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


# -- segmentation -----------------------------------------------------------------------------
def segmentation_protocol(options: EvalOptions) -> str:
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
    loader = eval_loader(dataset, batch_size, num_workers, max_images, seed)
    device, meter = _device_of(model), SegmentationMeter()
    with attach_gae(model) as gae:
        for images, masks in tqdm(loader, desc="segmentation", disable=not progress):
            meter.update(gae.explain(images.to(device)), masks)
    return {**meter.compute(), "protocol": protocol,
            "mean": [float(m) for m in config["mean"]], "std": [float(v) for v in config["std"]]}


# -- perturbation -----------------------------------------------------------------------------
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
    loader = eval_loader(_ImageFiles(eval_set, transform), batch_size, num_workers, max_images, seed)
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


# -- shortcuts --------------------------------------------------------------------------------
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
    loader = eval_loader(_ImageFiles(eval_set, transform), batch_size, num_workers, max_images, seed)
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
        loader = eval_loader(_ImageFiles(eval_set, transform), batch_size, num_workers, max_images, seed)
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


# -- running ----------------------------------------------------------------------------------
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
    splits: Mapping[str, FolderSplit] = field(default_factory=dict)  # the folder suite's
    skip_bad: bool = False  # the waterbirds suite: leave test images with a missing file out


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
    """Run ``suite`` for one model: ``{dataset: result}`` (robustness: ``{dataset: {protocol: ...}}``;
    folder: :func:`~relevance_finetune.evaluate.folder.evaluate_folder`'s result; waterbirds:
    :func:`~relevance_finetune.evaluate.waterbirds.evaluate_waterbirds`'s)."""
    common = dict(batch_size=options.batch_size, num_workers=options.num_workers,
                  max_images=options.max_images, seed=options.seed, progress=options.progress)
    if suite == "folder":
        return evaluate_folder(model, options.splits, **common)
    if suite == "waterbirds":
        if options.data_root is None:
            raise ValueError("--suite waterbirds needs --data-root WATERBIRDS_DIR (the folder with metadata.csv)")
        return evaluate_waterbirds(model, options.data_root, **common, skip_bad=options.skip_bad)
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
