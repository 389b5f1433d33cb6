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
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

from ..data import (ImageNetSDataset, MaskedDataset, MaskedImageFolder, PairedTransform,
                    imagenet_class_index, paired_transforms)
from ..gae import UnsupportedModelError
from ..groups import GROUP_FORMATS, csv_dataset
from ..head import linear_classifier
from ..masks.automatic import tokencut_folder
from ..masks.propagate_folder import PREFIX as PROPAGATE, propagated_masks
from ..models import add_model_arguments, create_model, merge_model_kwargs
from .config import TrainConfig, field_kind, resolve_config
from .distributed import Processes, init_distributed
from .loop import build_criterion, finetune
from .outputs import LAST
from .randomness import seeded
from .refit import check_refit_data, refit_stage
from .stopping import TrainingInterrupted

__all__ = ["add_arguments", "run"]

_log = logging.getLogger(__name__)


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
    main = Processes.current(config.device).is_main
    try:
        resuming = _resuming(config)
        torch.manual_seed(config.seed)  # a randomly initialised model repeats with --seed
        model = create_model(config.model, pretrained=config.pretrained and not resuming,
                             checkpoint=None if resuming else config.checkpoint,
                             random_weights=resuming,  # the run's last checkpoint replaces them
                             **merge_model_kwargs(config.model_kwargs, img_size=config.img_size,
                                                  num_classes=config.num_classes))
        try:
            if config.finetune:
                with build_criterion(model, config):
                    pass
        except UnsupportedModelError as error:
            print(f"relevance-finetune train: cannot finetune {config.model}: {error}", file=sys.stderr)
            return 2
        train_set, val_set = _build_datasets(model, config)
        _fit_classes(model, train_set, val_set, config, log=main)
        if main:
            unusable = _unusable_masks(train_set)
            _log.info("train: %s", _describe_data(train_set, val_set, unusable))
            if any(unusable.values()):
                _log.warning("train: warning: %s", _describe_unusable(unusable, len(train_set)))
        if config.head_refit:  # before a finetune: the refit's data problems stop the run now
            refit_set = _eval_view(train_set, _transform(model, config, train=False))  # no random augmentation
            check_refit_data(model, refit_set, val_set, config, _index_names(train_set))
        if config.finetune:
            finetune(model, train_set, val_set, config)
        if config.head_refit and main:  # one process: the refit is seconds of features and small fits
            refit_stage(model, refit_set, val_set, config, class_names=_index_names(train_set))
    except TrainingInterrupted as stopped:
        if main:
            print(f"relevance-finetune train: {stopped}", file=sys.stderr)
        return stopped.exit_code
    finally:
        if started:
            dist.destroy_process_group()
    return 0


def _transform(model: nn.Module, config: TrainConfig, train: bool) -> PairedTransform:
    """The model's paired training or evaluation transform, with the run's normalisation and masks."""
    return paired_transforms(model, train, normalization=config.normalization, soft_masks=config.soft_masks)


def _eval_view(dataset: Dataset, transform: PairedTransform) -> Dataset:
    """``dataset`` (a masked dataset or a ``Subset`` of one) read with ``transform`` instead of its own."""
    if isinstance(dataset, Subset):
        return Subset(_eval_view(dataset.dataset, transform), dataset.indices)
    view = copy.copy(dataset)
    view.transform = transform
    return view


