"""The run directory and what an epoch's checkpoint holds: exact resume.

``config.yaml`` (the resolved settings), ``metrics.jsonl`` (one line per epoch), ``last.safetensors``
(weights and trainer state) and ``best.safetensors`` (by the selection rule), in the format of
:mod:`relevance_finetune.checkpoint`. A run that refits the head after its finetune keeps the
finetune's best as ``best_before_head.safetensors`` and writes the refit model as ``best.safetensors``
(and a head refit alone as ``last.safetensors`` too), with one more ``metrics.jsonl`` line.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .._files import atomic_path
from .._version import __version__
from ..augment import BackgroundSwap
from ..checkpoint import load_checkpoint, save_checkpoint
from ..models import model_spec
from .config import RESUMABLE_CHANGES, TrainConfig
from .distributed import Processes
from .randomness import rng_state, set_rng_state
from .selection import SELECTION_RULES, best_epoch, newest_is_best

__all__ = ["BEST", "BEST_BEFORE_HEAD", "CHECKPOINTS", "LAST", "METRICS", "RESOLVED_CONFIG", "RUN_FILES",
           "EpochProgress", "RunState", "check_out", "check_resumable", "checkpoint_info", "files_written",
           "finetune_best", "resume", "run_summary", "start_outputs", "write_epoch", "write_head_refit",
           "write_progress"]

LAST, BEST, BEST_BEFORE_HEAD = "last.safetensors", "best.safetensors", "best_before_head.safetensors"
METRICS, RESOLVED_CONFIG = "metrics.jsonl", "config.yaml"
CHECKPOINTS = (LAST, BEST_BEFORE_HEAD, BEST)
RUN_FILES = (RESOLVED_CONFIG, METRICS, *CHECKPOINTS)


def finetune_best(config: TrainConfig) -> str:
    """The file of the finetune's best epoch: ``best_before_head.safetensors`` when the head refit
    follows (its result is ``best.safetensors``), else ``best.safetensors``."""
    return BEST_BEFORE_HEAD if config.head_refit else BEST


@dataclass
class EpochProgress:
    """Where this process stopped inside an epoch: what resuming there needs.

    ``step`` micro-batches are done; ``loader_state`` is the data order's generator as the epoch
    began (the loader draws its workers' seeds from it); ``meter`` the epoch's running sums;
    ``rng`` this process's RNG states at the stop (set when read from a checkpoint).
    """

    step: int
    loader_state: torch.Tensor
    meter: dict[str, Any]
    start_accuracy: dict[str, float]
    rng: dict[str, Any] | None = None


@dataclass
class RunState:
    """What a checkpoint holds besides the weights."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loader_generator: torch.Generator
    history: list[dict[str, Any]]
    swap: BackgroundSwap | None = None  # mask-guided counterfactual images (generator and buffer: resumable)
    progress: EpochProgress | None = None  # set by a resume inside an epoch, until the loop takes it

    def process_state(self) -> dict[str, Any]:
        """This process's streams: its RNG states and the background swap's buffer."""
        return {"rng": rng_state(self.loader_generator),
                "swap": None if self.swap is None else self.swap.state_dict()}

    def trainer_state(self, processes: list[dict[str, Any]]) -> dict[str, Any]:
        """Optimiser, schedule and grad-scaler state, with every process's :meth:`process_state`."""
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng": [p["rng"] for p in processes]}
        if self.swap is not None:
            state["swap"] = [p["swap"] for p in processes]
        return state

    def restore(self, state: dict[str, Any], history: list[dict[str, Any]], procs: Processes) -> None:
        """Load a checkpoint's trainer state and history; this process's streams if the process count matches."""
        progress = state.get("progress")
        if progress is not None and len(progress["processes"]) != procs.world_size:
            raise ValueError(f"the checkpoint stopped inside an epoch with {len(progress['processes'])} "
                             f"process(es), this run has {procs.world_size}: resume it with as many")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history[:] = history
        if len(state["rng"]) != procs.world_size:
            warnings.warn(f"the checkpoint was written by {len(state['rng'])} process(es), this run has "
                          f"{procs.world_size}: random streams restart from the seed, so the resumed run "
                          "will not repeat an uninterrupted one exactly")
            return
        set_rng_state(state["rng"][procs.rank], self.loader_generator)
        if self.swap is not None and state.get("swap") is not None:
            self.swap.load_state_dict(state["swap"][procs.rank])
        if progress is not None:
            mine = progress["processes"][procs.rank]
            self.progress = EpochProgress(progress["step"], mine["loader_state"], mine["meter"],
                                          progress["start_accuracy"], rng=state["rng"][procs.rank])


def checkpoint_info(model: nn.Module, config: TrainConfig, history: list[dict[str, Any]]) -> dict[str, Any]:
    """A checkpoint's JSON ``info``: the epoch, the model (architecture and spec), the settings, the history."""
    return {"epoch": len(history), "architecture": _architecture(model), "model": model_spec(model),
            "config": dataclasses.asdict(config), "history": history, "library_version": __version__}


def _architecture(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def check_out(out: Path, config: TrainConfig) -> None:
    """Refuse to start a new run in a directory that holds another one (unless ``config.overwrite``)."""
    if config.resume or config.overwrite:
        return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not _same_run_without_epochs(out, config):
        raise FileExistsError(f"{out} already holds a run ({', '.join(found)}): pass --resume (TrainConfig.resume) "
                              "to continue it, --overwrite to replace it, or choose another output directory")


def _same_run_without_epochs(out: Path, config: TrainConfig) -> bool:
    """Whether ``out`` holds only the ``config.yaml`` of ``config``'s settings and an empty metrics
    file: the same run, stopped before it finished an epoch."""
    if any((out / name).exists() for name in CHECKPOINTS) or not (out / RESOLVED_CONFIG).is_file():
        return False
    if (out / METRICS).is_file() and (out / METRICS).stat().st_size:
        return False
    try:
        recorded = yaml.safe_load((out / RESOLVED_CONFIG).read_text())
    except yaml.YAMLError:
        return False
    return isinstance(recorded, dict) and all(
        recorded.get(k) == v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES)


def resume(out: Path, model: nn.Module, run: RunState, config: TrainConfig, procs: Processes) -> bool:
    """Load ``out/last.safetensors`` into the model and ``run``; warn, start afresh and return False if absent."""
    if not (out / LAST).is_file():
        warnings.warn(f"--resume: {out / LAST} does not exist; starting a new run")
        return False
    model_state, info, trainer_state = load_checkpoint(out / LAST)
    check_resumable(out, info, config)
    model.load_state_dict(model_state)
    run.restore(trainer_state, info["history"], procs)
    return True


def check_resumable(out: Path, info: dict[str, Any], config: TrainConfig) -> None:
    """Refuse to resume the run of checkpoint ``info`` with settings that change its result."""
    changed = {k: (v, getattr(config, k, None)) for k, v in info["config"].items()
               if k not in RESUMABLE_CHANGES and getattr(config, k, None) != v}
    if changed:
        details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise ValueError(f"cannot resume {out}: settings differ from its checkpoint ({details}); "
                         f"only {sorted(RESUMABLE_CHANGES)} may change")


def write_epoch(out: Path, model: nn.Module, config: TrainConfig, run: RunState, procs: Processes) -> None:
    """Checkpoint ``last`` (and ``best`` if validation improved) and append the metrics line."""
    processes = procs.all_gather(run.process_state())  # collective: every process takes part
    if not procs.is_main:
        return
    info = checkpoint_info(model, config, run.history)
    if newest_is_best(run.history, config):
        save_checkpoint(out / finetune_best(config), model, info)  # before last: a resumed epoch rewrites it
    save_checkpoint(out / LAST, model, info, run.trainer_state(processes))
    with (out / METRICS).open("a") as f:
        f.write(json.dumps(run.history[-1]) + "\n")


def write_progress(out: Path, model: nn.Module, config: TrainConfig, run: RunState, procs: Processes,
                   progress: EpochProgress) -> None:
    """Checkpoint ``last`` inside an epoch, at ``progress`` (every process's; ``best`` and metrics stay)."""
    mine = {**run.process_state(), "loader_state": progress.loader_state, "meter": progress.meter}
    processes = procs.all_gather(mine)  # collective
    if not procs.is_main:
        return
    state = run.trainer_state(processes)
    state["progress"] = {"step": progress.step, "start_accuracy": progress.start_accuracy,
                         "processes": [{k: p[k] for k in ("loader_state", "meter")} for p in processes]}
    save_checkpoint(out / LAST, model, checkpoint_info(model, config, run.history), state)


def start_outputs(out: Path, config: TrainConfig, history: list[dict[str, Any]], fresh: bool) -> None:
    """Write the resolved config, and a metrics file holding exactly the checkpoint's history;
    a ``fresh`` run (no checkpoint resumed) removes the checkpoints of the run it replaces."""
    out.mkdir(parents=True, exist_ok=True)
    if fresh:
        for name in CHECKPOINTS:
            (out / name).unlink(missing_ok=True)
    with atomic_path(out / RESOLVED_CONFIG) as tmp:
        tmp.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    with atomic_path(out / METRICS) as tmp:
        tmp.write_text("".join(json.dumps(record) + "\n" for record in history))


def run_summary(out: Path, history: list[dict[str, Any]], config: TrainConfig) -> str:
    """One line: which epoch ``best`` holds and by which rule (or why there is none), and the files."""
    rule = f"--select {config.select}: {SELECTION_RULES[config.select].summary}"
    chosen, name = best_epoch(history, config), finetune_best(config)
    if chosen is not None:
        best = f"{name} holds epoch {chosen} of {len(history)} ({rule})"
    elif not any("val_loss" in record for record in history):
        best = f"no {name}: no validation data (--val-data or --val-fraction)"
    else:
        best = f"no {name}: no epoch met the rule ({rule})"
    return f"{best}; {files_written(out)}"


def files_written(out: Path) -> str:
    """``wrote config.yaml, ... in OUT``: the run's files that exist."""
    return f"wrote {', '.join(name for name in RUN_FILES if (out / name).is_file())} in {out}"


def write_head_refit(out: Path, model: nn.Module, info: dict[str, Any], record: dict[str, Any],
                     head_only: bool) -> None:
    """Write the refit model as ``best`` (and as ``last`` for a refit without finetune, which has
    no trainer state to resume) and append ``record`` to the metrics."""
    save_checkpoint(out / BEST, model, info)
    if head_only:
        save_checkpoint(out / LAST, model, info)
    with (out / METRICS).open("a") as f:
        f.write(json.dumps(record) + "\n")
