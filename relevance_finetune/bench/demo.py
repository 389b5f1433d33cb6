"""``relevance-finetune demo``: run the built-in benchmark and write its results.

Writes ``results.json`` (config, seeds, mean and std per method and metric, per-seed values),
``results.md`` (the tables), ``relevance_before_after.png`` (original vs finetuned relevance on
the same out-of-distribution images) and the finetuned weights (``ours/model.safetensors``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .runner import METHODS, BenchConfig, config_dict, normalize, run_seed
from .synthetic import CLASS_NAMES

__all__ = ["QUICK", "add_arguments", "markdown_tables", "run", "run_benchmark", "summarize", "write_reports"]

# A smoke-test scale (about a minute on 2 CPU cores): small sets, few epochs, few methods.
QUICK = dict(
    pretrain_images=600, pretrain_epochs=2, biased_images=600, biased_epochs=1, original_attempts=1,
    finetune_per_class=4, val_per_class=4, finetune_epochs=2, lr_grid=(1e-4,),
    test_images=100, perturbation_images=50, methods=("ours", "control", "gradmask", "rrr"),
)
METRICS = ("id_acc", "ood_acc", "adv_acc", "ood_acc_set_a", "ood_acc_set_b", "pixel_acc", "miou", "map",
           "perturbation_positive_auc", "perturbation_negative_auc")
PROBES = ("object_only", "background_only", "background_reliance")


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of every metric and probe, per method, and of the paired change
    vs the same seed's original (``"change"``)."""
    methods: dict[str, Any] = {}
    originals = [seed_result["original"] for seed_result in per_seed]
    for name in per_seed[0]:
        runs = [seed_result[name] for seed_result in per_seed]
        entry = {metric: _mean_std([r[metric] for r in runs]) for metric in METRICS}
        entry["probes"] = {probe: _mean_std([r["probes"][probe] for r in runs]) for probe in runs[0]["probes"]}
        entry["change"] = {metric: _mean_std([r[metric] - o[metric] for r, o in zip(runs, originals)])
                           for metric in METRICS}
        entry["change"].update({probe: _mean_std([r["probes"][probe] - o["probes"][probe] for r, o in zip(runs, originals)])
                                for probe in PROBES})
        if "lr" in runs[0]:
            entry["lr"] = [r["lr"] for r in runs]
            entry["description"] = METHODS[name].description
        methods[name] = entry
    return methods


def _cell(stat: dict[str, float], change: dict[str, float] | None = None) -> str:
    """``mean ± std``, or for a finetuned model the paired change vs the original ``+x ± s``."""
    if change is not None:
        return f"{change['mean']:+.1f} ± {change['std']:.1f}"
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def markdown_tables(methods: dict[str, Any]) -> str:
    """Accuracy and relevance quality, then reliance probes. The original's row holds mean ± std
    over seeds; every other row the change vs the same seed's original, mean ± std."""
    columns = [("ID", "id_acc"), ("OOD", "ood_acc"), ("adversarial", "adv_acc"),
               ("OOD set A", "ood_acc_set_a"), ("OOD set B", "ood_acc_set_b"),
               ("pixel acc", "pixel_acc"), ("mIoU", "miou"), ("mAP", "map")]
    lines = ["| method | " + " | ".join(c[0] for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, entry in methods.items():
        change = entry["change"] if name != "original" else {}
        lines.append(f"| {name} | " + " | ".join(_cell(entry[key], change.get(key)) for _, key in columns) + " |")
    lines += ["", "| method | object-only acc | background-only acc | background reliance | "
                  "perturbation AUC + (lower = faithful) | perturbation AUC − (higher = faithful) | lr |",
              "|---|---|---|---|---|---|---|"]
    for name, entry in methods.items():
        change = entry["change"] if name != "original" else {}
        cells = [_cell(entry["probes"][p], change.get(p)) for p in PROBES]
        cells += [_cell(entry[k], change.get(k)) for k in ("perturbation_positive_auc", "perturbation_negative_auc")]
        cells.append(", ".join(f"{lr:g}" for lr in entry.get("lr", [])) or "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def _figure(seed_result: dict[str, Any], out: Path, count: int = 6) -> Path:
    from ..gae import attach_gae
    from ..viz import before_after_grid, prediction_title
    images = seed_result["samples"].tensors[0][:count]
    rows = {}
    for name in ("original", "ours"):
        model = seed_result["models"][name]
        with attach_gae(model) as gae:
            relevance = gae.explain(normalize(images))
        with torch.no_grad():
            probs = model(normalize(images)).softmax(1)
        titles = [prediction_title(CLASS_NAMES[int(p.argmax())], float(p.max())) for p in probs]
        rows[name] = (relevance, titles)
    return before_after_grid(images, rows["original"][0], rows["ours"][0], rows["original"][1], rows["ours"][1],
                             out / "relevance_before_after.png")


def write_reports(out: Path, config: dict[str, Any], seeds: list[int], per_seed: list[dict[str, Any]],
                  seconds: float) -> dict[str, Any]:
    """Write ``results.json`` and ``results.md`` from the per-seed results; returns the results."""
    results = {"config": config, "seeds": seeds, "methods": summarize(per_seed), "per_seed": per_seed,
               "seconds": seconds}
    _write_atomic(out / "results.json", json.dumps(results, indent=2))
    header = (f"# relevance-finetune demo\n\n{len(seeds)} seeds ({', '.join(map(str, seeds))}), "
              f"{seconds:.0f} s. The original's row: mean ± std over seeds (percent); every other row: "
              "the change vs the same seed's original, mean ± std over seeds.\n\n")
    _write_atomic(out / "results.md", header + markdown_tables(results["methods"]))
    return results


def run_benchmark(config: BenchConfig, seeds: list[int], out: Path) -> dict[str, Any]:
    """Run every seed, write the files into ``out`` and return the results."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    per_seed, first = [], None
    bar = tqdm(total=len(seeds) * (len(config.methods) + 1), desc="benchmark")
    for seed in seeds:
        def progress(step: str) -> None:
            bar.set_postfix_str(f"seed {seed}: {step}")
            if step != "original model":
                bar.update(1)
        result = run_seed(config, seed, out / "cache", progress)
        bar.update(1)
        first = first or result
        per_seed.append({k: v for k, v in result.items() if k not in ("models", "samples")})
    bar.close()
    results = write_reports(out, config_dict(config), seeds, per_seed, round(time.time() - started, 1))
    _figure(first, out)
    _export(first["models"]["ours"], config, out / "ours")
    return results


def _export(model: torch.nn.Module, config: BenchConfig, out: Path) -> None:
    from ..export import save_finetuned
    save_finetuned(model, out, base_model="vit_tiny_patch16_224", finetune_config=config_dict(config))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default: demo-out)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default: 3)")
    parser.add_argument("--quick", action="store_true", help="a smoke-test scale (about 2 minutes)")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS),
                        help="methods to compare (default: all but the ext_ extensions)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise SystemExit("--seeds must be at least 1")
    try:  # before any training: a read-only --out would only fail once the models are trained
        args.out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out).close()
    except OSError as error:
        raise PermissionError(f"cannot write to --out {args.out} ({error.strerror}): choose another folder") from error
    if args.threads:
        torch.set_num_threads(args.threads)
    config = BenchConfig()
    if args.quick:
        config = replace(config, **QUICK)
    if args.methods:
        config = replace(config, methods=tuple(args.methods))
    results = run_benchmark(config, list(range(args.seeds)), args.out)
    print(markdown_tables(results["methods"]))
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, "
          f"{args.out / 'relevance_before_after.png'} and {args.out / 'ours'}")
    return 0
