"""The ``folder`` suite: a model on the user's own classes, read from ImageFolder-style splits.

A split is ``<images>/<class>/<image>``, with or without a masks folder that mirrors it
(``<masks>/<class>/<stem>.png``, read and checked by :class:`relevance_finetune.data.MaskedImageFolder`).
Images go through the ``train`` command's evaluation transform (:func:`relevance_finetune.data.paired_transforms`
at the model's data config). Per split: top-1, overall and per class; with masks also the reliance
probes of :func:`relevance_finetune.probes.reliance_probes` (top-1 with the background or the object
replaced, as the built-in benchmark measures them) and the segmentation and localisation scores of
the model's GAE map for its predicted class (:class:`relevance_finetune.metrics.SegmentationMeter`),
both on the images whose mask has object and background. With a groups file (``path,group``, ``--groups``):
per-group accuracy and counts, the worst group, the plain mean and the mean over groups (group-balanced;
a folder has no training split to weigh groups by), as fractions.

Class indices (:func:`folder_class_indices`): the model's ``label_names`` (which ``train`` records for
folder datasets) matched to the folder names; else ImageNet-1k indices of wnid folders for a 1000-class
head; else sorted folder order when the head has one output per class folder.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..augment import usable_masks
from ..data import (MaskedDataset, MaskedImageFolder, PairedTransform, Sample, class_indices, imagenet_class_index,
                    paired_transforms)
from ..gae import attach_gae
from ..groups import read_group_file
from ..images import list_images, model_data_config, read_image
from ..metrics import SegmentationMeter
from ..probes import reliance_probes
from .datasets import eval_loader
from .waterbirds import group_report

__all__ = ["EXAMPLES", "NO_MASKS_NOTE", "FolderSplit", "evaluate_folder", "folder_class_indices", "folder_datasets",
           "split_groups", "unit_transform"]

EXAMPLES = 4  # masked images whose relevance maps each run keeps, for the before/after picture
NO_MASKS_NOTE = "no masks: reliance probes and localisation not measured"


@dataclass(frozen=True)
class FolderSplit:
    """One split: ``images/<class>/<image>``, and ``masks/<class>/<stem>.png`` or None.

    ``skip_unmasked``: leave out the images that have no mask (TokenCut gives some none) instead of
    refusing the split; the split's result counts them (``unmasked``) and its note says so.
    ``groups``: a CSV ``path,group`` (:func:`relevance_finetune.groups.read_group_file`) giving each image
    of the split (``<class>/<image>``, relative to ``images``) a group: the result adds ``groups``.
    """
    images: str
    masks: str | None = None
    skip_unmasked: bool = False
    groups: str | None = None


class _UnmaskedFolder(MaskedDataset):
    """``<root>/<class>/<image>`` without masks: a sample's mask is the whole image (its ``mask`` path unused)."""

    def __init__(self, root: str | Path, transform: PairedTransform) -> None:
        super().__init__(transform)
        tree = list_images(root)
        empty = [name for name, paths in tree.items() if not paths]
        if empty:
            raise ValueError(f"class folder {Path(root) / empty[0]} holds no images")
        self.class_to_idx = class_indices(sorted(tree), "folder")
        self.classes = sorted(tree)
        self._set_samples([Sample(path, path, self.class_to_idx[name]) for name, paths in tree.items()
                           for path in paths], root)

    def load(self, sample: Sample):
        image = read_image(sample.image)
        return image, np.ones((image.height, image.width), dtype=bool)


def unit_transform(config: Mapping[str, Any]) -> PairedTransform:
    """The evaluation transform of timm data ``config`` with images left in [0, 1] (no normalisation)."""
    return paired_transforms({**config, "mean": (0.0,) * 3, "std": (1.0,) * 3}, crop_pct=config["crop_pct"])


def folder_datasets(splits: Mapping[str, FolderSplit], transform: PairedTransform) -> dict[str, MaskedDataset]:
    """Each split as a dataset of ``(image, mask, label)``; labels are sorted folder order until relabelled."""
    if not splits:
        raise ValueError("the folder suite needs at least one split: --split NAME=DIR of <class>/<image> folders")
    datasets = {}
    for name, split in splits.items():
        if split.masks is None:
            datasets[name] = _UnmaskedFolder(split.images, transform)
        else:
            datasets[name] = MaskedImageFolder(images=split.images, masks=split.masks, transform=transform,
                                               class_index="folder", skip_unmasked=split.skip_unmasked)
    return datasets


