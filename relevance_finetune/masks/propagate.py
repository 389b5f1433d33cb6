"""Masks for many images from a few annotated ones: a patch classifier on a ViT's own tokens.

A ViT's patch tokens tell object from background well enough that a small classifier on them
segments (the linear-probe segmentations of DINO and DINOv2). Given a few annotated images, every
other image of the same task gets a mask:

1. features: the patch tokens (prefix tokens dropped) that chosen blocks of the ViT output, the
   blocks concatenated (forward hooks on ``model.blocks``, no gradient, eval mode);
2. targets: each patch's object share, the annotated mask averaged over the patch;
3. a classifier on standardised tokens, a linear one or a one-hidden-layer MLP, trained full-batch
   with Adam for a fixed number of steps from a seeded start, object and background weighted
   equally (the soft patch shares as targets of a balanced binary cross-entropy);
4. the blocks, the classifier and the threshold chosen by the mean IoU of the held-out images'
   masks in k-fold cross-validation split by image; that IoU is the reported ``held_out_iou``
   (a little optimistic: it also chose the settings); then one refit on every annotated image;
5. prediction: each patch's object probability, upsampled bilinearly to the image's pixels,
   optionally smoothed by the bilateral solver on the image (``masks/bilateral.py``), thresholded.

The quality is known before anything trains on the masks: a held-out IoU under ``LOW_IOU`` gives a
warning with the number, and the counts of empty and whole masks come with the masks. The
annotated images keep their own masks: passing them again among the targets predicts them anew,
which a caller should not use in their place.
"""
from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from torch import nn
from tqdm import tqdm

from .bilateral import bilateral_solve
from .tokencut import patch_grid

__all__ = ["CLASSIFIERS", "FULL_SHARE", "LOW_IOU", "Propagation", "patch_tokens", "propagate_masks"]

CLASSIFIERS = ("linear", "mlp")
LOW_IOU = 0.3  # warn when the held-out IoU is below this
FULL_SHARE = 0.95  # a mask covering at least this share of its image counts as the whole image


@dataclass(frozen=True)
class Propagation:
    """What ``propagate_masks`` made and how good it is.

    Attributes
    ----------
    masks:
        (M, H, W) float 0/1 masks of the targets, at the images' size.
    held_out_iou:
        Mean IoU (a fraction) of the chosen setting's masks of held-out annotated images with
        their annotated masks, over every annotated image (k-fold, split by image).
    blocks, classifier, threshold:
        The chosen setting: the blocks whose tokens were read (indices into ``model.blocks``), the
        classifier (one of ``CLASSIFIERS``) and the probability threshold.
    fold_iou:
        The chosen setting's mean IoU per fold.
    scores:
        Every candidate setting's held-out IoU, keyed ``"<classifier> on blocks <i,j,...>, threshold <t>"``.
    empty, whole:
        Targets whose mask has no pixel, and whose mask covers at least ``FULL_SHARE`` of the image.
    low_quality:
        Whether ``held_out_iou`` is below ``warn_below`` (a warning was given).
    warn_below:
        The held-out IoU under which the masks count as low quality.
    annotated:
        The number of annotated images.
    seconds:
        Wall time of the whole call.
    """

    masks: torch.Tensor
    held_out_iou: float
    blocks: tuple[int, ...]
    classifier: str
    threshold: float
    fold_iou: tuple[float, ...]
    scores: Mapping[str, float]
    empty: int
    whole: int
    low_quality: bool
    warn_below: float
    annotated: int
    seconds: float

    def summary(self) -> dict[str, Any]:
        """Everything but the masks, JSON-ready."""
        return {"images": len(self.masks), "annotated": self.annotated, "held_out_iou": self.held_out_iou,
                "fold_iou": list(self.fold_iou), "blocks": list(self.blocks), "classifier": self.classifier,
                "threshold": self.threshold, "empty": self.empty, "whole": self.whole, "full_share": FULL_SHARE,
                "low_quality": self.low_quality, "warn_below": self.warn_below, "scores": dict(self.scores),
                "seconds": self.seconds}


class _Setting(NamedTuple):
    blocks: tuple[int, ...]
    classifier: str


class _Classifier(NamedTuple):
    """Standardisation and layers ((weight, bias) each; ReLU between) of a fitted patch classifier."""

    mean: torch.Tensor
    std: torch.Tensor
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]


