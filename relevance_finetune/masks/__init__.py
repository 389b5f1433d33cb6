"""Foreground masks: TokenCut unsupervised masks and their refinement, and the ImageNet-S masks.

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
from .tokencut import last_block_keys, tokencut_masks, tokencut_partition, upsample_mask

__all__ = [
    "IGNORE_ID",
    "MERGED_WNIDS",
    "ImageNetSRecord",
    "ImageNetSSplit",
    "bilateral_refine",
    "bilateral_solve",
    "decode_imagenet_s_mask",
    "imagenet_s_foreground",
    "imagenet_s_records",
    "imagenet_s_split",
    "last_block_keys",
    "read_categories",
    "tokencut_masks",
    "tokencut_partition",
    "upsample_mask",
]
