"""Foreground masks: TokenCut unsupervised masks and their refinement, masks propagated from a few
annotated ones, and the ImageNet-S masks.

ImageNet-S decoding and split live in :mod:`relevance_finetune.masks.imagenet_s` (the datasets read
them too) and are re-exported here.
"""
from .bilateral import bilateral_refine, bilateral_solve
from .imagenet_s import (
    IGNORE_ID,
    MERGED_WNIDS,
    ImageNetSRecord,
    ImageNetSSplit,
    decode_imagenet_s_mask,
    imagenet_s_foreground,
    imagenet_s_records,
    imagenet_s_split,
    read_categories,
)
from .propagate import Propagation, propagate_masks
from .tokencut import last_block_keys, tokencut_masks, tokencut_partition, upsample_mask

__all__ = [
    "IGNORE_ID",
    "MERGED_WNIDS",
    "Propagation",
    "ImageNetSRecord",
    "ImageNetSSplit",
    "bilateral_refine",
    "bilateral_solve",
    "decode_imagenet_s_mask",
    "imagenet_s_foreground",
    "imagenet_s_records",
    "imagenet_s_split",
    "last_block_keys",
    "propagate_masks",
    "read_categories",
    "tokencut_masks",
    "tokencut_partition",
    "upsample_mask",
]
