"""Shortcut reliance of original vs finetuned checkpoints: ImageNet-W and the Backgrounds Challenge.

Needs ImageNet val (``imagenet/val/<wnid>/``, watermarked on the fly by the ``imagenet-w``
package: ``pip install "relevance-finetune[eval]"``) and/or the IN-9 release (``bg_challenge/``)
under ``--data-root``, and the finetuned weights in ``CHECKPOINTS/<model>/<method>/``. ::

    python examples/shortcut_table.py --data-root /data --checkpoints checkpoints \\
        --out results/shortcuts.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from table1_robustness import MODELS

from relevance_finetune.evaluate import (
    add_table_arguments, evaluate_grid, metric_table, options_from_args, shortcut_rows, table_models, write_table)

METHODS = [(None, "Orig"), ("ours-annotated", "Ours"), ("ours-tokencut", "Ours (TokenCut)")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Shortcut table: IN-W gap, carton gap, IN-9 variants and BG-gap")
    add_table_arguments(parser, MODELS)
    args = parser.parse_args(argv)
    grid = [((model, method), name, None if folder is None else Path(args.checkpoints) / model / folder)
            for model, name in table_models(args, MODELS).items() for folder, method in METHODS]
    rows = evaluate_grid(grid, "shortcuts", options_from_args(args), args.device)
    columns = {" ".join(labels): results and shortcut_rows(results) for labels, results in rows}
    titles = {title: title for column in columns.values() for title in column or {}}
    write_table(args.out, "### Shortcut reliance\n\n" + metric_table(columns, titles, "Model"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