def _build_datasets(model: nn.Module, config: TrainConfig) -> tuple[Dataset, Dataset | None]:
    """The training and validation sets that ``config`` describes, with the model's paired transforms."""
    transform = functools.partial(_transform, model, config)
    if config.data_format == "imagenet-s":
        if config.masks is None or config.val_data is not None or config.val_fraction:
            raise ValueError("imagenet-s: pass the ImageNet root as --data and ImageNetS919 as --masks; "
                             "its validation split is built in (no --val-data / --val-fraction)")
        split = dict(num_classes=config.split_classes, images_per_class=config.images_per_class,
                     class_seed=config.class_seed, skip_bad=config.skip_bad)
        return (ImageNetSDataset(config.masks, config.data, "train", transform(train=True), **split),
                ImageNetSDataset(config.masks, config.data, "val", transform(train=False), **split))
    made = functools.partial(_made, model, config=config)
    if config.data_format in GROUP_FORMATS:
        return _group_splits(config, made, transform)
    masks = made(config.masks, config.data, Path(config.out) / "masks")  # tokencut:/propagate: made once into the run
    val_masks = made(config.val_masks, config.val_data, Path(config.out) / "val_masks")
    if (masks, val_masks) != (config.masks, config.val_masks):  # the images given no mask stay out
        config = dataclasses.replace(config, masks=masks, val_masks=val_masks, skip_unmasked=True)
    train_set = _masked_dataset(config.data, config.masks, transform(train=True), config)
    classes = _run_classes(model, train_set, config)
    _index_by(train_set, classes)
    if config.val_data is not None:
        val_set = _masked_dataset(config.val_data, config.val_masks, transform(train=False), config)
        _index_by(val_set, classes)
        return train_set, val_set
    if not config.val_fraction:
        return train_set, None
    training, validation = _held_out_split(train_set, config, log=Processes.current(config.device).is_main)
    val_view = _eval_view(train_set, transform(train=False))
    return Subset(train_set, training), Subset(val_view, validation)


def _held_out_split(dataset: MaskedDataset, config: TrainConfig, log: bool = True) -> tuple[list[int], list[int]]:
    """Training and validation indices of a seeded ``--val-fraction`` split of ``dataset``.

    A class whose every image the draw holds out (a class of one image, say) keeps one of them for
    training, and one line names it: no class of the data goes untrained.
    """
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.seed)).tolist()
    held_out = max(1, round(config.val_fraction * len(order)))
    if held_out >= len(order):
        raise ValueError(f"val_fraction {config.val_fraction} leaves no training images of {len(order)}")
    training, validation = order[held_out:], order[:held_out]
    trained = {dataset.samples[index].label for index in training}
    kept: dict[int, int] = {}  # label -> the first held-out image of a class with no training image
    for index in validation:
        label = dataset.samples[index].label
        if label not in trained:
            kept.setdefault(label, index)
    if not kept:
        return training, validation
    validation = [index for index in validation if index not in kept.values()]
    names = _index_names(dataset)
    shown = _shown([names.get(label, str(label)) for label in sorted(kept)])
    if not validation:
        raise ValueError(f"--val-fraction {config.val_fraction} would hold out every image of the class(es) {shown}, "
                         "and nothing else: pass validation images as --val-data")
    if log:
        _log.warning("train: warning: --val-fraction %s held out every image of the class(es) %s: one image of each "
                     "stays in training (and is not validated)", config.val_fraction, shown)
    return training + sorted(kept.values()), validation


def _group_splits(config: TrainConfig, made: Callable, transform: Callable) -> tuple[Dataset, Dataset]:
    """The training split of a Waterbirds or CelebA folder and the validation split of ``--val-data`` (default:
    the same folder); ``tokencut:MODEL`` masks are made for every image of the folder."""
    if config.masks is None or config.val_fraction:
        raise ValueError(f"--data-format {config.data_format}: pass --masks (CUB_200_2011/segmentations for "
                         "waterbirds, or tokencut:MODEL); the validation split is the data's own (no --val-fraction)")
    reader = GROUP_FORMATS[config.data_format]
    root = reader.locate(config.data)
    val_root = reader.locate(config.val_data) if config.val_data is not None else root
    masks = made(config.masks, root, Path(config.out) / "masks")
    val_masks = (made(config.val_masks, val_root, Path(config.out) / "val_masks") if config.val_masks is not None
                 else masks if val_root == root else made(config.masks, val_root, Path(config.out) / "val_masks"))
    options = dict(skip_bad=config.skip_bad, skip_unmasked=config.skip_unmasked or masks != config.masks)
    return (reader(root, "train", transform(train=True), masks=masks, **options),
            reader(val_root, "val", transform(train=False), masks=val_masks, **options))


def _model_label_names(model: nn.Module) -> list[str]:
    """The model's ``label_names`` (timm's ``pretrained_cfg``) when they name each of its outputs, else empty."""
    names = list((getattr(model, "pretrained_cfg", None) or {}).get("label_names") or ())
    return names if len(names) == getattr(model, "num_classes", None) else []


