"""Table 2 of RobustViT: SI-Score location / rotation / size, with changes against the original.

Same checkpoint layout as ``table1_robustness.py``. ::

    python examples/table2_si_score.py --data-root /data --checkpoints checkpoints \\
        --out results/table2.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from table1_robustness import BASELINE_MODELS, METHODS, MODELS

from relevance_finetune.evaluate import (
    add_table_arguments, evaluate_grid, options_from_args, robustness_table, table_models, write_table)

DATASETS = ("si-location", "si-rotation", "si-size")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="RobustViT Table 2: SI-Score")
    add_table_arguments(parser, MODELS)
    args = parser.parse_args(argv)
    options = options_from_args(args, DATASETS)
    grid, baselines = [], []
    for model, name in table_models(args, MODELS).items():
        original = len(grid)
        for folder, method, annotated in METHODS:
            if folder in ("gradmask", "rrr") and model not in BASELINE_MODELS:
                continue
            baselines.append(None if folder is None else original)
            grid.append(((model, method, annotated), name,
                         None if folder is None else Path(args.checkpoints) / model / folder))
    rows = evaluate_grid(grid, "robustness", options, args.device)
    markdown = "\n".join(
        f"### Table 2, protocol: {protocol}\n\n"
        + robustness_table(rows, DATASETS, ("Model", "Method", "Annotated segmentation"), protocol,
                           baselines=baselines)
        for protocol in options.protocols)
    write_table(args.out, markdown, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
