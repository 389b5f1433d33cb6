"""GAE on fused attention: record what SDPA sees, rebuild the cam rows in chunks.

With ``attach_gae(model, attention="fused")`` the model keeps timm's fused
``F.scaled_dot_product_attention``. :class:`SDPACapture` (entered by a forward pre-hook of each
attention module, left by its forward hook) records the arguments and output of that call as an
:class:`SDPACall`. :func:`fused_increment` then computes one block's rollout step ``row @ cam``
with ``cam = mean_h relu(dO v^T) * softmax(scale q k^T + bias)`` in one autograd function,
:class:`FusedIncrement`: its forward builds (B, heads, rows, N) chunks of the map once and keeps
only the softmax's log-sum-exp (B, heads, N); its backward rebuilds each chunk once and returns
the gradients w.r.t. the row, q, k and the bias in closed form.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

__all__ = ["FALLBACKS", "FusedIncrement", "SDPACall", "SDPACapture", "chunk_rows", "fused_increment"]

# dtype of q -> the dtype the kernel computes in (half types: float32, chunk by chunk)
_KERNEL_DTYPES = {torch.float32: torch.float32, torch.float64: torch.float64,
                  torch.bfloat16: torch.float32, torch.float16: torch.float32}
# fused_increment calls that fell back to autograd through the chunks, per dtype of q
FALLBACKS: Counter = Counter()
# automatic chunks, bytes per (B, heads, rows, N) tensor: at most a sixteenth of the free memory
# (the kernel holds two or three), and at most a cache-sized 4 MiB on CPU (larger chunks were
# slower there: docs/performance.md) or 256 MiB on a GPU
_CHUNK_BYTES = {"cpu": 2 ** 22, "cuda": 2 ** 28}
_FREE_SHARE = 16


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
    """The query rows ``start:stop`` of a bias broadcastable to (..., N, N)."""
    if bias is None or bias.shape[-2] == 1:
        return bias
    return bias[..., start:stop, :]


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device``: CUDA's free memory, else MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 ** 32  # unknown: assume 4 GiB


def chunk_rows(batch: int, heads: int, tokens: int, dtype: torch.dtype, device: torch.device,
               chunk_elements: int | None = None) -> int:
    """Query rows per chunk of the rebuilt (B, heads, rows, N) maps: at least one, at most N.

    ``chunk_elements`` caps the elements of one chunk tensor; None chooses the cap from the
    device and its free memory (``_CHUNK_BYTES``, ``_FREE_SHARE``).
    """
    if chunk_elements is None:
        budget = min(_CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"]), free_memory(device) // _FREE_SHARE)
        chunk_elements = budget * 8 // torch.finfo(dtype).bits
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be a positive number of elements, got {chunk_elements}")
    return min(tokens, max(1, chunk_elements // (batch * heads * tokens)))


class _Chunks:
    """One SDPA call's operands in the kernel's dtype, contiguous, and its chunks of query rows."""

    def __init__(self, call: SDPACall, grad_out: torch.Tensor, dtype: torch.dtype, rows: int) -> None:
        self.q, self.k, self.v, self.grad_out = (
            t.detach().to(dtype).contiguous() for t in (call.q, call.k, call.v, grad_out))
        self.bias = None if call.bias is None else call.bias.detach().to(dtype)
        self.scale = call.scale
        self.starts = range(0, self.q.shape[-2], rows)
        self.rows = rows

    def maps(self, start: int, lse: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(A, P, lse) for the rows from ``start``: the softmax A and ``P = relu(dO v^T) * A``,
        (B, heads, rows, N), and the log-sum-exp of the scores (B, heads, rows, 1), computed
        unless given (the backward passes the forward's, and A costs one product).
        """
        stop = start + self.rows
        scores = (self.q[..., start:stop, :] * self.scale) @ self.k.transpose(-2, -1)
        bias = _rows(self.bias, start, stop)
        if bias is not None:
            scores += bias
        if lse is None:
            high = scores.amax(dim=-1, keepdim=True)
            attn = scores.sub_(high).exp_()
            total = attn.sum(dim=-1, keepdim=True)
            attn.div_(total)
            lse = total.log_().add_(high)
        else:
            attn = scores.sub_(lse).exp_()
        # GAE's relu(grad * attn) = relu(grad) * attn since attn >= 0; grad of A = dO v^T
        product = (self.grad_out[..., start:stop, :] @ self.v.transpose(-2, -1)).clamp_(min=0).mul_(attn)
        return attn, product, lse


