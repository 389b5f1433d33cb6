"""Reliance probes: does the model use the object or the background?

The relevance map can move onto the object while the model keeps (or grows) its use of the
background. These probes measure the use directly, on images with foreground masks: accuracy
on object-only inputs (background replaced) and on background-only inputs (object replaced),
each with three fills, since a fill can itself be a cue: a neutral grey, the dataset's mean
colour, and a blurred copy of the image.
"""
from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
import torchvision.transforms.functional as TF
from torch import nn

__all__ = ["FILLS", "replace_region", "reliance_probes"]

Fill = Literal["grey", "mean", "blur"]
FILLS: tuple[Fill, ...] = ("grey", "mean", "blur")


def _fill_image(images: torch.Tensor, fill: Fill, mean: torch.Tensor | None) -> torch.Tensor:
    if fill == "grey":
        return torch.full_like(images, 0.5)
    if fill == "mean":
        colour = images.mean(dim=(0, 2, 3)) if mean is None else mean.to(images)
        return colour.view(1, -1, 1, 1).expand_as(images)
    if fill == "blur":
        size = max(images.shape[-2:])
        kernel = 2 * (size // 8) + 1
        return TF.gaussian_blur(images, kernel_size=[kernel, kernel], sigma=size / 8)
    raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")


def replace_region(
        images: torch.Tensor,
        masks: torch.Tensor,
        region: Literal["object", "background"],
        fill: Fill = "grey",
        mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace the object (or the background) of (B, C, H, W) images in [0, 1] by ``fill``.

    ``masks`` is (B, H, W) or (B, 1, H, W) foreground in [0, 1]; ``mean`` (C,) is the colour
    used by ``fill="mean"`` (default: the batch mean).
    """
    masks = masks if masks.ndim == 4 else masks[:, None]
    if masks.shape[0] != images.shape[0] or masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
    if region not in ("object", "background"):
        raise ValueError(f"region must be 'object' or 'background', got {region!r}")
    replaced = masks if region == "object" else 1 - masks
    return images * (1 - replaced) + _fill_image(images, fill, mean) * replaced


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
              normalize: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> float:
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(normalize(images[start:start + batch_size]))
        correct += (logits.argmax(1).cpu() == labels[start:start + batch_size].cpu()).sum().item()
    return 100.0 * correct / len(images)


def reliance_probes(
        model: nn.Module,
        images: torch.Tensor,
        masks: torch.Tensor,
        labels: torch.Tensor,
        normalize: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
        fills: Sequence[Fill] = FILLS,
        batch_size: int = 256,
) -> dict[str, float]:
    """Accuracy (percent) on full, object-only and background-only versions of the images.

    Returns ``full``, ``object_only/<fill>``, ``background_only/<fill>``, their means over the
    fills ``object_only`` and ``background_only``, and ``background_reliance`` =
    background_only - object_only (higher: the model leans more on the background).
    ``images`` are (B, C, H, W) in [0, 1]; ``normalize`` maps them to the model's input.
    """
    was_training = model.training
    model.eval()
    mean = images.mean(dim=(0, 2, 3))
    out = {"full": _accuracy(model, images, labels, normalize, batch_size)}
    for region, name in (("background", "object_only"), ("object", "background_only")):
        scores = []
        for fill in fills:
            probed = replace_region(images, masks, region, fill, mean)
            scores.append(_accuracy(model, probed, labels, normalize, batch_size))
            out[f"{name}/{fill}"] = scores[-1]
        out[name] = sum(scores) / len(scores)
    out["background_reliance"] = out["background_only"] - out["object_only"]
    model.train(was_training)
    return out
