"""Issue 31: how good are the built-in benchmark's propagated finetuning masks?

For each family, seed and finetuning-set size (``finetune_per_class``), the demo's data with
``--finetune-masks propagate`` (``finetune_classes=all``, 8 annotated images per class, the other
finetuning images and the 20 validation images per class propagated): the propagated masks' mean
IoU with the generator's exact masks, the held-out IoU the propagation reports from the annotated
masks alone, the empty and whole counts, beside the references (patch-level exact masks; another
image's exact mask), per source model (``BenchConfig.mask_source``). A property of the masks, not
of any method. The originals are trained (about two minutes each) or read from ``--cache``.

    python benchmarks/propagated_masks.py --cache /tmp/bench-cache --out benchmarks/results/propagated_masks_iou.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from relevance_finetune._files import write_text_atomic
from relevance_finetune.bench.config import ALL_CLASSES, MASK_SOURCES, BenchConfig
from relevance_finetune.bench.runner import make_data
from relevance_finetune.bench.synthetic import FAMILIES


def measure(family: str, seed: int, per_class: int, annotated: int, source: str, cache: Path) -> dict:
    """The propagated masks' quality (``make_data(...)["masks"]``) for one setting."""
    config = replace(BenchConfig(**ALL_CLASSES).for_family(family), finetune_masks="propagate",
                     finetune_per_class=per_class, annotated_per_class=annotated, mask_source=source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quality = make_data(config, seed, cache)["masks"]
    return {**quality, "warnings": [str(w.message) for w in caught if "propagat" in str(w.message)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--per-class", nargs="+", type=int, default=[32, 128], help="finetuning images per class")
    parser.add_argument("--annotated", type=int, default=8, help="annotated images per class (default: 8)")
    parser.add_argument("--sources", nargs="+", choices=MASK_SOURCES, default=list(MASK_SOURCES))
    parser.add_argument("--cache", type=Path, required=True, help="where the originals are cached")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    rows = [{"family": family, "seed": seed, "per_class": per_class, "annotated_per_class": args.annotated,
             **measure(family, seed, per_class, args.annotated, source, args.cache)}
            for family in args.families for seed in args.seeds for per_class in args.per_class
            for source in args.sources]
    print("| family | seed | per class | source | IoU with exact | held-out IoU | patch masks (reference) | "
          "another image's mask (chance) | empty | whole | propagated images | chosen |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['family']} | {row['seed']} | {row['per_class']} | {row['source']} | {row['iou']:.1f} | "
              f"{row['held_out_iou']:.1f} | {row['patch_iou']:.1f} | {row['chance_iou']:.1f} | {row['empty']} | "
              f"{row['full']} | {row['images']} | {row['classifier']} on blocks "
              f"{','.join(map(str, row['blocks']))} |")
    if args.out:
        report = {"command": "python benchmarks/propagated_masks.py " + " ".join(
                      f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in
                      (("families", args.families), ("seeds", args.seeds), ("per-class", args.per_class),
                       ("annotated", args.annotated), ("sources", args.sources), ("threads", args.threads))),
                  "machine": platform.platform(), "torch": torch.__version__, "threads": args.threads,
                  "seconds": round(time.time() - started, 1), "rows": rows}
        write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
