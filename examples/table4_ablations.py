"""Table 4 of RobustViT: ablations of the loss terms on ViT-B and DeiT-B (top-1).

Finetune each variant with the matching loss switches and keep its weights in
``CHECKPOINTS/<model>/<variant>/`` (folders below). ::

    python examples/table4_ablations.py --data-root /data --checkpoints checkpoints \\
        --out results/table4.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from table1_robustness import MODELS as ALL_MODELS

from relevance_finetune.evaluate import (
    add_table_arguments, evaluate_grid, options_from_args, robustness_table, table_models, write_table)

MODELS = {key: ALL_MODELS[key] for key in ("ViT-B", "DeiT-B")}
METHODS = [
    (None, "Original"),
    ("ours-annotated", "Ours"),
    ("no-classification", "w/o L_classification"),
    ("no-bg", "w/o L_bg"),
    ("no-fg", "w/o L_fg"),
    ("ground-truth", "w/ ground-truth"),
    ("only-bg", "only L_bg"),
    ("only-fg", "only L_fg"),
]
DATASETS = ("imagenet", "imagenet-a", "imagenet-r", "sketch", "imagenet-v2", "objectnet",
            "si-location", "si-rotation", "si-size")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="RobustViT Table 4: ablations")
    add_table_arguments(parser, MODELS)
    args = parser.parse_args(argv)
    options = options_from_args(args, DATASETS)
    grid = [((model, method), name, None if folder is None else Path(args.checkpoints) / model / folder)
            for model, name in table_models(args, MODELS).items() for folder, method in METHODS]
    rows = evaluate_grid(grid, "robustness", options, args.device)
    markdown = "\n".join(
        f"### Table 4 (top-1), protocol: {protocol}\n\n"
        + robustness_table(rows, DATASETS, ("Model", "Method"), protocol, metrics=("top1",))
        for protocol in options.protocols)
    write_table(args.out, markdown, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
