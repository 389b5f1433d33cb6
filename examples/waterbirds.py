"""Waterbirds end to end: an ordinary finetune, then the head refits and the recipes, by worst-group accuracy.

From a pretrained timm ViT (``vit_small_patch16_224.augreg_in21k_ft_in1k`` by default: its own data
config, 224 x 224 inputs, mean = std = 0.5, bicubic; the project's paired transforms, training:
resize to 256 and a random 224 crop with a horizontal flip, evaluation: shorter side to 256 and the
centre 224 crop), on the Waterbirds release (``metadata.csv``; training split 0, validation 1, test 2)
with CUB's segmentations as masks:

1. ``erm``: an ordinary finetune on the training split (cross-entropy only: no relevance terms, no
   counterfactual images), the epoch and learning rate by worst-group validation accuracy;
2. ``head``: the head refit on counterfactual views of the masked training images, C by the
   worst-group validation accuracy (``--recipe head --select worst_group``);
3. ``dfr``: the head refit on the validation split's group labels, DFR's own protocol
   (``--recipe head --head-labels groups``);
4. ``recommended``: the recommended recipe's finetune, by worst-group validation accuracy;
5. ``two_stage_head``: the same finetune, then the head refit on masks;

2-5 start from 1's model. Each is exported and evaluated on the test split (``evaluate --suite
waterbirds``); the table gives worst-group accuracy and both means (the plain mean over the test
images, and the test group accuracies weighted by the training split's group proportions), with
DFR's published ResNet-50 numbers beside them, cited, not measured here. ::

    python examples/waterbirds.py --waterbirds data/waterbird_complete95_forest2water2 \\
        --segmentations data/CUB_200_2011/segmentations --out runs/waterbirds

``OUT/commands.sh`` holds the exact commands it ran, ``OUT/table.md`` and ``OUT/table.json`` the table.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Sequence

from relevance_finetune import cli

MODEL = "vit_small_patch16_224.augreg_in21k_ft_in1k"
METHODS = ("erm", "head", "dfr", "recommended", "two_stage_head")
DESCRIPTIONS = {
    "erm": "ordinary finetune (cross-entropy), by worst-group validation accuracy",
    "head": "erm, then the head refit on counterfactual views of the masked training images (C by worst group)",
    "dfr": "erm, then the head refit on the validation split's groups (DFR's protocol)",
    "recommended": "erm, then the recommended recipe's finetune, by worst-group validation accuracy",
    "two_stage_head": "erm, then the recommended recipe's finetune and the head refit on masks",
}
# Kirichenko, Izmailov & Wilson (ICLR 2023), Table 1, Waterbirds, DFR on an ERM ResNet-50: cited, not measured here
REFERENCE = {"method": "DFR (Kirichenko et al. 2023), ResNet-50, published", "worst_group": "92.9 ± 0.2",
             "mean": "not reported", "weighted_mean": "94.2 ± 0.4"}
# the training stages of each method after erm: (recipe, extra flags, whether it finetunes)
STAGES = {"head": ("head", ("--select", "worst_group"), False), "dfr": ("head", ("--head-labels", "groups"), False),
          "recommended": ("recommended", ("--select", "worst_group"), True),
          "two_stage_head": ("two_stage_head", ("--select", "worst_group"), True)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--waterbirds", required=True, help="the release folder (metadata.csv and the CUB folders)")
    parser.add_argument("--segmentations", required=True, help="CUB_200_2011/segmentations (the masks)")
    parser.add_argument("--out", required=True, help="a new folder for the runs, exports, evaluations and the table")
    parser.add_argument("--model", default=MODEL, help=f"timm model, local-dir:DIR or hf-hub:ORG/NAME (default {MODEL})")
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                        help="random weights for a timm name (a local-dir: or hf-hub: model has its own weights)")
    parser.add_argument("--model-kwargs", default=None, help="JSON of more timm.create_model arguments")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of each finetune")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--erm-lrs", type=float, nargs="+", default=[1e-5, 3e-5],
                        help="learning rates of the ordinary finetune; the one whose best epoch has the highest "
                             "worst-group validation accuracy is kept")
    parser.add_argument("--recipe-lrs", type=float, nargs="+", default=[2e-6, 6e-6],
                        help="learning rates of the recommended finetune (the same choice)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to run (erm always runs: the others start from it)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser.parse_args(argv)


class Runner:
    """Runs ``relevance-finetune`` commands in this process and keeps each one, as typed, in ``commands.sh``."""

    def __init__(self, out: Path) -> None:
        self.out, self.commands = out, []

    def __call__(self, *args: str) -> None:
        line = shlex.join(["relevance-finetune", *args])
        self.commands.append(line)
        print(f"$ {line}", flush=True)
        (self.out / "commands.sh").write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + "\n".join(self.commands)
                                              + "\n")
        if cli.main(list(args)) != 0:
            raise SystemExit(f"waterbirds.py: this command failed: {line}")


def best_worst_group(run: Path) -> float:
    """The highest worst-group validation accuracy of ``run``'s epochs (the epoch --select worst_group keeps)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return max((r["val_worst_group_accuracy"] for r in records if "val_worst_group_accuracy" in r),
               default=float("-inf"))


