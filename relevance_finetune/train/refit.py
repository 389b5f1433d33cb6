"""The head refit stage of a run: ``--head-refit`` (the recipes ``head`` and ``two_stage_head``).

``refit_stage`` holds the training (and validation) images in memory as the model takes them,
refits the model's linear head with ``relevance_finetune.head.refit_head`` (Deep Feature
Reweighting on counterfactual views of the masked images), or with ``--head-labels groups``
``refit_head_groups`` on the validation images' group labels (DFR's own protocol), and writes the run's ``best.safetensors``
(and, for a refit without finetune, ``last.safetensors``) and one ``metrics.jsonl`` line. After a
finetune it starts from the finetune's best epoch (``best_before_head.safetensors``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..augment import usable_masks
from ..checkpoint import read_checkpoint_info
from ..head import HeadRefit, linear_classifier, refit_head, refit_head_groups
from ..models import load_weights
from .config import TrainConfig
from .distributed import Processes
from .groups import RunGroups, dataset_groups, run_groups
from .outputs import BEST, BEST_BEFORE_HEAD, LAST, check_out, check_resumable, checkpoint_info, files_written
from .outputs import start_outputs, write_head_refit

__all__ = ["check_refit_data", "refit_stage"]

_log = logging.getLogger(__name__)

_BATCH = 64  # images per forward of the refit and per batch read into memory (refit_head's default)
_GIB = 2 ** 30

Masked = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images (N, 3, H, W), masks (N, 1, H, W), labels (N,)


def refit_stage(
        model: nn.Module,
        train_set: Dataset,
        val_set: Dataset | None = None,
        config: TrainConfig | None = None,
        class_names: Mapping[int, str] | None = None,
) -> HeadRefit:
    """Refit ``model``'s linear head in place on ``train_set``; with ``config.out``, write it to the run.

    Parameters
    ----------
    model:
        A timm model with one linear head. With ``config.finetune`` and a run in ``config.out``, the
        finetune's best epoch (``best_before_head.safetensors``) is loaded into it first.
    train_set, val_set:
        Datasets of ``(image (3, H, W), mask (1, H, W), label)``, read as they are: give them the
        evaluation transform (no random augmentation). All of their images are held in memory
        (``config.head_max_gib`` bounds them). ``C`` is chosen on the views of ``val_set`` when
        given, else on a held-out half of each class (``refit_head``'s default).
    config:
        ``head_views``, ``head_fits``, ``seed``, ``workers``, ``device``, ``progress``, and ``out``:
        the run directory (a refit without finetune prepares it as ``finetune`` does, ``resume`` and
        ``overwrite`` included).
    class_names:
        Class index -> name, for the errors.

    Returns
    -------
    HeadRefit
        The chosen ``C``, the per-``C`` scores, the rows, the seconds.
    """
    config = config or TrainConfig(finetune=False, head_refit=True)
    out = Path(config.out) if config.out is not None else None
    num_classes = linear_classifier(model).out_features
    groups = _refit_groups(train_set, val_set, config)
    if config.head_labels == "groups":
        _check_memory([val_set], config.head_max_gib)
        images, _, labels = _in_memory(val_set, config.workers)
        _check_classes(None, labels, num_classes, class_names or {}, masked=False)
    else:
        _check_memory([part for part in (train_set, val_set) if part is not None], config.head_max_gib)
        train = _in_memory(train_set, config.workers)
        validation = None if val_set is None else _in_memory(val_set, config.workers)
        _check_classes(_usable_labels(train), None if validation is None else _usable_labels(validation),
                       num_classes, class_names or {})
    source, history = _starting_point(model, out, config)  # the data are fine: the run directory may change
    model.to(Processes.current(config.device).device)
    if config.head_labels == "groups":
        refit = refit_head_groups(model, images, labels, groups.validation, num_groups=max(groups.names) + 1,
                                  fits=config.head_fits, batch_size=_BATCH, seed=config.seed,
                                  progress=config.progress)
    else:
        refit = refit_head(model, *train, views=config.head_views, fits=config.head_fits, validation=validation,
                           validation_groups=None if groups is None else groups.validation, batch_size=_BATCH,
                           seed=config.seed, progress=config.progress)
    selected_on = ("held_out_validation" if config.head_labels == "groups" else "validation_groups" if groups
                   else "validation" if validation is not None else "held_out")
    record = _record(refit, source, selected_on, config)
    if config.head_labels != "groups" and validation is not None:  # the group refit fits on the validation images
        record["val_accuracy"] = _accuracy(model, validation)
    if out is not None:
        info = {**checkpoint_info(model, config, history), "head_refit": {k: v for k, v in record.items()
                                                                          if k != "seconds"}}
        write_head_refit(out, model, info, record, head_only=not config.finetune)
        _log.info("%s; %s", _summary(refit, record), files_written(out))
    return refit


@torch.no_grad()
def _accuracy(model: nn.Module, part: Masked) -> float:
    """Top-1 (a fraction) of ``model`` on in-memory images, in eval mode."""
    images, _, labels = part
    device, training = next(model.parameters()).device, model.training
    model.eval()
    correct = sum(int((model(batch.to(device)).argmax(1).cpu() == target).sum())
                  for batch, target in zip(images.split(_BATCH), labels.split(_BATCH)))
    model.train(training)
    return correct / len(labels)


def _starting_point(model: nn.Module, out: Path | None, config: TrainConfig) -> tuple[str, list[dict[str, Any]]]:
    """Which weights the refit starts from (a file of the run, or ``"model"``: those given) and
    their metrics history; loads the finetune's best into ``model``, or prepares a refit-only run."""
    if out is None:
        return "model", []
    if not config.finetune:
        if config.resume and (out / LAST).is_file():  # a refit is seconds: it runs again, from the start
            check_resumable(out, read_checkpoint_info(out / LAST), config)
        else:
            check_out(out, config)
        start_outputs(out, config, [], fresh=True)
        return "model", []
    source = out / BEST_BEFORE_HEAD
    if source.is_file():
        load_weights(model, source)
    else:  # no epoch met the selection rule (or no validation): the last epoch, as the finetune left it
        source = out / LAST
    info = read_checkpoint_info(source)
    return (source.name, info["history"]) if info is not None else ("model", [])


def _check_memory(parts: list[Dataset], limit_gib: float) -> None:
    """Refuse datasets whose images and masks, as float32 tensors, would take more than ``limit_gib``."""
    count = sum(len(part) for part in parts)
    if not count:
        return
    image, mask, _ = parts[0][0]
    size = count * (image.numel() + mask.numel()) * 4 / _GIB
    if size > limit_gib:
        raise ValueError(f"the head refit holds its images in memory: {count} images of "
                         f"{'x'.join(map(str, image.shape[-2:]))} with their masks take {size:.1f} GiB, above "
                         f"--head-max-gib {limit_gib:g}; raise it if the machine has the memory, or refit on fewer "
                         "images or at a smaller --img-size")


def _in_memory(dataset: Dataset, workers: int) -> Masked:
    """Every sample of ``dataset`` as three tensors (preallocated: no second copy while stacking)."""
    images = masks = None
    labels = torch.empty(len(dataset), dtype=torch.long)
    start = 0
    for image, mask, label in DataLoader(dataset, batch_size=_BATCH, num_workers=workers):
        if images is None:
            images = image.new_empty((len(dataset), *image.shape[1:]), dtype=torch.float32)
            masks = mask.new_empty((len(dataset), *mask.shape[1:]), dtype=torch.float32)
        end = start + len(label)
        images[start:end], masks[start:end], labels[start:end] = image, mask, label
        start = end
    return images, masks, labels


def _refit_groups(train_set: Dataset, val_set: Dataset | None, config: TrainConfig) -> RunGroups | None:
    """The validation groups the refit reads: with ``--head-labels groups`` (two images of every
    group) or ``--select worst_group`` (C by the worst group; one image each), else None; an error
    naming what is missing."""
    if config.head_labels != "groups" and config.select != "worst_group":
        return None
    flag = "--head-labels groups" if config.head_labels == "groups" else "--select worst_group"
    groups = run_groups(train_set, val_set)
    if groups is None:
        raise ValueError(f"{flag}: the head refit reads the validation images' group labels: give validation data "
                         "with groups (--data-format waterbirds or celeba)")
    least = 2 if config.head_labels == "groups" else 1
    groups.check_validation(least, f"the head refit with {flag}" + (" (C is chosen on a held-out half)" if least > 1
                                                                    else ""))
    return groups


def check_refit_data(model: nn.Module, train_set: Dataset, val_set: Dataset | None, config: TrainConfig,
                     class_names: Mapping[int, str] | None = None) -> None:
    """Before a finetune, what the refit will refuse without reading the images: a linear head,
    the memory its images take, and each class's images by label (masked datasets only); for the
    group refit, every group's validation images."""
    num_classes = linear_classifier(model).out_features
    _refit_groups(train_set, val_set, config)
    if config.head_labels == "groups":
        _check_memory([val_set], config.head_max_gib)
        labels = _labels(val_set)
        if labels is not None:
            _check_classes(None, labels, num_classes, class_names or {}, masked=False)
        return
    _check_memory([part for part in (train_set, val_set) if part is not None], config.head_max_gib)
    labels = [_labels(part) for part in (train_set, val_set)]
    if labels[0] is not None and (val_set is None or labels[1] is not None):
        _check_classes(labels[0], labels[1], num_classes, class_names or {})


def _labels(dataset: Dataset | None) -> torch.Tensor | None:
    """The labels of a masked dataset (or a ``Subset`` of one) from its sample list, else None."""
    if isinstance(dataset, Subset):
        labels = _labels(dataset.dataset)
        return None if labels is None else labels[list(dataset.indices)]
    samples = getattr(dataset, "samples", None)
    return None if samples is None else torch.tensor([sample.label for sample in samples], dtype=torch.long)


def _usable_labels(part: Masked) -> torch.Tensor:
    """The labels of the images whose masks have both object and background (those get views)."""
    _, masks, labels = part
    return labels[usable_masks(masks)]


def _check_classes(train: torch.Tensor | None, validation: torch.Tensor | None, num_classes: int,
                   names: Mapping[int, str], masked: bool = True) -> None:
    """Refuse labels of usable images (or of all images, a bound) that miss a class the head
    predicts, naming it: one image each, two in training when C is chosen on a held-out part of it
    (no training labels: the group refit, on the validation images alone, masks or not)."""
    parts = [] if train is None else [("training", train, 1 if validation is not None else 2)]
    if validation is not None:
        parts.append(("validation", validation, 1))
    for what, labels, least in parts:
        counts = torch.bincount(labels, minlength=num_classes).tolist()
        short = [index for index in range(num_classes) if counts[index] < least]
        if not short:
            continue
        listed = ", ".join(f"{_class_name(index, names)}: {counts[index]}" for index in short[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        why = "" if least == 1 else " (C is chosen on a held-out part of each class; or pass --val-data/--val-fraction)"
        mask = " with a mask of both object and background" if masked else ""
        raise ValueError(f"the head refit needs {least} {what} image(s){mask} of every class the head predicts "
                         f"({num_classes}){why}; too few of {listed}{more}")


def _class_name(index: int, names: Mapping[int, str]) -> str:
    return f"{names[index]!r} (index {index})" if index in names else f"class {index}"


def _record(refit: HeadRefit, source: str, selected_on: str, config: TrainConfig) -> dict[str, Any]:
    """The refit's ``metrics.jsonl`` line."""
    groups = config.head_labels == "groups"
    by_group = selected_on in ("held_out_validation", "validation_groups")
    worst = "worst_group_accuracy" if by_group else "worst_class_accuracy"
    return {"stage": "head_refit", "labels": config.head_labels, "source": source, "C": refit.C,
            "selected_on": selected_on if refit.scores else None,  # None: one C, no choice
            "scores": [{"C": c, worst: worst_accuracy, "mean_accuracy": mean}
                       for c, (worst_accuracy, mean) in refit.scores.items()],
            "views": None if groups else config.head_views, "fits": config.head_fits, "rows": refit.rows,
            "features": refit.features, "seconds": round(refit.seconds, 3)}


def _summary(refit: HeadRefit, record: dict[str, Any]) -> str:
    """One line: the chosen C and its score, the refit set, the time, what ``best`` holds."""
    source = "the model given" if record["source"] == "model" else f"{record['source']}'s model"
    if record["labels"] == "groups":
        return (f"head refit on group labels (DFR's protocol): {_choice(refit, record)}; {refit.rows} validation "
                f"images, {refit.seconds:.1f} s; {BEST} holds {source} with its head refit")
    after = f", validation accuracy {record['val_accuracy']:.3f} after it" if "val_accuracy" in record else ""
    return (f"head refit: {_choice(refit, record)}{after}; {refit.rows} images with their views, "
            f"{refit.seconds:.1f} s; {BEST} holds {source} with its head refit")


def _choice(refit: HeadRefit, record: dict[str, Any]) -> str:
    """How C was chosen, with its scores; or that it was the one candidate."""
    if not refit.scores:
        return f"C={refit.C:g}, the one candidate (nothing to choose)"
    worst, mean = refit.scores[refit.C]
    if record["labels"] == "groups":
        how = "worst-group accuracy on a held-out half of each validation group"
    elif record["selected_on"] == "validation_groups":
        how = "worst-group accuracy on the validation images (--select worst_group)"
    else:
        where = "validation images'" if record["selected_on"] == "validation" else "held-out training images'"
        how = f"worst-class accuracy on the {where} counterfactual views"
    return f"C={refit.C:g} of {len(refit.scores)} by the {how} ({worst:.3f}, mean {mean:.3f})"
