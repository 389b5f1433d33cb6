"""The run's processes under torchrun: rank and device, collectives, the per-process batch."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import TrainConfig

__all__ = ["Processes", "check_ddp_objective", "init_distributed", "micro_batch_size"]


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: rank, number of processes, device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls, device: str | None) -> Processes:
        """This process, on ``device`` (default: ``cuda:LOCAL_RANK`` if available, else cpu)."""
        distributed = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if distributed else 0
        world_size = dist.get_world_size() if distributed else 1
        if device is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        return cls(rank, world_size, torch.device(device))

    def all_gather(self, value: Any) -> list[Any]:
        """``value`` of every process, by rank (a collective: every process must call it)."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes, on the CPU (a collective)."""
        if self.world_size > 1:
            backend_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            values = values.to(backend_device)
            dist.all_reduce(values)
        return values.cpu()


def micro_batch_size(config: TrainConfig, world_size: int) -> int:
    """The images of one process's forward: the global batch over processes and accumulation steps."""
    parts = world_size * config.grad_accum
    if config.batch_size % parts:
        raise ValueError(f"batch_size {config.batch_size} must divide evenly over {world_size} process(es) x "
                         f"{config.grad_accum} accumulation step(s)")
    return config.batch_size // parts


def check_ddp_objective(config: TrainConfig) -> None:
    """Refuse an objective that leaves the classifier without a gradient (DDP needs one for every parameter)."""
    if config.lambda_classification == 0 or (config.method == "ours" and config.classification == "off"):
        raise ValueError(
            "DistributedDataParallel needs a gradient for every parameter, but without the classification "
            "term the head gets none: keep lambda_classification > 0 (and classification != 'off') "
            "or train in one process")


def init_distributed() -> bool:
    """Join the process group that torchrun describes in the environment; False when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", 1)) < 2 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True