def propagate_masks(
        model: nn.Module,
        images: torch.Tensor,
        masks: torch.Tensor,
        targets: torch.Tensor,
        *,
        blocks: Sequence[Sequence[int]] | None = None,
        classifiers: Sequence[str] = CLASSIFIERS,
        thresholds: Sequence[float] = (0.5,),
        hidden: int = 128,
        steps: int = 100,
        lr: float = 1e-2,
        weight_decay: float = 1e-2,
        folds: int = 3,
        refine: bool = False,
        warn_below: float = LOW_IOU,
        batch_size: int = 64,
        seed: int = 0,
        progress: bool = True,
) -> Propagation:
    """Masks for ``targets`` from the annotated ``images`` and ``masks``, read off ``model``'s patch tokens.

    Parameters
    ----------
    model:
        A timm vision transformer (``patch_embed`` and ``blocks``): the model being corrected, or
        any other that takes these images.
    images, masks:
        (N, C, H, W) annotated images as the model takes them (normalised), and their (N, [1,] H, W)
        masks in [0, 1] (1 = object); together they need object and background.
    targets:
        (M, C, H, W) images to mask, as ``images``.
    blocks:
        Candidate sets of block indices whose tokens are concatenated (negative from the end);
        default the last block, the last four and every block.
    classifiers, thresholds:
        Candidate classifiers (``"linear"``, ``"mlp"``) and probability thresholds.
    hidden, steps, lr, weight_decay:
        The MLP's hidden width; full-batch Adam steps, learning rate and weight decay of every fit.
    folds:
        Cross-validation folds, split by image (at least 2, at most N).
    refine:
        Smooth each probability map with the bilateral solver on its image before thresholding
        (spatial sigma one patch; tens of milliseconds per small image).
    warn_below:
        Warn when the held-out IoU is below this.
    batch_size, seed, progress:
        Images per forward; the seed of the folds and the classifiers' starts; a tqdm bar.
    """
    start = time.perf_counter()
    block_list = _token_blocks(model)
    masks = _checked(images, masks, targets)
    settings, thresholds = _candidates(blocks, len(block_list), classifiers, thresholds)
    if not 2 <= folds <= len(images):
        raise ValueError(f"{folds}-fold cross-validation needs 2 <= folds <= the {len(images)} annotated images: "
                         f"annotate more images or pass folds=2..{max(len(images), 2)}")
    used = sorted({index for setting in settings for index in setting.blocks})
    fit = _FitSettings(hidden, steps, lr, weight_decay, seed)
    rgb = _rgb(model, images) if refine else None
    tokens, grid = patch_tokens(model, images, used, batch_size, progress, "propagation: annotated tokens")
    shares = F.adaptive_avg_pool2d(masks[:, None].to(tokens), grid).flatten(1)  # (N, patches)
    truth = masks > 0.5
    fold_of = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)) % folds
    scores, chosen = {}, {}
    for setting in tqdm(settings, desc="propagation: choosing the setting", disable=not progress):
        columns = _columns(tokens, used, setting.blocks)
        probabilities = torch.empty(shares.shape, device=tokens.device)
        for fold in range(folds):
            held = fold_of == fold
            classifier = _fit(columns[~held], shares[~held], setting.classifier, fit)
            probabilities[held] = _probabilities(classifier, columns[held])
        pixels = _pixels(probabilities, grid, truth.shape[-2:], rgb, model)
        for threshold in thresholds:
            iou = _iou(pixels > threshold, truth)
            name = f"{setting.classifier} on blocks {','.join(map(str, setting.blocks))}, threshold {threshold:g}"
            scores[name] = iou.mean().item()
            chosen[name] = (setting, threshold, tuple(iou[fold_of == fold].mean().item() for fold in range(folds)))
    best = max(scores, key=scores.get)  # ties: the earlier candidate
    setting, threshold, fold_iou = chosen[best]
    classifier = _fit(_columns(tokens, used, setting.blocks), shares, setting.classifier, fit)
    del tokens
    predicted = _predict(model, targets, classifier, setting.blocks, threshold, refine, batch_size, progress)
    held_out_iou = scores[best]
    low = held_out_iou < warn_below
    if low:
        warnings.warn(f"propagated masks: held-out IoU {held_out_iou:.2f} with the annotated masks is below "
                      f"{warn_below:g}: look at the masks, annotate more images or read another model's tokens")
    area = predicted.flatten(1).mean(1) if len(predicted) else torch.zeros(0)
    return Propagation(predicted, held_out_iou, setting.blocks, setting.classifier, threshold, fold_iou,
                       MappingProxyType(scores), int((area == 0).sum()), int((area >= FULL_SHARE).sum()), low,
                       warn_below, len(images), time.perf_counter() - start)


class _FitSettings(NamedTuple):
    hidden: int
    steps: int
    lr: float
    weight_decay: float
    seed: int


