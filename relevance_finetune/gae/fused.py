"""GAE on fused attention: record what SDPA sees, rebuild the cam rows in chunks.

With ``attach_gae(model, attention="fused")`` the model keeps timm's fused
``F.scaled_dot_product_attention``. :class:`SDPACapture` (entered by a forward pre-hook of each
attention module, left by its forward hook) records the arguments and output of that call as an
:class:`SDPACall`; on CPU it runs the flash kernel that SDPA would choose itself, directly, so that
the softmax's log-sum-exp (B, heads, N) is kept. :func:`fused_increment` then computes one block's
rollout step ``row @ cam`` with ``cam = mean_h relu(dO v^T) * softmax(scale q k^T + bias)`` in one
autograd function, :class:`FusedIncrement`: its forward builds (B * heads, rows, N) chunks of the
map once (from the log-sum-exp, or computing it) and keeps only the log-sum-exp; its backward
rebuilds each chunk once and returns the gradients w.r.t. the row, q, k and the bias in closed form.
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

try:  # SDPA's CPU flash kernel, which returns the log-sum-exp (torch >= 2.2)
    from torch.nn.attention import SDPBackend
    _CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
except (ImportError, AttributeError):
    _CPU_FLASH = None

__all__ = ["FALLBACKS", "FusedIncrement", "SDPACall", "SDPACapture", "chunk_rows", "fused_increment"]

# dtype of q -> the dtype the kernel computes in (half types: float32, chunk by chunk)
_KERNEL_DTYPES = {torch.float32: torch.float32, torch.float64: torch.float64,
                  torch.bfloat16: torch.float32, torch.float16: torch.float32}
# fused_increment calls that fell back to autograd through the chunks, per dtype of q
FALLBACKS: Counter = Counter()
# automatic chunks, bytes per (B, heads, rows, N) tensor: at most a sixteenth of the free memory
# (the kernel holds two or three), and at most 8 MiB on CPU (the fastest in a full step at 1025
# tokens; smaller and larger chunks were slower: docs/performance.md) or 256 MiB on a GPU
_CHUNK_BYTES = {"cpu": 2 ** 23, "cuda": 2 ** 28}
_FREE_SHARE = 16


@dataclass(frozen=True)
class SDPACall:
    """One attention's ``scaled_dot_product_attention`` call, as the kernel saw it.

    ``q``, ``k``, ``v``, ``out``: (B, heads, N, head_dim); ``bias``: additive, broadcastable to
    (B, heads, N, N), or None; ``scale``: the factor applied to ``q k^T``; ``lse``: the softmax's
    log-sum-exp (B, heads, N) where the kernel returned it (SDPA's CPU flash kernel), else None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    dropout_p: float
    lse: torch.Tensor | None = None

    @classmethod
    def from_call(cls, args: tuple, kwargs: dict, out: torch.Tensor, lse: torch.Tensor | None = None) -> "SDPACall":
        bound = _bind_sdpa(*args, **kwargs)
        q, k = bound["query"], bound["key"]
        scale = bound["scale"] if bound["scale"] is not None else 1 / math.sqrt(q.shape[-1])
        bias = _additive_bias(bound["attn_mask"], q)
        if bound["is_causal"]:
            causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
            bias = _additive_bias(causal, q)
        return cls(q, k, bound["value"], out, bias, float(scale), float(bound["dropout_p"]), lse)


def _bind_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False) -> dict:
    """SDPA's arguments by name, whether passed by position or keyword."""
    return dict(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p,
                is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _cpu_flash(bound: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(output, log-sum-exp) from SDPA's CPU flash kernel, the kernel SDPA itself would run, called
    directly so that the log-sum-exp is kept; None where SDPA would choose another kernel."""
    q, k, v, mask = bound["query"], bound["key"], bound["value"], bound["attn_mask"]
    if (_CPU_FLASH is None or q.device.type != "cpu" or q.dtype not in _KERNEL_DTYPES or bound["enable_gqa"]
            or (mask is not None and mask.dtype == torch.bool) or torch.is_autocast_enabled("cpu")):
        return None  # (autocast casts SDPA's inputs, not the kernel's)
    args = (q, k, v, mask, bound["dropout_p"], bound["is_causal"])
    if torch._fused_sdp_choice(*args, scale=bound["scale"]) != int(SDPBackend.FLASH_ATTENTION):
        return None
    return _CPU_FLASH(q, k, v, bound["dropout_p"], bound["is_causal"], attn_mask=mask, scale=bound["scale"])


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
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        flash = _cpu_flash(_bind_sdpa(*args, **kwargs))
        out, lse = flash if flash is not None else (func(*args, **kwargs), None)
        self.record(SDPACall.from_call(args, kwargs, out, lse))
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
    """One SDPA call's operands in the kernel's dtype, heads folded into the batch, laid out for
    the products (``scores = q_lse @ k_t`` gives ``scale q k^T - lse`` directly), and two chunk
    buffers (the softmax, the cam product) that every chunk of rows reuses."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                 bias: torch.Tensor | None, lse: torch.Tensor | None, scale: float, dtype: torch.dtype,
                 rows: int) -> None:
        self.batch, self.heads, self.tokens, dim = q.shape
        folded = self.batch * self.heads
        # (B * heads, N, d + 1): [scale q, -lse], the log-sum-exp column 0 where it is to be computed
        self.q_lse = torch.empty(self.batch, self.heads, self.tokens, dim + 1, dtype=dtype, device=q.device)
        self.q_lse[..., :dim].copy_(q.detach()).mul_(scale)
        if lse is None:
            self.q_lse[..., dim] = 0
        else:
            self.q_lse[..., dim].copy_(lse.detach().reshape(self.batch, self.heads, self.tokens)).neg_()
        self.q_lse = self.q_lse.view(folded, self.tokens, dim + 1)
        # (B * heads, d + 1, N): [k, 1] transposed, the layout the products run fastest on
        self.k_t = torch.empty(folded, dim + 1, self.tokens, dtype=dtype, device=q.device)
        self.k_t[:, :dim].copy_(k.detach().reshape(folded, self.tokens, dim).transpose(1, 2))
        self.k_t[:, dim] = 1
        self.v_t = v.detach().to(dtype).reshape(folded, self.tokens, dim).transpose(1, 2).contiguous()
        self.grad_out = grad_out.detach().to(dtype).reshape(folded, self.tokens, dim).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.known_lse = lse is not None
        self.scale = scale
        # one allocation each, not one per chunk: fresh allocations of this size cost page faults
        size = folded * min(rows, self.tokens) * self.tokens
        self._buffers = [torch.empty(size, dtype=dtype, device=q.device) for _ in range(2)]

    @property
    def scaled_q(self) -> torch.Tensor:
        """``scale q`` (B * heads, N, d)."""
        return self.q_lse[..., :-1]

    @property
    def k(self) -> torch.Tensor:
        """k (B * heads, N, d)."""
        return self.k_t[:, :-1].transpose(1, 2)

    def buffer(self, index: int, start: int, stop: int) -> torch.Tensor:
        """Chunk buffer ``index`` as a contiguous (B * heads, stop - start, N) tensor."""
        shape = (self.q_lse.shape[0], stop - start, self.tokens)
        return self._buffers[index][:math.prod(shape)].view(shape)

    def attention(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The softmax A of the query rows ``start:stop`` (B * heads, rows, N) and their log-sum-exp
        (B * heads, rows, 1): with a known log-sum-exp one product and one ``exp``, else the softmax."""
        scores = torch.bmm(self.q_lse[:, start:stop], self.k_t, out=self.buffer(0, start, stop))
        scores = self._add_bias(scores, start, stop)
        if self.known_lse:
            return scores.exp_(), self.q_lse[:, start:stop, -1:].neg()
        high = scores.amax(dim=-1, keepdim=True)
        attn = scores.sub_(high).exp_()
        total = attn.sum(dim=-1, keepdim=True)
        return attn.div_(total), total.log_().add_(high)

    def cam(self, start: int, stop: int, attn: torch.Tensor) -> torch.Tensor:
        """``P = relu(dO v^T) * A`` for the rows ``start:stop`` (GAE's ``relu(grad * attn)``, equal
        since A >= 0; the gradient of A is ``dO v^T``)."""
        product = torch.bmm(self.grad_out[:, start:stop], self.v_t, out=self.buffer(1, start, stop))
        return product.clamp_(min=0).mul_(attn)

    def _add_bias(self, scores: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if self.bias is not None:
            scores.view(self.batch, self.heads, -1, self.tokens).add_(_rows(self.bias, start, stop))
        return scores

    def heads_of(self, chunk: torch.Tensor) -> torch.Tensor:
        """A (B * heads, rows, ...) chunk viewed as (B, heads, rows, ...)."""
        return chunk.view(self.batch, self.heads, *chunk.shape[1:])


def _weighted_rows(weights: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``sum_{h, n} weights[b, n] maps[b, h, n, m]``: (B, rows) and (B, heads, rows, N) -> (B, N)."""
    batch, heads, rows, tokens = maps.shape
    flat = weights.repeat(1, heads)[:, None]  # (B, 1, heads * rows), index h * rows + n
    return torch.bmm(flat, maps.reshape(batch, heads * rows, tokens))[:, 0]


def _weighted_extent(weights: torch.Tensor) -> int:
    """One past the last query row that any image weights: the rows after it add nothing (a class
    token readout weights only its first rows)."""
    used = weights.ne(0).any(dim=0).nonzero()
    return int(used[-1]) + 1 if len(used) else 0


class FusedIncrement(torch.autograd.Function):
    """``row @ mean_h(relu(dO v^T) * softmax(scale q k^T + bias))`` with a closed-form backward.

    Inputs: ``row`` (B, N), ``q``, ``k`` (B, heads, N, d) and the bias, differentiable; ``v`` and
    ``grad_out`` (B, heads, N, d), constants (GAE's first-order rule: the cam weights
    ``relu(dO v^T)`` carry no gradient, as on the explicit path); ``lse`` (B, heads, N), the
    softmax's log-sum-exp if the attention kernel returned it, else None (computed here). With
    ``g`` the gradient of the increment, ``P = relu(dO v^T) * A`` and ``z = P g``, the softmax's
    gradient is ``dS = row/heads * (P g^T - A z)`` per head, row by row; ``dq = scale dS k``,
    ``dk = scale dS^T q``, the bias gets ``dS``, the row ``mean_h z``. Each chunk of A is built
    from the log-sum-exp with one product; query rows that the row does not weight are skipped
    unless the row's gradient needs them.
    """

    @staticmethod
    def forward(ctx, row: torch.Tensor, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None,
                v: torch.Tensor, grad_out: torch.Tensor, scale: float, rows: int,
                lse: torch.Tensor | None = None) -> torch.Tensor:
        dtype = _KERNEL_DTYPES[q.dtype]
        chunks = _Chunks(q, k, v, grad_out, bias, lse, scale, dtype, rows)
        weights = row.to(dtype) / chunks.heads
        # without a log-sum-exp to start from, the backward of the row needs it on every row
        stop_at = _weighted_extent(weights) if lse is not None or not ctx.needs_input_grad[0] else chunks.tokens
        increment = torch.zeros(row.shape, dtype=dtype, device=row.device)
        saved_lse = (torch.zeros(chunks.batch * chunks.heads, chunks.tokens, 1, dtype=dtype, device=q.device)
                     if lse is None else lse.detach().to(dtype).reshape(-1, chunks.tokens, 1))
        for start in range(0, stop_at, rows):
            stop = min(start + rows, stop_at)
            attn, saved_lse[:, start:stop] = chunks.attention(start, stop)
            increment += _weighted_rows(weights[:, start:stop], chunks.heads_of(chunks.cam(start, stop, attn)))
        ctx.save_for_backward(row, q, k, bias, v, grad_out, saved_lse)
        ctx.scale, ctx.rows = scale, rows
        return increment.to(row.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        row, q, k, bias, v, grad_out, lse = ctx.saved_tensors
        dtype = lse.dtype
        chunks = _Chunks(q, k, v, grad_out, bias, lse, ctx.scale, dtype, ctx.rows)
        heads = chunks.heads
        weights = row.to(dtype) / heads
        grad = grad.to(dtype)
        want_row, want_q, want_k, want_bias = ctx.needs_input_grad[:4]
        grad_row = torch.zeros_like(weights) if want_row else None
        folded_shape = (chunks.batch * heads, chunks.tokens, q.shape[-1])
        grad_q = torch.zeros(folded_shape, dtype=dtype, device=q.device) if want_q else None
        grad_k = torch.zeros(folded_shape, dtype=dtype, device=q.device) if want_k else None
        grad_bias = torch.zeros_like(chunks.bias) if want_bias else None
        stop_at = chunks.tokens if want_row else _weighted_extent(weights)
        grad_column = grad[:, None, :, None]  # (B, 1, N, 1)
        for start in range(0, stop_at, ctx.rows):
            stop = min(start + ctx.rows, stop_at)
            attn, _ = chunks.attention(start, stop)
            product = chunks.heads_of(chunks.cam(start, stop, attn))
            z = product @ grad_column  # (B, heads, rows, 1)
            if want_row:
                grad_row[:, start:stop] = z.sum(dim=1)[..., 0] / heads
            if not (want_q or want_k or want_bias):
                continue
            # -dS / (row / heads) = A z - P g, in the memory of A
            negative = chunks.heads_of(attn).mul_(z).addcmul_(product, grad[:, None, None, :], value=-1)
            factor = weights[:, None, start:stop, None].neg()  # (B, 1, rows, 1): dS = negative * factor
            flat = negative.view(-1, stop - start, chunks.tokens)
            folded = factor.expand(-1, heads, -1, -1).reshape(-1, stop - start, 1)
            if want_q:
                grad_q[:, start:stop] = torch.bmm(flat, chunks.k).mul_(folded * ctx.scale)
            if want_k:  # scale dS^T q, from the scaled q
                grad_k.baddbmm_(flat.transpose(1, 2), chunks.scaled_q[:, start:stop] * folded)
            if want_bias:
                rows_grad = _rows(grad_bias, start, stop)
                rows_grad += (negative * factor).sum_to_size(rows_grad.shape)
        return (_cast(grad_row, row), _cast(_unfold(grad_q, q), q), _cast(_unfold(grad_k, k), k),
                _cast(grad_bias, bias), None, None, None, None, None)


def _unfold(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A (B * heads, N, d) gradient in the (B, heads, N, d) shape of ``like``."""
    return None if grad is None else grad.view(like.shape)


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
    return FusedIncrement.apply(row, call.q, call.k, call.bias, call.v.detach(), grad_out, call.scale, rows, call.lse)
