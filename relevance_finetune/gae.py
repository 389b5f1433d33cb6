"""Differentiable GAE relevance (Chefer et al., 2021) for timm vision transformers.

``attach_gae(model)`` instruments the attention modules of one model instance so that each
forward records its post-softmax attention maps. ``handle.relevance(logits)`` then turns the
maps of that forward into the relevance row the classifier reads, with one
``torch.autograd.grad`` call over all maps and a row-vector rollout (O(L N^2)).
With ``attention="fused"`` the model keeps its fused SDPA attention and the forward records
SDPA's inputs and output instead; the rollout rebuilds the maps in row chunks (see ``fused.py``).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .fused import SDPACall, SDPACapture, fused_increment

__all__ = [
    "AUTO_FUSED_TOKENS",
    "AttentionFamily",
    "ATTENTION_FAMILIES",
    "GAEHandle",
    "UnsupportedModelError",
    "attach_gae",
    "explicit_attention",
    "normalize_relevance",
    "upsample_relevance",
]

# Attention modules whose maps GAE cannot read as token-to-token rows of one sequence.
_UNSUPPORTED_ATTENTION = (
    "WindowAttention",      # Swin: windows, no class token
    "XCA",                  # XCiT: channel attention
    "ClassAttn",            # CaiT: class attention
    "TalkingHeadAttn",      # CaiT: mixes heads after softmax
    "AttentionPoolLatent",  # 'map' pooling head
)
_SUPPORTED_POOLS = ("token", "avg")
_ATTENTION_MODES = ("explicit", "fused", "auto")
# attention="auto" runs fused from this many tokens on (CLS and prefix tokens included); below
# it the explicit path is as small and faster. Measured in docs/performance.md.
AUTO_FUSED_TOKENS = 512
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
    AttentionFamily("timm Attention (ViT, AugReg, DeiT, DeiT3, register and CLIP ViTs)",
                    "timm.layers.attention:Attention"),
    AttentionFamily("BEiT Attention (relative position bias)", "timm.models.beit:Attention"),
    AttentionFamily("EVA Attention (RoPE)", "timm.models.eva:EvaAttention"),
)


def _supported_names() -> str:
    return "; ".join(family.name for family in ATTENTION_FAMILIES)


def _find_attention(model: nn.Module) -> list[tuple[nn.Module, AttentionFamily]]:
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
            f"{type(model).__name__} has no supported attention module. "
            f"Supported: {_supported_names()}.")
    return found


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Run every supported attention module of ``model`` on the explicit softmax path.

    Needed by anything that takes a double backward through attention (second-order GAE,
    GradMask, RRR): SDPA has no double backward. The fused flags are restored on exit.
    """
    modules = _find_attention(model)
    previous = [family.use_explicit(module) for module, family in modules]
    try:
        yield model
    finally:
        for (module, family), flag in zip(modules, previous):
            family.restore(module, flag)


