"""``relevance-finetune train``: flags from ``TrainConfig``, the datasets the flags describe, the run."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import logging
import sys
import typing
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

from ..data import ImageNetSDataset, MaskedCsvDataset, MaskedDataset, MaskedImageFolder, paired_transforms
from ..gae import UnsupportedModelError
from ..models import add_model_arguments, create_model, merge_model_kwargs
from .config import TrainConfig, field_kind, resolve_config
from .distributed import init_distributed
from .loop import build_criterion, finetune
from .outputs import LAST

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` flags: one per ``TrainConfig`` field, plus ``--config FILE``."""
    parser.add_argument("--config", metavar="FILE", help="TOML/YAML file of settings (keys as the flags); flags win")
    hints = typing.get_type_hints(TrainConfig)
    add_model_arguments(parser, default=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model_kwargs", "img_size"):
            continue
        kind, choices, _ = field_kind(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        shown = "" if f.default in (None, False) else f" (default: {f.default})"
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata["help"] + shown)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag, type=kind, choices=choices, **kwargs)


def run(args: argparse.Namespace) -> int:
    """Run ``relevance-finetune train``; under torchrun, one process per device."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "debug")}
    config = resolve_config(flags, getattr(args, "config", None))
    if config.model is None or config.data is None or config.out is None:
        raise SystemExit("relevance-finetune train: --model (or a --preset naming one), --data and --out "
                         "are required")
    started = init_distributed()
    try:
        resuming = config.resume and (Path(config.out) / LAST).is_file()
        model = create_model(config.model, pretrained=config.pretrained and not resuming,
                             checkpoint=None if resuming else config.checkpoint,
                             **merge_model_kwargs(config.model_kwargs, img_size=config.img_size,
                                                  num_classes=config.num_classes))
        try:
            with build_criterion(model, config):
                pass
        except UnsupportedModelError as error:
            print(f"relevance-finetune train: cannot finetune {config.model}: {error}", file=sys.stderr)
            return 2
        train_set, val_set = _build_datasets(model, config)
        _fit_classes(model, train_set, val_set)
        finetune(model, train_set, val_set, config)
    finally:
        if started:
            dist.destroy_process_group()
    return 0


def _build_datasets(model: nn.Module, config: TrainConfig) -> tuple[Dataset, Dataset | None]:
    """The training and validation sets that ``config`` describes, with the model's paired transforms."""
    transform = functools.partial(paired_transforms, model, normalization=config.normalization,
                                  soft_masks=config.soft_masks)
    if config.data_format == "imagenet-s":
        if config.masks is None or config.val_data is not None or config.val_fraction:
            raise ValueError("imagenet-s: pass the ImageNet root as --data and ImageNetS919 as --masks; "
                             "its validation split is built in (no --val-data / --val-fraction)")
        split = dict(num_classes=config.split_classes, images_per_class=config.images_per_class,
                     class_seed=config.class_seed, skip_bad=config.skip_bad)
        return (ImageNetSDataset(config.masks, config.data, "train", transform(train=True), **split),
                ImageNetSDataset(config.masks, config.data, "val", transform(train=False), **split))
    train_set = _masked_dataset(config.data, config.masks, transform(train=True), config)
    if config.val_data is not None:
        return train_set, _masked_dataset(config.val_data, config.val_masks, transform(train=False), config)
    if not config.val_fraction:
        return train_set, None
    val_view = copy.copy(train_set)
    val_view.transform = transform(train=False)
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.seed)).tolist()
    held_out = max(1, round(config.val_fraction * len(order)))
    if held_out >= len(order):
        raise ValueError(f"val_fraction {config.val_fraction} leaves no training images of {len(order)}")
    return Subset(train_set, order[held_out:]), Subset(val_view, order[:held_out])


def _fit_classes(model: nn.Module, train_set: Dataset, val_set: Dataset | None) -> None:
    """Refuse labels beyond the classifier's outputs; record the training set's class names
    (folder datasets) as timm's ``label_names``."""
    for dataset in (train_set, val_set):
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        if not isinstance(base, MaskedDataset):
            continue
        top = max(sample.label for sample in base.samples)
        if top >= model.num_classes:
            raise ValueError(
                f"the data ({type(base).__name__}) has class index {top} but the model has {model.num_classes} "
                f"classes: pass --num-classes {top + 1} or more (or check --class-index)")
        names = base.label_names
        if dataset is train_set and names is not None and len(names) == model.num_classes:
            model.pretrained_cfg = {**model.pretrained_cfg, "label_names": names}


def _masked_dataset(data: str, masks: str | None, transform, config: TrainConfig) -> MaskedDataset:
    """A CSV manifest or a masked-image folder (``data/images`` + ``data/masks``, or ``data`` + ``masks``)."""
    options = dict(class_index=config.class_index, skip_bad=config.skip_bad)
    if config.data_format == "csv" or (config.data_format == "auto" and Path(data).suffix == ".csv"):
        return MaskedCsvDataset(data, transform, **options)
    folders = dict(root=data) if masks is None else dict(images=data, masks=masks)
    return MaskedImageFolder(transform=transform, skip_unmasked=config.skip_unmasked, **folders, **options)
