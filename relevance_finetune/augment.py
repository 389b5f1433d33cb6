"""Mask-guided counterfactual images: objects on other images' backgrounds, or on none.

A batch callable in the style of timm's ``Mixup``: ``images, masks = swap(images, masks)``;
the labels stay, because each image keeps its object. Compositing is linear, so the images may
be in [0, 1] or already normalised per channel.

The hole a donor's own object leaves in its background is filled by normalised convolution
(a Gaussian-weighted mean of the surrounding background pixels, Knutsson & Westin 1993), which
continues smooth gradients and the local colour of textures; where no background lies within
reach, by the donor's background mean.
"""
from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torchvision.transforms.functional as TF

__all__ = ["BackgroundSwap", "fill_object"]

Fill = Literal["inpaint", "mean"]


def _check(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``masks`` as float (B, 1, H, W) matching (B, C, H, W) ``images``."""
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    masks = masks[:, None] if masks.ndim == 3 else masks
    if masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[0] != images.shape[0] \
            or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}: "
                         "expected (B, H, W) or (B, 1, H, W) at the images' size")
    masks = masks.to(images.dtype)
    if masks.numel() and (masks.min() < 0 or masks.max() > 1 or masks.isnan().any()):
        raise ValueError("masks must lie in [0, 1]")
    return masks


def fill_object(images: torch.Tensor, masks: torch.Tensor, fill: Fill = "inpaint") -> torch.Tensor:
    """The backgrounds of (B, C, H, W) ``images`` with their objects (``masks`` (B, [1,] H, W)) filled.

    ``"inpaint"``: normalised convolution of the background (sigma = 1/8 of the image side);
    ``"mean"``: each image's background mean colour.
    """
    if fill not in ("inpaint", "mean"):
        raise ValueError(f"fill must be 'inpaint' or 'mean', got {fill!r}")
    masks = _check(images, masks)
    background = 1 - masks
    area = background.sum(dim=(2, 3), keepdim=True)
    mean = (images * background).sum(dim=(2, 3), keepdim=True) / area.clamp(min=1e-6)
    filler = mean.expand_as(images)
    if fill == "inpaint":
        sigma = max(images.shape[-2:]) / 8
        kernel = 2 * math.ceil(2 * sigma) + 1
        blurred = TF.gaussian_blur(torch.cat([images * background, background], 1), [kernel, kernel], [sigma, sigma])
        weight = blurred[:, -1:]
        reach = weight > 1e-3
        filler = torch.where(reach, blurred[:, :-1] / weight.clamp(min=1e-3), filler)
    return images * background + filler * masks


class BackgroundSwap:
    """Paste each object onto another image's background with probability ``p``.

    Parameters
    ----------
    p:
        Probability that an image's object moves onto another image's background.
    object_only:
        Probability that an image not swapped loses its background instead (filled with the
        batch's mean background colour).
    fill:
        How a donor's own object hole is filled: ``"inpaint"`` or ``"mean"`` (see ``fill_object``).
    seed:
        Seeds the draws (a CPU generator); ``None`` uses torch's global generator.

    Images whose mask is all background (no object to move) or all object (no background to
    give) are left unchanged and counted in ``skipped``; ``swapped`` and ``object_only_count``
    count the others. A batch with fewer than two usable images swaps nothing.
    """

    def __init__(self, p: float = 1.0, object_only: float = 0.0, fill: Fill = "inpaint", seed: int | None = None):
        for name, value in (("p", p), ("object_only", object_only)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if fill not in ("inpaint", "mean"):
            raise ValueError(f"fill must be 'inpaint' or 'mean', got {fill!r}")
        self.p, self.object_only, self.fill = p, object_only, fill
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.swapped = self.object_only_count = self.skipped = 0

    def __repr__(self) -> str:
        return f"BackgroundSwap(p={self.p}, object_only={self.object_only}, fill={self.fill!r})"

    def _uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, masks) -> (counterfactual images, their masks); shapes and device kept."""
        masks_4d = _check(images, masks)
        area = masks_4d.sum(dim=(1, 2, 3)).cpu()
        usable = (area > 0) & (area < masks_4d[0].numel())
        skipped = int((~usable).sum())
        if skipped:
            self.skipped += skipped
            warnings.warn(f"BackgroundSwap: {skipped} of {len(area)} images have a mask that is all background "
                          f"or all object and were left unchanged ({self.skipped} so far)", stacklevel=2)
        draw = self._uniform(len(area))
        moving = usable & (draw < self.p)
        stripped = usable & ~moving & (self._uniform(len(area)) < self.object_only)
        out = images.clone()
        if int(moving.sum()) and int(usable.sum()) >= 2:
            donors = self._donors(moving, usable).to(images.device)
            index = torch.nonzero(moving).squeeze(1).to(images.device)
            backgrounds = fill_object(images[donors], masks_4d[donors], self.fill)
            keep = masks_4d[index]
            out[index] = images[index] * keep + backgrounds * (1 - keep)
            self.swapped += len(index)
        if int(stripped.sum()):
            index = torch.nonzero(stripped).squeeze(1).to(images.device)
            background = 1 - masks_4d
            colour = (images * background).sum(dim=(0, 2, 3)) / background.sum(dim=(0, 2, 3)).clamp(min=1e-6)
            keep = masks_4d[index]
            out[index] = images[index] * keep + colour.view(1, -1, 1, 1) * (1 - keep)
            self.object_only_count += len(index)
        return out, masks

    def _donors(self, moving: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
        """For every moving image, another usable image whose background it takes."""
        candidates = torch.nonzero(usable).squeeze(1)
        order = candidates[torch.randperm(len(candidates), generator=self.generator)]
        following = torch.empty_like(usable, dtype=torch.long)
        following[order] = order.roll(-1)  # a cycle: nobody gets their own background
        return following[moving]
