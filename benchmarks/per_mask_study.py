"""The robustness-per-mask studies (issues 27, 31): gap closed per method, mask source and masks per class.

Each argument is a demo's ``results.json`` (one family, or several under ``"families"``). Per run
(family, mask source, masked images per class) and method: the share of the original-to-oracle gap
closed on OOD and background-only accuracy, over the seeds whose oracle is ahead of their original
on OOD by at least ``MIN_GAP`` points (the others are listed, not averaged in), the method's ID minus
the oracle's (paired per seed, those seeds), and its wall time per seed (selection, finetune and
refit; evaluation excluded); with automatic masks their mean IoU with the exact ones (and the held-out
IoU of propagated ones), under a step budget the optimiser steps. Prints a markdown table; ``--json`` and ``--figure`` write the rows and
the curve of gap closed against masks per class::

    python benchmarks/per_mask_study.py runs/r1/results.json runs/r2/results.json \\
        --methods head swap recommended two_stage_head --json benchmarks/results/per_mask_study.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from relevance_finetune._files import write_text_atomic
from relevance_finetune.bench.ceiling import MIN_GAP

METHODS = ("head", "swap", "recommended", "two_stage_head")


def reports(paths: list[Path]) -> list[dict[str, Any]]:
    """Every family's report of every ``results.json``, in the order given. Other JSON files (this
    script's own ``--json`` rows match ``per_mask_*.json`` too) are skipped with a line on stderr;
    none left is a ``ValueError``."""
    found = []
    for path in paths:
        results = json.loads(path.read_text())
        families = (results.get("families") or {"": results}) if isinstance(results, dict) else {}
        if not families or not all(isinstance(f, dict) and "per_seed" in f for f in families.values()):
            print(f"skipping {path}: not a demo's results.json (no per_seed)", file=sys.stderr)
            continue
        found.extend(families.values())
    if not found:
        raise ValueError(f"none of the {len(paths)} file(s) is a demo's results.json")
    return found


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def study_rows(report: dict[str, Any], methods: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per method of ``report`` that ran: gap closed, ID vs oracle, seconds, seeds used."""
    config, per_seed, seeds = report["config"], report["per_seed"], report["seeds"]
    ahead = [i for i, run in enumerate(per_seed)
             if run["oracle"]["ood_acc"] - run["original"]["ood_acc"] >= MIN_GAP]
    rows = []
    for method in methods:
        if method not in per_seed[0]:
            continue

        def change(metric: str, name: str = method) -> list[float]:
            def value(run: dict[str, Any], model: str) -> float:
                entry = run[model]
                return entry[metric] if metric in entry else entry["probes"][metric]
            return [value(per_seed[i], name) - value(per_seed[i], "original") for i in ahead]

        gaps = {}
        for metric in ("ood_acc", "background_only"):
            oracle = _mean(change(metric, "oracle"))
            gaps[metric] = None if not ahead or abs(oracle) < MIN_GAP else 100 * _mean(change(metric)) / oracle
        id_vs_oracle = [per_seed[i][method]["id_acc"] - per_seed[i]["oracle"]["id_acc"] for i in ahead]
        seconds = [run[method]["seconds"] for run in per_seed if "seconds" in run[method]]
        rows.append({
            "family": config["family"], "masks": config.get("finetune_masks", "exact"),
            "per_class": config["finetune_per_class"], "method": method,
            "annotated_per_class": config.get("annotated_per_class") if config.get("finetune_masks") == "propagate"
            else None,
            "finetune_steps": config.get("finetune_steps") or None, **_masks_iou(report.get("masks")),
            "ood_gap_closed": gaps["ood_acc"], "bg_only_gap_closed": gaps["background_only"],
            "ood_change": _mean(change("ood_acc")), "ood_change_std": _std(change("ood_acc")),
            "id_vs_oracle": _mean(id_vs_oracle), "id_vs_oracle_std": _std(id_vs_oracle),
            "seconds": _mean(seconds), "seeds": [seeds[i] for i in ahead],
            "seeds_without_ceiling": [seed for i, seed in enumerate(seeds) if i not in ahead],
        })
    return rows


