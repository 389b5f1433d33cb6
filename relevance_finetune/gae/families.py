"""What ``attach_gae`` supports: one adapter per family of timm attention modules, and the readouts.

A family knows where its modules hand the post-softmax map on (``map_source``) and how to switch
an instance between its explicit softmax path and fused SDPA. ``find_attention`` picks the family
of each module by ``isinstance``; ``readout_pool`` refuses models whose classifier GAE cannot follow.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from torch import nn

__all__ = ["ATTENTION_FAMILIES", "AttentionFamily", "UnsupportedModelError", "explicit_attention", "find_attention",
           "readout_pool"]

# Attention modules whose maps GAE cannot read as token-to-token rows of one sequence.
_UNSUPPORTED_ATTENTION = (
    "WindowAttention",      # Swin: windows, no class token
    "XCA",                  # XCiT: channel attention
    "ClassAttn",            # CaiT: class attention
    "TalkingHeadAttn",      # CaiT: mixes heads after softmax
    "AttentionPoolLatent",  # 'map' pooling head
)
_SUPPORTED_POOLS = ("token", "avg")
# Models refused whatever their attention, and why (docs/integrations.md#naflexvit).
_UNSUPPORTED_MODELS = {
    "NaFlexVit": "a NaFlex batch holds images of different sizes and aspect ratios as patch sequences padded "
                 "to one length (patch_coord, patch_valid), so each image has its own relevance grid and the "
                 "loss would need per-image masks on that grid with the padding left out; finetune a "
                 "fixed-grid timm ViT instead (vit_*, with --img-size or dynamic_img_size=True)",
}


class UnsupportedModelError(TypeError):
    """The model has no attention that ``attach_gae`` can instrument."""


@dataclass(frozen=True)
class AttentionFamily:
    """One family of timm attention modules and how to read its post-softmax map.

    The families listed in ``ATTENTION_FAMILIES`` all compute ``softmax(q k^T + bias)`` on an
    explicit path that feeds the probabilities to ``attn_drop``, and choose the fused (SDPA)
    path by the instance flag ``fused_attn``. A family that differs overrides the methods.
    """

    name: str
    module_path: str  # "package.module:ClassName"

    def module_type(self) -> type | None:
        module_name, class_name = self.module_path.split(":")
        try:
            module = __import__(module_name, fromlist=[class_name])
        except ImportError:
            return None
        return getattr(module, class_name, None)

    def matches(self, module: nn.Module) -> bool:
        module_type = self.module_type()
        return module_type is not None and isinstance(module, module_type)

    def map_source(self, module: nn.Module) -> nn.Module:
        """The submodule whose input is the post-softmax attention (B, heads, N, N)."""
        if not hasattr(module, "attn_drop") or not hasattr(module, "fused_attn"):
            raise UnsupportedModelError(
                f"{type(module).__name__} has no `attn_drop`/`fused_attn`: this timm version's "
                f"{self.name} attention is not supported")
        return module.attn_drop

    def use_explicit(self, module: nn.Module) -> bool:
        """Switch the instance to the explicit softmax path; returns the previous flag."""
        previous = bool(module.fused_attn)
        module.fused_attn = False
        return previous

    def use_fused(self, module: nn.Module) -> bool:
        """Switch the instance to the fused (SDPA) path; returns the previous flag."""
        previous = bool(module.fused_attn)
        module.fused_attn = True
        return previous

    def restore(self, module: nn.Module, previous: bool) -> None:
        module.fused_attn = previous


ATTENTION_FAMILIES: tuple[AttentionFamily, ...] = (
    AttentionFamily("ViT, AugReg, DeiT, DeiT3, register and CLIP ViTs", "timm.layers.attention:Attention"),
    AttentionFamily("BEiT, relative position bias", "timm.models.beit:Attention"),
    AttentionFamily("EVA-02 and vit_*_rope_reg*_gap, RoPE", "timm.models.eva:EvaAttention"),
    AttentionFamily("vit_*_rope_* ViTs, RoPE", "timm.layers.attention:AttentionRope"),
)


def _supported_names() -> str:
    return "; ".join(f"{family.module_path.replace(':', '.')} ({family.name})" for family in ATTENTION_FAMILIES)


def _attention_like(model: nn.Module) -> str:
    """The attention-looking modules of ``model`` (by class name), each class once with its first path."""
    first: dict[type, str] = {}
    for name, module in model.named_modules():
        if any(word in type(module).__name__ for word in ("Attention", "Attn")):
            first.setdefault(type(module), name)
    found = ", ".join(f"{kind.__module__}.{kind.__name__} at {name}" for kind, name in first.items())
    return f"found {found}" if found else "found no module named like an attention"


def find_attention(model: nn.Module) -> list[tuple[nn.Module, AttentionFamily]]:
    """Every supported attention module of ``model`` with its family, first block first."""
    found = []
    for name, module in model.named_modules():
        if type(module).__name__ in _UNSUPPORTED_ATTENTION:
            raise UnsupportedModelError(
                f"{type(model).__name__} uses {type(module).__name__} ({name}), which GAE "
                f"relevance does not support. Supported: {_supported_names()}.")
        family = next((f for f in ATTENTION_FAMILIES if f.matches(module)), None)
        if family is not None:
            found.append((module, family))
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no attention module that GAE relevance supports "
            f"({_attention_like(model)}). Supported: {_supported_names()}.")
    return found


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Run every supported attention module of ``model`` on the explicit softmax path.

    Needed by anything that takes a double backward through attention (second-order GAE,
    GradMask, RRR): SDPA has no double backward. The fused flags are restored on exit.
    """
    modules = find_attention(model)
    previous = [family.use_explicit(module) for module, family in modules]
    try:
        yield model
    finally:
        for (module, family), flag in zip(modules, previous):
            family.restore(module, flag)


def readout_pool(model: nn.Module) -> str:
    """The token pooling ``model``'s classifier reads (``'token'`` or ``'avg'``); refuses models GAE cannot follow."""
    reason = _UNSUPPORTED_MODELS.get(type(model).__name__)
    if reason is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported: {reason}. Supported attention: {_supported_names()}.")
    if not hasattr(model, "patch_embed"):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `patch_embed`: attach_gae supports timm vision "
            f"transformers (if it wraps one, pass the inner timm model). "
            f"Supported attention: {_supported_names()}.")
    pool = getattr(model, "global_pool", None)
    if pool not in _SUPPORTED_POOLS:
        raise UnsupportedModelError(
            f"{type(model).__name__} pools tokens with global_pool={pool!r}; GAE relevance needs "
            f"one of {_SUPPORTED_POOLS} (the classifier reads the class token or the patch mean)")
    return pool

