"""The headline table across benchmark runs: each run's original, then each method's change.

Each argument is a demo's ``results.json`` (one family, or several under ``"families"``); each
cell is the paired change vs the same seed's original, mean ± std over seeds. Runs with an oracle
also get the gap-closed columns (``relevance_finetune.bench.ceiling``)::

    python benchmarks/headline.py benchmarks/results/demo_hue_full.json benchmarks/results/demo_hue_all_full.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from relevance_finetune.bench.ceiling import CEILING_COLUMNS, ceiling_columns, no_oracle_note
from relevance_finetune.bench.runner import BenchConfig, config_dict

COLUMNS = (("ID", "id_acc"), ("OOD", "ood_acc"), ("adv", "adv_acc"), ("bg-only", "background_only"))
SET_B = ("OOD set B", "ood_acc_set_b")  # a column where a run held out classes (the paper's protocol)


def _label(config: dict[str, Any]) -> str:
    """``family (which classes[, N masked images][, patch masks][, lr grid][, N first-phase images])``:
    the settings that differ between runs."""
    defaults = config_dict(BenchConfig())
    parts = [f"{config.get('finetune_classes', 'half')} classes"]
    images = config["finetune_per_class"] * len(config["set_a"])
    if images != 80:  # the benchmark's 80 masked finetuning images
        parts.append(f"{images} masked images")
    if config.get("finetune_masks", "exact") != "exact":
        parts.append(f"{config['finetune_masks']} masks")
    if list(config.get("lr_grid", defaults["lr_grid"])) != defaults["lr_grid"]:
        parts.append("lr " + ", ".join(f"{lr:g}" for lr in config["lr_grid"]))
    if config.get("pretrain_images", defaults["pretrain_images"]) != defaults["pretrain_images"]:
        parts.append(f"{config['pretrain_images']} first-phase images")
    return f"{config['family']} ({', '.join(parts)})"


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """Everything but the methods, fields that an older run did not record at their defaults."""
    return {**config_dict(BenchConfig()), **config, "methods": None}


def runs(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """``"family (classes[, masks])"`` -> that run's report, in the order given; runs of the same
    settings and seeds (the same originals) are merged, their methods side by side."""
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        results = json.loads(path.read_text())
        for report in (results.get("families") or {"": results}).values():
            label, settings = _label(report["config"]), _settings(report["config"])
            if label in out:
                if _settings(out[label]["config"]) != settings or out[label]["seeds"] != report["seeds"]:
                    raise ValueError(f"{path}: a run labelled {label!r} with other settings or seeds came first")
                if _accuracies(out[label]) != _accuracies(report):
                    raise ValueError(f"{path}: the run labelled {label!r} has other originals than the one before "
                                     "(its original's accuracies differ): its changes are not comparable")
                out[label] = {**out[label], "methods": {**out[label]["methods"], **report["methods"]}}
            else:
                out[label] = report
    return out


def _accuracies(report: dict[str, Any]) -> list[float]:
    original = report["methods"]["original"]
    return [original[key]["mean"] for key in ("id_acc", "ood_acc", "adv_acc")]


def _cell(entry: dict[str, Any], key: str) -> str:
    if key not in entry["change"]:
        return ""
    change = entry["change"][key]
    return f"{change['mean']:+.1f} ± {change['std']:.1f}"


def headline(reports: dict[str, dict[str, Any]], methods: list[str]) -> str:
    """Rows grouped by run: the original's accuracies (percent, mean over seeds), then each
    method's paired change; with the gap-closed columns where a run has an oracle (its row first),
    and a line naming the runs without one."""
    with_oracle = any("oracle" in report["methods"] for report in reports.values())
    columns = COLUMNS + ((SET_B,) if any(SET_B[1] in r["methods"]["original"] for r in reports.values()) else ())
    names = [label for label, _ in columns] + (list(CEILING_COLUMNS) if with_oracle else [])
    lines = ["| run | method | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    blank = [""] * len(CEILING_COLUMNS) if with_oracle else []
    for name, report in reports.items():
        entries = report["methods"]
        original = entries["original"]
        values = [original.get(key, original["probes"].get(key)) for _, key in columns]
        lines.append(f"| {name} | original | " + " | ".join(
            [f"{value['mean']:.1f}" if value else "" for value in values] + blank) + " |")
        for method in ["oracle", *methods] if "oracle" in entries else methods:
            if method in entries:
                cells = [_cell(entries[method], key) for _, key in columns]
                cells += ceiling_columns(entries, method) or blank
                lines.append(f"| | {method} | " + " | ".join(cells) + " |")
    missing = [name for name, report in reports.items() if no_oracle_note(report["methods"])]
    if missing:
        lines.append("\n" + no_oracle_note({}) + f" ({', '.join(missing)})")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="demo results.json files")
    parser.add_argument("--methods", nargs="+", default=["ours", "control", "gradmask", "rrr", "swap", "recommended"])
    args = parser.parse_args()
    print(headline(runs(args.results), args.methods))


if __name__ == "__main__":
    main()
