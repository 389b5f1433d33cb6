"""Table 1 of RobustViT: robustness of seven ViTs before and after finetuning, and the baselines.

Finetuned weights are read from ``CHECKPOINTS/<model>/<method>/`` (an exported directory or a
``.safetensors`` path), methods ``gradmask``, ``rrr``, ``ours-annotated`` (ImageNet-S masks)
and ``ours-tokencut``; rows whose weights are missing show "-". ::

    python examples/table1_robustness.py --data-root /data --checkpoints checkpoints \\
        --out results/table1.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from relevance_finetune.evaluate import (
    add_table_arguments, evaluate_grid, options_from_args, robustness_table, table_models, write_table)

# The paper's checkpoints under their current timm names (the original ViT-L/16 has no exact
# timm equivalent any more: pass one with --model-name ViT-L=NAME).
MODELS = {
    "ViT-B": "vit_base_patch16_224.orig_in21k_ft_in1k",
    "ViT-L": None,
    "AR-S": "vit_small_patch16_224.augreg_in21k_ft_in1k",
    "AR-B": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "AR-L": "vit_large_patch16_224.augreg_in21k_ft_in1k",
    "DeiT-S": "deit_small_patch16_224.fb_in1k",
    "DeiT-B": "deit_base_patch16_224.fb_in1k",
}
# (checkpoint folder or None for the pretrained model, Method, Annotated segmentation)
METHODS = [
    (None, "Original", "✗"),
    ("gradmask", "GradMask", "✓"),
    ("rrr", "RRR", "✓"),
    ("ours-annotated", "Ours", "✓"),
    ("ours-tokencut", "Ours", "✗"),
]
BASELINE_MODELS = {"ViT-B", "AR-S", "AR-B", "DeiT-S", "DeiT-B"}  # the paper ran GradMask/RRR on these
DATASETS = ("imagenet", "imagenet-a", "imagenet-r", "sketch", "imagenet-v2", "objectnet")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="RobustViT Table 1: robustness accuracy")
    add_table_arguments(parser, MODELS)
    args = parser.parse_args(argv)
    options = options_from_args(args, DATASETS)
    grid = [((model, method, annotated), name, None if folder is None else Path(args.checkpoints) / model / folder)
            for model, name in table_models(args, MODELS).items()
            for folder, method, annotated in METHODS
            if folder not in ("gradmask", "rrr") or model in BASELINE_MODELS]
    rows = evaluate_grid(grid, "robustness", options, args.device)
    markdown = "\n".join(
        f"### Table 1, protocol: {protocol}\n\n"
        + robustness_table(rows, DATASETS, ("Model", "Method", "Annotated segmentation"), protocol)
        for protocol in options.protocols)
    write_table(args.out, markdown, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