def folder_class_indices(model: nn.Module, names: Sequence[str]) -> tuple[dict[str, int], list[str]]:
    """The model's class index of each class folder in ``names``, and the model's name of every index.

    Raises ``ValueError`` naming the mismatch: a folder that the model's ``label_names`` lack, or
    a class count that differs from the head's without ``label_names``.
    """
    num_classes = getattr(model, "num_classes", None)
    label_names = list((getattr(model, "pretrained_cfg", None) or {}).get("label_names") or ())
    if label_names and len(label_names) == num_classes:
        unknown = sorted(set(names) - set(label_names))
        if unknown:
            raise ValueError(f"class folder(s) {unknown[:5]} are not among the model's {num_classes} label_names "
                             f"{label_names[:10]}{' ...' if num_classes > 10 else ''}")
        return {name: label_names.index(name) for name in names}, label_names
    imagenet = imagenet_class_index()
    if num_classes == 1000 and all(name in imagenet for name in names):
        return class_indices(names, "imagenet"), sorted(imagenet, key=imagenet.get)
    if len(names) == num_classes:
        return class_indices(names, "folder"), sorted(names)
    raise ValueError(f"the splits hold {len(names)} class folders {list(names)[:5]} but the model has {num_classes} "
                     "outputs and no label_names naming them: use the model that `train` finetuned on these "
                     "folders (it records their names), or one output per class folder (sorted order)")


def _relabel(dataset: MaskedDataset, index: Mapping[str, int]) -> None:
    """Give ``dataset``'s samples and its ``class_to_idx`` the model's index of each class folder."""
    names = {label: name for name, label in dataset.class_to_idx.items()}
    dataset.samples = [sample._replace(label=index[names[sample.label]]) for sample in dataset.samples]
    dataset.class_to_idx = {name: index[name] for name in dataset.class_to_idx}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _top1(hits: torch.Tensor) -> float | None:
    return 100.0 * float(hits.double().mean()) if len(hits) else None  # None: no image


def split_groups(dataset: MaskedDataset, split: FolderSplit) -> tuple[torch.Tensor, dict[int, str]]:
    """The group of each of ``dataset``'s samples (in order) from ``split.groups``, and the group names.

    Raises ``ValueError`` counting the images the file gives no group, naming the first.
    """
    group_of, names = read_group_file(split.groups)
    paths = [sample.image.relative_to(split.images).as_posix() for sample in dataset.samples]
    missing = [path for path in paths if path not in group_of]
    if missing:
        raise ValueError(f"{split.groups} gives no group to {len(missing)} of the {len(paths)} images of "
                         f"{split.images}, first: {missing[0]} (expected a row '{missing[0]},<group>')")
    return torch.tensor([group_of[path] for path in paths]), names


def _group_result(predicted: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor, names: Mapping[int, str],
                  file: str) -> dict[str, Any]:
    """Per-group accuracy, the worst group, the plain mean and the mean over groups (fractions)."""
    result = group_report(predicted, targets, groups, names)
    del result["weighted_mean_accuracy"]  # no training split to weigh by
    result["group_balanced_mean_accuracy"] = float(np.mean([v["accuracy"] for v in result["groups"].values()]))
    return {"file": file, **result}


def _evaluate_split(model: nn.Module, dataset: MaskedDataset, split: FolderSplit, loader: DataLoader,
                    normalize: Callable, index: Mapping[str, int], desc: str | None,
                    grouping: tuple[torch.Tensor, dict[int, str]] | None = None) -> dict[str, Any]:
    """Top-1 (overall, per class) of one split; with masks its probes and localisation scores; with
    ``grouping`` (:func:`split_groups`) per-group accuracy."""
    device, meter = _device(model), SegmentationMeter()
    model.eval()
    correct, predictions, targets, probes, empty, scored = [], [], [], {}, 0, 0
    for images, masks, labels in tqdm(loader, desc=desc, disable=desc is None):
        images = images.to(device)
        with torch.no_grad():
            predictions.append(model(normalize(images)).argmax(dim=1).cpu())
        correct.append(predictions[-1] == labels)
        targets.append(labels)
        if split.masks is None:
            continue
        masks = masks.to(device)
        usable = usable_masks(masks)
        empty += int((masks.flatten(1).amax(1) <= 0).sum())
        if not usable.any():
            continue
        images, masks, labels = images[usable], masks[usable], labels[usable.cpu()]
        scored += len(images)
        scores = reliance_probes(model, images, masks, labels, normalize, batch_size=len(images))
        for key, value in scores.items():
            probes[key] = probes.get(key, 0.0) + value * len(images)
        with attach_gae(model) as gae:  # detached again so the plain forwards keep fused attention
            meter.update(gae.explain(normalize(images)), masks)
    hits, targets = torch.cat(correct), torch.cat(targets)
    result: dict[str, Any] = {"images": split.images, "masks": split.masks, "n": len(hits), "top1": _top1(hits)}
    result["per_class"] = {name: {"n": int((targets == index[name]).sum()), "top1": _top1(hits[targets == index[name]])}
                           for name in dataset.classes}
    if grouping is not None:
        positions = loader.dataset.indices if isinstance(loader.dataset, Subset) else slice(None)
        result["groups"] = _group_result(torch.cat(predictions), targets, grouping[0][positions], grouping[1],
                                         split.groups)
    notes = []
    if split.masks is None:
        notes.append(NO_MASKS_NOTE)
    else:
        result["unusable_masks"] = len(hits) - scored
        if scored:
            result["probes"] = {key: total / scored for key, total in probes.items()}
            result["localisation"] = meter.compute()
        else:
            result["probes"] = result["localisation"] = None
            result["not_measured"] = (f"no mask has both object and background ({empty} empty, {len(hits) - empty} "
                                      "full): reliance probes and localisation not measured")
            notes.append(result["not_measured"])
        if scored and result["unusable_masks"]:
            notes.append(f"{result['unusable_masks']} image(s) whose mask is empty or full ({empty} empty) left out "
                         "of the reliance probes and localisation")
    if dataset.unmasked:
        result["unmasked"] = dataset.unmasked
        notes.append(f"{dataset.unmasked} image(s) without a mask left out (--skip-unmasked)")
    if notes:
        result["note"] = "; ".join(notes)
    return result


