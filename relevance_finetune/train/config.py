"""The settings of a finetuning run: ``TrainConfig``, the paper's presets, config files and recipes.

A run has up to two stages: the finetune (``finetune``) and then the head refit (``head_refit``,
``relevance_finetune.head.refit_head``); the recipes ``head`` and ``two_stage_head`` set them.

Settings resolve in one order (last wins): defaults, ``--preset``, ``--recipe``, the config file,
the flags.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .. import recipes
from ..data import default_workers

__all__ = ["PRESETS", "RESUMABLE_CHANGES", "TrainConfig", "field_kind", "read_config_file", "resolve_config"]

# Settings a resumed run may change; any other difference from the checkpoint is an error.
RESUMABLE_CHANGES = frozenset({"epochs", "resume", "progress", "workers", "device", "out", "data", "masks",
                               "val_data", "val_masks", "pretrained", "checkpoint", "preset", "skip_bad",
                               "skip_unmasked", "deterministic", "recipe", "overwrite", "head_max_gib"})


# Per-model learning rates and temperatures of the paper's reference code (README).
PRESETS: dict[str, dict[str, Any]] = {
    "vit_base": dict(model="vit_base_patch16_224.orig_in21k_ft_in1k", lr=3e-6),
    "vit_large": dict(lr=9e-7),  # the paper's original ViT-L/16 has no exact timm equivalent
    "augreg_small": dict(model="vit_small_patch16_224.augreg_in21k_ft_in1k", lr=2e-6),
    "augreg_base": dict(model="vit_base_patch16_224.augreg_in21k_ft_in1k", lr=6e-7),
    "augreg_large": dict(model="vit_large_patch16_224.augreg_in21k_ft_in1k", lr=9e-7),
    "deit_small": dict(model="deit_small_patch16_224.fb_in1k", lr=1e-6, temperature=0.55),
    "deit_base": dict(model="deit_base_patch16_224.fb_in1k", lr=8e-7, temperature=0.65),
}


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every setting of a finetuning run; field names are the command's flags (``_`` as ``-``).

    Defaults are the paper's recipe: AdamW(weight_decay=1e-4), ``lr * 0.85 ** (epoch // 2)``,
    50 epochs, global batch 8, the regulariser's default weights.
    """

    # model and data (read by the command; ``finetune`` takes a model and datasets)
    model: str | None = _option(None, "timm model name, also local-dir:DIR or hf-hub:ORG/NAME")
    pretrained: bool = _option(False, "load the model's pretrained weights")
    checkpoint: str | None = _option(None, "weights to start from (.safetensors, checkpoint, export dir)")
    num_classes: int | None = _option(None, "replace the classifier (default: keep the model's)")
    model_kwargs: dict = field(default_factory=dict, metadata={"help": "more timm.create_model arguments"})
    img_size: int | None = _option(None, "build the model for this image size; the data follow the model")
    data: str | None = _option(
        None, "training data: a folder with images/ and masks/ (or the images folder, with --masks), "
              "a CSV manifest image,mask,label[,group], the ImageNet root (with --data-format imagenet-s), "
              "or the Waterbirds or CelebA folder (--data-format waterbirds, celeba: their training split)")
    masks: str | None = _option(None, "the masks folder (ImageNetS919 for --data-format imagenet-s, "
                                      "CUB_200_2011/segmentations for waterbirds), or "
                                      "tokencut:MODEL to make them into OUT/masks, or propagate:MASKS to "
                                      "propagate the few masks in MASKS to every image (the model's tokens)")
    data_format: Literal["auto", "folder", "csv", "imagenet-s", "waterbirds", "celeba"] = _option(
        "auto", "layout of --data (auto: csv for a .csv file, else folder)")
    val_data: str | None = _option(None, "validation data, as --data (folder and csv layouts; waterbirds and "
                                         "celeba: the validation split of this folder, default --data's)")
    val_masks: str | None = _option(None, "the masks folder of --val-data, or tokencut:MODEL or propagate:MASKS "
                                          "(MASKS: a few of --val-data's; into OUT/val_masks)")
    val_fraction: float = _option(0.0, "hold out this fraction of --data for validation (seeded)")
    class_index: Literal["auto", "folder", "imagenet"] = _option(
        "auto", "class indices: sorted folders, ImageNet-1k indices of wnids, or auto")
    split_classes: int = _option(500, "imagenet-s: classes of the training set (the rest validate)")
    images_per_class: int = _option(3, "imagenet-s: training images per class")
    class_seed: int | None = _option(None, "imagenet-s: shuffle the classes to draw another split")
    normalization: Literal["model", "half"] = _option(
        "model", "image mean/std: the model's own, or 0.5 (the reference code, every model)")
    soft_masks: bool = _option(False, "resize masks bilinearly and keep them soft (the reference code)")
    skip_bad: bool = _option(False, "leave unreadable or mismatched images out with a warning")
    skip_unmasked: bool = _option(False, "leave out images that have no mask (e.g. TokenCut skipped them)")
    # outputs
    out: str | None = _option(None, "run directory: config, metrics, checkpoints")
    resume: bool = _option(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = _option(False, "replace the run that --out holds (its config, metrics and checkpoints)")
    # objective
    method: Literal["ours", "gradmask", "rrr"] = _option("ours", "relevance loss (ours) or a baseline")
    lambda_bg: float = _option(2.0, "weight of the background term")
    lambda_fg: float = _option(0.3, "weight of the foreground term")
    lambda_relevance: float = _option(0.8, "weight of both relevance terms")
    lambda_classification: float | None = _option(
        None, "weight of the classification term (default 0.2 for ours, 1.0 for baselines)")
    lambda_mask: float = _option(1.0, "weight of the input-gradient penalty (gradmask, rrr)")
    classification: Literal["confidence", "ground_truth", "off"] = _option(
        "confidence", "classification term of ours: own prediction, labels, or none")
    temperature: float = _option(1.0, "divides the logits of the classification term")
    second_order: bool = _option(False, "differentiate through the attention gradients")
    background_swap: float = _option(
        0.0, "probability of pasting each training object onto another image's background (labels stay)")
    select: recipes.Selection = _option(
        "paper", "best checkpoint: lowest validation loss (paper), lowest validation background-only "
                 "accuracy among epochs within --max-val-drop points of the starting accuracy (reliance), "
                 "highest accuracy on validation objects moved onto other validation backgrounds (counterfactual), "
                 "or highest worst-group validation accuracy (worst_group: validation data with group labels)")
    max_val_drop: float = _option(2.5, "reliance selection: validation accuracy may fall by this many points")
    recipe: str | None = _option(None, f"a named recipe ({', '.join(recipes.names())}): its loss weights, "
                                       "--background-swap, --select and stages (--finetune, --head-refit); flags "
                                       "and the config file win")
    # stages
    finetune: bool = _option(True, "finetune the model (--no-finetune --head-refit: refit the head alone)")
    head_refit: bool = _option(
        False, "then refit the linear head on the training images and counterfactual views of them (Deep Feature "
               "Reweighting, relevance_finetune.head.refit_head; C chosen on the validation images' views if "
               "any): best.safetensors")
    head_labels: Literal["masks", "groups"] = _option(
        "masks", "head refit on: masks (the training images and their counterfactual views) or groups (the "
                 "validation images' group labels, Deep Feature Reweighting's own protocol, "
                 "relevance_finetune.head.refit_head_groups)")
    head_views: int = _option(4, "head refit: counterfactual views per masked image")
    head_fits: int = _option(20, "head refit: fits on class-balanced subsamples, their coefficients averaged")
    head_max_gib: float = _option(
        8.0, "head refit: the most memory (GiB) its images may take; it holds every training and validation "
             "image and mask as float32 (N x 4 x H x W x 4 bytes)")
    # optimisation
    epochs: int = _option(50, "number of epochs")
    batch_size: int = _option(8, "global batch size (over all processes and accumulation steps)")
    lr: float = _option(3e-6, "AdamW learning rate")
    weight_decay: float = _option(1e-4, "AdamW weight decay")
    lr_decay: float = _option(0.85, "learning-rate factor every --lr-decay-epochs epochs")
    lr_decay_epochs: int = _option(2, "epochs between learning-rate decays")
    grad_accum: int = _option(1, "micro-batches per optimiser step")
    amp: Literal["bf16", "fp16"] | None = _option(None, "mixed precision of the forward")
    # run
    seed: int = _option(0, "seed of the data order, augmentation and validation hold-out")
    workers: int = _option(default_workers(2), "data-loading worker processes; by default 2, or the CPUs this "
                                               "process may use if fewer")
    device: str | None = _option(None, "torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    deterministic: bool = _option(False, "use deterministic GPU kernels (slower; CPU runs repeat anyway)")
    progress: bool = _option(True, "show progress bars")
    preset: str | None = _option(None, f"a paper recipe: {', '.join(PRESETS)}")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        if self.lambda_classification is None:
            self.lambda_classification = 0.2 if self.method == "ours" else 1.0
        for name in ("epochs", "batch_size", "grad_accum", "lr_decay_epochs", "head_views", "head_fits"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.background_swap <= 1:
            raise ValueError(f"background_swap must lie in [0, 1], got {self.background_swap}")
        if self.workers < 0 or self.lr <= 0 or self.temperature <= 0 or not 0 <= self.val_fraction < 1:
            raise ValueError(f"need workers >= 0, lr > 0, temperature > 0 and 0 <= val_fraction < 1, got "
                             f"workers={self.workers}, lr={self.lr}, temperature={self.temperature}, "
                             f"val_fraction={self.val_fraction}")
        if not (self.finetune or self.head_refit):
            raise ValueError("finetune and head_refit are both off: the run would do nothing")
        if not self.head_max_gib > 0:
            raise ValueError(f"head_max_gib must be positive, got {self.head_max_gib}")
        if self.img_size is not None and self.img_size < 1:
            raise ValueError(f"img_size must be positive, got {self.img_size}")
        try:  # as the checkpoint will hold them: tuples become lists, so a resumed run compares equal
            self.model_kwargs = json.loads(json.dumps(self.model_kwargs))
        except (TypeError, ValueError) as error:
            raise ValueError(f"model_kwargs must be JSON-serialisable: {error}") from None
        if self.pretrained and self.checkpoint is not None:
            raise ValueError("pass either pretrained or checkpoint, not both")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.recipe is not None:
            recipes.get(self.recipe)  # an unknown name fails here


def field_kind(hint: Any) -> tuple[type, tuple | None, bool]:
    """(value type, Literal choices or None, whether None is allowed) of a config annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) is not None and len(args) < len(typing.get_args(hint))
    hint = args[0] if optional else hint
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices, optional
    return hint, None, optional


def _coerce(name: str, value: Any, hint: Any) -> Any:
    kind, choices, optional = field_kind(hint)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must not be empty")
    if kind is bool or isinstance(value, bool):
        if kind is not bool or not isinstance(value, bool):
            raise ValueError(f"{name} must be {kind.__name__}, got {value!r}")
        return value
    try:
        coerced = kind(value)  # YAML reads 3e-6 as a string; TOML may give 1 for 1.0
    except (TypeError, ValueError):
        coerced = None
    if coerced is None or (kind is int and isinstance(value, float) and value != coerced):
        raise ValueError(f"{name} must be {kind.__name__}, got {value!r}")
    value = coerced
    if choices is not None and value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


# -- configuration files ----------------------------------------------------------------------
def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON file whose keys are ``TrainConfig`` fields (``-`` or ``_``)."""
    path = Path(path)
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise ValueError(f"reading {path} needs Python 3.11 or newer (tomllib); use YAML instead") from None
        with path.open("rb") as f:
            values = tomllib.load(f)
    elif path.suffix in (".yaml", ".yml", ".json"):
        with path.open() as f:
            values = yaml.safe_load(f) or {}
    else:
        raise ValueError(f"config file must end in .toml, .yaml, .yml or .json, got {path}")
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a table of settings, got {type(values).__name__}")
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
    return values


def _recipe_settings(name: str | None) -> dict[str, Any]:
    """The ``TrainConfig`` values of recipe ``name`` (none for ``None`` or an unknown name)."""
    if name not in recipes.RECIPES:
        return {}
    recipe = recipes.get(name)
    if recipe.object_only:
        raise ValueError(f"recipe {name!r} uses object-only images, which the train command does not offer")
    stages = {"finetune": recipe.finetune, "head_refit": recipe.head_refit}
    if not recipe.finetune:  # its loss, swap and selection settings are unused
        return stages
    return {**recipe.loss, "background_swap": recipe.background_swap, "select": recipe.selection, **stages}


def resolve_config(flags: dict[str, Any] | None = None, config_file: str | Path | None = None) -> TrainConfig:
    """Defaults, then the preset, then the recipe, then the config file, then the given flags (last wins)."""
    flags = dict(flags or {})
    file_values = read_config_file(config_file) if config_file is not None else {}
    preset = flags.get("preset", file_values.get("preset"))  # an unknown one fails in TrainConfig
    recipe = _recipe_settings(flags.get("recipe", file_values.get("recipe")))
    return TrainConfig(**{**PRESETS.get(preset, {}), **recipe, **file_values, **flags})