def _token_blocks(model: nn.Module) -> nn.ModuleList | nn.Sequential:
    """``model.blocks``, or an error saying what propagation needs."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed") or not len(blocks):
        raise TypeError(f"propagate_masks needs a vision transformer with patch tokens (timm's `patch_embed` and "
                        f"`blocks`, e.g. a ViT, DeiT, BEiT or EVA); {type(model).__name__} has none")
    return blocks


def _checked(images: torch.Tensor, masks: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The masks as (N, H, W), or an error naming the shapes or what the masks lack."""
    masks = masks[:, 0] if masks.ndim == 4 and masks.shape[1] == 1 else masks
    if images.ndim != 4 or masks.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"images must be (N, C, H, W) and masks (N, [1,] H, W) of the same N, H and W; got images "
                         f"{tuple(images.shape)}, masks {tuple(masks.shape)}")
    if targets.ndim != 4 or targets.shape[1:] != images.shape[1:]:
        raise ValueError(f"targets must be (M, C, H, W) like the images {tuple(images.shape[1:])}; got "
                         f"{tuple(targets.shape)}")
    if not len(images):
        raise ValueError("no annotated images: propagation needs a few images with their masks")
    area = masks.float().mean()
    if area == 0 or area == 1:
        raise ValueError(f"every annotated mask is {'empty' if area == 0 else 'the whole image'}: the classifier "
                         "needs both object and background")
    return masks.float()


def _candidates(blocks: Sequence[Sequence[int]] | None, depth: int, classifiers: Sequence[str],
                thresholds: Sequence[float]) -> tuple[list[_Setting], tuple[float, ...]]:
    """Every (block set, classifier) to score, each block set as sorted indices; the thresholds."""
    if blocks is None:
        blocks = [[-1], range(-min(4, depth), 0), range(depth)]
    sets = []
    for group in blocks:
        group = [int(index) for index in group]
        indices = sorted({index % depth for index in group if -depth <= index < depth})
        if not indices or len(indices) != len(set(group)):
            raise ValueError(f"blocks must be non-empty sets of indices into the model's {depth} blocks, got {group}")
        sets.append(tuple(indices))
    unknown = sorted(set(classifiers) - set(CLASSIFIERS))
    if unknown or not classifiers:
        raise ValueError(f"classifiers must be some of {CLASSIFIERS}, got {list(classifiers)}")
    if not thresholds or not all(0 < t < 1 for t in thresholds):
        raise ValueError(f"thresholds must lie strictly between 0 and 1, got {list(thresholds)}")
    settings = [_Setting(*pair) for pair in itertools.product(dict.fromkeys(sets), dict.fromkeys(classifiers))]
    return settings, tuple(dict.fromkeys(map(float, thresholds)))


@torch.no_grad()
def patch_tokens(model: nn.Module, images: torch.Tensor, blocks: Sequence[int], batch_size: int = 64,
                 progress: bool = False, desc: str = "patch tokens") -> tuple[torch.Tensor, tuple[int, int]]:
    """The patch tokens (N, patches, len(blocks) * D) that ``model.blocks[i]`` output for ``i`` in ``blocks``
    (concatenated in that order, prefix tokens dropped), and the patch grid; in eval mode, on the model's device."""
    block_list = _token_blocks(model)
    device = next(model.parameters()).device
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    grid = tuple(patch_grid(model, tuple(images.shape[-2:])))
    captured: dict[int, torch.Tensor] = {}
    hooks = [block_list[index].register_forward_hook(
        lambda module, args, output, index=index: captured.__setitem__(index, output[:, prefix:]))
        for index in blocks]
    training = model.training
    model.eval()
    parts = []
    try:
        for batch in tqdm(images.split(batch_size), desc=desc, disable=not progress):
            model.forward_features(batch.to(device))
            parts.append(torch.cat([captured[index] for index in blocks], dim=-1).float())
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    tokens = torch.cat(parts)
    if tokens.shape[1] != grid[0] * grid[1]:
        raise RuntimeError(f"{tokens.shape[1]} patch tokens do not fill the {grid[0]}x{grid[1]} grid")
    return tokens, grid


def _columns(tokens: torch.Tensor, used: Sequence[int], blocks: tuple[int, ...]) -> torch.Tensor:
    """The tokens of ``blocks`` out of ``tokens`` (the blocks ``used``, concatenated), (N, patches, D')."""
    width = tokens.shape[-1] // len(used)
    return torch.cat([tokens[..., used.index(b) * width:(used.index(b) + 1) * width] for b in blocks], dim=-1)


