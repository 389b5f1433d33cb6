"""Table 3 of RobustViT: segmentation test of the relevance maps on ImageNet-segmentation.

Needs ``gtsegs_ijcv.mat`` (``--data-root`` holding it, or ``--dataset-dir segmentation=FILE``)
and the finetuned weights in ``CHECKPOINTS/<model>/ours-annotated/``. ::

    python examples/table3_segmentation.py --data-root /data --checkpoints checkpoints \\
        --out results/table3.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from table1_robustness import MODELS

from relevance_finetune.evaluate import (
    SEGMENTATION_METRICS, add_table_arguments, evaluate_grid, metric_table, options_from_args, table_models,
    write_table)

METHODS = [(None, "Orig"), ("ours-annotated", "Ours")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="RobustViT Table 3: segmentation test")
    add_table_arguments(parser, MODELS)
    args = parser.parse_args(argv)
    grid = [((model, method), name, None if folder is None else Path(args.checkpoints) / model / folder)
            for model, name in table_models(args, MODELS).items() for folder, method in METHODS]
    rows = evaluate_grid(grid, "segmentation", options_from_args(args), args.device)
    columns = {" ".join(labels): results and results["segmentation"] for labels, results in rows}
    write_table(args.out, "### Table 3\n\n" + metric_table(columns, SEGMENTATION_METRICS, "Model"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
