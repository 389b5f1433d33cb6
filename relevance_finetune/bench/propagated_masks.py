"""Finetuning masks from a few annotated ones: ``masks.propagate_masks`` on a benchmark model's tokens.

With ``finetune_masks="propagate"`` the first ``annotated_per_class`` finetuning images of each class
keep their exact masks (the annotated ones), and every other finetuning image and every validation
image gets the mask that ``propagate_masks`` (its defaults, seeded by the run's seed) learns from
them on the patch tokens of ``config.mask_source``'s model: a user with a few annotated images per
class has no exact masks for a validation set either. The quality is measured on the propagated
masks alone (the annotated ones are exact), against the generator's exact masks, beside the
patch-level reference and chance (``automatic_masks.reference_iou``), with the held-out IoU the
propagation itself reports (from the annotated masks only).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ..masks.propagate import propagate_masks
from .automatic_masks import mask_quality, mask_source_model, reference_iou, warn_degenerate
from .config import BenchConfig
from .originals import normalize

__all__ = ["annotated_images", "propagated_splits"]


def annotated_images(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """(N,) bool: the first ``per_class`` images of each class in ``labels`` (N,)."""
    annotated = torch.zeros(len(labels), dtype=torch.bool)
    for label in labels.unique():
        annotated[torch.nonzero(labels == label).squeeze(1)[:per_class]] = True
    return annotated


def propagated_splits(splits: tuple[TensorDataset, TensorDataset], config: BenchConfig, seed: int,
                      cache_dir: Path | None = None) -> tuple[tuple[TensorDataset, TensorDataset], dict[str, Any]]:
    """The (finetuning, validation) ``splits`` with masks propagated from the finetuning set's
    annotated images (``annotated_images``; they keep their own), and the propagated masks' quality:
    ``mask_quality`` and ``reference_iou`` over them, ``held_out_iou`` (percent), ``annotated``,
    the chosen ``blocks``, ``classifier`` and ``threshold``, ``seconds`` and ``source``. Warns when
    many are empty or whole, and (``propagate_masks``) when the held-out IoU is low."""
    train, val = splits
    images, masks, labels, *_ = train.tensors
    annotated = annotated_images(labels, config.annotated_per_class)
    targets = torch.cat([images[~annotated], val.tensors[0]])
    exact = torch.cat([masks[~annotated], val.tensors[1]])
    model = mask_source_model(config, seed, cache_dir)
    out = propagate_masks(model, normalize(images[annotated]), masks[annotated], normalize(targets), seed=seed,
                          progress=False)
    quality = {**mask_quality(out.masks, exact), **reference_iou(exact, config.patch_size),
               "held_out_iou": 100.0 * out.held_out_iou, "annotated": int(annotated.sum()), "blocks": list(out.blocks),
               "classifier": out.classifier, "threshold": out.threshold, "seconds": round(out.seconds, 1),
               "source": config.mask_source}
    warn_degenerate(quality, "propagated masks")
    train_masks = masks.clone()
    train_masks[~annotated] = out.masks[:int((~annotated).sum())]
    val_masks = out.masks[int((~annotated).sum()):]
    return (TensorDataset(images, train_masks, *train.tensors[2:]),
            TensorDataset(val.tensors[0], val_masks, *val.tensors[2:])), quality
