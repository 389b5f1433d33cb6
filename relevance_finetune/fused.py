"""GAE on fused attention: record what SDPA sees, rebuild the cam rows in chunks.

With ``attach_gae(model, attention="fused")`` the model keeps timm's fused
``F.scaled_dot_product_attention``. :class:`SDPACapture` (entered by a forward pre-hook of each
attention module, left by its forward hook) records the arguments and output of that call as an
:class:`SDPACall`. :func:`fused_increment` then computes one block's rollout step ``row @ cam``
with ``cam = mean_h relu(dO v^T) * softmax(scale q k^T + bias)``, never holding more than a
(B, heads, rows, N) chunk; when differentiable, each chunk is recomputed in the backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

__all__ = ["SDPACall", "SDPACapture", "fused_increment"]


@dataclass(frozen=True)
class SDPACall:
    """One attention's ``scaled_dot_product_attention`` call, as the kernel saw it.

    ``q``, ``k``, ``v``, ``out``: (B, heads, N, head_dim); ``bias``: additive, broadcastable to
    (B, heads, N, N), or None; ``scale``: the factor applied to ``q k^T``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    dropout_p: float

    @classmethod
    def from_call(cls, args: tuple, kwargs: dict, out: torch.Tensor) -> "SDPACall":
        bound = _bind_sdpa(*args, **kwargs)
        q, k = bound["query"], bound["key"]
        scale = bound["scale"] if bound["scale"] is not None else 1 / math.sqrt(q.shape[-1])
        bias = _additive_bias(bound["attn_mask"], q)
        if bound["is_causal"]:
            causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            bias = _additive_bias(causal, q)
        return cls(q, k, bound["value"], out, bias, float(scale), float(bound["dropout_p"]))


def _bind_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False) -> dict:
    """SDPA's arguments by name, whether passed by position or keyword."""
    return dict(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p,
                is_causal=is_causal, scale=scale)


def _additive_bias(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """SDPA's ``attn_mask`` as an additive bias: a boolean mask (True = attend) becomes 0 / -inf."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill_(~mask, -math.inf)


class SDPACapture(TorchFunctionMode):
    """Runs every torch call unchanged; hands each SDPA call to ``record`` as an :class:`SDPACall`."""

    def __init__(self, record: Callable[[SDPACall], None]) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            self.record(SDPACall.from_call(args, kwargs, out))
        return out


def _rows(bias: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    if bias is None or bias.shape[-2] == 1:
        return bias
    return bias[..., start:stop, :]


def _cam_product(
        row: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        bias: torch.Tensor | None,
        grad_out: torch.Tensor,
        v: torch.Tensor,
        scale: float,
) -> torch.Tensor:
    """``row @ cam`` for a chunk of c query rows: row (B, c), q and grad_out (B, heads, c, d),
    k and v (B, heads, N, d), bias (..., c, N); returns (B, N)."""
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    attn = scores.softmax(dim=-1)
    # GAE's relu(grad * attn) = relu(grad) * attn since attn >= 0; grad of A = dO v^T
    weight = (grad_out @ v.transpose(-2, -1)).clamp_(min=0)
    product = weight * attn if torch.is_grad_enabled() else weight.mul_(attn)
    cam = product.mean(dim=1)  # (B, c, N)
    return torch.einsum("bn,bnm->bm", row, cam.to(row.dtype))


def fused_increment(
        row: torch.Tensor,
        call: SDPACall,
        grad_out: torch.Tensor,
        chunk_elements: int,
) -> torch.Tensor:
    """One block's rollout increment ``row @ cam`` (B, N), from a recorded SDPA call.

    ``grad_out`` (B, heads, N, d) is the target score's gradient w.r.t. ``call.out``; the cam
    weights ``relu(grad_out v^T)`` are constants, as in explicit mode. The N x N quantities are
    built in chunks of query rows, each at most ``chunk_elements`` elements per tensor; with
    gradients enabled each chunk is checkpointed, so its backward recomputes it.
    """
    batch, heads, tokens, _ = call.q.shape
    size = max(1, chunk_elements // (batch * heads * tokens))
    v = call.v.detach()
    increment = None
    for start in range(0, tokens, size):
        stop = min(start + size, tokens)
        args = (row[:, start:stop], call.q[..., start:stop, :], call.k, _rows(call.bias, start, stop),
                grad_out[..., start:stop, :], v, call.scale)
        if torch.is_grad_enabled():
            part = checkpoint(_cam_product, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            part = _cam_product(*args)
        increment = part if increment is None else increment + part
    return increment
