"""How much of the reachable gain a method gets: its change as a fraction of the oracle's.

The oracle is the original's architecture and schedule trained with the shortcut independent of
the class (``runner.train_oracle``): the best OOD accuracy and background-only accuracy a finetune
can hope for, and the ID accuracy of a model that reads the objects alone. For OOD and
background-only, a method's *gap closed* is ``(method - original) / (oracle - original)`` of the
means over seeds, in percent (100 = the oracle reached; above 100 = past it); its *ID vs oracle* is
its ID accuracy minus the oracle's, paired per seed.
"""
from __future__ import annotations

from typing import Any

__all__ = ["GAP_METRICS", "MIN_GAP", "ceiling_columns", "gap_closed", "no_oracle_note"]

# metric -> the direction in which the oracle should lie from the original (OOD up, background-only down)
GAP_METRICS = {"ood_acc": 1.0, "background_only": -1.0}
# An oracle ahead of the original by less than this many points is no ceiling to measure against.
MIN_GAP = 1.0


def _change(entry: dict[str, Any], metric: str) -> float:
    return entry["change"][metric]["mean"]


def gap_closed(methods: dict[str, dict[str, Any]], name: str) -> dict[str, float | None] | None:
    """``{metric: percent of the original-to-oracle gap closed, "id_vs_oracle": points}`` of
    method ``name`` in a summary (``demo.summarize``); a metric where the oracle is not ahead of the
    original by at least ``MIN_GAP`` points is ``None``. ``None`` when the summary has no oracle."""
    oracle = methods.get("oracle")
    if oracle is None or name in ("original", "oracle"):
        return None
    entry = methods[name]
    out: dict[str, float | None] = {}
    for metric, direction in GAP_METRICS.items():
        gap = _change(oracle, metric)
        out[metric] = 100.0 * _change(entry, metric) / gap + 0.0 if direction * gap >= MIN_GAP else None
    out["id_vs_oracle"] = _change(entry, "id_acc") - _change(oracle, "id_acc")
    return out


def ceiling_columns(methods: dict[str, dict[str, Any]], name: str) -> list[str]:
    """The markdown cells of ``name``'s gap-closed columns (empty without an oracle)."""
    gaps = gap_closed(methods, name)
    if name == "oracle":
        return ["100%", "100%", "+0.0"]
    if gaps is None:
        return ["", "", ""] if "oracle" in methods else []
    cells = [f"{gaps[metric]:.0f}%" if gaps[metric] is not None else "n/a (oracle not ahead)"
             for metric in GAP_METRICS]
    paired = methods[name].get("vs_oracle", {}).get("id_acc")  # per seed, where the summary has them
    id_cell = f"{paired['mean']:+.1f} ± {paired['std']:.1f}" if paired else f"{gaps['id_vs_oracle']:+.1f}"
    return cells + [id_cell]


def no_oracle_note(methods: dict[str, dict[str, Any]]) -> str:
    """Why a table has no gap-closed columns, or ``""`` when it has them."""
    if "oracle" in methods:
        return ""
    return ("No gap-closed columns: these results have no oracle (a model trained with the shortcut "
            "independent of the class), so the reachable gain is unknown.")
