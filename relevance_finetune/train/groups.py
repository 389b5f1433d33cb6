"""Group labels in a run: which groups its data have, and the validation accuracy by group.

A dataset with group labels (Waterbirds' bird x background, CelebA's hair x sex) exposes per-sample
``groups`` (group ids) and ``group_names``; a ``Subset`` of one has the groups of its indices. When
the validation data have groups, each validation adds ``val_worst_group_accuracy``,
``val_mean_accuracy`` (the plain mean over the images), ``val_weighted_mean_accuracy`` (the group
accuracies weighted by the *training* data's group proportions, DFR's and GroupDRO's "mean
accuracy") and ``val_groups`` (per group: its name, accuracy and count) to the epoch's record, and
``--select worst_group`` picks the epoch by the first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.utils.data import Dataset, Subset

from ..metrics import group_accuracy

__all__ = ["RunGroups", "dataset_groups", "group_metrics", "group_summary", "run_groups"]


@dataclass(frozen=True)
class RunGroups:
    """The groups of a run whose validation data have group labels.

    Attributes
    ----------
    validation:
        (N,) the group of each validation image, in the dataset's order.
    names:
        Group id -> name, for every group of the run (the training data's and the named ones).
    train_counts:
        Group id -> training images: the weights of ``val_weighted_mean_accuracy``.
    """

    validation: torch.Tensor
    names: Mapping[int, str]
    train_counts: Mapping[int, int]

    def check_validation(self, least: int = 1, why: str = "--select worst_group") -> None:
        """Refuse a group with fewer than ``least`` validation images, naming it."""
        counts = torch.bincount(self.validation, minlength=max(self.names, default=-1) + 1).tolist()
        short = [f"{self.names[group]!r} (group {group}): {counts[group]}" for group in sorted(self.names)
                 if counts[group] < least]
        if short:
            raise ValueError(f"{why} needs {least} validation image(s) of every group; too few of "
                             f"{', '.join(short)}")


def dataset_groups(dataset: Dataset | None) -> torch.Tensor | None:
    """(N,) the group of each sample of ``dataset`` (or of a ``Subset`` of one), or None without groups."""
    if isinstance(dataset, Subset):
        groups = dataset_groups(dataset.dataset)
        return None if groups is None else groups[list(dataset.indices)]
    groups = getattr(dataset, "groups", None)
    return None if groups is None else torch.as_tensor(list(groups), dtype=torch.long)


def _group_names(dataset: Dataset) -> dict[int, str]:
    """Group id -> name from the dataset's ``group_names`` (a sequence by id or a mapping), else empty."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    names = getattr(dataset, "group_names", None) or {}
    return {int(group): str(name) for group, name in (names.items() if isinstance(names, Mapping)
                                                      else enumerate(names))}


def run_groups(train_set: Dataset, val_set: Dataset | None) -> RunGroups | None:
    """The groups of a run, or None when the validation data have no group labels."""
    validation = dataset_groups(val_set)
    if validation is None:
        return None
    training = dataset_groups(train_set)
    train_counts = {} if training is None else {int(g): int(n) for g, n in
                                                 zip(*torch.unique(training, return_counts=True))}
    named = _group_names(val_set) or _group_names(train_set)
    ids = set(named) | set(train_counts) | set(validation.tolist())
    return RunGroups(validation, {g: named.get(g, f"group {g}") for g in sorted(ids)}, train_counts)


def group_metrics(predictions: torch.Tensor, labels: torch.Tensor, groups: RunGroups) -> dict[str, Any]:
    """The validation record's group entries (accuracies as fractions) from every validation
    image's prediction and label, in the dataset's order; the weighted mean is None when a
    training group has no validation image (or the training data have no groups)."""
    complete = groups.train_counts and set(groups.train_counts) <= set(groups.validation.tolist())
    result = group_accuracy(predictions, labels, groups.validation, groups.train_counts if complete else None)
    return {"val_worst_group_accuracy": result["worst_group_accuracy"],
            "val_mean_accuracy": result["mean_accuracy"],
            "val_weighted_mean_accuracy": result["weighted_mean_accuracy"],
            "val_groups": {groups.names[g]: {"group": g, **entry} for g, entry in sorted(result["groups"].items())}}


def group_summary(record: Mapping[str, Any]) -> str:
    """One line of a record's validation groups: each group's accuracy and count, the worst, both means."""
    per_group = ", ".join(f"{name} {entry['accuracy']:.3f} (n={entry['count']})"
                          for name, entry in record["val_groups"].items())
    weighted = record["val_weighted_mean_accuracy"]
    weighted = "n/a (a training group without validation images, or no training groups)" if weighted is None \
        else f"{weighted:.3f}"
    return (f"validation groups: {per_group}; worst-group {record['val_worst_group_accuracy']:.3f}, mean "
            f"{record['val_mean_accuracy']:.3f} (plain, over images), {weighted} (weighted by the training "
            "groups' proportions)")
