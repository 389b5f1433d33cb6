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
from collections import deque
from typing import Any, Literal

import torch
import torchvision.transforms.functional as TF

__all__ = ["BackgroundSwap", "fill_object", "paste_objects", "usable_masks"]

Fill = Literal["inpaint", "mean"]
_COUNTS = ("swapped", "object_only_count", "skipped", "unswapped")


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


def usable_masks(masks: torch.Tensor) -> torch.Tensor:
    """(B,) bool: which of the (B, [1,] H, W) ``masks`` in [0, 1] have both object (> 0) and background (< 1).

    An empty mask has no object to move or score, a full one no background to give or replace:
    the counterfactual views, the head refit and the reliance probes use only the others.
    """
    if masks.ndim not in (3, 4) or (masks.ndim == 4 and masks.shape[1] != 1):
        raise ValueError(f"masks must have shape (B, H, W) or (B, 1, H, W), got {tuple(masks.shape)}")
    flat = masks.flatten(1)
    return (flat > 0).any(1) & (flat < 1).any(1)


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
        # torch's reflect padding (kernel // 2) must stay below the shorter side: a smaller kernel on thin images
        kernel = min(2 * math.ceil(2 * sigma) + 1, 2 * min(images.shape[-2:]) - 1)
        blurred = TF.gaussian_blur(torch.cat([images * background, background], 1), [kernel, kernel], [sigma, sigma])
        weight = blurred[:, -1:]
        reach = weight > 1e-3
        filler = torch.where(reach, blurred[:, :-1] / weight.clamp(min=1e-3), filler)
    return images * background + filler * masks


