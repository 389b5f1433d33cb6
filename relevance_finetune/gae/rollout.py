"""The GAE rule: relevance from the recorded attention calls of one forward and its logits.

One ``torch.autograd.grad`` call over every block's map (explicit path) or attention output (fused
path), then a row-vector rollout from the tokens the classifier reads, O(L N^2): each block adds
``row @ mean_h relu(grad * attn)`` (Chefer et al., 2021). The fused path rebuilds the maps in row
chunks (:func:`relevance_finetune.gae.fused.fused_increment`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .fused import SDPACall, fused_increment

__all__ = ["SECOND_ORDER_FUSED", "Readout", "resolve_target", "rollout_gain"]

SECOND_ORDER_FUSED = (
    "second-order relevance differentiates through the attention's backward, which fused SDPA "
    "does not support: use attach_gae(model, second_order=True, attention='explicit') (or 'auto')")


@dataclass(frozen=True)
class Readout:
    """The tokens the classifier reads, where the rollout starts.

    ``'token'`` pooling: the first ``class_tokens`` tokens (2 for distilled DeiTs, whose logits
    average the class and distillation heads); ``'avg'``: the mean of the tokens after the
    ``num_prefix_tokens`` prefix tokens.
    """

    pool: str
    num_prefix_tokens: int
    class_tokens: int = 1

    def row(self, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
        """The rollout's starting row (B, N)."""
        row = torch.zeros(batch, tokens, dtype=torch.float32, device=device)
        if self.pool == "token":
            row[:, :self.class_tokens] = 1.0 / self.class_tokens
        else:
            row[:, self.num_prefix_tokens:] = 1.0 / (tokens - self.num_prefix_tokens)
        return row


def rollout_gain(
        records: list[torch.Tensor | SDPACall],
        logits: torch.Tensor,
        target: int | torch.Tensor | None,
        readout: Readout,
        create_graph: bool,
        chunk_elements: int | None,
) -> torch.Tensor:
    """What the blocks add to the readout row for class ``target`` (None: the predicted class), (B, N).

    ``records`` are one forward's, first block first; ``logits`` (B, classes) that forward's output.
    Differentiable through the maps when gradients are enabled; with ``create_graph`` through the
    attention gradients too. Fused records take chunks of at most ``chunk_elements`` elements (None:
    chosen from the free memory).
    """
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
    target = resolve_target(logits, target)
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
    row = readout.row(batch, tokens, logits.device)
    gained = torch.zeros_like(row)  # the rollout row minus the readout row
    for record in reversed(records):
        grad = grads.pop()  # each gradient is dropped once used
        if fused:
            increment = fused_increment(row, record, grad, chunk_elements)
        else:
            increment = _explicit_increment(row, record, grad, create_graph, differentiable)
        row = row + increment
        gained = gained + increment
    return gained


def _check_fused(calls: list[SDPACall], create_graph: bool) -> None:
    if create_graph:
        raise ValueError(SECOND_ORDER_FUSED)
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


def resolve_target(logits: torch.Tensor, target: int | torch.Tensor | None) -> torch.Tensor:
    """The (B,) long class indices ``target`` names for (B, classes) ``logits``; None: the predicted class."""
    batch, classes = logits.shape
    if target is None:
        return logits.detach().argmax(dim=1)
    target = torch.as_tensor(target, device=logits.device)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target classes must be integers, got a {target.dtype} tensor")
    target = target.long()
    if target.ndim == 0:
        target = target.expand(batch)
    if target.shape != (batch,):
        raise ValueError(f"target must be an int or a ({batch},) tensor, got shape {tuple(target.shape)}")
    if target.min() < 0 or target.max() >= classes:
        raise ValueError(f"target classes must lie in [0, {classes}), got {target.tolist()}")
    return target
