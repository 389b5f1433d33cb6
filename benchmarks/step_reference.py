"""The paper's reference GAE algorithm, re-implemented from its description (docs: reference-facts
section 1), as the baseline of the step-time benchmark."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from torch import nn

from step_workload import Phase, Workload, no_phase


class ReferenceGAE:
    """GAE as the paper's code computes it: per-block ``autograd.grad`` and an N x N rollout.

    Use as a context manager: it switches the timm ``Attention`` modules to the explicit path
    and records their post-softmax maps during :meth:`forward`. CLS readout (the paper's models).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = [m for m in model.modules() if isinstance(m, Attention)]
        self.maps: list[torch.Tensor] = []
        self._recording = False
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> "ReferenceGAE":
        for module in self.modules:
            self._undo.append(lambda m=module, flag=module.fused_attn: setattr(m, "fused_attn", flag))
            module.fused_attn = False
            self._undo.append(module.attn_drop.register_forward_hook(self._record).remove)
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._recording:
            self.maps.append(args[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """A forward whose attention maps are kept for :meth:`relevance`."""
        self.maps, self._recording = [], True
        try:
            return self.model(images)
        finally:
            self._recording = False

    def relevance(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Raw relevance (B, gh, gw) of ``target``: CLS row of the rollout, patch columns."""
        score = logits[torch.arange(logits.shape[0]), target].sum()
        batch, tokens = logits.shape[0], self.maps[0].shape[-1]
        rollout = torch.eye(tokens, device=logits.device).repeat(batch, 1, 1)
        for attn in self.maps:
            grad = torch.autograd.grad(score, attn, retain_graph=True)[0]
            cam = (grad * attn).clamp(min=0).mean(dim=1)
            rollout = rollout + torch.bmm(cam, rollout)
        gh, gw = self.model.patch_embed.grid_size
        return rollout[:, 0, self.model.num_prefix_tokens:].reshape(batch, gh, gw)


def reference_heatmap(relevance: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling to ``size`` and per-image min-max (an epsilon guards constant maps)."""
    heat = F.interpolate(relevance[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    low = heat.amin(dim=(1, 2), keepdim=True)
    high = heat.amax(dim=(1, 2), keepdim=True)
    return (heat - low) / (high - low + 1e-8)


def reference_loss(ref: ReferenceGAE, work: Workload, phase: Phase) -> torch.Tensor:
    """The paper's loss the reference way: relevance forward, then a second forward for L_cls."""
    with phase("forward"):
        logits = ref.forward(work.images)
    with phase("relevance"):
        relevance = ref.relevance(logits, work.labels)
    heat = reference_heatmap(relevance, tuple(work.masks.shape[-2:]))
    background = F.mse_loss(heat * (1 - work.masks), torch.zeros_like(heat))
    foreground = F.mse_loss(heat * work.masks, work.masks)
    with phase("second forward"):
        logits = work.model(work.images)
    classification = F.cross_entropy(logits, logits.argmax(dim=1))
    return 0.8 * (2.0 * background + 0.3 * foreground) + 0.2 * classification


def reference_explain(ref: ReferenceGAE, images: torch.Tensor, phase: Phase = no_phase) -> torch.Tensor:
    """The reference explanation of the predicted class: (B, H, W) in [0, 1]."""
    with torch.enable_grad():
        with phase("forward"):
            logits = ref.forward(images)
        with phase("relevance"):
            relevance = ref.relevance(logits, logits.argmax(dim=1)).detach()
    return reference_heatmap(relevance, tuple(images.shape[-2:]))
