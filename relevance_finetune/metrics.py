"""Relevance-quality metrics: the segmentation test and the perturbation test.

Both follow the protocol of Chefer et al. (Transformer-Explainability, CVPR 2021), which the
RobustViT paper uses for its Table 3 and Appendix N. Pure tensor functions: no files, no data
loading; the same functions serve ``relevance-finetune evaluate`` and the built-in benchmark.

Segmentation test, per image: min-max normalise the relevance map, threshold it at its own
mean (strictly greater = foreground); pixel accuracy and the (background, foreground) IoU are
accumulated over the whole dataset, average precision of the continuous map is taken per image
and averaged over images.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "DEFAULT_FRACTIONS",
    "SegmentationMeter",
    "area_under_curve",
    "average_precision",
    "perturb",
    "perturbation_curve",
]

DEFAULT_FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _as_maps(x: torch.Tensor, name: str) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) -> (B, H, W) float on the CPU."""
    x = torch.as_tensor(x)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (B, H, W) or (B, 1, H, W), got {tuple(x.shape)}")
    return x.detach().float().cpu()


def _min_max(maps: torch.Tensor) -> torch.Tensor:
    """Exact per-image min-max to [0, 1] (no epsilon, so tied values stay tied); constant -> 0."""
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    return torch.where(span > 0, (flat - low) / span.clamp(min=torch.finfo(flat.dtype).tiny), 0.0).view_as(maps)


