"""The finetuning loop: the paper's recipe, checkpoints with exact resume, DDP, and the ``train`` command.

``finetune(model, train_set, val_set, config)`` trains on any dataset of ``(image, mask, label)``
samples (image (3, H, W), mask (1, H, W) in [0, 1], int label). Under ``torchrun`` it runs
DistributedDataParallel; ``config.batch_size`` is always the global batch.

A checkpoint is one ``.safetensors`` file: the model's state dict under its own keys (read by
:func:`relevance_finetune.models.load_weights`), the optimiser, schedule, grad-scaler and RNG
tensors under ``trainer_state/``, and JSON in the header (the structure of that state, the epoch,
the config, the metrics history). Loading never unpickles.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import logging
import os
import random
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from timm.utils import unwrap_model
from tqdm import tqdm

from . import __version__
from . import recipes
from ._files import atomic_path
from .augment import BackgroundSwap
from .data import ImageNetSDataset, MaskedCsvDataset, MaskedDataset, MaskedImageFolder, paired_transforms
from .gae import UnsupportedModelError, attach_gae, explicit_attention
from .losses import InputGradientRegularizer, RegularizerOutput, RelevanceRegularizer
from .models import (CHECKPOINT_FORMAT, TRAINER_STATE_PREFIX, add_model_arguments, create_model,
                     merge_model_kwargs, model_spec, open_safetensors)
from .probes import replace_region

__all__ = [
    "PRESETS",
    "TrainConfig",
    "add_arguments",
    "build_criterion",
    "finetune",
    "load_checkpoint",
    "read_checkpoint_info",
    "read_config_file",
    "resolve_config",
    "run",
    "save_checkpoint",
]

_log = logging.getLogger(__name__)

LAST, BEST = "last.safetensors", "best.safetensors"
METRICS, RESOLVED_CONFIG = "metrics.jsonl", "config.yaml"
_LOSS_PARTS = ("loss", "background", "foreground", "classification", "mask_penalty")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Settings a resumed run may change; any other difference from the checkpoint is an error.
_RESUMABLE_CHANGES = frozenset({"epochs", "resume", "progress", "workers", "device", "out", "data", "masks",
                                "val_data", "val_masks", "pretrained", "checkpoint", "preset", "skip_bad",
                                "skip_unmasked", "deterministic", "recipe"})

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
              "a CSV manifest image,mask,label, or the ImageNet root (with --data-format imagenet-s)")
    masks: str | None = _option(None, "the masks folder (ImageNetS919 for --data-format imagenet-s)")
    data_format: Literal["auto", "folder", "csv", "imagenet-s"] = _option(
        "auto", "layout of --data (auto: csv for a .csv file, else folder)")
    val_data: str | None = _option(None, "validation data, as --data (folder and csv layouts)")
    val_masks: str | None = _option(None, "the masks folder of --val-data")
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
    select: Literal["paper", "reliance"] = _option(
        "paper", "best checkpoint: lowest validation loss (paper), or lowest validation background-only "
                 "accuracy among epochs within --max-val-drop points of the starting accuracy (reliance)")
    max_val_drop: float = _option(2.5, "reliance selection: validation accuracy may fall by this many points")
    recipe: str | None = _option(None, f"a named recipe ({', '.join(recipes.names())}): its loss weights, "
                                       "--background-swap and --select; flags and the config file win")
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
    workers: int = _option(2, "data-loading worker processes")
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
        for name in ("epochs", "batch_size", "grad_accum", "lr_decay_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.background_swap <= 1:
            raise ValueError(f"background_swap must lie in [0, 1], got {self.background_swap}")
        if self.workers < 0 or self.lr <= 0 or self.temperature <= 0 or not 0 <= self.val_fraction < 1:
            raise ValueError(f"need workers >= 0, lr > 0, temperature > 0 and 0 <= val_fraction < 1, got "
                             f"workers={self.workers}, lr={self.lr}, temperature={self.temperature}, "
                             f"val_fraction={self.val_fraction}")
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


def _field_kind(hint: Any) -> tuple[type, tuple | None, bool]:
    """(value type, Literal choices or None, whether None is allowed) of a config annotation."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) is not None and len(args) < len(typing.get_args(hint))
    hint = args[0] if optional else hint
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices, optional
    return hint, None, optional


