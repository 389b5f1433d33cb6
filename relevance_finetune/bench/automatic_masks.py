"""Finetuning masks without annotation: TokenCut on a benchmark model, and their quality.

The ``tokencut`` finetuning masks are made as ``relevance-finetune masks`` makes them (its
defaults: ``tau`` 0.2, ``eps`` 1e-5, bilateral refinement with TokenCut's rule), from the last-block
keys of the seed's original or of its first phase (``BenchConfig.mask_source``). One setting
follows the benchmark's grid: the refinement's spatial sigma is one patch (8 px), as TokenCut's 16
px is one patch of its ViT/16. Every image keeps a mask, so each mask setting finetunes on the
same images: where the refinement is discarded (IoU < 0.5 with the coarse mask) the coarse
patch-grid mask stays, and small masks are kept (the command's ``--min-pixels`` 520 is a quarter
of a 48 x 48 image).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset

from .._files import atomic_path
from .._version import __version__
from ..masks.automatic import FULL_SHARE, WARN_SHARE
from ..masks.bilateral import bilateral_refine
from ..masks.tokencut import last_block_keys, tokencut_partition, upsample_mask
from .config import BenchConfig
from .originals import normalize, train_first_phase, train_original

__all__ = ["automatic_masks", "mask_quality", "mask_source_model", "patch_level", "reference_iou", "tokencut_splits",
           "warn_degenerate"]

# FULL_SHARE and WARN_SHARE: what counts as a whole mask and when to warn, as for train --masks tokencut:MODEL
_BATCH = 500


def mask_source_model(config: BenchConfig, seed: int, cache_dir: Path | None = None) -> nn.Module:
    """The model whose keys TokenCut reads (``config.mask_source``), trained or loaded from ``cache_dir``."""
    train = train_original if config.mask_source == "original" else train_first_phase
    return train(config, seed, cache_dir)


def _refined(image: torch.Tensor, coarse: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, bool]:
    """The bilateral refinement of ``coarse`` (H, W) bool on ``image`` (3, H, W) in [0, 1], or
    ``coarse`` where the refinement is discarded; and whether it was kept."""
    rgb = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    refined = bilateral_refine(rgb, coarse.numpy(), sigma_spatial=float(patch_size))
    return (coarse, False) if refined is None else (torch.from_numpy(refined), True)


@torch.no_grad()
def automatic_masks(model: nn.Module, images: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, int]:
    """TokenCut masks (N, H, W) float 0/1 of ``images`` (N, 3, H, W) in [0, 1] from ``model``'s keys,
    refined; and how many refinements were discarded (their coarse mask kept)."""
    masks, discarded = [], 0
    for start in range(0, len(images), _BATCH):
        batch = images[start:start + _BATCH]
        keys, grid = last_block_keys(model.eval(), normalize(batch))
        for image, key in zip(batch, keys.float().cpu()):
            coarse = torch.from_numpy(upsample_mask(tokencut_partition(key, grid), tuple(image.shape[-2:])))
            mask, kept = _refined(image, coarse, patch_size)
            masks.append(mask)
            discarded += not kept
    return torch.stack(masks).float(), discarded


def mask_quality(masks: torch.Tensor, exact: torch.Tensor) -> dict[str, Any]:
    """Mean IoU (percent) of ``masks`` (N, H, W) 0/1 with the ``exact`` ones, and the counts of empty
    masks and of masks covering at least ``FULL_SHARE`` of the image (two empty masks: IoU 100)."""
    if masks.shape != exact.shape or masks.ndim != 3:
        raise ValueError(f"expected two (N, H, W) mask stacks of one shape, got {tuple(masks.shape)} and "
                         f"{tuple(exact.shape)}")
    masks, exact = masks > 0.5, exact > 0.5
    union = (masks | exact).flatten(1).sum(1)
    inter = (masks & exact).flatten(1).sum(1)
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones(len(masks)))
    area = masks.flatten(1).float().mean(1)
    return {"iou": 100.0 * iou.mean().item(), "empty": int((area == 0).sum()),
            "full": int((area >= FULL_SHARE).sum()), "images": len(masks)}


def patch_level(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``masks`` (N, H, W) with every patch the object touches set: the best a mask on the patch grid can be."""
    coarse = F.max_pool2d(masks[:, None], patch_size)
    return F.interpolate(coarse, scale_factor=patch_size, mode="nearest")[:, 0]