def _fit(tokens: torch.Tensor, shares: torch.Tensor, kind: str, settings: _FitSettings) -> _Classifier:
    """A patch classifier fitted on ``tokens`` (n, patches, D) to the object ``shares`` (n, patches)."""
    x, share = tokens.flatten(0, 1), shares.flatten()
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x = (x - mean) / std
    generator = torch.Generator().manual_seed(settings.seed)
    widths = (x.shape[1], settings.hidden, 1) if kind == "mlp" else (x.shape[1], 1)
    layers = tuple(_initial_layer(fan_in, fan_out, generator, x.device) for fan_in, fan_out in zip(widths, widths[1:]))
    parameters = [tensor for layer in layers for tensor in layer]
    # object and background weigh the same in all (the shares are soft: a patch counts towards both)
    object_weight = 0.5 / share.mean().clamp(min=1e-6)
    background_weight = 0.5 / (1 - share).mean().clamp(min=1e-6)
    weight = share * object_weight + (1 - share) * background_weight
    target = torch.where(weight > 0, share * object_weight / weight, share)
    optimizer = torch.optim.Adam(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    with torch.enable_grad():
        for _ in range(settings.steps):
            loss = F.binary_cross_entropy_with_logits(_logits(layers, x), target, weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return _Classifier(mean, std, tuple((w.detach(), b.detach()) for w, b in layers))


def _initial_layer(fan_in: int, fan_out: int, generator: torch.Generator,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A (weight, bias) pair drawn as ``nn.Linear`` draws them, from ``generator``."""
    bound = fan_in ** -0.5
    weight = (torch.rand(fan_in, fan_out, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(fan_out, generator=generator) * 2 - 1) * bound
    return weight.to(device).requires_grad_(), bias.to(device).requires_grad_()


def _logits(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    for depth, (weight, bias) in enumerate(layers):
        x = x @ weight + bias
        if depth < len(layers) - 1:
            x = F.relu(x)
    return x.squeeze(-1)


def _probabilities(classifier: _Classifier, tokens: torch.Tensor) -> torch.Tensor:
    """Object probability (n, patches) of each patch of ``tokens`` (n, patches, D)."""
    return torch.sigmoid(_logits(classifier.layers, (tokens - classifier.mean) / classifier.std))


def _rgb(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """``images`` as the bilateral solver reads them: (N, H, W, 3) uint8, un-normalised by the model's
    mean and std (timm's data config)."""
    config = resolve_model_data_config(model)
    mean, std = (torch.tensor(config[key], dtype=torch.float32).view(1, -1, 1, 1) for key in ("mean", "std"))
    pixels = (images.detach().float().cpu() * std + mean).clamp(0, 1)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    return (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _pixels(probabilities: torch.Tensor, grid: tuple[int, int], size: torch.Size, rgb: np.ndarray | None,
            model: nn.Module) -> torch.Tensor:
    """Per-patch probabilities (n, patches) upsampled bilinearly to (n, H, W), bilateral-smoothed on
    ``rgb`` (n, H, W, 3) when given (spatial sigma one patch)."""
    maps = F.interpolate(probabilities.view(-1, 1, *grid), size=tuple(size), mode="bilinear",
                         align_corners=False)[:, 0].cpu()
    if rgb is None:
        return maps
    sigma = float(tuple(model.patch_embed.patch_size)[0])
    return torch.stack([torch.from_numpy(bilateral_solve(image, probability.numpy(), sigma_spatial=sigma)).float()
                        for image, probability in zip(rgb, maps)])


def _iou(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image IoU (n,) of two bool stacks (n, H, W); 1 where both are empty."""
    truth = truth.to(predicted.device)
    union = (predicted | truth).flatten(1).sum(1)
    inter = (predicted & truth).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones(len(union), device=union.device))


def _predict(model: nn.Module, targets: torch.Tensor, classifier: _Classifier, blocks: tuple[int, ...],
             threshold: float, refine: bool, batch_size: int, progress: bool) -> torch.Tensor:
    """The targets' masks (M, H, W) float 0/1, batch by batch (their tokens are never all held)."""
    out = torch.zeros(len(targets), *targets.shape[-2:])
    with tqdm(total=len(targets), desc="propagation: masks", unit="img", disable=not progress) as bar:
        for start in range(0, len(targets), batch_size):
            batch = targets[start:start + batch_size]
            tokens, grid = patch_tokens(model, batch, blocks, batch_size)
            pixels = _pixels(_probabilities(classifier, tokens), grid, batch.shape[-2:],
                             _rgb(model, batch) if refine else None, model)
            out[start:start + len(batch)] = (pixels > threshold).float()
            bar.update(len(batch))
    return out
