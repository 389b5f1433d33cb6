"""Relevance-quality metrics: the segmentation test, localisation scores and the perturbation test.

The segmentation and perturbation tests follow the protocol of Chefer et al.
(Transformer-Explainability, CVPR 2021), which the RobustViT paper uses for its Table 3 and
Appendix N; the localisation scores follow the definitions of Quantus (Hedström et al., JMLR
2023). Pure tensor functions: no files, no data loading; the same functions serve
``relevance-finetune evaluate`` and the built-in benchmark.

Group accuracy (``group_accuracy``) is the metric of group-labelled data (Waterbirds, CelebA, a
user's own groups): per-group accuracy and counts, the worst group, the plain mean and the group
accuracies weighted by the training split's group proportions (DFR's "mean accuracy").

Segmentation test, per image: min-max normalise the relevance map, threshold it at its own
mean (strictly greater = foreground); pixel accuracy and the (background, foreground) IoU are
accumulated over the whole dataset, average precision of the continuous map is taken per image
and averaged over images. As in the reference code, a constant map (no min-max range) counts as
background everywhere with both AP channels 0 (AP = 0.5), and pixels labelled -1 are left out
of every metric.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "DEFAULT_FRACTIONS",
    "LOCALISATION_METRICS",
    "SegmentationMeter",
    "area_under_curve",
    "average_precision",
    "group_accuracy",
    "perturb",
    "perturbation_curve",
    "pointing_game",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
]

DEFAULT_FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _as_maps(x: torch.Tensor, name: str) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) -> (B, H, W) float on the CPU."""
    x = torch.as_tensor(x)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (B, H, W) or (B, 1, H, W), got {tuple(x.shape)}")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name} are empty: shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or inf")
    return x.detach().float().cpu()