def normalize_relevance(relevance: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-image min-max normalisation of (B, ...) maps to [0, 1]; a constant map gives 0.

    ``eps`` guards the range relative to the map's largest magnitude, so that maps of any
    scale normalise alike (the raw relevance of a randomly initialised model can be ~1e-12).
    """
    flat = relevance.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    guard = (eps * torch.maximum(low.abs(), high.abs())).clamp(min=torch.finfo(flat.dtype).tiny)
    return ((flat - low) / (high - low + guard)).view_as(relevance)


def upsample_relevance(relevance: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear upsampling of (B, gh, gw) maps to (B, H, W)."""
    out = F.interpolate(relevance[:, None], size=tuple(size), mode="bilinear", align_corners=False)
    return out[:, 0]


# Attention module -> the handle instrumenting it: a second handle on the same modules is refused,
# whatever wrapper (DDP, torch.compile) it is reached through.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, GAEHandle]" = weakref.WeakKeyDictionary()
# Wrappers whose inner model attach_gae instruments: class name -> attribute holding the model.
_WRAPPERS = {
    "DistributedDataParallel": "module",  # torch DDP, also what accelerate's prepare returns
    "DataParallel": "module",
    "DeepSpeedEngine": "module",          # accelerate with DeepSpeed
    "OptimizedModule": "_orig_mod",       # torch.compile
}


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP, DataParallel, DeepSpeed and ``torch.compile`` wrappers (nested too)."""
    while True:
        attribute = next((_WRAPPERS[c.__name__] for c in type(model).__mro__ if c.__name__ in _WRAPPERS), None)
        if attribute is None:
            return model
        model = getattr(model, attribute)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class GAEHandle:
    """Records the attention maps of a model's forwards and computes GAE relevance from them.

    Made by :func:`attach_gae`. Use as a context manager or call :meth:`remove`.
    """

    # fused mode: elements of one (B, heads, rows, N) chunk of the rebuilt maps (16 MiB in fp32)
    chunk_elements = 2 ** 22

    def __init__(self, model: nn.Module, second_order: bool = False, attention: str = "explicit") -> None:
        if attention not in _ATTENTION_MODES:
            raise ValueError(f"attention must be one of {_ATTENTION_MODES}, got {attention!r}")
        if second_order and attention == "fused":
            raise ValueError(_SECOND_ORDER_FUSED)
        self.model = model
        self.second_order = second_order
        self.attention = attention
        self.pool = _readout_pool(model)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self._modules = _find_attention(model)
        # per block, of the latest forward: the map (explicit path) or the SDPA call (fused path)
        self._maps: list[torch.Tensor | SDPACall | None] = [None] * len(self._modules)
        self._input_size: tuple[int, int] | None = None
        self._removed = False
        self._fused_flags = [family.use_fused(module) if attention == "fused" else family.use_explicit(module)
                             for module, family in self._modules]
        self._hooks = [model.patch_embed.register_forward_pre_hook(self._on_forward_start)]
        for index, (module, family) in enumerate(self._modules):
            hook = family.map_source(module).register_forward_hook(self._recorder(index))
            if attention != "explicit":
                self._hooks += self._sdpa_hooks(module, index)
            self._hooks.append(hook)
        for module, _ in self._modules:
            _ATTACHED[module] = self

    # -- recording -------------------------------------------------------------------------
    def _on_forward_start(self, module: nn.Module, args: tuple) -> None:
        if _in_backward():  # a checkpointed patch_embed re-run: keep the first forward's maps
            return
        self._maps = [None] * len(self._modules)
        self._input_size = tuple(args[0].shape[-2:])
        if self.attention == "auto":
            fused = self._auto_fused()
            for module, family in self._modules:
                (family.use_fused if fused else family.use_explicit)(module)

    def _auto_fused(self) -> bool:
        """Fused for long sequences, unless second order or active attention dropout need maps."""
        gh, gw = self.grid_size()
        dropout = self.model.training and any(family.map_source(module).p > 0 for module, family in self._modules)
        return gh * gw + self.num_prefix_tokens >= AUTO_FUSED_TOKENS and not (self.second_order or dropout)

    def _record(self, index: int, value: torch.Tensor | SDPACall) -> None:
        # Re-runs in backward (gradient checkpointing) and repeats are ignored.
        if self._maps[index] is None and not _in_backward():
            self._maps[index] = value

    def _recorder(self, index: int):
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

    @property
    def attention_maps(self) -> list[torch.Tensor | SDPACall]:
        """What the latest forward recorded per block, first block first.

        On the explicit path the post-softmax maps (B, heads, N, N); on the fused path the
        :class:`~relevance_finetune.fused.SDPACall` of each block (q, k, v, bias, output).
        """
        if self._removed:
            raise RuntimeError(
                "this GAE handle was removed (gae.remove() or the end of its `with` block) and records "
                "nothing: attach_gae(model) again, and use the new handle (e.g. in a new RelevanceRegularizer)")
        if self._input_size is None or any(m is None for m in self._maps):
            raise RuntimeError(
                "no complete forward has been recorded: call the model on a batch of images "
                "(with gradients enabled) after attach_gae and before computing relevance")
        return list(self._maps)

    def grid_size(self) -> tuple[int, int]:
        """Patch grid (gh, gw) of the latest forward, from the model and the input size."""
        patch_embed = self.model.patch_embed
        if self._input_size is not None and hasattr(patch_embed, "dynamic_feat_size"):
            return tuple(patch_embed.dynamic_feat_size(self._input_size))
        return tuple(patch_embed.grid_size)

    # -- relevance -------------------------------------------------------------------------
    def relevance(
            self,
            logits: torch.Tensor,
            target: int | torch.Tensor | None = None,
            second_order: bool | None = None,
    ) -> torch.Tensor:
        """Raw GAE relevance (B, gh, gw) of ``target`` for the forward that produced ``logits``.

        Differentiable through the attention maps when gradients are enabled (under
        ``torch.no_grad()`` it is detached and computed in place). With ``second_order``
        (default: the handle's setting) the attention gradients are differentiable too.
        The value is the rollout row minus the readout row it starts from: the relevance gained
        through the blocks (for ``'avg'`` pooling the readout adds a constant, which would
        swamp small increments in float32; min-max normalisation removes it either way).
        """
        records = self.attention_maps
        fused = isinstance(records[0], SDPACall)
        sources = [record.out for record in records] if fused else records
        if not all(source.requires_grad for source in sources):
            raise RuntimeError(
                "the latest forward ran without gradients (torch.no_grad() or inference_mode, "
                "or reentrant gradient checkpointing); relevance needs a forward with gradients")
        batch, tokens = sources[0].shape[0], sources[0].shape[-2]
        if logits.ndim != 2 or logits.shape[0] != batch:
            raise ValueError(
                f"expected logits of shape (B, classes) with B={batch} as in the "
                f"latest forward, got {tuple(logits.shape)}")
        target = _resolve_target(logits, target)
        create_graph = self.second_order if second_order is None else second_order
        if fused:
            _check_fused(records, create_graph)
        with torch.enable_grad():  # the score is part of the graph even under no_grad
            score = logits.gather(1, target[:, None]).sum()
        grads = list(torch.autograd.grad(
            score, sources, retain_graph=True, create_graph=create_graph, allow_unused=True))
        if any(g is None for g in grads):
            raise RuntimeError(
                "these logits do not come from the latest recorded forward of the attached "
                "model: pass the logits of the most recent `model(images)` call")
        differentiable = torch.is_grad_enabled()
        row = self._readout_row(batch, tokens, logits.device)
        gained = torch.zeros_like(row)  # the rollout row minus the readout row
        for record in reversed(records):
            grad = grads.pop()  # each gradient is dropped once used
            if fused:
                increment = fused_increment(row, record, grad, self.chunk_elements)
            else:
                increment = _explicit_increment(row, record, grad, create_graph, differentiable)
            row = row + increment
            gained = gained + increment
        gh, gw = self.grid_size()
        patches = gained[:, self.num_prefix_tokens:]
        if patches.shape[1] != gh * gw:
            raise RuntimeError(
                f"{patches.shape[1]} patch tokens do not fill the {gh}x{gw} grid expected for "
                f"input size {self._input_size}")
        return rearrange(patches, "b (h w) -> b h w", h=gh, w=gw)

    def _readout_row(self, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
        """The rollout's starting row: the token(s) the classifier reads, as (B, N).

        The class token (and the distillation token of distilled DeiTs) for ``'token'``
        pooling; the mean of the patch tokens for ``'avg'``.
        """
        row = torch.zeros(batch, tokens, dtype=torch.float32, device=device)
        if self.pool == "token":
            # distilled DeiT: the logits average the class and distillation heads
            readout = 2 if getattr(self.model, "dist_token", None) is not None else 1
            row[:, :readout] = 1.0 / readout
        else:
            row[:, self.num_prefix_tokens:] = 1.0 / (tokens - self.num_prefix_tokens)
        return row

    @torch.no_grad()
    def explain(
            self,
            images: torch.Tensor,
            target: int | torch.Tensor | None = None,
            normalize: bool = True,
            upsample: bool = True,
    ) -> torch.Tensor:
        """Detached relevance maps for ``images`` (B, C, H, W).

        Returns (B, H, W) in [0, 1] by default; with ``normalize=False, upsample=False`` the raw
        GAE row on the patch grid (B, gh, gw). ``target`` None means the predicted class. Runs in
        eval mode and restores the model's mode and the recorded maps of the caller's forward.
        """
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"explain expects a (B, C, H, W) tensor of images, got {type(images).__name__}")
        if images.ndim != 4:
            hint = ": add the batch dimension with images[None]" if images.ndim == 3 else ""
            raise ValueError(f"explain expects a batch of images (B, C, H, W), got shape {tuple(images.shape)}{hint}")
        saved = (self._maps, self._input_size)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                logits = self.model(images)
            relevance = self.relevance(logits, target, second_order=False)
        finally:
            self.model.train(was_training)
            self._maps, self._input_size = saved
        relevance = relevance.detach().float()
        if upsample:
            relevance = upsample_relevance(relevance, images.shape[-2:])
        if normalize:
            relevance = normalize_relevance(relevance)
        return relevance

    # -- lifetime --------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove the hooks and restore the fused attention flags. Idempotent."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for (module, family), flag in zip(self._modules, self._fused_flags):
            family.restore(module, flag)
        self._maps = [None] * len(self._modules)
        self._removed = True
        for module, _ in self._modules:
            if _ATTACHED.get(module) is self:
                del _ATTACHED[module]

    def __enter__(self) -> "GAEHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"GAEHandle({type(self.model).__name__}, blocks={len(self._modules)}, "
                f"pool={self.pool!r}, second_order={self.second_order}, attention={self.attention!r})")


_SECOND_ORDER_FUSED = (
    "second-order relevance differentiates through the attention's backward, which fused SDPA "
    "does not support: use attach_gae(model, second_order=True, attention='explicit') (or 'auto')")


def _check_fused(calls: list[SDPACall], create_graph: bool) -> None:
    if create_graph:
        raise ValueError(_SECOND_ORDER_FUSED)
    dropout = max(call.dropout_p for call in calls)
    if dropout > 0:
        raise RuntimeError(
            f"attention dropout (p={dropout:g}) was active in the recorded forward, and the fused "
            "path cannot rebuild the dropped maps: use attach_gae(model, attention='explicit') "
            "(or 'auto', which falls back to it), or run the model in eval mode")


def _explicit_increment(
        row: torch.Tensor,
        attn: torch.Tensor,
        grad: torch.Tensor,
        create_graph: bool,
        differentiable: bool,
) -> torch.Tensor:
    """One block's rollout increment ``row @ cam`` (B, N) from its recorded map and gradient."""
    # GAE's cam is mean_h relu(grad * attn); since attn >= 0 it equals
    # mean_h relu(grad) * attn, which the backward needs one saved tensor for, not two.
    # Ops run in place wherever autograd needs neither operand.
    weight = grad.clamp(min=0) if create_graph else grad.clamp_(min=0)
    product = weight * attn if differentiable else weight.mul_(attn)
    cam = product.mean(dim=1)  # (B, N, N)
    return torch.einsum("bn,bnm->bm", row, cam.to(row.dtype))


def _readout_pool(model: nn.Module) -> str:
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


def _resolve_target(logits: torch.Tensor, target: int | torch.Tensor | None) -> torch.Tensor:
    batch, classes = logits.shape
    if target is None:
        return logits.detach().argmax(dim=1)
    target = torch.as_tensor(target, device=logits.device).long()
    if target.ndim == 0:
        target = target.expand(batch)
    if target.shape != (batch,):
        raise ValueError(f"target must be an int or a ({batch},) tensor, got shape {tuple(target.shape)}")
    if target.min() < 0 or target.max() >= classes:
        raise ValueError(f"target classes must lie in [0, {classes}), got {target.tolist()}")
    return target


def attach_gae(model: nn.Module, second_order: bool = False, attention: str = "explicit") -> GAEHandle:
    """Instrument ``model``'s attention so that its forwards yield GAE relevance.

    Parameters
    ----------
    model:
        A timm vision transformer whose attention is one of ``ATTENTION_FAMILIES``, pooled by
        the class token (``global_pool='token'``) or the patch mean (``'avg'``). DDP,
        DataParallel, DeepSpeed (accelerate) and ``torch.compile`` wrappers are unwrapped: the
        handle instruments the inner model (``handle.model``), and the wrapper's forwards record.
    second_order:
        Take the attention gradients with ``create_graph=True`` so the loss also reaches the
        weights through them. Default False: constant gradients, as the paper's code.
    attention:
        ``"explicit"`` (default): attention runs on its explicit softmax path and each forward
        keeps the (B, heads, N, N) maps. ``"fused"``: attention keeps timm's fused SDPA; each
        forward records SDPA's q, k, v, bias and output, and the relevance rebuilds the maps in
        row chunks (memory near the plain step's; no second order, no attention dropout).
        ``"auto"``: fused from ``AUTO_FUSED_TOKENS`` tokens on, explicit below, for second
        order and under active attention dropout. Equal relevance and gradients either way.

    Returns
    -------
    GAEHandle
        ``handle.relevance(logits)`` after the model's forward, ``handle.explain(images)`` for
        pictures; ``handle.remove()`` (or leaving a ``with`` block) restores the model.

    Raises
    ------
    ValueError
        For an unknown ``attention``, or ``second_order=True`` with ``attention="fused"``.
    UnsupportedModelError
        For models without supported attention (Swin, XCiT, CaiT, CNNs) or readout.
    RuntimeError
        If a handle is already attached to the model's attention modules (through any wrapper):
        call its ``remove()`` first.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach_gae expects a torch.nn.Module, got {type(model).__name__}")
    inner = _unwrap(model)
    attached = next((_ATTACHED[m] for m in inner.modules() if m in _ATTACHED), None)
    if attached is not None:
        via = "" if inner is model else f" (reached through its {type(model).__name__} wrapper)"
        raise RuntimeError(
            f"a GAE handle is already attached to this {type(inner).__name__}'s attention{via}: "
            f"{attached!r}. Use that handle, or call its remove() before attaching again")
    return GAEHandle(inner, second_order=second_order, attention=attention)
