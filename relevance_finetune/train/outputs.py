"""The run directory and what an epoch's checkpoint holds: exact resume.

``config.yaml`` (the resolved settings), ``metrics.jsonl`` (one line per epoch), ``last.safetensors``
(weights and trainer state) and ``best.safetensors`` (by the selection rule), in the format of
:mod:`relevance_finetune.checkpoint`.
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
from .selection import newest_is_best

__all__ = ["BEST", "LAST", "METRICS", "RESOLVED_CONFIG", "RunState", "resume", "start_outputs", "write_epoch"]

LAST, BEST = "last.safetensors", "best.safetensors"
METRICS, RESOLVED_CONFIG = "metrics.jsonl", "config.yaml"


@dataclass
class RunState:
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

    def restore(self, state: dict[str, Any], history: list[dict[str, Any]], procs: Processes) -> None:
        """Load a checkpoint's trainer state and history; this process's RNG states if the process count matches."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history[:] = history
        if len(state["rng"]) == procs.world_size:
            set_rng_state(state["rng"][procs.rank], self.loader_generator)
        else:
            warnings.warn(f"the checkpoint was written by {len(state['rng'])} process(es), this run has "
                          f"{procs.world_size}: random streams restart from the seed, so the resumed run "
                          "will not repeat an uninterrupted one exactly")


def _checkpoint_info(model: nn.Module, config: TrainConfig, history: list[dict[str, Any]]) -> dict[str, Any]:
    return {"epoch": len(history), "architecture": _architecture(model), "model": model_spec(model),
            "config": dataclasses.asdict(config), "history": history, "library_version": __version__}


def _architecture(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def resume(out: Path, model: nn.Module, run: RunState, config: TrainConfig, procs: Processes) -> None:
    """Load ``out/last.safetensors`` into the model and ``run``; warn and start afresh if absent."""
    if not (out / LAST).is_file():
        warnings.warn(f"--resume: {out / LAST} does not exist; starting a new run")
        return
    model_state, info, trainer_state = load_checkpoint(out / LAST)
    changed = {k: (v, getattr(config, k, None)) for k, v in info["config"].items()
               if k not in RESUMABLE_CHANGES and getattr(config, k, None) != v}
    if changed:
        details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise ValueError(f"cannot resume {out}: settings differ from its checkpoint ({details}); "
                         f"only {sorted(RESUMABLE_CHANGES)} may change")
    model.load_state_dict(model_state)
    run.restore(trainer_state, info["history"], procs)


def write_epoch(out: Path, model: nn.Module, config: TrainConfig, run: RunState, procs: Processes) -> None:
    """Checkpoint ``last`` (and ``best`` if validation improved) and append the metrics line."""
    rng = procs.all_gather(rng_state(run.loader_generator))  # collective: every process takes part
    if not procs.is_main:
        return
    info = _checkpoint_info(model, config, run.history)
    if newest_is_best(run.history, config):
        save_checkpoint(out / BEST, model, info)  # before last: a resumed epoch rewrites it
    save_checkpoint(out / LAST, model, info, run.trainer_state(rng))
    with (out / METRICS).open("a") as f:
        f.write(json.dumps(run.history[-1]) + "\n")


def start_outputs(out: Path, config: TrainConfig, history: list[dict[str, Any]]) -> None:
    """Write the resolved config, and a metrics file holding exactly the checkpoint's history."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / RESOLVED_CONFIG) as tmp:
        tmp.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    with atomic_path(out / METRICS) as tmp:
        tmp.write_text("".join(json.dumps(record) + "\n" for record in history))

