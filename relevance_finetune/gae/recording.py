"""Recording the attention calls of a model's forwards: what GAE needs from each block.

On the explicit path a block records its post-softmax map (B, heads, N, N), read at the input of
its family's ``map_source``; on the fused path the :class:`~relevance_finetune.gae.fused.SDPACall` of its
SDPA (q, k, v, bias, output). ``attention="auto"`` picks the path at the start of each forward.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from timm.layers import PatchEmbed
from torch import nn

from .fused import SDPACall, SDPACapture
from .families import AttentionFamily

__all__ = ["AUTO_FUSED_TOKENS", "AttentionRecorder", "check_input_size", "patch_multiples"]

# attention="auto" runs fused from this many tokens on (CLS and prefix tokens included); below
# it the explicit path is as small and faster. Measured in docs/performance.md.
AUTO_FUSED_TOKENS = 512

Record = torch.Tensor | SDPACall


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def patch_multiples(size: tuple[int, int], patch: tuple[int, int]) -> str:
    """The sizes nearest ``size`` that ``patch`` divides, e.g. ``'24x24 or 32x32'``."""
    below = tuple(max(p, s // p * p) for s, p in zip(size, patch))
    above = tuple(b + p if b < s else b for b, s, p in zip(below, size, patch))
    return " or ".join(dict.fromkeys(f"{h}x{w}" for h, w in (below, above)))


def check_input_size(patch_embed: nn.Module, size: tuple[int, int]) -> None:
    """Refuse, as a ValueError, an image size that timm's ``PatchEmbed`` would assert on, or whose
    patch grid would leave pixels out (a size that is not a multiple of the patch size: the
    relevance map is stretched over every pixel, so maps and masks would no longer line up)."""
    if not isinstance(patch_embed, PatchEmbed) or patch_embed.img_size is None:
        return
    model_size, patch = tuple(patch_embed.img_size), tuple(patch_embed.patch_size)
    if patch_embed.strict_img_size and size != model_size:
        raise ValueError(f"images of {size[0]}x{size[1]} do not match the model's input size "
                         f"{model_size[0]}x{model_size[1]}: resize them, or create the model with "
                         "dynamic_img_size=True")
    if not patch_embed.dynamic_img_pad and (size[0] % patch[0] or size[1] % patch[1]):
        covered = f"{size[0] // patch[0] * patch[0]}x{size[1] // patch[1] * patch[1]}"
        remedy = ("build the model for one of them (img_size=, --img-size)" if patch_embed.strict_img_size else
                  "crop or resize them, or create the model with dynamic_img_pad=True")
        raise ValueError(f"images of {size[0]}x{size[1]} are not a multiple of the patch size "
                         f"{patch[0]}x{patch[1]} (its patch grid would cover {covered} of them): use "
                         f"{patch_multiples(size, patch)}; {remedy}")


class AttentionRecorder:
    """Hooks on ``modules`` (attention modules of ``model`` with their families) that keep, per
    block, what the latest forward computed; :meth:`remove` undoes them and the path switches."""

    def __init__(self, model: nn.Module, modules: list[tuple[nn.Module, AttentionFamily]], attention: str,
                 second_order: bool) -> None:
        self.model = model
        self.modules = modules
        self.attention = attention
        self.second_order = second_order
        self.input_size: tuple[int, int] | None = None
        self.removed = False
        self._records: list[Record | None] = [None] * len(modules)
        self._previous_flags = [family.use_fused(module) if attention == "fused" else family.use_explicit(module)
                                for module, family in modules]
        self._hooks = [model.patch_embed.register_forward_pre_hook(self._on_forward_start)]
        for index, (module, family) in enumerate(modules):
            self._hooks.append(family.map_source(module).register_forward_hook(self._map_recorder(index)))
            if attention != "explicit":
                self._hooks += self._sdpa_hooks(module, index)

    @property
    def records(self) -> list[Record]:
        """What the latest forward recorded per block, first block first."""
        if self.removed:
            raise RuntimeError(
                "this GAE handle was removed (gae.remove() or the end of its `with` block) and records "
                "nothing: attach_gae(model) again, and use the new handle (e.g. in a new RelevanceRegularizer)")
        if self.input_size is None or any(r is None for r in self._records):
            raise RuntimeError(
                "no complete forward has been recorded: call the model on a batch of images "
                "(with gradients enabled) after attach_gae and before computing relevance")
        return list(self._records)

    def grid_size(self) -> tuple[int, int]:
        """Patch grid (gh, gw) of the latest forward, from the model and the input size."""
        patch_embed = self.model.patch_embed
        if self.input_size is not None and hasattr(patch_embed, "dynamic_feat_size"):
            return tuple(patch_embed.dynamic_feat_size(self.input_size))
        return tuple(patch_embed.grid_size)

    @contextlib.contextmanager
    def kept(self) -> Iterator[None]:
        """Forwards inside the block leave the records of the forward before it in place on exit."""
        saved = (self._records, self.input_size)
        try:
            yield
        finally:
            self._records, self.input_size = saved

    def remove(self) -> None:
        """Remove the hooks and restore the fused attention flags. Idempotent."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for (module, family), flag in zip(self.modules, self._previous_flags):
            family.restore(module, flag)
        self._records = [None] * len(self.modules)
        self.removed = True

    def _on_forward_start(self, module: nn.Module, args: tuple) -> None:
        if _in_backward():  # a checkpointed patch_embed re-run: keep the first forward's maps
            return
        check_input_size(module, tuple(args[0].shape[-2:]))
        self._records = [None] * len(self.modules)
        self.input_size = tuple(args[0].shape[-2:])
        if self.attention == "auto":
            fused = self._auto_fused()
            for module, family in self.modules:
                (family.use_fused if fused else family.use_explicit)(module)

    def _auto_fused(self) -> bool:
        """Fused for long sequences, unless second order or active attention dropout need maps."""
        gh, gw = self.grid_size()
        tokens = gh * gw + int(getattr(self.model, "num_prefix_tokens", 0))
        dropout = self.model.training and any(family.map_source(module).p > 0 for module, family in self.modules)
        return tokens >= AUTO_FUSED_TOKENS and not (self.second_order or dropout)

    def _record(self, index: int, value: Record) -> None:
        # Re-runs in backward (gradient checkpointing) and repeats are ignored.
        if self._records[index] is None and not _in_backward():
            self._records[index] = value

    def _map_recorder(self, index: int):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._record(index, args[0])
        return record

    def _sdpa_hooks(self, module: nn.Module, index: int) -> list:
        """Hooks that record the module's SDPA call while its forward runs."""
        captures: list[SDPACapture] = []

        def enter(module: nn.Module, args: tuple) -> None:
            captures.append(SDPACapture(lambda call: self._record(index, call)))
            captures[-1].__enter__()

        def leave(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            captures.pop().__exit__(None, None, None)

        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]
