"""The GAE handle: ``attach_gae`` instruments a model, the handle turns its forwards into relevance.

The handle owns an :class:`~.recording.AttentionRecorder` (what each forward computed per block)
and applies the rule of :mod:`.rollout` to it; ``explain`` runs a forward of its own for pictures.
"""
from __future__ import annotations

import weakref

import torch
from einops import rearrange
from torch import nn

from .fused import SDPACall
from .families import find_attention, readout_pool
from .maps import normalize_relevance, upsample_relevance
from .recording import AttentionRecorder
from .rollout import SECOND_ORDER_FUSED, Readout, rollout_gain

__all__ = ["GAEHandle", "attach_gae"]

_ATTENTION_MODES = ("explicit", "fused", "auto")
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


class GAEHandle:
    """Records the attention of a model's forwards and computes GAE relevance from them.

    Made by :func:`attach_gae`. Use as a context manager or call :meth:`remove`.
    """

    # fused mode: the most elements of one (B, heads, rows, N) chunk of the rebuilt maps; None:
    # chosen from the device and its free memory (relevance_finetune.gae.fused.chunk_rows)
    chunk_elements: int | None = None

    def __init__(self, model: nn.Module, second_order: bool = False, attention: str = "explicit") -> None:
        if attention not in _ATTENTION_MODES:
            raise ValueError(f"attention must be one of {_ATTENTION_MODES}, got {attention!r}")
        if second_order and attention == "fused":
            raise ValueError(SECOND_ORDER_FUSED)
        self.model = model
        self.second_order = second_order
        self.attention = attention
        self.pool = readout_pool(model)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        distilled = getattr(model, "dist_token", None) is not None
        self._readout = Readout(self.pool, self.num_prefix_tokens, class_tokens=2 if distilled else 1)
        self._recorder = AttentionRecorder(model, find_attention(model), attention, second_order)
        for module, _ in self._recorder.modules:
            _ATTACHED[module] = self

    @property
    def attention_maps(self) -> list[torch.Tensor | SDPACall]:
        """What the latest forward recorded per block, first block first.

        On the explicit path the post-softmax maps (B, heads, N, N); on the fused path the
        :class:`~relevance_finetune.gae.fused.SDPACall` of each block (q, k, v, bias, output).
        """
        return self._recorder.records

    def grid_size(self) -> tuple[int, int]:
        """Patch grid (gh, gw) of the latest forward, from the model and the input size."""
        return self._recorder.grid_size()

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
        create_graph = self.second_order if second_order is None else second_order
        gained = rollout_gain(self.attention_maps, logits, target, self._readout, create_graph, self.chunk_elements)
        gh, gw = self.grid_size()
        patches = gained[:, self.num_prefix_tokens:]
        if patches.shape[1] != gh * gw:
            raise RuntimeError(
                f"{patches.shape[1]} patch tokens do not fill the {gh}x{gw} grid expected for "
                f"input size {self._recorder.input_size}")
        return rearrange(patches, "b (h w) -> b h w", h=gh, w=gw)

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
        if not torch.isfinite(images).all():
            raise ValueError("explain got images that contain NaN or inf")
        was_training = self.model.training
        self.model.eval()
        try:
            with self._recorder.kept():
                with torch.enable_grad():
                    logits = self.model(images)
                relevance = self.relevance(logits, target, second_order=False)
        finally:
            self.model.train(was_training)
        relevance = relevance.detach().float()
        if upsample:
            relevance = upsample_relevance(relevance, images.shape[-2:])
        if normalize:
            relevance = normalize_relevance(relevance)
        return relevance

    def remove(self) -> None:
        """Remove the hooks and restore the fused attention flags. Idempotent."""
        self._recorder.remove()
        for module, _ in self._recorder.modules:
            if _ATTACHED.get(module) is self:
                del _ATTACHED[module]

    def __enter__(self) -> GAEHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"GAEHandle({type(self.model).__name__}, blocks={len(self._recorder.modules)}, "
                f"pool={self.pool!r}, second_order={self.second_order}, attention={self.attention!r})")


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
