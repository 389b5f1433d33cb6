"""The ``waterbirds`` suite: per-group and worst-group accuracy on the Waterbirds test split.

The test split of :class:`relevance_finetune.groups.WaterbirdsDataset` goes through the ``train``
command's evaluation transform (:func:`relevance_finetune.data.paired_transforms`); the model's class
index is the release's ``y`` (0 landbird, 1 waterbird). Scored by
:func:`relevance_finetune.metrics.group_accuracy` with the training split's group sizes (from the same
``metadata.csv``): the plain test mean and the test group accuracies weighted by the training group
proportions, the "mean accuracy" of DFR's paper and GroupDRO's analysis code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import Subset
from tqdm import tqdm

from ..data import paired_transforms
from ..groups import WaterbirdsDataset
from ..metrics import group_accuracy
from .datasets import eval_loader

__all__ = ["evaluate_waterbirds", "group_report"]


def _check_classes(model: nn.Module) -> None:
    """A Waterbirds model has two outputs, 0 landbird and 1 waterbird (its ``label_names``, when it records them)."""
    names = list((getattr(model, "pretrained_cfg", None) or {}).get("label_names") or ())
    if getattr(model, "num_classes", None) != 2:
        raise ValueError(f"a Waterbirds model has 2 outputs (0 landbird, 1 waterbird); this one has "
                         f"{getattr(model, 'num_classes', None)}: use the model that `train --data-format waterbirds` made")
    if names and names != WaterbirdsDataset.classes:
        raise ValueError(f"the model's label_names {names} are not {WaterbirdsDataset.classes} (0 landbird, 1 waterbird)")


def group_report(predictions: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, names: Mapping[int, str],
                 train_group_counts: Mapping[int, int] | None = None) -> dict[str, Any]:
    """:func:`group_accuracy` with each group's name: ``groups`` keyed by group id (as JSON keys, strings)."""
    result = group_accuracy(predictions, labels, groups, train_group_counts)
    result["groups"] = {str(g): {"name": names.get(g, str(g)), **value} for g, value in result["groups"].items()}
    return result


@torch.no_grad()
def evaluate_waterbirds(
        model: nn.Module,
        root: str | Path,
        batch_size: int = 64,
        num_workers: int = 4,
        max_images: int | None = None,
        seed: int = 0,
        data_config: Mapping[str, Any] | None = None,
        progress: bool = True,
        skip_bad: bool = False,
) -> dict[str, Any]:
    """Per-group accuracy, worst-group accuracy and both means of ``model`` on the Waterbirds test split.

    ``root``: the release folder (with ``metadata.csv``) or a folder holding it. Returns ``root``,
    ``n``, ``groups`` ({group id: {name, y, place, accuracy, count}}), ``worst_group_accuracy``,
    ``mean_accuracy`` (all test images), ``weighted_mean_accuracy`` (test group accuracies weighted by
    the training split's group proportions) and ``training_group_counts``; accuracies are fractions.
    """
    _check_classes(model)
    transform = paired_transforms(model if data_config is None else dict(data_config))
    test = WaterbirdsDataset(root, "test", transform, skip_bad=skip_bad)
    loader = eval_loader(test, batch_size, num_workers, max_images, seed)
    positions = loader.dataset.indices if isinstance(loader.dataset, Subset) else list(range(len(test)))
    device = next(model.parameters()).device
    model.eval()
    predictions, labels = [], []
    for images, _, targets in tqdm(loader, desc="waterbirds test", disable=not progress):
        predictions.append(model(images.to(device)).argmax(dim=1).cpu())
        labels.append(targets)
    result = group_report(torch.cat(predictions), torch.cat(labels), test.groups[positions], test.group_names,
                          test.training_group_counts)
    for group, value in result["groups"].items():
        value["y"], value["place"] = divmod(int(group), 2)
    return {"root": str(test.root), "split": "test", "n": len(positions), **result,
            "training_group_counts": {str(g): n for g, n in test.training_group_counts.items()}}
