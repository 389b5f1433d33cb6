"""The finetuning loop: ``finetune``, one training epoch, validation, and the loss the run optimises.

``finetune(model, train_set, val_set, config)`` trains on any dataset of ``(image, mask, label)``
samples (image (3, H, W), mask (1, H, W) in [0, 1], int label). Under ``torchrun`` it runs
DistributedDataParallel; ``config.batch_size`` is always the global batch.
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

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
from .groups import RunGroups, group_metrics, group_summary, run_groups
from .outputs import LAST, RESOLVED_CONFIG, EpochProgress, RunState, check_out, resume, run_summary, start_outputs
from .outputs import write_epoch, write_progress
from .randomness import seed_everything, set_rng_state, use_deterministic_kernels
from .selection import SELECTION_RULES
from .stopping import STOP_SIGNALS, NonFiniteLossError, StopSignals, TrainingInterrupted, ignore_stop_signals

__all__ = ["build_criterion", "finetune"]

_log = logging.getLogger(__name__)

_LOSS_PARTS = ("loss", "background", "foreground", "classification", "mask_penalty")
_CHECKED = ("logits", *_LOSS_PARTS)  # what a training step checks for NaN and inf
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


def _forward(model: nn.Module, criterion: nn.Module, images: torch.Tensor, amp: str | None) -> torch.Tensor:
    """The logits of one forward (under autocast if ``amp``), in float32."""
    if isinstance(criterion, InputGradientRegularizer):
        images.requires_grad_(True)
    with _autocast(images.device.type, amp):
        logits = model(images)
    return logits.float()


def _loss(criterion: nn.Module, logits: torch.Tensor, images: torch.Tensor, masks: torch.Tensor,
          labels: torch.Tensor) -> RegularizerOutput:
    """The loss of ``logits`` (the input-gradient baselines also read the images)."""
    if isinstance(criterion, InputGradientRegularizer):
        return criterion(logits, images, masks, labels)
    return criterion(logits, masks, labels=labels)


def _autocast(device_type: str, amp: str | None) -> torch.autocast:
    return torch.autocast(device_type, dtype=_AMP_DTYPES.get(amp), enabled=amp is not None)


class _Meter:
    """Sample-weighted sums of the loss parts and correct predictions of one pass, over all processes."""

    def __init__(self) -> None:
        self.sums = torch.zeros(len(_LOSS_PARTS), dtype=torch.float64)
        self.counts = torch.zeros(len(_LOSS_PARTS), dtype=torch.float64)  # samples a part was computed for
        self.correct = 0
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums.clone(), "counts": self.counts.clone(), "correct": self.correct,
                "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.counts = state["sums"].clone(), state["counts"].clone()
        self.correct, self.count = state["correct"], state["count"]

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


def _progress(batches: Iterable[Any], procs: Processes, desc: str, show: bool, total: int | None = None,
              initial: int = 0) -> tqdm:
    return tqdm(batches, desc=desc, disable=not (show and procs.is_main), leave=False, dynamic_ncols=True,
                total=total, initial=initial)


def _to_device(batch: Sequence[Any], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(t).to(device, non_blocking=True) for t in batch)


class _StopRequested(Exception):
    """A stop signal reached every process: the epoch ends at ``progress``."""

    def __init__(self, progress: EpochProgress, signum: int) -> None:
        super().__init__(signum)
        self.progress, self.signum = progress, signum


def _non_finite_flags(out: RegularizerOutput | None) -> torch.Tensor:
    """1 for each of the logits (``out`` None) and the loss parts of ``out`` that is NaN or infinite
    (in ``_CHECKED`` order), else 0."""
    if out is None:
        return torch.eye(len(_CHECKED))[0]
    values = [getattr(out, name) for name in _LOSS_PARTS]
    return torch.tensor([0.0] + [float(v is not None and not bool(torch.isfinite(v.detach()).all())) for v in values])


def _non_finite_gradients(model: nn.Module, scaler: torch.amp.GradScaler) -> bool:
    """Whether the (unscaled) gradients hold a NaN or inf that the step must not take.

    Under fp16 the scaler skips such a step and lowers its scale, which is normal while the scale
    settles; only a scale already down to 1 (gradients that overflow unscaled) counts.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf))):
        return False
    return not scaler.is_enabled() or scaler.get_scale() <= 1.0


def _agreed_signal(stop: StopSignals, procs: Processes) -> int | None:
    """The stop signal if any process received one (a collective: every process calls it)."""
    received = procs.sum(torch.tensor([float(stop.received == signum) for signum in STOP_SIGNALS]))
    return next((signum for signum, count in zip(STOP_SIGNALS, received.tolist()) if count), None)


