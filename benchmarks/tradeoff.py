"""The ID-for-reliance trade-off of the benchmark's methods, from a demo's ``results.json``.

Every learning rate and checkpoint that a rule scored is a point, mean over seeds of its change
against the original: validation accuracy vs validation background-only accuracy (what the
reliance rule sees), and test ID vs test OOD accuracy (recorded, never selected on), with the
oracle's point (the model trained without the shortcut) where the run has one. Methods under the
paper's rule contribute their final models. Writes
``tradeoff[_FAMILY].png`` and ``tradeoff.md`` next to the results::

    python benchmarks/tradeoff.py demo-out/results.json
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def trial_points(per_seed: list[dict[str, Any]], method: str) -> dict[tuple[float, int], dict[str, float]]:
    """(lr, epoch) -> mean over seeds of each trial quantity's change vs the original: ``val_acc``,
    ``val_background_only`` or ``val_counterfactual`` (by the rule) and, where recorded, ``test_id``
    and ``test_ood``."""
    changes: dict[tuple[float, int], list[dict[str, float]]] = defaultdict(list)
    for seed_result in per_seed:
        trials = seed_result[method]["lr_trials"]
        if not trials:
            continue
        start, *rest = trials
        for trial in rest:
            change = {"val_acc": trial["acc"] - start["acc"]}
            for key in ("background_only", "counterfactual"):  # what the reliance / counterfactual rule reads
                if key in trial:
                    change[f"val_{key}"] = trial[key] - start[key]
            for split, value in trial.get("test", {}).items():
                change[f"test_{split}"] = value - start["test"][split]
            changes[(trial["lr"], trial.get("epoch", 0))].append(change)
    return {key: {name: statistics.fmean(change[name] for change in values) for name in values[0]}
            for key, values in changes.items()}


def oracle_point(per_seed: list[dict[str, Any]]) -> tuple[float, float] | None:
    """The oracle's (test ID, test OOD) change vs the original, mean over seeds; None without one."""
    if "oracle" not in per_seed[0]:
        return None
    return tuple(statistics.fmean(s["oracle"][key] - s["original"][key] for s in per_seed)  # type: ignore[return-value]
                 for key in ("id_acc", "ood_acc"))


def _methods(family: dict[str, Any]) -> list[str]:
    return [method for method in family["per_seed"][0] if method not in ("original", "oracle")]


def family_table(name: str, family: dict[str, Any]) -> str:
    columns = ("val_acc", "val_background_only", "val_counterfactual", "test_id", "test_ood")
    lines = [f"### {name}", "", "| method | lr | epoch | val accuracy | val background-only | val counterfactual "
             "| test ID | test OOD |", "|---|---|---|---|---|---|---|---|"]
    for method in _methods(family):
        for (lr, epoch), change in sorted(trial_points(family["per_seed"], method).items()):
            cells = " | ".join(f"{change[c]:+.1f}" if c in change else "-" for c in columns)
            lines.append(f"| {method} | {lr:g} | {epoch} | {cells} |")
    oracle = oracle_point(family["per_seed"])
    if oracle is not None:
        lines.append(f"| oracle | - | - | - | - | - | {oracle[0]:+.1f} | {oracle[1]:+.1f} |")
    return "\n".join(lines) + "\n"


def family_plot(name: str, family: dict[str, Any], path: Path) -> None:
    """Left: what the methods' rules see on the validation images (background-only accuracy for the
    reliance rule, circles; counterfactual accuracy for the counterfactual rule, triangles); right:
    the test accuracies they never see, with the oracle's point."""
    figure, (val_ax, test_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    reliance = False
    for index, method in enumerate(_methods(family)):
        colour = f"C{index % 10}"
        points = trial_points(family["per_seed"], method).values()
        for key, marker in (("val_background_only", "o"), ("val_counterfactual", "^")):
            val = [(p["val_acc"], p[key]) for p in points if key in p]
            if val:
                val_ax.scatter(*zip(*val), label=method, s=18, color=colour, marker=marker)
                reliance |= key == "val_background_only"
        test = [(p["test_id"], p["test_ood"]) for p in points if "test_ood" in p]
        if test:
            test_ax.scatter(*zip(*test), label=method, s=18, color=colour)
    oracle = oracle_point(family["per_seed"])
    if oracle is not None:
        test_ax.scatter(*oracle, marker="*", s=160, color="black", label="oracle (no shortcut)", zorder=3)
    if reliance:
        val_ax.axvline(-family["config"]["max_val_drop"], color="red", lw=0.8, ls="--", label="accuracy limit")
    for ax in (val_ax, test_ax):
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.legend(fontsize=8)
    val_ax.set_xlabel("validation accuracy change (points)")
    val_ax.set_ylabel("validation background-only (o) / counterfactual (^)\naccuracy change (points)")
    test_ax.set_xlabel("test ID accuracy change (points)")
    test_ax.set_ylabel("test OOD accuracy change (points)")
    figure.suptitle(f"{name}: every lr x checkpoint scored, mean over {len(family['seeds'])} seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a demo's results.json")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    families = results.get("families") or {results["config"]["family"]: results}
    tables = []
    for name, family in families.items():
        suffix = "" if len(families) == 1 else f"_{name}"
        family_plot(name, family, args.results.parent / f"tradeoff{suffix}.png")
        tables.append(family_table(name, family))
    (args.results.parent / "tradeoff.md").write_text("\n".join(tables))
    print("\n".join(tables))


if __name__ == "__main__":
    main()
