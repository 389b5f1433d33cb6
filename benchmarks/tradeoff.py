"""The ID-for-reliance trade-off of the benchmark's methods, from a demo's ``results.json``.

Every learning rate and checkpoint that the reliance rule scored is a point: the change of
validation accuracy (x) and of validation background-only accuracy (y) against the original,
mean over seeds. Methods under the paper's rule contribute their final models. Writes
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


def trial_points(per_seed: list[dict[str, Any]], method: str) -> dict[tuple[float, int], tuple[float, float | None]]:
    """(lr, epoch) -> mean over seeds of (validation accuracy change, background-only change)."""
    changes: dict[tuple[float, int], list[tuple[float, float | None]]] = defaultdict(list)
    for seed_result in per_seed:
        trials = seed_result[method]["lr_trials"]
        if not trials:
            continue
        start, *rest = trials
        for trial in rest:
            background = trial.get("background_only")
            changes[(trial["lr"], trial.get("epoch", 0))].append(
                (trial["acc"] - start["acc"], None if background is None else background - start["background_only"]))
    return {key: (statistics.fmean(a for a, _ in values),
                  None if values[0][1] is None else statistics.fmean(b for _, b in values))
            for key, values in changes.items()}


def family_table(name: str, family: dict[str, Any]) -> str:
    lines = [f"### {name}", "", "| method | lr | epoch | val accuracy change | val background-only change |",
             "|---|---|---|---|---|"]
    for method in family["per_seed"][0]:
        if method == "original":
            continue
        for (lr, epoch), (acc, background) in sorted(trial_points(family["per_seed"], method).items()):
            shown = "-" if background is None else f"{background:+.1f}"
            lines.append(f"| {method} | {lr:g} | {epoch} | {acc:+.1f} | {shown} |")
    return "\n".join(lines) + "\n"


def family_plot(name: str, family: dict[str, Any], path: Path) -> None:
    figure, ax = plt.subplots(figsize=(6, 4.5))
    for method in family["per_seed"][0]:
        if method == "original":
            continue
        points = [(acc, background) for acc, background in trial_points(family["per_seed"], method).values()
                  if background is not None]
        if points:
            ax.scatter(*zip(*points), label=method, s=18)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.axvline(-family["config"]["max_val_drop"], color="red", lw=0.8, ls="--", label="accuracy limit")
    ax.set_xlabel("validation accuracy change (points)")
    ax.set_ylabel("validation background-only change (points)")
    ax.set_title(f"{name}: every lr x checkpoint the reliance rule scored ({len(family['seeds'])} seeds)")
    ax.legend(fontsize=8)
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