def _non_finite_message(flags: torch.Tensor | None, config: TrainConfig, epoch: int, micro_batch: int,
                        history: list[dict[str, Any]]) -> str:
    """What is non-finite (``flags`` of :func:`_non_finite_flags`, None for the gradients), where,
    what was kept, and how to go on."""
    named = [] if flags is None else [name for name, bad in zip(_CHECKED, flags.tolist()) if bad]
    what = ("the gradients are" if flags is None else "the logits are" if named == ["logits"]
            else f"the loss ({', '.join(named)}) is")
    step = micro_batch // config.grad_accum + 1
    advice = f"Lower --lr (now {config.lr:g}) and run again (--overwrite)"
    if config.out is None or not history:
        return f"{what} NaN or infinite at epoch {epoch + 1}, step {step}: training stopped before that step. {advice}"
    last = Path(config.out) / LAST
    return (f"{what} NaN or infinite at epoch {epoch + 1}, step {step}: training stopped before that step ({last} "
            f"still holds epoch {len(history)}). {advice}, or start from those weights with --checkpoint {last} and "
            "a new --out (--resume would repeat the same steps)")


@contextlib.contextmanager
def _closing(batches: Iterator[Any]) -> Iterator[Iterator[Any]]:
    """``batches`` of a DataLoader, whose worker processes end with the block even when a traceback
    keeps the iterator: they ignore SIGTERM (see ``ignore_stop_signals``), so multiprocessing's exit
    could not end them."""
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # only iterators with workers have it
        if shutdown is not None:
            shutdown()


def _epoch_batches(loader: DataLoader, run: RunState, resumed: EpochProgress | None) -> Iterator[Any]:
    """The epoch's batches; after a stop inside it, from where it stopped.

    The data order's generator goes back to the epoch's start (the loader draws its workers'
    seeds from it), the done batches are drawn again (workers' random streams advance as they
    did) and dropped, then every RNG state returns to the stop.
    """
    if resumed is None:
        return iter(loader)
    run.loader_generator.set_state(resumed.loader_state)
    batches = iter(loader)
    for _ in range(resumed.step):
        next(batches)
    set_rng_state(resumed.rng, run.loader_generator)
    return batches


def _micro_batch(model: nn.Module, criterion: nn.Module, batch: Sequence[Any], weight: float, sync: bool,
                 run: RunState, config: TrainConfig, procs: Processes,
                 where: tuple[int, int]) -> tuple[RegularizerOutput, torch.Tensor, torch.Tensor]:
    """Forward and backward of one micro-batch, its loss weighted by ``weight`` (its share of the
    step's images); ``sync`` reduces the gradients under DDP. The processes agree on non-finite
    logits or losses first, and skip the backward together (``NonFiniteLossError``)."""
    images, masks, labels = _to_device(batch, procs.device)
    if run.swap is not None:
        images, masks = run.swap(images, masks)
    with contextlib.nullcontext() if sync or procs.world_size == 1 else model.no_sync():
        logits = _forward(model, criterion, images, config.amp)
        finite = bool(torch.isfinite(logits.detach()).all())
        out = _loss(criterion, logits, images, masks, labels) if finite else None
        flags = procs.sum(_non_finite_flags(out))
        if flags.any():
            raise NonFiniteLossError(_non_finite_message(flags, config, *where, run.history))
        run.scaler.scale(out.loss * weight).backward()
    return out, logits, labels


def _optimizer_step(model: nn.Module, run: RunState, config: TrainConfig, where: tuple[int, int]) -> None:
    """Take the step unless its gradients are non-finite (``NonFiniteLossError``; the fp16 scaler's skips aside)."""
    run.scaler.unscale_(run.optimizer)
    if _non_finite_gradients(model, run.scaler):  # equal on every process: DDP averaged them
        raise NonFiniteLossError(_non_finite_message(None, config, *where, run.history))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


