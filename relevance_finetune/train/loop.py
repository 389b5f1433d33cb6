"""The finetuning loop: ``finetune``, one training epoch, validation, and the loss the run optimises.

``finetune(model, train_set, val_set, config)`` trains on any dataset of ``(image, mask, label)``
samples (image (3, H, W), mask (1, H, W) in [0, 1], int label). Under ``torchrun`` it runs
DistributedDataParallel; ``config.batch_size`` is always the global batch.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from ..augment import BackgroundSwap
from ..gae import attach_gae, explicit_attention
from ..losses import InputGradientRegularizer, RegularizerOutput, RelevanceRegularizer
from ..probes import replace_region
from .config import TrainConfig
from .distributed import Processes, check_ddp_objective, micro_batch_size
from .outputs import LAST, RunState, resume, start_outputs, write_epoch
from .randomness import seed_everything, use_deterministic_kernels
from .selection import SELECTION_RULES

__all__ = ["build_criterion", "finetune"]

_log = logging.getLogger(__name__)

_LOSS_PARTS = ("loss", "background", "foreground", "classification", "mask_penalty")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    with _autocast(images.device.type, amp):
        logits = model(images)
    logits = logits.float()
    if input_gradient:
        return criterion(logits, images, masks, labels), logits
    return criterion(logits, masks, labels=labels), logits


def _autocast(device_type: str, amp: str | None) -> torch.autocast:
    return torch.autocast(device_type, dtype=_AMP_DTYPES.get(amp), enabled=amp is not None)


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

    def result(self, prefix: str, procs: Processes) -> dict[str, float]:
        totals = procs.sum(torch.cat([self.sums, self.counts, torch.tensor([self.correct, self.count])]))
        sums, counts, (correct, count) = totals.split([len(_LOSS_PARTS), len(_LOSS_PARTS), 2])
        metrics = {f"{prefix}{name}": float(total / n) for name, total, n in zip(_LOSS_PARTS, sums, counts) if n}
        metrics[f"{prefix}accuracy"] = float(correct / count.clamp(min=1))
        return metrics


def _progress(loader: DataLoader, procs: Processes, desc: str, show: bool) -> tqdm:
    return tqdm(loader, desc=desc, disable=not (show and procs.is_main), leave=False, dynamic_ncols=True)


def _to_device(batch: Sequence[Any], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(t).to(device, non_blocking=True) for t in batch)


def _train_epoch(
        model: nn.Module,
        criterion: nn.Module,
        loader: DataLoader,
        run: RunState,
        config: TrainConfig,
        procs: Processes,
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
              procs: Processes, micro_batch: int) -> dict[str, float]:
    """Loss parts and accuracy over ``val_set``, sharded over the processes without padding.

    Runs the bare model (never the DDP wrapper): relevance needs gradients, but no reduction.
    """
    model.eval()
    shard = Subset(val_set, range(procs.rank, len(val_set), procs.world_size))
    loader = DataLoader(shard, batch_size=micro_batch, shuffle=False, num_workers=config.workers,
                        pin_memory=procs.device.type == "cuda")
    meter = _Meter()
    rule = SELECTION_RULES[config.select]
    correct = {name: torch.zeros(1, dtype=torch.float64) for name, wanted in (
        ("val_background_only", rule.background_only), ("val_counterfactual", rule.counterfactual)) if wanted}
    for index, batch in enumerate(_progress(loader, procs, "validate", config.progress)):
        images, masks, labels = _to_device(batch, procs.device)
        out, logits = _forward_loss(model, criterion, images, masks, labels, config.amp)
        meter.update(out, logits, labels)
        if rule.background_only:
            correct["val_background_only"] += _background_only_correct(model, images, masks, labels, config.amp)
        if rule.counterfactual:
            correct["val_counterfactual"] += _counterfactual_correct(model, images, masks, labels, config.amp, index)
    metrics = meter.result("val_", procs)
    count = procs.sum(torch.tensor([float(len(shard))], dtype=torch.float64)).clamp(min=1)
    metrics.update({name: float(procs.sum(total) / count) for name, total in correct.items()})
    return metrics


@torch.no_grad()
def _counterfactual_correct(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                            amp: str | None, seed: int) -> float:
    """Correct predictions on the batch's objects moved onto each other's backgrounds (one fixed
    draw per batch ``seed``: every validation pass sees the same images)."""
    with warnings.catch_warnings():  # an image without an object (or background) to move stays as it is
        warnings.filterwarnings("ignore", message="BackgroundSwap:")
        moved, _ = BackgroundSwap(1.0, seed=seed)(images, masks)
    with _autocast(images.device.type, amp):
        return float((model(moved).argmax(dim=1) == labels).sum())


@torch.no_grad()
def _background_only_correct(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                             amp: str | None) -> float:
    """Correct predictions on the images with their objects replaced, averaged over two fills that
    commute with per-channel normalisation (the batch's mean colour and a blurred copy)."""
    correct = 0.0
    for fill in ("mean", "blur"):
        probed = replace_region(images, masks, "object", fill)
        with _autocast(images.device.type, amp):
            correct += float((model(probed).argmax(dim=1) == labels).sum()) / 2
    return correct


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
    procs = Processes.current(config.device)
    micro_batch = micro_batch_size(config, procs.world_size)
    if procs.world_size > 1:
        check_ddp_objective(config)
    out = Path(config.out) if config.out is not None else None
    if config.resume and out is None:
        raise ValueError("resume needs the run directory: set out")
    rule = SELECTION_RULES[config.select]
    if (rule.background_only or rule.counterfactual) and val_set is None:
        raise ValueError(f"select={config.select!r} needs masked validation images: pass --val-data or "
                         "--val-fraction")
    if out is not None and not config.resume and (out / LAST).exists():
        raise FileExistsError(f"{out} already holds a run ({LAST}): pass --resume (TrainConfig.resume) to "
                              "continue it, or choose another output directory")
    seed_everything(config.seed + procs.rank)
    if config.deterministic:
        use_deterministic_kernels()
    model.to(procs.device)
    with build_criterion(model, config) as criterion:
        train_model = model
        if procs.world_size > 1:
            device_ids = [procs.device.index] if procs.device.type == "cuda" else None
            train_model = DistributedDataParallel(model, device_ids=device_ids)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        run = RunState(optimizer=optimizer,
                   scheduler=torch.optim.lr_scheduler.StepLR(optimizer, config.lr_decay_epochs, config.lr_decay),
                   scaler=torch.amp.GradScaler(procs.device.type, enabled=config.amp == "fp16"),
                   loader_generator=torch.Generator().manual_seed(config.seed + procs.rank),
                   history=[], swap=BackgroundSwap(config.background_swap) if config.background_swap else None)
        if config.resume:
            resume(out, model, run, config, procs)
        if out is not None and procs.is_main:
            start_outputs(out, config, run.history)
        sampler = DistributedSampler(train_set, num_replicas=procs.world_size, rank=procs.rank,
                                     shuffle=True, seed=config.seed)
        loader = DataLoader(train_set, batch_size=micro_batch, sampler=sampler, num_workers=config.workers,
                            generator=run.loader_generator, pin_memory=procs.device.type == "cuda")
        start_accuracy = {}
        if rule.background_only:  # the reference a rule's accuracy limit is measured from
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
                write_epoch(out, model, config, run, procs)
    return run.history

