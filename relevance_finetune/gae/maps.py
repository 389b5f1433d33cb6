"""Relevance maps after the rollout: per-image normalisation and upsampling to the image size."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["normalize_relevance", "upsample_relevance"]


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