def _train_epoch(
        model: nn.Module,
        criterion: nn.Module,
        loader: DataLoader,
        run: RunState,
        config: TrainConfig,
        procs: Processes,
        epoch: int,
        stop: StopSignals,
        start_accuracy: dict[str, float],
) -> dict[str, float]:
    """One pass over ``loader`` (from ``run.progress`` after a stop inside it): an optimiser step
    every ``grad_accum`` micro-batches, then the processes agree on a stop signal (``_StopRequested``).

    Each micro-batch's mean loss is weighted by its share of the step's images, so a short last
    step (fewer or smaller micro-batches) is the mean over its images, as a full one is.
    """
    model.train()
    resumed, run.progress = run.progress, None
    meter = _Meter()
    if resumed is not None:
        meter.load_state_dict(resumed.meter)
    first = resumed.step if resumed is not None else 0
    loader_state = resumed.loader_state if resumed is not None else run.loader_generator.get_state()
    step_images = loader.batch_size * config.grad_accum
    samples = len(loader.sampler)  # this process's images, equal on every process (the sampler pads)
    with _closing(_epoch_batches(loader, run, resumed)) as batches:
        bar = _progress(batches, procs, f"train {epoch + 1}/{config.epochs}", config.progress, total=len(loader),
                        initial=first)
        for step, batch in enumerate(bar, start=first):
            last_micro_batch = (step + 1) % config.grad_accum == 0 or step + 1 == len(loader)
            weight = len(batch[-1]) / min(step_images, samples - step // config.grad_accum * step_images)
            out, logits, labels = _micro_batch(model, criterion, batch, weight, last_micro_batch, run, config,
                                               procs, (epoch, step))
            meter.update(out, logits, labels)
            bar.set_postfix(loss=f"{float(out.loss.detach()):.4f}")
            if not last_micro_batch:
                continue
            _optimizer_step(model, run, config, (epoch, step))
            signum = _agreed_signal(stop, procs)
            if signum is not None:
                raise _StopRequested(EpochProgress(step + 1, loader_state, meter.state_dict(), start_accuracy),
                                     signum)
    return meter.result("train_", procs)


def _validate(model: nn.Module, criterion: nn.Module, val_set: Dataset, config: TrainConfig,
              procs: Processes, micro_batch: int, groups: RunGroups | None = None) -> dict[str, Any]:
    """Loss parts and accuracy over ``val_set``, sharded over the processes without padding, and
    with ``groups`` the accuracy by group (``train/groups.py``).

    Runs the bare model (never the DDP wrapper): relevance needs gradients, but no reduction.
    """
    model.eval()
    shard = Subset(val_set, range(procs.rank, len(val_set), procs.world_size))
    loader = DataLoader(shard, batch_size=micro_batch, shuffle=False, num_workers=config.workers,
                        pin_memory=procs.device.type == "cuda", worker_init_fn=ignore_stop_signals)
    meter = _Meter()
    rule = SELECTION_RULES[config.select]
    correct = {name: torch.zeros(1, dtype=torch.float64) for name, wanted in (
        ("val_background_only", rule.background_only), ("val_counterfactual", rule.counterfactual)) if wanted}
    # every image's prediction and label (plus one; zero where another process has the image)
    answers = torch.zeros(2, len(val_set), dtype=torch.long) if groups is not None else None
    done = 0
    with _closing(iter(loader)) as batches:
        for index, batch in enumerate(_progress(batches, procs, "validate", config.progress)):
            images, masks, labels = _to_device(batch, procs.device)
            logits = _forward(model, criterion, images, config.amp)
            out = _loss(criterion, logits, images, masks, labels)
            meter.update(out, logits, labels)
            if answers is not None:
                positions = torch.tensor(shard.indices[done:done + len(labels)])
                answers[:, positions] = torch.stack([logits.detach().argmax(dim=1), labels]).cpu() + 1
                done += len(labels)
            if rule.background_only:
                correct["val_background_only"] += _background_only_correct(model, images, masks, labels, config.amp)
            if rule.counterfactual:
                correct["val_counterfactual"] += _counterfactual_correct(model, images, masks, labels, config.amp,
                                                                         index)
    metrics = meter.result("val_", procs)
    count = procs.sum(torch.tensor([float(len(shard))], dtype=torch.float64)).clamp(min=1)
    metrics.update({name: float(procs.sum(total) / count) for name, total in correct.items()})
    if answers is not None:
        metrics.update(group_metrics(*(procs.sum(answers) - 1), groups))
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


def _start_accuracy(model: nn.Module, criterion: nn.Module, val_set: Dataset | None, run: RunState,
                    config: TrainConfig, procs: Processes, micro_batch: int) -> dict[str, float]:
    """The validation before the first epoch that a rule's accuracy limit is measured from
    (``val_start_*``; taken from the checkpoint when resuming); empty for other rules."""
    if not SELECTION_RULES[config.select].background_only:
        return {}
    if run.progress is not None:
        return run.progress.start_accuracy
    if run.history:
        return {k: v for k, v in run.history[0].items() if k.startswith("val_start_")}
    start = _validate(model, criterion, val_set, config, procs, micro_batch)
    return {f"val_start_{k[4:]}": v for k, v in start.items()}


def _interrupted_message(signum: int, where: str, out: Path) -> str:
    return (f"stopped by {signal.Signals(signum).name} {where}; {out / LAST} holds the run: continue it with "
            f"`relevance-finetune train --config {out / RESOLVED_CONFIG} --resume` (under torchrun, the same "
            "torchrun line), or TrainConfig.resume=True from Python")


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
        ``config.yaml``, ``metrics.jsonl``, ``last.safetensors`` and ``best.safetensors`` there
        (``best_before_head.safetensors`` with ``config.head_refit``, whose ``refit_stage`` follows),
        and ``config.resume`` continues the run saved there (``config.finetune`` is read by the
        command, which skips this function without it). Inside an initialised process group the
        model runs under DistributedDataParallel.

    Returns
    -------
    list of dict
        One record per epoch (the run's earlier epochs too when resuming): ``epoch``, ``lr``,
        ``train_*`` and ``val_*`` loss parts and accuracy, ``time_s``.
    Raises
    ------
    TrainingInterrupted
        SIGINT or SIGTERM arrived (handled only with ``config.out``): the run stopped after the
        step in progress and ``last.safetensors`` holds it, mid-epoch, for ``config.resume``.
    NonFiniteLossError
        A step's logits, loss or gradients were NaN or infinite; the step was not taken.
    FileExistsError
        ``config.out`` holds another run (neither ``resume`` nor ``overwrite``).
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
    groups = run_groups(train_set, val_set)
    if rule.groups:
        if groups is None:
            raise ValueError(f"select={config.select!r} needs validation data with group labels "
                             "(--data-format waterbirds or celeba); use another --select for data without groups")
        groups.check_validation()
    if out is not None:
        check_out(out, config)
    seed_everything(config.seed + procs.rank)
    if config.deterministic:
        use_deterministic_kernels()
    model.to(procs.device)
    with build_criterion(model, config) as criterion, StopSignals(enabled=out is not None) as stop:
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
        resumed = config.resume and resume(out, model, run, config, procs)
        if out is not None and procs.is_main:
            start_outputs(out, config, run.history, fresh=not resumed)
        sampler = DistributedSampler(train_set, num_replicas=procs.world_size, rank=procs.rank,
                                     shuffle=True, seed=config.seed)
        loader = DataLoader(train_set, batch_size=micro_batch, sampler=sampler, num_workers=config.workers,
                            generator=run.loader_generator, pin_memory=procs.device.type == "cuda",
                            worker_init_fn=ignore_stop_signals)
        start_accuracy = _start_accuracy(model, criterion, val_set, run, config, procs, micro_batch)
        for epoch in range(len(run.history), config.epochs):
            start = time.perf_counter()
            sampler.set_epoch(epoch)
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **start_accuracy}
            try:
                record.update(_train_epoch(train_model, criterion, loader, run, config, procs, epoch, stop,
                                           start_accuracy))
            except _StopRequested as request:
                write_progress(out, model, config, run, procs, request.progress)
                steps = math.ceil(len(loader) / config.grad_accum)
                done = math.ceil(request.progress.step / config.grad_accum)
                raise TrainingInterrupted(_interrupted_message(request.signum, f"at epoch {epoch + 1}, step "
                                                               f"{done} of {steps}", out), request.signum) from None
            if val_set is not None:
                record.update(_validate(model, criterion, val_set, config, procs, micro_batch, groups))
            run.scheduler.step()
            record["time_s"] = round(time.perf_counter() - start, 3)
            run.history.append(record)
            if procs.is_main:
                _log.info("epoch %d/%d: %s", epoch + 1, config.epochs,
                          ", ".join(f"{k}={v:.4g}" for k, v in record.items()
                                    if k != "epoch" and isinstance(v, (int, float))))
                if "val_groups" in record:
                    _log.info("epoch %d/%d: %s", epoch + 1, config.epochs, group_summary(record))
            if out is not None:
                write_epoch(out, model, config, run, procs)
            signum = _agreed_signal(stop, procs) if epoch + 1 < config.epochs else None
            if signum is not None:
                raise TrainingInterrupted(_interrupted_message(signum, f"after epoch {epoch + 1}", out), signum)
    if out is not None and procs.is_main:
        _log.info(run_summary(out, run.history, config))
    return run.history

