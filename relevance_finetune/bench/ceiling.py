"""How much of the reachable gain a method gets: its change as a fraction of the oracle's.

The oracle is the original's architecture and schedule trained with the shortcut independent of
the class (``originals.train_oracle``): the best OOD accuracy and background-only accuracy a finetune
can hope for, and the ID accuracy of a model that reads the objects alone. For OOD and
background-only, a method's *gap closed* is ``(method - original) / (oracle - original)`` of the
means over seeds, in percent (100 = the oracle reached; above 100 = past it); its *ID vs oracle* is
its ID accuracy minus the oracle's, paired per seed.

The oracle also reads the objects better than the original (its second phase was more object
practice), which no finetune on a few masked images can teach. The part of the OOD gap that a
change of reliance alone can close ends near the original's own object-only accuracy (its top-1 with
the background replaced): a method's *object-only gap closed* is ``(method OOD - original OOD) /
(original object-only - original OOD)``.
"""
from __future__ import annotations

from typing import Any, Sequence

__all__ = ["CEILING_COLUMNS", "GAP_METRICS", "MIN_GAP", "ceiling_columns", "ceiling_note", "format_stat", "gap_closed",
           "no_oracle_note", "seed_count", "seeds_with_a_ceiling"]

# metric -> the direction in which the oracle should lie from the original (OOD up, background-only down)
GAP_METRICS = {"ood_acc": 1.0, "background_only": -1.0}
# An oracle ahead of the original by less than this many points is no ceiling to measure against.
MIN_GAP = 1.0
CEILING_COLUMNS = ("OOD gap closed", "bg-only gap closed", "ID vs oracle", "object-only gap closed")


def format_stat(stat: dict[str, float], n_seeds: int | None = None, signed: bool = False) -> str:
    """A table cell: ``mean ± std`` over seeds (``+mean ± std`` when ``signed``); the mean alone for
    one seed, which has no spread. ``n_seeds`` None (a summary that predates the count): with the std."""
    mean = f"{stat['mean']:+.1f}" if signed else f"{stat['mean']:.1f}"
    return mean if n_seeds == 1 else f"{mean} ± {stat['std']:.1f}"


def seed_count(methods: dict[str, dict[str, Any]]) -> int | None:
    """How many seeds a summary (``demo.summarize``) is over: its ``"n_seeds"``, or where it predates
    them the number of chosen learning rates; None when it cannot say."""
    counts = [entry.get("n_seeds", len(entry.get("lr", ())) or None) for entry in methods.values()]
    return next((count for count in counts if count), None)


def _change(entry: dict[str, Any], metric: str) -> float:
    return entry["change"][metric]["mean"]


def gap_closed(methods: dict[str, dict[str, Any]], name: str) -> dict[str, float | None] | None:
    """``{metric: percent of the original-to-oracle gap closed, "id_vs_oracle": points,
    "object_only": percent of the OOD gap to the original's object-only accuracy closed}`` of method
    ``name`` in a summary (``demo.summarize``); a gap narrower than ``MIN_GAP`` points (or the wrong
    way round) gives ``None``. ``None`` when the summary has no oracle."""
    oracle = methods.get("oracle")
    if oracle is None or name in ("original", "oracle"):
        return None
    entry = methods[name]
    out: dict[str, float | None] = {}
    for metric, direction in GAP_METRICS.items():
        gap = _change(oracle, metric)
        out[metric] = 100.0 * _change(entry, metric) / gap if direction * gap >= MIN_GAP else None
    out["id_vs_oracle"] = _change(entry, "id_acc") - _change(oracle, "id_acc")
    original = methods["original"]
    reliance_gap = original["probes"]["object_only"]["mean"] - original["ood_acc"]["mean"]
    out["object_only"] = 100.0 * _change(entry, "ood_acc") / reliance_gap if reliance_gap >= MIN_GAP else None
    return out


def ceiling_columns(methods: dict[str, dict[str, Any]], name: str) -> list[str]:
    """The markdown cells of ``name``'s gap-closed columns (empty without an oracle)."""
    gaps = gap_closed(methods, name)
    if name == "oracle":
        return ["100%", "100%", "+0.0", ""]
    if gaps is None:
        return [""] * len(CEILING_COLUMNS) if "oracle" in methods else []
    cells = [f"{gaps[metric]:.0f}%" if gaps[metric] is not None else "n/a (oracle not ahead)"
             for metric in GAP_METRICS]
    paired = methods[name].get("vs_oracle", {}).get("id_acc")  # per seed, where the summary has them
    id_cell = format_stat(paired, seed_count(methods), signed=True) if paired else f"{gaps['id_vs_oracle']:+.1f}"
    object_only = "n/a (no gap)" if gaps["object_only"] is None else f"{gaps['object_only']:.0f}%"
    return cells + [id_cell, object_only]


def seeds_with_a_ceiling(per_seed: list[dict[str, Any]]) -> list[int]:
    """Indices of the seeds whose oracle is ahead of their original on OOD by at least ``MIN_GAP``
    points; a seed whose oracle is not (neither model learnt the objects) has no ceiling to close."""
    return [index for index, seed in enumerate(per_seed)
            if "oracle" in seed and seed["oracle"]["ood_acc"] - seed["original"]["ood_acc"] >= MIN_GAP]


def _seed_list(labels: Sequence[int]) -> str:
    return f"seed {labels[0]}" if len(labels) == 1 else "seeds " + ", ".join(map(str, labels))


def ceiling_note(ahead: Sequence[int], seeds: Sequence[int]) -> str:
    """One sentence: the seeds (``seeds``, by index in ``ahead`` as ``seeds_with_a_ceiling`` gives
    them) whose oracle is ahead of their original on OOD by at least ``MIN_GAP`` points."""
    by = f"on OOD by at least {MIN_GAP:g} point{'' if MIN_GAP == 1 else 's'}"
    behind = [seed for index, seed in enumerate(seeds) if index not in ahead]
    if not behind:
        where = _seed_list(seeds) if len(seeds) == 1 else f"every seed ({', '.join(map(str, seeds))})"
        return (f"The oracle is ahead of the original {by} in {where}: the OOD gap closed has a ceiling to "
                "measure against.")
    if not ahead:
        where = _seed_list(seeds) if len(seeds) == 1 else f"any of the {len(seeds)} seeds"
        return (f"The oracle is not ahead of the original {by} in {where}, so there is no OOD ceiling to "
                "close (the OOD gap closed reads n/a).")
    return (f"The oracle is ahead of the original {by} in {_seed_list([seeds[i] for i in ahead])} but not in "
            f"{_seed_list(behind)}; a seed where it is not has no ceiling to close.")


def no_oracle_note(methods: dict[str, dict[str, Any]]) -> str:
    """Why a table has no gap-closed columns, or ``""`` when it has them."""
    if "oracle" in methods:
        return ""
    return ("No gap-closed columns: these results have no oracle (a model trained with the shortcut "
            "independent of the class), so the reachable gain is unknown.")