def _masks_iou(quality: list[dict[str, Any]] | None) -> dict[str, float | None]:
    """The automatic masks' mean IoU with the exact ones and, for propagated masks, the held-out IoU,
    over every seed (percent); None without automatic masks."""
    quality = quality or []
    return {"masks_iou": _mean([q["iou"] for q in quality]),
            "held_out_iou": _mean([q["held_out_iou"] for q in quality if "held_out_iou" in q])}


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table; the masks' IoU (held-out IoU in brackets) and the step budget
    are columns when some row has them."""
    with_iou = any(row.get("masks_iou") is not None for row in rows)
    with_steps = any(row.get("finetune_steps") for row in rows)
    header = ("| family | masks | per class | method | OOD gap closed | bg-only gap closed | OOD change | "
              "ID vs oracle | s per seed | seeds (without a ceiling) |" + (" masks IoU (held-out) |" if with_iou else "")
              + (" steps |" if with_steps else ""))
    lines = [header, "|---" * header.count(" |") + "|"]
    for row in rows:
        without = f" ({', '.join(map(str, row['seeds_without_ceiling']))})" if row["seeds_without_ceiling"] else ""
        id_cell = "n/a" if row["id_vs_oracle"] is None else f"{row['id_vs_oracle']:+.1f} ± {row['id_vs_oracle_std']:.1f}"
        ood_cell = "n/a" if row["ood_change"] is None else f"{row['ood_change']:+.1f} ± {row['ood_change_std']:.1f}"
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.1f}"
        masks = row["masks"] + (f" ({row['annotated_per_class']} annotated)" if row.get("annotated_per_class") else "")
        line = (f"| {row['family']} | {masks} | {row['per_class']} | {row['method']} | "
                f"{_percent(row['ood_gap_closed'])} | {_percent(row['bg_only_gap_closed'])} | {ood_cell} | "
                f"{id_cell} | {seconds} | {', '.join(map(str, row['seeds']))}{without} |")
        if with_iou:
            iou, held = row.get("masks_iou"), row.get("held_out_iou")
            line += " " + ("exact" if iou is None else f"{iou:.1f}" + ("" if held is None else f" ({held:.1f})")) + " |"
        if with_steps:
            line += f" {row.get('finetune_steps') or 'epochs'} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def curve_figure(rows: list[dict[str, Any]], path: Path) -> None:
    """OOD gap closed against masked images per class, one panel per family, a line per method and source."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({row["family"] for row in rows})
    methods = list(dict.fromkeys(row["method"] for row in rows))  # one colour per method, a line style per source
    fig, axes = plt.subplots(1, len(families), figsize=(4.5 * len(families), 3.6), squeeze=False)
    for ax, family in zip(axes[0], families):
        lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for row in rows:
            if row["family"] == family and row["ood_gap_closed"] is not None:
                lines.setdefault((row["method"], row["masks"]), []).append((row["per_class"], row["ood_gap_closed"]))
        for (method, masks), points in sorted(lines.items()):
            points.sort()
            ax.plot(*zip(*points), marker="o", linestyle="-" if masks == "exact" else "--",
                    color=f"C{methods.index(method)}", label=f"{method} ({masks})")
        ax.axhline(100, color="grey", linewidth=0.8)
        ax.set(xscale="log", title=family, xlabel="masked images per class", ylabel="OOD gap closed (%)")
        if lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="demo results.json files")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--figure", type=Path, help="write the curve of gap closed against masks per class here (PNG)")
    args = parser.parse_args()
    rows = [row for report in reports(args.results) for row in study_rows(report, tuple(args.methods))]
    rows.sort(key=lambda row: (row["family"], row["masks"], row["per_class"], args.methods.index(row["method"])))
    print(markdown(rows))
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=2))
    if args.figure:
        curve_figure(rows, args.figure)


if __name__ == "__main__":
    main()
