"""Issue 9's investigation: which finetuning settings move the reliance, not only the map?

One factor at a time against a fixed original model per seed (the demo's, cached), each
variant with its learning rate chosen on the validation set by the paper's rule. Prints a
markdown table (the original's values; each variant's change vs the same seed's original, mean
± std over seeds) and writes JSON.

    python benchmarks/reliance_study.py --seeds 0 1 2 --lr 3e-5 --out study-out
    python benchmarks/reliance_study.py --only ours control finetune_unbiased --lr 1e-4
"""
from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from relevance_finetune.bench.runner import (
    METHODS, BenchConfig, Method, choose_lr, evaluate_model, finetune, make_data, train_original)

# name -> (method, config overrides): one factor changed from "ours" each.
VARIANTS: dict[str, tuple[Method, dict]] = {
    "ours": (METHODS["ours"], {}),
    "control": (METHODS["control"], {}),
    "second_order": (METHODS["ours_second_order"], {}),
    "ground_truth_ce": (METHODS["ours_ground_truth"], {}),
    "no_classification": (METHODS["wo_classification"], {}),
    "classification_0.5": (Method("cls05", kwargs=dict(lambda_classification=0.5, lambda_relevance=0.5)), {}),
    "relevance_for_prediction": (Method("pred", kwargs=dict(relevance_target="prediction")), {}),
    "bg_only_weight_4": (Method("bg4", kwargs=dict(lambda_bg=4.0)), {}),
    "finetune_unbiased": (METHODS["ours"], dict(finetune_distribution="independent")),
    "control_unbiased": (METHODS["control"], dict(finetune_distribution="independent")),
    "4x_images": (METHODS["ours"], dict(finetune_per_class=64)),
    "3x_epochs": (METHODS["ours"], dict(finetune_epochs=30)),
    "ext_object_consistency": (METHODS["ext_object_consistency"], {}),
    "ext_consistency_no_classification": (
        replace(METHODS["ext_object_consistency"], kwargs=dict(lambda_classification=0.0)), {}),
    "gradmask": (METHODS["gradmask"], {}),
    "rrr": (METHODS["rrr"], {}),
}
COLUMNS = ("id_acc", "ood_acc", "adv_acc", "miou", "object_only", "background_only", "background_reliance",
           "perturbation_positive_auc")


def _flatten(result: dict) -> dict[str, float]:
    out = {k: v for k, v in result.items() if isinstance(v, float)}
    out.update({k: v for k, v in result["probes"].items()})
    return out


def run(seeds: list[int], names: list[str], cache: Path, lr: float | None = None) -> dict[str, list[dict]]:
    """Evaluate the original and every variant; ``lr`` fixes the learning rate instead of the rule."""
    base = BenchConfig()
    rows: dict[str, list[dict]] = {"original": []}
    for seed in seeds:
        original = train_original(base, seed, cache)
        rows["original"].append(_flatten(evaluate_model(original, make_data(base, seed)["tests"], base)))
        for name in names:
            method, overrides = VARIANTS[name]
            config = replace(base, **overrides)
            data = make_data(config, seed)
            if lr is None:
                used, model, _ = choose_lr(original, method, data["train"], data["val"], config, seed)
            else:
                used, model = lr, finetune(original, method, data["train"], lr, config, seed)
            rows.setdefault(name, []).append({**_flatten(evaluate_model(model, data["tests"], config)), "lr": used})
            print(seed, name, {k: round(rows[name][-1][k], 1) for k in COLUMNS}, "lr", used, flush=True)
    return rows


def table(rows: dict[str, list[dict]]) -> str:
    """The original: mean (± std over seeds); every variant: the change vs the same seed's
    original, mean (± std over seeds)."""
    def cell(values: list[float], signed: bool) -> str:
        mean = statistics.fmean(values)
        text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
        return text + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")

    originals = rows["original"]
    lines = ["| variant | " + " | ".join(COLUMNS) + " | lr |", "|---|" + "---|" * (len(COLUMNS) + 1)]
    for name, runs in rows.items():
        if name == "original":
            cells = [cell([r[key] for r in runs], signed=False) for key in COLUMNS]
        else:
            cells = [cell([r[key] - o[key] for r, o in zip(runs, originals)], signed=True) for key in COLUMNS]
        lrs = ", ".join(f"{r['lr']:g}" for r in runs) if name != "original" else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {lrs} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (original models) to run")
    parser.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("study-out"))
    parser.add_argument("--cache", type=Path, default=Path("demo-out/cache"), help="where original models are kept")
    parser.add_argument("--lr", type=float, default=None, help="fix the learning rate (default: the paper's rule)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.seeds, args.only, args.cache, args.lr)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.json").write_text(json.dumps(rows, indent=2))
    text = table(rows)
    (args.out / "study.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