def _run_classes(model: nn.Module, train_set: MaskedDataset, config: TrainConfig) -> dict[str, int]:
    """Class name -> index of the run: the model's ``label_names`` when they name every class of the
    training data (as ``evaluate`` maps folders), else the training data's own indices (empty for
    integer labels)."""
    own = dict(getattr(train_set, "class_to_idx", None) or {})
    model_names = _model_label_names(model)
    if _named_classes(train_set, config) is not None and model_names and set(own) <= set(model_names):
        return {name: index for index, name in enumerate(model_names)}
    return own


def _follows_model(model: nn.Module, train_set: Dataset) -> bool:
    """Whether each named training class has its index among the model's ``label_names``."""
    own, labels = getattr(_base(train_set), "class_to_idx", None), _model_label_names(model)
    return bool(own and labels) and all(index < len(labels) and labels[index] == name for name, index in own.items())


def _shown(names: list[str], most: int = 10) -> str:
    """``a, b, c`` (the first ``most`` names, then ``...``)."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def _index_by(dataset: MaskedDataset, classes: dict[str, int]) -> None:
    """Give the named classes of ``dataset`` their index in ``classes``; refuse classes it lacks (which
    only validation data can have: ``classes`` name every training class)."""
    own = getattr(dataset, "class_to_idx", None)
    if not own or not classes:
        return
    extra = sorted(set(own) - set(classes))
    if extra:
        trained = _shown(sorted(classes, key=classes.get))
        raise ValueError(f"the validation data has class(es) {extra[:5]} that the run does not train (its "
                         f"classes: {trained}): take their folders (or rows) out of the validation data, or add "
                         "images of them to --data")
    dataset.relabel(classes)


def _made(model: nn.Module, spec: str | None, images: str | None, folder: Path, config: TrainConfig) -> str | None:
    """The masks folder ``spec`` names; ``tokencut:MODEL`` and ``propagate:MASKS`` are made into ``folder``
    once (propagated on the tokens of ``model``, as it starts the run: a resumed run has none to give)."""
    options = dict(device=Processes.current(config.device).device, workers=config.workers, progress=config.progress,
                   skip_bad=config.skip_bad)
    if str(spec).startswith(PROPAGATE):
        source = None if _resuming(config) else model
        return propagated_masks(spec, images, folder, source, config.model, **options)
    return tokencut_folder(spec, images, folder, build=create_model, **options)


def _resuming(config: TrainConfig) -> bool:
    """Whether the run continues from its last checkpoint (whose weights replace the model's)."""
    return config.resume and config.finetune and (Path(config.out) / LAST).is_file()


def _base(dataset: Dataset | None) -> Dataset | None:
    return dataset.dataset if isinstance(dataset, Subset) else dataset


def _index_names(dataset: Dataset) -> dict[int, str]:
    """Class index -> name of a masked dataset (folder or CSV names; ImageNet wnids included), else empty."""
    return {index: name for name, index in (getattr(_base(dataset), "class_to_idx", None) or {}).items()}


def _named_classes(dataset: Dataset, config: TrainConfig) -> list[str] | None:
    """The data's class names in index order when the indices are theirs (sorted folders or CSV
    names); None for ImageNet wnids (indices of the 1000-class head) and integer labels."""
    base = _base(dataset)
    names = base.label_names if isinstance(base, MaskedDataset) else None
    if names is None or (config.class_index != "folder" and all(n in imagenet_class_index() for n in names)):
        return None
    return names


def _fit_classes(model: nn.Module, train_set: Dataset, val_set: Dataset | None, config: TrainConfig,
                 log: bool = True) -> None:
    """Fit the classifier to the data and record its class names as timm's ``label_names``.

    Without ``--num-classes``, a head whose size differs from the classes the data names, or whose
    ``label_names`` lack one of them, is replaced (seeded by ``--seed``); a class index beyond the
    classifier is an error.
    """
    names = _named_classes(train_set, config)
    chosen = config.num_classes is not None or "num_classes" in config.model_kwargs
    mismatch = _head_mismatch(model, names) if names is not None and not chosen else None
    if mismatch is not None:
        if log:
            _log.info("train: %s: training a new %d-class head (seeded by --seed); --num-classes N keeps another "
                      "size", mismatch, len(names))
        with seeded(config.seed):
            model.reset_classifier(len(names))
    elif log and _follows_model(model, train_set):
        _log.info("train: the classes take the model's indices, in the order of its label_names (%s)",
                  _shown(_model_label_names(model)))
    if config.head_refit:
        linear_classifier(model)  # before the data's class checks: a model without a linear head is the problem
    for dataset in (train_set, val_set):
        base = _base(dataset)
        if not isinstance(base, MaskedDataset):
            continue
        top = max(sample.label for sample in base.samples)
        if top >= model.num_classes:
            raise ValueError(
                f"the data ({type(base).__name__}) has class index {top} but the model has {model.num_classes} "
                f"classes: pass --num-classes {top + 1} or more (or check --class-index)")
    if names is not None and len(names) == model.num_classes:
        cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "label_descriptions"}
        model.pretrained_cfg = {**cfg, "num_classes": len(names), "label_names": names}