def _min_max(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-image min-max to [0, 1] (no epsilon, so tied values stay tied).

    Returns the normalised maps and a (B,) bool tensor of the constant maps, which become 0.
    """
    flat = maps.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    normalised = torch.where(span > 0, (flat - low) / span.clamp(min=torch.finfo(flat.dtype).tiny), 0.0)
    return normalised.view_as(maps), span[:, 0] == 0


def _labels(relevance: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, H, W) relevance, foreground (mask > 0.5) and labelled pixels (mask >= 0; -1 = ignored)."""
    relevance, masks = _as_maps(relevance, "relevance"), _as_maps(masks, "masks")
    if relevance.shape != masks.shape:
        raise ValueError(
            f"relevance {tuple(relevance.shape)} and masks {tuple(masks.shape)} must have the "
            "same shape: upsample the relevance to the mask size (gae.explain does)")
    return relevance, masks > 0.5, masks >= 0


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
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
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
    >>> result = meter.compute()
    >>> result["pixel_acc"], result["miou"], result["map"], result["pointing_game"], result["images"]
    (100.0, 100.0, 100.0, 100.0, 1)
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
        self.localisation: dict[str, list[torch.Tensor]] = {name: [] for name in LOCALISATION_METRICS}

    def update(self, relevance: torch.Tensor, masks: torch.Tensor) -> None:
        """Add a batch.

        Parameters
        ----------
        relevance : (B, H, W) or (B, 1, H, W) maps, raw or in [0, 1]; each is min-max normalised.
        masks : same spatial size, foreground where > 0.5 (binary masks or soft ones); pixels
            labelled -1 (any negative value) are ignored by every metric.
        """
        relevance, truth, valid = _labels(relevance, masks)
        relevance, constant = _min_max(relevance)
        pred = relevance > relevance.flatten(1).mean(1)[:, None, None]
        self.correct += int(((pred == truth) & valid).sum())
        self.labeled += int(valid.sum())
        for cls, (p, t) in enumerate(((~pred, ~truth), (pred, truth))):
            self.intersection[cls] += int((p & t & valid).sum())
            self.union[cls] += int(((p | t) & valid).sum())
        for r, t, v, flat in zip(relevance.numpy(), truth.numpy(), valid.numpy(), constant.tolist()):
            scores = np.zeros((2, int(v.sum())), np.float32) if flat else np.stack([1 - r[v], r[v]])
            self.ap_scores.append(average_precision(scores, np.stack([~t[v], t[v]])))
        for name, metric in LOCALISATION_METRICS.items():
            self.localisation[name].append(metric(relevance, torch.where(valid, truth.float(), -1.0)))

    def compute(self) -> dict[str, float | None]:
        """``pixel_acc``, ``miou``, ``map`` and the localisation scores in percent, and ``images``.

        ``mass_accuracy``, ``rank_accuracy`` and ``pointing_game`` are means over the
        ``localised_images``, those with at least one labelled foreground pixel (None if none).
        """
        if not self.ap_scores:
            raise ValueError("SegmentationMeter.compute() called before any update()")
        iou = self.intersection / np.maximum(self.union, 1)
        result = {
            "pixel_acc": 100.0 * self.correct / max(self.labeled, 1),
            "miou": 100.0 * float(iou.mean()),
            "map": 100.0 * float(np.mean(self.ap_scores)),
            "images": len(self.ap_scores),
        }
        scored = None
        for name, scores in self.localisation.items():
            scores = torch.cat(scores)
            scored = scores[~scores.isnan()]
            result[name] = 100.0 * float(scored.mean()) if scored.numel() else None
        result["localised_images"] = scored.numel()
        return result


# -- localisation (Quantus's definitions) -------------------------------------------------------------
def _localisation_inputs(relevance: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N) float64 relevance, foreground and labelled pixels, flattened."""
    relevance, truth, valid = _labels(torch.as_tensor(relevance), torch.as_tensor(masks))
    return relevance.double().flatten(1), truth.flatten(1), valid.flatten(1)


def _nan_without_foreground(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    return torch.where(truth.any(dim=1), scores, torch.nan)


def relevance_mass_accuracy(relevance: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the relevance that lies on the object (Arras et al., Inf. Fusion 2022).

    As Quantus's ``RelevanceMassAccuracy`` (``abs=False``; its default max-normalisation does not
    change the ratio): ``sum(R * S) / sum(R)`` per image. Pass non-negative maps (GAE maps are).

    Parameters
    ----------
    relevance : (B, H, W) or (B, 1, H, W) maps.
    masks : same shape; foreground where > 0.5, pixels labelled -1 (negative) left out.

    Returns
    -------
    (B,) float64 scores, in [0, 1] for non-negative maps; NaN for an image without foreground (as
    Quantus); 0 for a map whose labelled pixels sum to 0 (Quantus: 0/0 = NaN), such as the
    all-zero map a constant relevance map becomes after min-max normalisation.
    """
    relevance, truth, valid = _localisation_inputs(relevance, masks)
    relevance = relevance * valid
    total = relevance.sum(dim=1)
    within = (relevance * truth).sum(dim=1)
    return _nan_without_foreground(torch.where(total != 0, within / total.where(total != 0, 1.0), 0.0), truth)


def relevance_rank_accuracy(relevance: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the K most relevant pixels that lie on the object, K = object size (Arras et al. 2022).

    As Quantus's ``RelevanceRankAccuracy``: ``|top-K(R) & S| / K`` with ``K = |S|``. Quantus
    breaks ties at the K-th value by ``np.argsort`` order (arbitrary); here the pixels tied at the
    K-th value share the remaining places in proportion (the expectation over tie orders), so a
    constant map scores ``|S| / N``. Without ties the two agree exactly.

    Parameters
    ----------
    relevance, masks : as :func:`relevance_mass_accuracy`.

    Returns
    -------
    (B,) float64 scores in [0, 1]; NaN for an image without foreground (as Quantus).
    """
    relevance, truth, valid = _localisation_inputs(relevance, masks)
    relevance = relevance.masked_fill(~valid, -torch.inf)
    k = truth.sum(dim=1)
    kth = relevance.sort(dim=1, descending=True).values.gather(1, (k - 1).clamp(min=0)[:, None])
    above, tied = relevance > kth, relevance == kth
    shared = (k - above.sum(dim=1)) * (tied & truth).sum(dim=1) / tied.sum(dim=1).double()
    hits = (above & truth).sum(dim=1) + shared
    return _nan_without_foreground(hits / k.clamp(min=1), truth)


def pointing_game(relevance: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """1 where the most relevant pixel lies on the object, else 0 (Zhang et al., IJCV 2018).

    As Quantus's ``PointingGame`` (``weighted=False``): a hit when any pixel holding the maximum
    is foreground, so a constant map hits whenever the object is present; no tolerance radius
    (the original paper allows 15 pixels).

    Parameters
    ----------
    relevance, masks : as :func:`relevance_mass_accuracy`.

    Returns
    -------
    (B,) float64 scores in {0, 1}; NaN for an image without foreground (as Quantus).
    """
    relevance, truth, valid = _localisation_inputs(relevance, masks)
    relevance = relevance.masked_fill(~valid, -torch.inf)
    top = relevance == relevance.max(dim=1, keepdim=True).values
    return _nan_without_foreground((top & truth).any(dim=1).double(), truth)


LOCALISATION_METRICS = {
    "mass_accuracy": relevance_mass_accuracy,
    "rank_accuracy": relevance_rank_accuracy,
    "pointing_game": pointing_game,
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
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"fractions and accuracy must be finite, got {x.tolist()} and {y.tolist()}")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _as_vector(x, name: str) -> np.ndarray:
    """A 1-d int64 array of ``x`` (tensor, array or sequence)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-d (N,), got shape {x.shape}")
    if x.size and not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
    return x.astype(np.int64)


def group_accuracy(
        predictions: torch.Tensor | np.ndarray | Sequence[int],
        labels: torch.Tensor | np.ndarray | Sequence[int],
        groups: torch.Tensor | np.ndarray | Sequence[int],
        train_group_counts: Mapping[int, int] | None = None,
) -> dict:
    """Per-group accuracy, worst-group accuracy and the two means, as fractions.

    Parameters
    ----------
    predictions, labels, groups:
        (N,) integer class predictions, true classes and group ids.
    train_group_counts:
        Group id -> number of training images. When given, ``weighted_mean_accuracy`` is the
        group accuracies weighted by these proportions (DFR's and GroupDRO's "mean accuracy");
        every group with a positive count must occur in ``groups``.

    Returns
    -------
    ``{"groups": {group: {"accuracy", "count"}}, "worst_group_accuracy", "mean_accuracy"
    (over all N), "weighted_mean_accuracy" (None without ``train_group_counts``)}``.
    """
    predictions = _as_vector(predictions, "predictions")
    labels, groups = _as_vector(labels, "labels"), _as_vector(groups, "groups")
    if not predictions.shape == labels.shape == groups.shape:
        raise ValueError(f"predictions, labels and groups must have the same length, got "
                         f"{len(predictions)}, {len(labels)} and {len(groups)}")
    if not len(groups):
        raise ValueError("group_accuracy got no samples")
    correct = predictions == labels
    per_group = {int(g): {"accuracy": float(correct[groups == g].mean()), "count": int((groups == g).sum())}
                 for g in np.unique(groups)}
    weighted = None
    if train_group_counts is not None:
        counts = {int(g): int(n) for g, n in train_group_counts.items()}
        if any(n < 0 for n in counts.values()) or not sum(counts.values()):
            raise ValueError(f"train_group_counts must be non-negative with a positive total, got {counts}")
        absent = sorted(g for g, n in counts.items() if n and g not in per_group)
        if absent:
            raise ValueError(f"group(s) {absent} have training images but none here: the mean weighted by "
                             "training groups is undefined")
        total = sum(counts.values())
        weighted = sum(n / total * per_group[g]["accuracy"] for g, n in counts.items() if n)
    return {"groups": per_group,
            "worst_group_accuracy": min(v["accuracy"] for v in per_group.values()),
            "mean_accuracy": float(correct.mean()),
            "weighted_mean_accuracy": None if weighted is None else float(weighted)}