def finetune(run: Runner, args: argparse.Namespace, name: str, model: list[str], lrs: Sequence[float],
             flags: Sequence[str]) -> Path:
    """One run per learning rate in ``OUT/runs/NAME/lr_LR``; the run with the best worst-group validation
    accuracy (the first of equals) is exported to ``OUT/models/NAME``."""
    runs = []
    for lr in lrs:
        runs.append(args.out / "runs" / name / f"lr_{lr:g}")
        run("train", *model, *data_flags(args), "--epochs", str(args.epochs), "--lr", f"{lr:g}", *flags,
            "--out", str(runs[-1]))
    chosen = max(runs, key=best_worst_group)
    return export(run, args, name, chosen)


def export(run: Runner, args: argparse.Namespace, name: str, chosen: Path) -> Path:
    folder = args.out / "models" / name
    run("export", str(chosen / "best.safetensors"), "--out", str(folder))
    return folder


def data_flags(args: argparse.Namespace) -> list[str]:
    return ["--data-format", "waterbirds", "--data", str(args.waterbirds), "--masks", str(args.segmentations),
            "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--seed", str(args.seed),
            *([] if args.device is None else ["--device", args.device]),
            *([] if args.progress else ["--no-progress"])]


def evaluate(run: Runner, args: argparse.Namespace, name: str, model: Path) -> dict:
    out = args.out / "eval" / name
    run("evaluate", "--model", f"local-dir:{model}", "--suite", "waterbirds", "--data-root", str(args.waterbirds),
        "--workers", str(args.workers), *([] if args.device is None else ["--device", args.device]),
        *([] if args.progress else ["--no-progress"]), "--out", str(out))
    return json.loads((out / "waterbirds.json").read_text())


def table(results: dict[str, dict]) -> str:
    """The markdown table: per method, worst-group accuracy and both means (percent), the reference below."""
    lines = ["| method | worst-group accuracy | mean accuracy (plain, test images) | mean accuracy (weighted by "
             "training groups) |", "|---|---|---|---|"]
    for name, result in results.items():
        weighted = result["weighted_mean_accuracy"]
        lines.append(f"| {name}: {DESCRIPTIONS[name]} | {100 * result['worst_group_accuracy']:.1f} | "
                     f"{100 * result['mean_accuracy']:.1f} | {'n/a' if weighted is None else f'{100 * weighted:.1f}'} |")
    lines.append(f"| {REFERENCE['method']} (cited, not measured here) | {REFERENCE['worst_group']} | "
                 f"{REFERENCE['mean']} | {REFERENCE['weighted_mean']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    run = Runner(args.out)
    start = ["--model", args.model, *(["--pretrained"] if args.pretrained else []),
             *([] if args.model_kwargs is None else ["--model-kwargs", args.model_kwargs]), "--num-classes", "2"]
    plain = ("--lambda-relevance", "0", "--classification", "ground_truth", "--lambda-classification", "1",
             "--select", "worst_group")
    models = {"erm": finetune(run, args, "erm", start, args.erm_lrs, plain)}
    erm = ["--model", f"local-dir:{models['erm']}"]
    for name in (m for m in METHODS[1:] if m in args.methods):
        recipe, flags, finetunes = STAGES[name]
        flags = ("--recipe", recipe, *flags)
        if finetunes:
            models[name] = finetune(run, args, name, erm, args.recipe_lrs, flags)
        else:
            out = args.out / "runs" / name
            run("train", *erm, *data_flags(args), *flags, "--out", str(out))
            models[name] = export(run, args, name, out)
    results = {name: evaluate(run, args, name, model) for name, model in models.items()}
    text = table(results)
    (args.out / "table.md").write_text(text)
    (args.out / "table.json").write_text(json.dumps({"results": results, "reference": REFERENCE}, indent=2) + "\n")
    print(text)
    print(f"wrote {args.out / 'table.md'}, {args.out / 'table.json'} and {args.out / 'commands.sh'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
