"""Issue 31: how long propagating masks takes at the built-in benchmark's scale.

``propagate_masks`` with its defaults on the benchmark's model (48 px images, 6 x 6 patches, 4 blocks
of width 64; random weights: the time does not depend on them) from 80 annotated images (8 per
class) to ``--images`` targets (default 4,000, as many as the original's second phase), on
``--threads`` CPU threads. Prints the seconds and writes JSON::

    python benchmarks/propagate_speed.py --threads 2 --out benchmarks/results/propagate_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from relevance_finetune._files import write_text_atomic
from relevance_finetune.bench.config import ALL_CLASSES, BenchConfig
from relevance_finetune.bench.originals import create_original, normalize
from relevance_finetune.bench.synthetic import make_split
from relevance_finetune.masks import propagate_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000, help="images to mask (default: 4000)")
    parser.add_argument("--annotated", type=int, default=80, help="annotated images (default: 80, 8 per class)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--refine", action="store_true", help="also time the bilateral refinement")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = BenchConfig(**ALL_CLASSES)
    torch.manual_seed(0)
    model = create_original(config).eval()
    annotated = make_split(args.annotated, "biased", config.p, config.spurious(), seed=1)
    targets = make_split(args.images, "biased", config.p, config.spurious(), seed=2).tensors[0]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    out = propagate_masks(model, normalize(annotated.tensors[0]), annotated.tensors[1], normalize(targets),
                          refine=args.refine, progress=False)
    seconds = time.perf_counter() - start
    print(f"propagated {args.images} masks from {args.annotated} annotated images in {seconds:.1f} s "
          f"({args.threads} threads, load average before {load:.1f})")
    if args.out:
        report = {"command": f"python benchmarks/propagate_speed.py --images {args.images} --annotated "
                             f"{args.annotated} --threads {args.threads}" + (" --refine" if args.refine else ""),
                  "machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                  "threads": args.threads, "load_average_before": round(load, 2), "images": args.images,
                  "annotated": args.annotated, "refine": args.refine, "seconds": round(seconds, 2),
                  "settings_scored": len(out.scores)}
        write_text_atomic(args.out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