def _weighted_rows(weights: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``sum_{h, n} weights[b, n] maps[b, h, n, m]``: (B, rows) and (B, heads, rows, N) -> (B, N)."""
    batch, heads, rows, tokens = maps.shape
    flat = weights.repeat(1, heads)[:, None]  # (B, 1, heads * rows), index h * rows + n
    return torch.bmm(flat, maps.reshape(batch, heads * rows, tokens))[:, 0]


class FusedIncrement(torch.autograd.Function):
    """``row @ mean_h(relu(dO v^T) * softmax(scale q k^T + bias))`` with a closed-form backward.

    Inputs: ``row`` (B, N), ``q``, ``k`` (B, heads, N, d) and the bias, differentiable; ``v`` and
    ``grad_out`` (B, heads, N, d), constants (GAE's first-order rule: the cam weights
    ``relu(dO v^T)`` carry no gradient, as on the explicit path). With ``g`` the gradient of the
    increment, ``P = relu(dO v^T) * A`` and ``z = P g``, the softmax's gradient is
    ``dS = row/heads * (P g^T - A z)`` per head, row by row; ``dq = scale dS k``,
    ``dk = scale dS^T q``, the bias gets ``dS``, the row ``mean_h z``. The forward keeps the
    log-sum-exp of each row, so that the backward rebuilds each chunk of A with one product.
    """

    @staticmethod
    def forward(ctx, row: torch.Tensor, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None,
                v: torch.Tensor, grad_out: torch.Tensor, scale: float, rows: int) -> torch.Tensor:
        call = SDPACall(q, k, v, grad_out, bias, scale, 0.0)
        dtype = _KERNEL_DTYPES[q.dtype]
        chunks = _Chunks(call, grad_out, dtype, rows)
        heads = q.shape[1]
        weights = row.to(dtype) / heads
        increment = torch.zeros(row.shape, dtype=dtype, device=row.device)
        lse = torch.empty(*q.shape[:-1], 1, dtype=dtype, device=q.device)
        for start in chunks.starts:
            stop = start + rows
            _, product, lse[..., start:stop, :] = chunks.maps(start)
            increment += _weighted_rows(weights[:, start:stop], product)
        ctx.save_for_backward(row, q, k, bias, v, grad_out, lse)
        ctx.scale, ctx.rows = scale, rows
        return increment.to(row.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        row, q, k, bias, v, grad_out, lse = ctx.saved_tensors
        dtype = lse.dtype
        chunks = _Chunks(SDPACall(q, k, v, grad_out, bias, ctx.scale, 0.0), grad_out, dtype, ctx.rows)
        heads = q.shape[1]
        weights = row.to(dtype) / heads
        grad = grad.to(dtype)
        want_row, want_q, want_k, want_bias = ctx.needs_input_grad[:4]
        grad_row = torch.zeros_like(weights) if want_row else None
        grad_q = torch.zeros_like(chunks.q) if want_q else None
        grad_k = torch.zeros_like(chunks.k) if want_k else None
        grad_bias = torch.zeros_like(chunks.bias) if want_bias else None
        for start in chunks.starts:
            stop = start + ctx.rows
            attn, product, _ = chunks.maps(start, lse[..., start:stop, :])
            z = (product @ grad[:, None, :, None])  # (B, heads, rows, 1)
            if want_row:
                grad_row[:, start:stop] = z.sum(dim=1)[..., 0] / heads
            if not (want_q or want_k or want_bias):
                continue
            # dS / (row / heads): P * g - A * z, in the product's memory
            scores_grad = product.mul_(grad[:, None, None, :]).sub_(attn.mul_(z))
            factor = weights[:, None, start:stop, None]  # (B, 1, rows, 1)
            if want_q:
                grad_q[..., start:stop, :] = (scores_grad @ chunks.k).mul_(factor * ctx.scale)
            if want_k:
                grad_k += scores_grad.transpose(-2, -1) @ (chunks.q[..., start:stop, :] * (factor * ctx.scale))
            if want_bias:
                rows_grad = _rows(grad_bias, start, stop)
                rows_grad += (scores_grad * factor).sum_to_size(rows_grad.shape)
        return (_cast(grad_row, row), _cast(grad_q, q), _cast(grad_k, k), _cast(grad_bias, bias),
                None, None, None, None)


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)


def _cam_product(
        row: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        bias: torch.Tensor | None,
        grad_out: torch.Tensor,
        v: torch.Tensor,
        scale: float,
) -> torch.Tensor:
    """``row @ cam`` for a chunk of c query rows by autograd-able operators: row (B, c), q and
    grad_out (B, heads, c, d), k and v (B, heads, N, d), bias (..., c, N); returns (B, N)."""
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    attn = scores.softmax(dim=-1)
    weight = (grad_out @ v.transpose(-2, -1)).clamp(min=0)
    cam = (weight * attn).mean(dim=1)  # (B, c, N)
    return torch.einsum("bn,bnm->bm", row, cam.to(row.dtype))


def _fallback_increment(row: torch.Tensor, call: SDPACall, grad_out: torch.Tensor, rows: int) -> torch.Tensor:
    """The increment by autograd through checkpointed chunks, for dtypes the kernel lacks."""
    FALLBACKS[call.q.dtype] += 1
    if FALLBACKS[call.q.dtype] == 1:
        warnings.warn(f"the fused GAE kernel does not handle {call.q.dtype}: the relevance falls back to "
                      f"autograd through checkpointed chunks (slower; counted in fused.FALLBACKS)", stacklevel=3)
    v = call.v.detach()
    increment = None
    for start in range(0, row.shape[1], rows):
        stop = start + rows
        args = (row[:, start:stop], call.q[..., start:stop, :], call.k, _rows(call.bias, start, stop),
                grad_out[..., start:stop, :], v, call.scale)
        part = checkpoint(_cam_product, *args, use_reentrant=False, preserve_rng_state=False)
        increment = part if increment is None else increment + part
    return increment


def fused_increment(
        row: torch.Tensor,
        call: SDPACall,
        grad_out: torch.Tensor,
        chunk_elements: int | None = None,
) -> torch.Tensor:
    """One block's rollout increment ``row @ cam`` (B, N), from a recorded SDPA call.

    ``grad_out`` (B, heads, N, d) is the target score's gradient w.r.t. ``call.out``; the cam
    weights ``relu(grad_out v^T)`` are constants, as in explicit mode. The N x N quantities are
    built in chunks of query rows (:func:`chunk_rows`; ``chunk_elements`` caps one chunk, None
    chooses from the free memory); any token count works, the last chunk takes the rest.
    Differentiable w.r.t. ``row``, q, k and the bias (:class:`FusedIncrement`). A dtype the
    kernel does not handle falls back to autograd, with a warning, counted in ``FALLBACKS``.
    """
    if grad_out.shape != call.out.shape:
        raise ValueError(f"grad_out must have the shape of the attention output {tuple(call.out.shape)}, "
                         f"got {tuple(grad_out.shape)}")
    if grad_out.requires_grad:
        raise ValueError("fused_increment takes the attention output's gradient as a constant "
                         "(first-order GAE); second order needs attention='explicit'")
    batch, heads, tokens, _ = call.q.shape
    dtype = _KERNEL_DTYPES.get(call.q.dtype)
    rows = chunk_rows(batch, heads, tokens, dtype or call.q.dtype, call.q.device, chunk_elements)
    if dtype is None:
        return _fallback_increment(row, call, grad_out, rows)
    return FusedIncrement.apply(row, call.q, call.k, call.bias, call.v.detach(), grad_out, call.scale, rows)