def average_precision(scores: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> float:
    """Average precision of ``scores`` ranking the positive ``targets`` (both flattened).

    ``AP = sum_k (recall_k - recall_{k-1}) * precision_k`` over the distinct score thresholds,
    highest first (tied scores enter together), as ``sklearn.metrics.average_precision_score``.
    Returns 0.0 when there is no positive.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    targets = np.asarray(targets).reshape(-1).astype(bool)
    if scores.shape != targets.shape:
        raise ValueError(f"scores and targets differ in size: {scores.size} vs {targets.size}")
    positives = targets.sum()
    if positives == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    scores, targets = scores[order], targets[order]
    true_pos = np.cumsum(targets)
    # last index of every run of tied scores: one threshold per distinct value
    ends = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tp = true_pos[ends]
    precision = tp / (ends + 1)
    recall = tp / positives
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


class SegmentationMeter:
    """Dataset-level segmentation metrics of relevance maps against binary foreground masks.

    Examples
    --------
    >>> meter = SegmentationMeter()
    >>> meter.update(torch.tensor([[[0.9, 0.1], [0.8, 0.2]]]), torch.tensor([[[1, 0], [1, 0]]]))
    >>> meter.compute()
    {'pixel_acc': 100.0, 'miou': 100.0, 'map': 100.0, 'images': 1}
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.correct = 0
        self.labeled = 0
        self.intersection = np.zeros(2, dtype=np.int64)  # (background, foreground)
        self.union = np.zeros(2, dtype=np.int64)
        self.ap_scores: list[float] = []

    def update(self, relevance: torch.Tensor, masks: torch.Tensor) -> None:
        """Add a batch.

        Parameters
        ----------
        relevance : (B, H, W) or (B, 1, H, W) maps, raw or in [0, 1]; each is min-max normalised.
        masks : same spatial size, foreground where > 0.5 (binary masks or soft ones).
        """
        relevance, masks = _as_maps(relevance, "relevance"), _as_maps(masks, "masks")
        if relevance.shape != masks.shape:
            raise ValueError(
                f"relevance {tuple(relevance.shape)} and masks {tuple(masks.shape)} must have the "
                "same shape: upsample the relevance to the mask size (gae.explain does)")
        relevance = _min_max(relevance)
        truth = masks > 0.5
        pred = relevance > relevance.flatten(1).mean(1)[:, None, None]
        self.correct += int((pred == truth).sum())
        self.labeled += truth.numel()
        for cls, (p, t) in enumerate(((~pred, ~truth), (pred, truth))):
            self.intersection[cls] += int((p & t).sum())
            self.union[cls] += int((p | t).sum())
        for r, t in zip(relevance.numpy(), truth.numpy()):
            self.ap_scores.append(average_precision(np.stack([1 - r, r]), np.stack([~t, t])))

    def compute(self) -> dict[str, float]:
        """``pixel_acc``, ``miou``, ``map`` in percent, and the number of ``images``."""
        if not self.ap_scores:
            raise ValueError("SegmentationMeter.compute() called before any update()")
        iou = self.intersection / np.maximum(self.union, 1)
        return {
            "pixel_acc": 100.0 * self.correct / self.labeled,
            "miou": 100.0 * float(iou.mean()),
            "map": 100.0 * float(np.mean(self.ap_scores)),
            "images": len(self.ap_scores),
        }


def perturb(
        images: torch.Tensor,
        relevance: torch.Tensor,
        fraction: float,
        mode: str = "positive",
        fill: float | Sequence[float] = 0.0,
) -> torch.Tensor:
    """Replace the ``fraction`` most (``'positive'``) or least (``'negative'``) relevant pixels.

    Parameters
    ----------
    images : (B, C, H, W) model input.
    relevance : (B, H, W) or (B, 1, H, W) maps at the image size.
    fraction : share of the H*W pixels to replace, ``int(H * W * fraction)`` of them.
    mode : ``'positive'`` removes the highest relevance first, ``'negative'`` the lowest.
    fill : value written into every channel, or one value per channel. To zero pixels before
        normalisation (the reference protocol), pass ``-mean / std`` per channel.

    Returns
    -------
    A perturbed copy of ``images``.
    """
    if mode not in ("positive", "negative"):
        raise ValueError(f"mode must be 'positive' or 'negative', got {mode!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    relevance = _as_maps(relevance, "relevance").to(images.device)
    batch, channels, height, width = images.shape
    if relevance.shape != (batch, height, width):
        raise ValueError(
            f"relevance must have shape ({batch}, {height}, {width}) to match images "
            f"{tuple(images.shape)}, got {tuple(relevance.shape)}: use gae.explain(images)")
    fill = torch.as_tensor(fill, dtype=images.dtype, device=images.device).reshape(-1)
    if fill.numel() not in (1, channels):
        raise ValueError(f"fill must be a number or {channels} per-channel values, got {fill.numel()}")
    count = int(height * width * fraction)
    scores = relevance.flatten(1) if mode == "positive" else -relevance.flatten(1)
    index = scores.topk(count, dim=1).indices
    removed = torch.zeros(batch, height * width, dtype=torch.bool, device=images.device)
    removed.scatter_(1, index, True)
    removed = removed.view(batch, 1, height, width)
    return torch.where(removed, fill.view(1, -1, 1, 1), images)


@torch.no_grad()
def perturbation_curve(
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        relevance: torch.Tensor,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        mode: str = "positive",
        fill: float | Sequence[float] = 0.0,
) -> torch.Tensor:
    """Top-1 accuracy (percent) of ``model`` on ``images`` with growing shares of pixels removed.

    Parameters
    ----------
    model : a classifier; called as ``model(images)`` without gradients in its current mode.
    images, labels : (B, C, H, W) model input and (B,) class indices.
    relevance : (B, H, W) maps at the image size (e.g. ``gae.explain(images)``, which explains
        the predicted class, as the reference protocol does).
    fractions, mode, fill : see :func:`perturb`.

    Returns
    -------
    (len(fractions),) float tensor of accuracies in percent for this batch. Batches combine by
    the batch-size-weighted mean.
    """
    if len(fractions) == 0:
        raise ValueError("fractions must name at least one share of pixels to remove")
    labels = torch.as_tensor(labels, device=images.device).reshape(-1)
    if labels.numel() != images.shape[0]:
        raise ValueError(f"expected {images.shape[0]} labels, got {labels.numel()}")
    accuracy = []
    for fraction in fractions:
        logits = model(perturb(images, relevance, fraction, mode, fill))
        accuracy.append(100.0 * (logits.argmax(dim=1) == labels).float().mean())
    return torch.stack(accuracy).cpu()


def area_under_curve(fractions: Sequence[float], accuracy: Sequence[float] | torch.Tensor) -> float:
    """Trapezoidal area under the accuracy-vs-fraction curve (same units as ``accuracy``)."""
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(torch.as_tensor(accuracy).cpu(), dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"fractions and accuracy must be 1-d of equal length, got {x.shape} and {y.shape}")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))