def paste_objects(images: torch.Tensor, masks: torch.Tensor, donors: torch.Tensor, donor_masks: torch.Tensor,
                  fill: Fill = "inpaint") -> torch.Tensor:
    """The objects of (B, C, H, W) ``images`` (``masks`` (B, [1,] H, W), as alpha) on the backgrounds of
    ``donors`` of the same shape, whose own objects (``donor_masks``) are filled first (``fill_object``)."""
    keep = _check(images, masks)
    return images * keep + fill_object(donors, donor_masks, fill) * (1 - keep)


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
    buffer_size:
        How many recent usable images (with their masks) are kept as donors for later calls;
        0 keeps none.

    A donor is another usable image of the same batch (a random cycle, so nobody gets their own
    background). When the batch has no second usable image (a batch of one, a micro-batch of one
    under gradient accumulation, one image per process), the donor is drawn from the buffer of
    the ``buffer_size`` most recent usable images of earlier calls (detached copies on the batch's
    device), excluding any whose pixels equal the receiver's; so a batch of one swaps from the
    second call on. Images whose mask is all background (no object to move) or all object (no
    background to give) are left unchanged and counted in ``skipped``; moving images that find
    no donor are left unchanged and counted in ``unswapped``; each case warns once, with its
    count. ``swapped`` and ``object_only_count`` count the others. ``state_dict()`` and
    ``load_state_dict()`` save and restore the generator, the buffer and the counts for an exact
    resume.
    """

    def __init__(self, p: float = 1.0, object_only: float = 0.0, fill: Fill = "inpaint", seed: int | None = None,
                 buffer_size: int = 16):
        for name, value in (("p", p), ("object_only", object_only)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if fill not in ("inpaint", "mean"):
            raise ValueError(f"fill must be 'inpaint' or 'mean', got {fill!r}")
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 0:
            raise ValueError(f"buffer_size must be an integer >= 0, got {buffer_size!r}")
        self.p, self.object_only, self.fill = p, object_only, fill
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.buffer: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=buffer_size)
        self.swapped = self.object_only_count = self.skipped = self.unswapped = 0
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return (f"BackgroundSwap(p={self.p}, object_only={self.object_only}, fill={self.fill!r}, "
                f"buffer_size={self.buffer.maxlen})")

    def _uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator)

    def _warn_once(self, reason: str, message: str) -> None:
        """Warn about ``reason`` the first time only (called from a method ``__call__`` calls)."""
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"BackgroundSwap: {message}; later ones are only counted", stacklevel=4)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, masks) -> (counterfactual images, their masks); shapes and device kept."""
        masks_4d = _check(images, masks)
        if not len(images):
            return images.clone(), masks.clone()
        usable = usable_masks(masks_4d).cpu()
        self._count_skipped(int((~usable).sum()), len(usable))
        draw = self._uniform(len(usable))
        moving = usable & (draw < self.p)
        stripped = usable & ~moving & (self._uniform(len(usable)) < self.object_only)
        out = images.clone()
        if int(moving.sum()):
            index, donors, donor_masks = self._donors_of(images, masks_4d, moving, usable)
            out[index] = paste_objects(images[index], masks_4d[index], donors, donor_masks, self.fill)
            self.swapped += len(index)
            self._count_unswapped(int(moving.sum()) - len(index))
        if int(stripped.sum()):
            index = torch.nonzero(stripped).squeeze(1).to(images.device)
            background = 1 - masks_4d
            colour = (images * background).sum(dim=(0, 2, 3)) / background.sum(dim=(0, 2, 3)).clamp(min=1e-6)
            keep = masks_4d[index]
            out[index] = images[index] * keep + colour.view(1, -1, 1, 1) * (1 - keep)
            self.object_only_count += len(index)
        self._remember(images, masks_4d, usable)
        return out, masks

    def _donors_of(self, images: torch.Tensor, masks: torch.Tensor, moving: torch.Tensor,
                   usable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The moving images that find a donor (indices), and their donors' images and masks."""
        index = torch.nonzero(moving).squeeze(1)
        if int(usable.sum()) >= 2:
            donors = self._donors(moving, usable).to(images.device)
            return index.to(images.device), images[donors], masks[donors]
        self._buffer_to(images.device)
        donors = {i: self._buffered_donor(images[i]) for i in index.tolist()}
        found = [i for i, donor in donors.items() if donor is not None]
        if not found:
            return index[:0].to(images.device), images[:0], masks[:0]
        donor_images = torch.stack([donors[i][0] for i in found]).to(images)
        donor_masks = torch.stack([donors[i][1] for i in found]).to(images)
        return torch.tensor(found, device=images.device), donor_images, donor_masks

    def _count_skipped(self, skipped: int, total: int) -> None:
        if skipped:
            self.skipped += skipped
            self._warn_once("skipped", f"{skipped} of {total} images have a mask that is all background or all "
                                       f"object and were left unchanged ({self.skipped} so far, in .skipped)")

    def _count_unswapped(self, missing: int) -> None:
        if missing:
            self.unswapped += missing
            reason = "empty" if not self.buffer else "buffer"
            self._warn_once(reason, f"{missing} image(s) could not be swapped: no other image of the batch has a "
                                    f"usable background and none of the {len(self.buffer)} buffered backgrounds "
                                    f"(buffer_size={self.buffer.maxlen}) is another image of this size "
                                    f"({self.unswapped} so far, in .unswapped)")

    def _donors(self, moving: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
        """For every moving image, another usable image whose background it takes."""
        candidates = torch.nonzero(usable).squeeze(1)
        order = candidates[torch.randperm(len(candidates), generator=self.generator)]
        following = torch.empty_like(usable, dtype=torch.long)
        following[order] = order.roll(-1)  # a cycle: nobody gets their own background
        return following[moving]

    def _buffered_donor(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A random buffered (image, mask) of ``image``'s size whose pixels differ from it, if any."""
        candidates = [(donor, mask) for donor, mask in self.buffer
                      if donor.shape == image.shape and not torch.equal(donor, image)]
        if not candidates:
            return None
        return candidates[int(torch.randint(len(candidates), (1,), generator=self.generator))]

    def _buffer_to(self, device: torch.device) -> None:
        if self.buffer and self.buffer[0][0].device != device:
            self.buffer = deque(((image.to(device), mask.to(device)) for image, mask in self.buffer),
                                maxlen=self.buffer.maxlen)

    def _remember(self, images: torch.Tensor, masks: torch.Tensor, usable: torch.Tensor) -> None:
        """Keep detached copies of the newest usable images as donors for later calls."""
        if self.buffer.maxlen:
            for i in torch.nonzero(usable).squeeze(1)[-self.buffer.maxlen:].tolist():
                self.buffer.append((images[i].detach().clone(), masks[i].detach().clone()))

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (``None`` for torch's global one), the buffer (on the CPU) and the counts."""
        return {"generator": None if self.generator is None else self.generator.get_state(),
                "buffer": [(image.cpu(), mask.cpu()) for image, mask in self.buffer],
                "counts": {name: getattr(self, name) for name in _COUNTS},
                "warned": sorted(self._warned)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the buffer moves to the next batch's device)."""
        missing = {"generator", "buffer", "counts", "warned"} - set(state)
        if missing:
            raise ValueError(f"not a BackgroundSwap state: missing {sorted(missing)}")
        self.generator = None if state["generator"] is None else torch.Generator()
        if self.generator is not None:
            self.generator.set_state(state["generator"])
        self.buffer = deque(((image, mask) for image, mask in state["buffer"]), maxlen=self.buffer.maxlen)
        for name in _COUNTS:
            setattr(self, name, int(state["counts"][name]))
        self._warned = set(state["warned"])
