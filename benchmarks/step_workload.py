"""The measured setting of the step-time benchmark: a configuration and its model, optimiser, batch."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import timm
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

MODELS = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224")
# the fused attention kernels a GPU run may use (no math fallback, which builds the N x N map)
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

Phase = Callable[[str], ContextManager]


def no_phase(name: str) -> ContextManager:
    """The phase marker of a plain timed step: does nothing."""
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Config:
    """One measured setting; ``model_kwargs`` go to ``timm.create_model`` (tests use tiny models)."""

    model: str = "vit_small_patch16_224"
    batch: int = 8
    img_size: int = 224
    depth: int | None = None
    device: str = "cpu"
    dtype: str = "fp32"  # "fp32" or "bf16" (autocast)
    steps: int = 5
    warmup: int = 2
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads; None: torch's default
    chunk_elements: int | None = None  # attention="fused": GAEHandle.chunk_elements; None: automatic
    model_kwargs: dict = field(default_factory=dict)


@dataclass
class Workload:
    """A model in training mode with its optimiser and one fixed batch of images, masks, labels."""

    config: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    images: torch.Tensor  # (B, 3, H, W)
    masks: torch.Tensor  # (B, H, W) in {0, 1}
    labels: torch.Tensor  # (B,)

    def autocast(self) -> ContextManager:
        """bf16 autocast when configured; on CUDA, SDPA limited to its flash and efficient kernels."""
        device_type = torch.device(self.config.device).type
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.config.dtype == "bf16"))
        if device_type == "cuda":
            stack.enter_context(sdpa_kernel(CUDA_SDPA_BACKENDS))
        return stack

    def update(self, loss: torch.Tensor, phase: Phase) -> None:
        """Backward, optimiser step, zero grads: the part every training step shares."""
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def make_workload(config: Config) -> Workload:
    """Random-weight model (``pretrained=False``), AdamW as in the paper, a random batch."""
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    kwargs = dict(img_size=config.img_size, **config.model_kwargs)
    if config.depth is not None:
        kwargs["depth"] = config.depth
    model = timm.create_model(config.model, pretrained=False, **kwargs).to(config.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=1e-4)
    size = model.patch_embed.img_size
    images = torch.randn(config.batch, 3, *size, device=config.device)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1]), indexing="ij")
    masks = (yy.square() + xx.square() < 0.5).float().expand(config.batch, -1, -1).to(config.device)
    labels = torch.randint(0, model.num_classes, (config.batch,), device=config.device)
    return Workload(config, model, optimizer, images, masks, labels)