def _spread(samples: Sequence[Sample], count: int) -> list[int]:
    """Positions of ``count`` samples: the first of each class in turn, then the second, ..."""
    seen: dict[int, int] = {}
    keyed = []
    for position, sample in enumerate(samples):
        keyed.append((seen.get(sample.label, 0), sample.label, position))
        seen[sample.label] = keyed[-1][0] + 1
    return [position for _, _, position in sorted(keyed)[:count]]


def _examples(model: nn.Module, split: str, dataset: MaskedDataset, normalize: Callable,
              names: Sequence[str]) -> list[dict[str, Any]]:
    """A few images' predictions and normalised GAE maps on the patch grid, for the before/after picture."""
    positions = _spread(dataset.samples, EXAMPLES)
    images = torch.stack([dataset[p][0] for p in positions]).to(_device(model))
    inputs = normalize(images)
    with torch.no_grad():
        probabilities = model(inputs).float().softmax(dim=1).cpu()
    with attach_gae(model) as gae:
        maps = gae.explain(inputs, upsample=False).cpu()
    return [{"split": split, "path": str(dataset.samples[p].image), "true": names[dataset.samples[p].label],
             "predicted": names[int(prob.argmax())], "probability": float(prob.max()),
             "relevance": [[round(float(v), 4) for v in row] for row in grid]}
            for p, prob, grid in zip(positions, probabilities, maps)]


def evaluate_folder(
        model: nn.Module,
        splits: Mapping[str, FolderSplit],
        batch_size: int = 64,
        num_workers: int = 4,
        max_images: int | None = None,
        seed: int = 0,
        data_config: Mapping[str, Any] | None = None,
        progress: bool = True,
) -> dict[str, Any]:
    """Top-1, reliance probes and relevance localisation of ``model`` on each of ``splits`` (percent).

    Returns ``classes`` ({folder: model index}), ``input`` (the preprocessing: ``input_size``,
    ``interpolation``, ``crop_pct``), ``splits`` and ``examples``. Each split's result holds its
    folders, ``n``, ``top1`` and ``per_class`` ({folder: {n, top1}}); with masks, ``probes`` (as
    :func:`relevance_finetune.probes.reliance_probes` returns them, averaged over batches: the
    ``mean`` fill is each batch's mean colour) and ``localisation`` (as
    :meth:`relevance_finetune.metrics.SegmentationMeter.compute`), both over the images whose mask
    has object and background (:func:`relevance_finetune.augment.usable_masks`; the others are counted
    in ``unusable_masks``); when no mask is usable both are None and ``not_measured`` says why; without
    masks, a ``note``. A split that
    left out images without a mask (``skip_unmasked``) counts them in ``unmasked``, with a ``note``.
    A split with ``groups`` adds ``groups``: the ``file``, ``groups`` ({group id: {name, accuracy,
    count}}), ``worst_group_accuracy``, ``mean_accuracy`` and ``group_balanced_mean_accuracy`` (fractions).
    ``examples``: :data:`EXAMPLES` images of the first masked split (one per class in turn) with
    the predicted class, its probability and the GAE map on the patch grid.
    """
    config = dict(data_config or model_data_config(model))
    transform = unit_transform(config)
    datasets = folder_datasets(splits, transform)
    index, names = folder_class_indices(model, sorted(set().union(*(d.classes for d in datasets.values()))))
    normalize = functools.partial(TF.normalize, mean=list(config["mean"]), std=list(config["std"]))
    groupings = {name: split_groups(datasets[name], split) for name, split in splits.items() if split.groups}
    results = {}
    for name, dataset in datasets.items():
        _relabel(dataset, index)
        loader = eval_loader(dataset, batch_size, num_workers, max_images, seed)
        results[name] = _evaluate_split(model, dataset, splits[name], loader, normalize, index,
                                        f"split {name}" if progress else None, groupings.get(name))
    masked = next((name for name, split in splits.items() if split.masks is not None), None)
    return {"classes": index,
            "input": {"input_size": list(config["input_size"]), "interpolation": config.get("interpolation"),
                      "crop_pct": config["crop_pct"]},
            "splits": results,
            "examples": [] if masked is None else _examples(model, masked, datasets[masked], normalize, names)}