def reference_iou(exact: torch.Tensor, patch_size: int) -> dict[str, float]:
    """The references an automatic mask's IoU with the ``exact`` masks (N, H, W) is read against:
    ``patch_iou``, the patch-level exact masks' (``patch_level``), and ``chance_iou``, each image
    given the previous image's exact mask."""
    return {"patch_iou": mask_quality(patch_level(exact, patch_size), exact)["iou"],
            "chance_iou": mask_quality(exact.roll(1, 0), exact)["iou"]}


def warn_degenerate(quality: dict[str, Any], what: str = "automatic masks") -> None:
    """Warn when more than ``WARN_SHARE`` of the masks of ``quality`` (``mask_quality``) are empty or whole."""
    bad = quality["empty"] + quality["full"]
    if bad > WARN_SHARE * quality["images"]:
        warnings.warn(f"{bad} of {quality['images']} {what} are empty ({quality['empty']}) or cover the whole "
                      f"image ({quality['full']}): the finetune sees little of the objects")


def _cache_path(cache_dir: Path, config: BenchConfig, seed: int, images: torch.Tensor) -> Path:
    """Where the masks of ``images`` from the source model of ``seed`` are cached: keyed on the
    source's settings, the images themselves and the package's version."""
    digest = hashlib.sha1(images.contiguous().numpy().tobytes())
    digest.update(json.dumps([config.original_key(seed), config.mask_source, __version__]).encode())
    return Path(cache_dir) / f"masks-{digest.hexdigest()[:12]}.safetensors"


def _masks_of(model: nn.Module, images: torch.Tensor, config: BenchConfig, seed: int,
              cache_dir: Path | None) -> tuple[torch.Tensor, int]:
    """``automatic_masks`` of ``images``, read from or written to ``cache_dir`` when given."""
    path = None if cache_dir is None else _cache_path(cache_dir, config, seed, images)
    if path is not None and path.is_file():
        stored = load_file(str(path))
        return stored["masks"], int(stored["discarded"])
    masks, discarded = automatic_masks(model, images, config.patch_size)
    if path is not None:
        with atomic_path(path) as temporary:
            save_file({"masks": masks, "discarded": torch.tensor(discarded)}, str(temporary))
    return masks, discarded


def tokencut_splits(splits: tuple[TensorDataset, ...], config: BenchConfig, seed: int,
                    cache_dir: Path | None = None) -> tuple[tuple[TensorDataset, ...], dict[str, Any]]:
    """``splits`` with TokenCut masks from the model of ``config.mask_source``, and the masks'
    quality over all of them (``mask_quality``, ``reference_iou`` and ``"unrefined"``: the
    refinements discarded);
    warns when many are empty or whole. The masks are cached in ``cache_dir`` when given."""
    model = mask_source_model(config, seed, cache_dir)
    images, exact = (torch.cat([split.tensors[i] for split in splits]) for i in (0, 1))
    masks, discarded = _masks_of(model, images, config, seed, cache_dir)
    quality = {**mask_quality(masks, exact), **reference_iou(exact, config.patch_size), "unrefined": discarded,
               "source": config.mask_source}
    warn_degenerate(quality)
    pieces = masks.split([len(split) for split in splits])
    out = tuple(TensorDataset(split.tensors[0], piece, *split.tensors[2:]) for split, piece in zip(splits, pieces))
    return out, quality