def _coerce(name: str, value: Any, hint: Any) -> Any:
    kind, choices, optional = _field_kind(hint)
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


# -- configuration files ---------------------------------------------------------------------------
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
    return {**recipe.loss, "background_swap": recipe.background_swap, "select": recipe.selection}


def resolve_config(flags: dict[str, Any] | None = None, config_file: str | Path | None = None) -> TrainConfig:
    """Defaults, then the preset, then the recipe, then the config file, then the given flags (last wins)."""
    flags = dict(flags or {})
    file_values = read_config_file(config_file) if config_file is not None else {}
    preset = flags.get("preset", file_values.get("preset"))  # an unknown one fails in TrainConfig
    recipe = _recipe_settings(flags.get("recipe", file_values.get("recipe")))
    return TrainConfig(**{**PRESETS.get(preset, {}), **recipe, **file_values, **flags})


# -- checkpoints -----------------------------------------------------------------------------------
def _encode(value: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """JSON skeleton of nested dicts/lists/tuples; tensors move to ``tensors`` under ``key``."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v, tensors, f"{key}/{i}")] for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_encode(v, tensors, f"{key}/{i}") for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} at {key!r} in a checkpoint")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(node, dict):
        return node
    ((kind, value),) = node.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {k: _decode(v, tensors) for k, v in value}
    items = [_decode(v, tensors) for v in value]
    return items if kind == "list" else tuple(items)


def save_checkpoint(
        path: str | Path,
        model: nn.Module,
        info: dict[str, Any],
        trainer_state: dict[str, Any] | None = None,
) -> None:
    """Write ``model``'s weights (unwrapped from DDP), ``info`` (JSON) and optionally ``trainer_state``
    to one file, atomically.

    ``trainer_state`` is any nesting of dicts, lists, tuples, tensors and JSON scalars
    (optimiser and scheduler state dicts, RNG states).
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in unwrap_model(model).state_dict().items()}
    metadata = {"format": CHECKPOINT_FORMAT, "info": json.dumps(info)}
    if trainer_state is not None:
        metadata["trainer_state"] = json.dumps(_encode(trainer_state, tensors, TRAINER_STATE_PREFIX.rstrip("/")))
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_checkpoint_info(path: str | Path) -> dict[str, Any] | None:
    """The JSON ``info`` of a checkpoint (epoch, architecture, config, history), or None for other files."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    with open_safetensors(path) as f:
        metadata = f.metadata() or {}
    return json.loads(metadata["info"]) if metadata.get("format") == CHECKPOINT_FORMAT else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """Read a checkpoint of :func:`save_checkpoint`: ``(model_state, info, trainer_state or None)``."""
    path = Path(path)
    with open_safetensors(path) as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a relevance-finetune checkpoint (no {CHECKPOINT_FORMAT!r} header)")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    model_state = {k: v for k, v in tensors.items() if not k.startswith(TRAINER_STATE_PREFIX)}
    trainer_state = None
    if "trainer_state" in metadata:
        trainer_state = _decode(json.loads(metadata["trainer_state"]), tensors)
    return model_state, json.loads(metadata["info"]), trainer_state


# -- randomness ------------------------------------------------------------------------------------
def _use_deterministic_kernels() -> None:
    """Deterministic cuBLAS/cuDNN kernels; warns (never fails) where an op has none."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(loader_generator: torch.Generator) -> dict[str, Any]:
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": loader_generator.get_state(),
    }