def _head_mismatch(model: nn.Module, names: list[str]) -> str | None:
    """Why the model's head does not fit the data's named classes (``names``, in index order), or None."""
    labels = _model_label_names(model)
    lacking = [name for name in names if name not in labels] if labels else []
    lacks = f"the model's label_names lack the data's class(es) {_shown(lacking, 5)}" if lacking else ""
    if len(names) != model.num_classes:
        return f"the data have {len(names)} classes and the model {model.num_classes} outputs" + (
            f" ({lacks})" if lacks else "")
    return lacks or None


def _unusable_masks(train_set: Dataset) -> dict[str, list[Path]]:
    """The training masks that are empty or full (:meth:`MaskedDataset.unusable_masks`); none known for
    other datasets."""
    base = _base(train_set)
    if not isinstance(base, MaskedDataset):
        return {}
    return base.unusable_masks(train_set.indices if isinstance(train_set, Subset) else None)


def _describe_unusable(unusable: dict[str, list[Path]], total: int) -> str:
    """One line on the empty and full training masks: how many, what the loss makes of them, the first."""
    empty, full = unusable["empty"], unusable["full"]
    parts = ([f"{len(empty)} empty (no object: the whole image counts as background)"] if empty else []) + (
        [f"{len(full)} full (no background: the whole image counts as object)"] if full else [])
    return (f"{' and '.join(parts)} of the {total} training masks, first: {(empty or full)[0]}; the relevance "
            "loss cannot tell object from background on them: fix those masks or leave their images out")


def _describe_data(train_set: Dataset, val_set: Dataset | None, unusable: dict[str, list[Path]] | None = None) -> str:
    """One line: images and classes of the training set, validation images, unusable training masks,
    what was left out."""
    base = _base(train_set)
    text = f"{len(train_set)} training images"
    if isinstance(base, MaskedDataset):
        names = [name for _, name in sorted(_index_names(base).items())]
        indices = train_set.indices if isinstance(train_set, Subset) else range(len(base.samples))
        classes = len({base.samples[index].label for index in indices})
        shown = f" ({_shown(names, 5)})" if names else ""
        text += f" of {classes} classes{shown}, each with its mask"
    counts = [f"{len(paths)} {kind}" for kind, paths in (unusable or {}).items() if paths]
    if counts:
        text += f" ({' and '.join(counts)}: see the warning)"
    text += f"; {len(val_set)} validation images" if val_set is not None else "; no validation data"
    left_out = []
    # a --val-fraction split views a copy of the training set: the same samples, counted once
    for dataset in {id(b.samples): b for b in (base, _base(val_set)) if isinstance(b, MaskedDataset)}.values():
        unmasked, bad = getattr(dataset, "unmasked", 0), len(dataset.skipped)
        if unmasked:
            left_out.append(f"{unmasked} image(s) without a mask (--skip-unmasked)")
        if bad:
            left_out.append(f"{bad} bad file(s) (--skip-bad; first: {dataset.skipped[0]})")
    return text + ("; left out: " + ", ".join(left_out) if left_out else "")


def _masked_dataset(data: str, masks: str | None, transform, config: TrainConfig) -> MaskedDataset:
    """A CSV manifest or a masked-image folder (``data/images`` + ``data/masks``, or ``data`` + ``masks``)."""
    options = dict(class_index=config.class_index, skip_bad=config.skip_bad)
    if config.data_format == "csv" or (config.data_format == "auto" and Path(data).suffix == ".csv"):
        return csv_dataset(data, transform, **options)
    folders = dict(root=data) if masks is None else dict(images=data, masks=masks)
    return MaskedImageFolder(transform=transform, skip_unmasked=config.skip_unmasked, **folders, **options)
