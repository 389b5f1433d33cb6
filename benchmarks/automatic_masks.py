"""Issue 27: how good are the built-in benchmark's automatic (TokenCut) finetuning masks?

For each family and seed, the finetuning and validation images of the demo's default run
(``finetune_classes=all``: 80 + 200 images) get TokenCut masks from each source model
(``BenchConfig.mask_source``); prints their mean IoU with the generator's exact masks and the
counts of empty and whole-image masks, beside two references: the patch-level masks (every patch
the object touches: the best a mask on the 6 x 6 grid can be before refinement) and chance (each
image given the previous image's exact mask); and writes JSON. A property
of the masks, not of any method. The originals are trained (about two minutes each) or read
from ``--cache``.

    python benchmarks/automatic_masks.py --cache /work/tmp_notes/bench-cache \\
        --out benchmarks/results/automatic_masks_iou.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from relevance_finetune._files import write_text_atomic
from relevance_finetune.bench.automatic_masks import mask_quality
from relevance_finetune.bench.config import ALL_CLASSES, MASK_SOURCES, BenchConfig
from relevance_finetune.bench.runner import make_data, patch_masks
from relevance_finetune.bench.synthetic import FAMILIES

# the reference rows: the best a patch-grid mask can be, and chance (the exact mask of the previous image)
LABELS = {"patch": "patch masks (exact, on the grid)", "another_image": "another image's exact mask"}


def _exact_masks(data: dict) -> torch.Tensor:
    return torch.cat([data[split].tensors[1] for split in ("train", "val")])


def measure(family: str, seed: int, cache: Path) -> dict[str, dict]:
    """The quality of each source's TokenCut masks, and of the patch masks, for one family and seed."""
    config = replace(BenchConfig(**ALL_CLASSES).for_family(family), finetune_masks="tokencut")
    exact = make_data(replace(config, finetune_masks="exact"), seed)
    patch = torch.cat([patch_masks(exact[split], config.patch_size).tensors[1] for split in ("train", "val")])
    masks = _exact_masks(exact)
    rows = {"patch": mask_quality(patch, masks), "another_image": mask_quality(masks.roll(1, 0), masks)}
    for source in MASK_SOURCES:
        rows[source] = make_data(replace(config, mask_source=source), seed, cache)["masks"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--cache", type=Path, required=True, help="where the originals and masks are cached")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    results = {family: {str(seed): measure(family, seed, args.cache) for seed in args.seeds}
               for family in args.families}
    print("| family | seed | masks | IoU with exact | empty | whole image | refinement discarded | images |")
    print("|---|---|---|---|---|---|---|---|")
    for family, seeds in results.items():
        for seed, rows in seeds.items():
            for name, row in rows.items():
                label = LABELS.get(name, f"TokenCut on {name}")
                print(f"| {family} | {seed} | {label} | {row['iou']:.1f} | {row['empty']} | {row['full']} | "
                      f"{row.get('unrefined', '-')} | {row['images']} |")
    if args.out:
        report = {"command": "python benchmarks/automatic_masks.py " + " ".join(
                      f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in
                      (("families", args.families), ("seeds", args.seeds), ("threads", args.threads))),
                  "machine": platform.platform(), "torch": torch.__version__, "threads": args.threads,
                  "seconds": round(time.time() - started, 1), "results": results}
        write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