def _set_rng_state(state: dict[str, Any], loader_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    loader_generator.set_state(state["loader"])


# -- processes -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Processes:
    """This process's place in the run: rank, number of processes, device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls, device: str | None) -> "_Processes":
        distributed = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if distributed else 0
        world_size = dist.get_world_size() if distributed else 1
        if device is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        return cls(rank, world_size, torch.device(device))

    def all_gather(self, value: Any) -> list[Any]:
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            backend_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            values = values.to(backend_device)
            dist.all_reduce(values)
        return values.cpu()


# -- the loop --------------------------------------------------------------------------------------
@contextlib.contextmanager
def build_criterion(model: nn.Module, config: TrainConfig) -> Iterator[nn.Module]:
    """The loss of ``config.method``, with ``model`` instrumented for it until the block exits.

    Raises ``UnsupportedModelError`` for models whose attention ``attach_gae`` cannot handle.
    """
    if config.method == "ours":
        with attach_gae(model, second_order=config.second_order) as gae:
            yield RelevanceRegularizer(
                gae, lambda_bg=config.lambda_bg, lambda_fg=config.lambda_fg,
                lambda_relevance=config.lambda_relevance, lambda_classification=config.lambda_classification,
                classification=config.classification, temperature=config.temperature)
    else:  # the input-gradient baselines take a double backward: SDPA has none
        with explicit_attention(model):
            yield InputGradientRegularizer(
                config.method, lambda_mask=config.lambda_mask, lambda_classification=config.lambda_classification)


def _forward_loss(
        model: nn.Module,
        criterion: nn.Module,
        images: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        amp: str | None,
) -> tuple[RegularizerOutput, torch.Tensor]:
    """One forward (under autocast if ``amp``) and the loss, computed in float32."""
    input_gradient = isinstance(criterion, InputGradientRegularizer)
    if input_gradient:
        images.requires_grad_(True)
    with torch.autocast(images.device.type, dtype=_AMP_DTYPES.get(amp), enabled=amp is not None):
        logits = model(images)
    logits = logits.float()
    if input_gradient:
        return criterion(logits, images, masks, labels), logits
    return criterion(logits, masks, labels=labels), logits


class _Meter:
    """Sample-weighted sums of the loss parts and correct predictions of one pass, over all processes."""

    def __init__(self) -> None:
        self.sums = torch.zeros(len(_LOSS_PARTS), dtype=torch.float64)
        self.counts = torch.zeros(len(_LOSS_PARTS), dtype=torch.float64)  # samples a part was computed for
        self.correct = 0
        self.count = 0

    def update(self, out: RegularizerOutput, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.shape[0]
        for index, name in enumerate(_LOSS_PARTS):
            value = getattr(out, name)
            if value is not None:
                self.sums[index] += float(value.detach()) * n
                self.counts[index] += n
        self.correct += int((logits.detach().argmax(dim=1) == labels).sum())
        self.count += n

    def result(self, prefix: str, procs: _Processes) -> dict[str, float]:
        totals = procs.sum(torch.cat([self.sums, self.counts, torch.tensor([self.correct, self.count])]))
        sums, counts, (correct, count) = totals.split([len(_LOSS_PARTS), len(_LOSS_PARTS), 2])
        metrics = {f"{prefix}{name}": float(total / n) for name, total, n in zip(_LOSS_PARTS, sums, counts) if n}
        metrics[f"{prefix}accuracy"] = float(correct / count.clamp(min=1))
        return metrics


def _progress(loader: DataLoader, procs: _Processes, desc: str, show: bool) -> tqdm:
    return tqdm(loader, desc=desc, disable=not (show and procs.is_main), leave=False, dynamic_ncols=True)


def _to_device(batch: Sequence[Any], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(t).to(device, non_blocking=True) for t in batch)


def _train_epoch(
        model: nn.Module,
        criterion: nn.Module,
        loader: DataLoader,
        run: "_Run",
        config: TrainConfig,
        procs: _Processes,
        epoch: int,
) -> dict[str, float]:
    """One pass over ``loader``: an optimiser step every ``grad_accum`` micro-batches.

    Each micro-batch's mean loss is weighted by its share of the step's images, so a short last
    step (fewer or smaller micro-batches) is the mean over its images, as a full one is.
    """
    model.train()
    meter = _Meter()
    bar = _progress(loader, procs, f"train {epoch + 1}/{config.epochs}", config.progress)
    step_images = loader.batch_size * config.grad_accum
    samples = len(loader.sampler)  # this process's images, equal on every process (the sampler pads)
    for step, batch in enumerate(bar):
        images, masks, labels = _to_device(batch, procs.device)
        if run.swap is not None:
            images, masks = run.swap(images, masks)
        last_micro_batch = (step + 1) % config.grad_accum == 0 or step + 1 == len(loader)
        images_in_step = min(step_images, samples - step // config.grad_accum * step_images)
        sync = contextlib.nullcontext() if last_micro_batch or procs.world_size == 1 else model.no_sync()
        with sync:
            out, logits = _forward_loss(model, criterion, images, masks, labels, config.amp)
            run.scaler.scale(out.loss * (labels.shape[0] / images_in_step)).backward()
        if last_micro_batch:
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
        meter.update(out, logits, labels)
        bar.set_postfix(loss=f"{float(out.loss.detach()):.4f}")
    return meter.result("train_", procs)


def _validate(model: nn.Module, criterion: nn.Module, val_set: Dataset, config: TrainConfig,
              procs: _Processes, micro_batch: int) -> dict[str, float]:
    """Loss parts and accuracy over ``val_set``, sharded over the processes without padding.

    Runs the bare model (never the DDP wrapper): relevance needs gradients, but no reduction.
    """
    model.eval()
    shard = Subset(val_set, range(procs.rank, len(val_set), procs.world_size))
    loader = DataLoader(shard, batch_size=micro_batch, shuffle=False, num_workers=config.workers,
                        pin_memory=procs.device.type == "cuda")
    meter = _Meter()
    background_correct = torch.zeros(1, dtype=torch.float64)
    for batch in _progress(loader, procs, "validate", config.progress):
        images, masks, labels = _to_device(batch, procs.device)
        out, logits = _forward_loss(model, criterion, images, masks, labels, config.amp)
        meter.update(out, logits, labels)
        if config.select == "reliance":
            background_correct += _background_only_correct(model, images, masks, labels, config.amp)
    metrics = meter.result("val_", procs)
    if config.select == "reliance":
        count = procs.sum(torch.tensor([float(len(shard))], dtype=torch.float64))
        metrics["val_background_only"] = float(procs.sum(background_correct) / count.clamp(min=1))
    return metrics


@torch.no_grad()
def _background_only_correct(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                             amp: str | None) -> float:
    """Correct predictions on the images with their objects replaced, averaged over two fills that
    commute with per-channel normalisation (the batch's mean colour and a blurred copy)."""
    correct = 0.0
    for fill in ("mean", "blur"):
        probed = replace_region(images, masks, "object", fill)
        with torch.autocast(images.device.type, dtype=_AMP_DTYPES.get(amp), enabled=amp is not None):
            correct += float((model(probed).argmax(dim=1) == labels).sum()) / 2
    return correct


def _micro_batch(config: TrainConfig, world_size: int) -> int:
    parts = world_size * config.grad_accum
    if config.batch_size % parts:
        raise ValueError(f"batch_size {config.batch_size} must divide evenly over {world_size} process(es) x "
                         f"{config.grad_accum} accumulation step(s)")
    return config.batch_size // parts


def _check_ddp_objective(config: TrainConfig) -> None:
    if config.lambda_classification == 0 or (config.method == "ours" and config.classification == "off"):
        raise ValueError(
            "DistributedDataParallel needs a gradient for every parameter, but without the classification "
            "term the head gets none: keep lambda_classification > 0 (and classification != 'off') "
            "or train in one process")


@dataclass
class _Run:
    """What one epoch's checkpoint holds besides the weights."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loader_generator: torch.Generator
    history: list[dict[str, Any]]
    swap: BackgroundSwap | None = None  # mask-guided counterfactual images (global torch RNG: resumable)

    def trainer_state(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        """Optimiser, schedule and grad-scaler state, with the RNG states of every process."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng}

    def restore(self, state: dict[str, Any], history: list[dict[str, Any]], procs: _Processes) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history[:] = history
        if len(state["rng"]) == procs.world_size:
            _set_rng_state(state["rng"][procs.rank], self.loader_generator)
        else:
            warnings.warn(f"the checkpoint was written by {len(state['rng'])} process(es), this run has "
                          f"{procs.world_size}: random streams restart from the seed, so the resumed run "
                          "will not repeat an uninterrupted one exactly")


def _checkpoint_info(model: nn.Module, config: TrainConfig, history: list[dict[str, Any]]) -> dict[str, Any]:
    return {"epoch": len(history), "architecture": _architecture(model), "model": model_spec(model),
            "config": dataclasses.asdict(config), "history": history, "library_version": __version__}


def _architecture(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def _resume(out: Path, model: nn.Module, run: _Run, config: TrainConfig, procs: _Processes) -> None:
    """Load ``out/last.safetensors`` into the model and ``run``; warn and start afresh if absent."""
    if not (out / LAST).is_file():
        warnings.warn(f"--resume: {out / LAST} does not exist; starting a new run")
        return
    model_state, info, trainer_state = load_checkpoint(out / LAST)
    changed = {k: (v, getattr(config, k, None)) for k, v in info["config"].items()
               if k not in _RESUMABLE_CHANGES and getattr(config, k, None) != v}
    if changed:
        details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise ValueError(f"cannot resume {out}: settings differ from its checkpoint ({details}); "
                         f"only {sorted(_RESUMABLE_CHANGES)} may change")
    model.load_state_dict(model_state)
    run.restore(trainer_state, info["history"], procs)


def _write_epoch(out: Path, model: nn.Module, config: TrainConfig, run: _Run, procs: _Processes) -> None:
    """Checkpoint ``last`` (and ``best`` if validation improved) and append the metrics line."""
    rng = procs.all_gather(_rng_state(run.loader_generator))  # collective: every process takes part
    if not procs.is_main:
        return
    info = _checkpoint_info(model, config, run.history)
    if _newest_is_best(run.history, config):
        save_checkpoint(out / BEST, model, info)  # before last: a resumed epoch rewrites it
    save_checkpoint(out / LAST, model, info, run.trainer_state(rng))
    with (out / METRICS).open("a") as f:
        f.write(json.dumps(run.history[-1]) + "\n")


def _newest_is_best(history: list[dict[str, Any]], config: TrainConfig) -> bool:
    """Whether the newest epoch beats every earlier one by ``config.select``.

    ``"paper"``: lower validation loss. ``"reliance"``: among epochs whose validation accuracy is
    within ``max_val_drop`` points of the starting accuracy, lower background-only accuracy (ties:
    higher accuracy, then the earlier epoch)."""
    if "val_loss" not in history[-1]:
        return False
    if config.select == "paper":
        return history[-1]["val_loss"] < min((r["val_loss"] for r in history[:-1]), default=float("inf"))
    floor = history[0]["val_start_accuracy"] - config.max_val_drop / 100
    earlier = [(r["val_background_only"], -r["val_accuracy"]) for r in history[:-1] if r["val_accuracy"] >= floor]
    newest = (history[-1]["val_background_only"], -history[-1]["val_accuracy"])
    return history[-1]["val_accuracy"] >= floor and newest < min(earlier, default=(float("inf"),))


def _start_outputs(out: Path, config: TrainConfig, history: list[dict[str, Any]]) -> None:
    """Write the resolved config, and a metrics file holding exactly the checkpoint's history."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / RESOLVED_CONFIG) as tmp:
        tmp.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    with atomic_path(out / METRICS) as tmp:
        tmp.write_text("".join(json.dumps(record) + "\n" for record in history))


def finetune(
        model: nn.Module,
        train_set: Dataset,
        val_set: Dataset | None = None,
        config: TrainConfig | None = None,
) -> list[dict[str, Any]]:
    """Finetune ``model`` in place with the relevance loss (or a baseline) and return the metrics.

    Parameters
    ----------
    model:
        A timm vision transformer supported by ``attach_gae``; moved to the run's device.
    train_set, val_set:
        Datasets of ``(image (3, H, W), mask (1, H, W), label)``. Without ``val_set`` there is no
        validation and no ``best`` checkpoint.
    config:
        The settings (default: the paper's recipe). With ``config.out`` set, the main process writes
        ``config.yaml``, ``metrics.jsonl``, ``last.safetensors`` and ``best.safetensors`` there, and
        ``config.resume`` continues the run saved there. Inside an initialised process group the
        model runs under DistributedDataParallel.

    Returns
    -------
    list of dict
        One record per epoch (the run's earlier epochs too when resuming): ``epoch``, ``lr``,
        ``train_*`` and ``val_*`` loss parts and accuracy, ``time_s``.
    """
    if isinstance(model, DistributedDataParallel):
        raise TypeError("pass the bare model: finetune wraps it in DistributedDataParallel itself, after "
                        "instrumenting its attention")
    config = config or TrainConfig()
    procs = _Processes.current(config.device)
    micro_batch = _micro_batch(config, procs.world_size)
    if procs.world_size > 1:
        _check_ddp_objective(config)
    out = Path(config.out) if config.out is not None else None
    if config.resume and out is None:
        raise ValueError("resume needs the run directory: set out")
    if config.select == "reliance" and val_set is None:
        raise ValueError("select='reliance' needs masked validation images: pass --val-data or --val-fraction")
    if out is not None and not config.resume and (out / LAST).exists():
        raise FileExistsError(f"{out} already holds a run ({LAST}): pass --resume (TrainConfig.resume) to "
                              "continue it, or choose another output directory")
    _seed_everything(config.seed + procs.rank)
    if config.deterministic:
        _use_deterministic_kernels()
    model.to(procs.device)
    with build_criterion(model, config) as criterion:
        train_model = model
        if procs.world_size > 1:
            device_ids = [procs.device.index] if procs.device.type == "cuda" else None
            train_model = DistributedDataParallel(model, device_ids=device_ids)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        run = _Run(optimizer=optimizer,
                   scheduler=torch.optim.lr_scheduler.StepLR(optimizer, config.lr_decay_epochs, config.lr_decay),
                   scaler=torch.amp.GradScaler(procs.device.type, enabled=config.amp == "fp16"),
                   loader_generator=torch.Generator().manual_seed(config.seed + procs.rank),
                   history=[], swap=BackgroundSwap(config.background_swap) if config.background_swap else None)
        if config.resume:
            _resume(out, model, run, config, procs)
        if out is not None and procs.is_main:
            _start_outputs(out, config, run.history)
        sampler = DistributedSampler(train_set, num_replicas=procs.world_size, rank=procs.rank,
                                     shuffle=True, seed=config.seed)
        loader = DataLoader(train_set, batch_size=micro_batch, sampler=sampler, num_workers=config.workers,
                            generator=run.loader_generator, pin_memory=procs.device.type == "cuda")
        start_accuracy = {}
        if config.select == "reliance":  # the reference the accuracy limit is measured from
            start_accuracy = {k: v for k, v in run.history[0].items() if k.startswith("val_start_")} if run.history \
                else {f"val_start_{k[4:]}": v for k, v in _validate(model, criterion, val_set, config, procs,
                                                                    micro_batch).items()}
        for epoch in range(len(run.history), config.epochs):
            start = time.perf_counter()
            sampler.set_epoch(epoch)
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **start_accuracy}
            record.update(_train_epoch(train_model, criterion, loader, run, config, procs, epoch))
            if val_set is not None:
                record.update(_validate(model, criterion, val_set, config, procs, micro_batch))
            run.scheduler.step()
            record["time_s"] = round(time.perf_counter() - start, 3)
            run.history.append(record)
            if procs.is_main:
                _log.info("epoch %d/%d: %s", epoch + 1, config.epochs,
                          ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
            if out is not None:
                _write_epoch(out, model, config, run, procs)
    return run.history


# -- the command -----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` flags: one per ``TrainConfig`` field, plus ``--config FILE``."""
    parser.add_argument("--config", metavar="FILE", help="TOML/YAML file of settings (keys as the flags); flags win")
    hints = typing.get_type_hints(TrainConfig)
    add_model_arguments(parser, default=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model_kwargs", "img_size"):
            continue
        kind, choices, _ = _field_kind(hints[f.name])
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
    started = _init_distributed()
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


def _init_distributed() -> bool:
    """Join the process group that torchrun describes in the environment; False when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", 1)) < 2 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


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
