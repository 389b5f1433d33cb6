"""Markdown tables of evaluation results: the paper's table layouts and the ``evaluate`` command's report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .datasets import DATASETS, IN9_VARIANTS

__all__ = ["FOLDER_COLUMNS", "GROUP_MEANS", "SEGMENTATION_METRICS", "folder_changes", "folder_markdown",
           "group_markdown", "metric_table", "robustness_table", "shortcut_rows", "suite_markdown", "write_table"]

SEGMENTATION_METRICS = {"pixel_acc": "Pixel acc.", "miou": "mIoU", "map": "mAP", "mass_accuracy": "Mass acc.",
                        "rank_accuracy": "Rank acc.", "pointing_game": "Pointing game"}
# the folder suite's columns: "section/key" of a split's result -> title (all but top-1 need masks)
FOLDER_COLUMNS = {"top1": "Top-1", "probes/object_only": "Object-only", "probes/background_only": "Background-only",
                  "probes/background_reliance": "BG reliance", "localisation/miou": "mIoU",
                  "localisation/mass_accuracy": "Mass acc.", "localisation/pointing_game": "Pointing game"}
_NOT_MEASURED = "n/a (no usable mask)"  # a masked split whose masks are all empty or full: its note says more
_CLASSES_SHOWN = 20  # class folders the folder table lists with their model index
_FOLDER_LEGEND = ("Object-only / background-only: top-1 with the background / the object replaced (mean over grey, "
                  "mean-colour and blurred fills); BG reliance = background-only - object-only (lower: less use of "
                  "the background). mIoU, mass accuracy, pointing game: the GAE map of the predicted class against "
                  "the mask. Percent.")


def _markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, delta: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if delta is None else f"{value:.1f} ({value - delta:+.1f})"


def robustness_table(
        rows: Sequence[tuple[Sequence[str], Mapping[str, Mapping[str, Any]] | None]],
        datasets: Sequence[str],
        row_header: Sequence[str] = ("Model",),
        protocol: str = "standard",
        metrics: Sequence[str] = ("top1", "top5"),
        split: str | None = None,
        baselines: Sequence[int | None] | None = None,
) -> str:
    """Markdown table in the layout of the paper's Tables 1, 2 and 4.

    ``rows`` are ``(label cells, {dataset: {protocol: result}})``; results may be None or lack a
    dataset (shown as "-"). ``split`` picks ``'set_a'``/``'set_b'``. ``baselines[i]``, a row index
    or None, makes row ``i`` show each value's change against that row, as Table 2 does.
    """
    def value(results, dataset, metric):
        entry = (results or {}).get(dataset, {}).get(protocol)
        if entry is None or (split and split not in entry):
            return None
        return (entry[split] if split else entry)[metric]

    names = {"top1": "R@1", "top5": "R@5"}
    header = list(row_header) + [f"{DATASETS[d].title if d in DATASETS else d} {names.get(m, m)}"
                                 for d in datasets for m in metrics]
    baselines = baselines or [None] * len(rows)
    body = []
    for (labels, results), b in zip(rows, baselines):
        base = None if b is None else rows[b][1]
        cells = [_fmt(value(results, d, m), None if base is None else value(base, d, m))
                 for d in datasets for m in metrics]
        body.append(list(labels) + cells)
    return _markdown(header, body)


def metric_table(columns: Mapping[str, Mapping[str, float] | None], metrics: Mapping[str, str],
                 corner: str = "Metric") -> str:
    """Markdown table with one row per metric (``{key: title}``) and one column per run (Table 3)."""
    header = [corner] + list(columns)
    rows = [[title] + [_fmt((result or {}).get(key)) for result in columns.values()]
            for key, title in metrics.items()]
    return _markdown(header, rows)


def shortcut_rows(results: Mapping[str, Any]) -> dict[str, float | None]:
    """One run's shortcut results as ``{row title: value}`` for :func:`metric_table`."""
    rows: dict[str, float | None] = {}
    if "imagenet-w" in results:
        w = results["imagenet-w"]
        rows.update({"IN-1k top-1": w["clean_top1"], "IN-W top-1": w["watermarked_top1"],
                     "IN-W gap": w["in_w_gap"], "Carton gap": w["carton_gap"]})
    if "imagenet-9" in results:
        in9 = results["imagenet-9"]
        rows.update({f"IN-9 {v}": in9[v]["top1"] for v in IN9_VARIANTS if v in in9})
        rows["BG-gap"] = in9["bg_gap"]
    return rows


def _perturbation_rows(result: Mapping[str, Any]) -> dict[str, float]:
    flat = {}
    for mode in ("positive", "negative"):
        flat[f"{mode} AUC"] = result[mode]["auc"]
        for fraction, accuracy in zip(result[mode]["fractions"], result[mode]["accuracy"]):
            flat[f"{mode} {fraction:.0%}"] = accuracy
    return flat


def _folder_values(split: Mapping[str, Any]) -> dict[str, float | None]:
    """``{FOLDER_COLUMNS key: value}`` of one split's result; keys of what was not measured are absent."""
    values = {}
    for key in FOLDER_COLUMNS:
        section, _, name = key.rpartition("/")
        source = split.get(section) if section else split
        if source is not None:
            values[key] = source.get(name)
    return values


def folder_changes(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """``{split: {column key: second run - first run}}`` of two folder-suite runs (columns both measured)."""
    (_, first), (_, second) = runs.items()
    changes = {}
    for split, result in second["splits"].items():
        before, after = _folder_values(first["splits"][split]), _folder_values(result)
        changes[split] = {key: after[key] - before[key] for key in after
                          if before.get(key) is not None and after[key] is not None}
    return changes


def folder_markdown(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """The folder suite's table: a row per split and run, with a change row when two runs are compared.

    The probe and localisation columns appear only when some split has masks; a split without
    them shows "-" there, one whose masks are all empty or full "n/a (no usable mask)", and a
    note below the table says why.
    """
    splits = list(next(iter(runs.values()))["splits"])
    masked = any("probes" in run["splits"][s] for run in runs.values() for s in splits)
    columns = {k: t for k, t in FOLDER_COLUMNS.items() if masked or "/" not in k}
    changes = folder_changes(runs) if len(runs) == 2 else None
    body = []
    for split in splits:
        for label, run in runs.items():
            values = _folder_values(run["splits"][split])
            missing = _NOT_MEASURED if run["splits"][split].get("not_measured") else "-"
            body.append([split, label, str(run["splits"][split]["n"])]
                        + [missing if "/" in k and values.get(k) is None else _fmt(values.get(k)) for k in columns])
        if changes is not None:
            body.append([split, "change", ""] + [f"{changes[split][k]:+.1f}" if k in changes[split] else "-"
                                                 for k in columns])
    first = next(iter(runs.values()))
    notes = [f"Split `{s}`: {first['splits'][s]['note']}." for s in splits if "note" in first["splits"][s]]
    classes = [f"{name}={index}" for name, index in first["classes"].items()]
    shown = ", ".join(classes[:_CLASSES_SHOWN]) + (f", ... ({len(classes)} in all)" if len(classes) > _CLASSES_SHOWN
                                                   else "")
    grouped = [f"Groups of split `{s}` (percent; the mean over groups weighs each group alike):\n\n"
               + group_markdown({label: run["splits"][s]["groups"] for label, run in runs.items()}).rstrip()
               for s in splits if "groups" in first["splits"][s]]
    parts = [_markdown(["Split", "Run", "Images"] + list(columns.values()), body).rstrip(),
             *([_FOLDER_LEGEND] if masked else []), *notes, f"Classes (model index): {shown}.", *grouped]
    return "\n\n".join(parts) + "\n"


GROUP_MEANS = {"worst_group_accuracy": "worst group", "mean_accuracy": "mean (test)",
               "weighted_mean_accuracy": "mean weighted by training groups",
               "group_balanced_mean_accuracy": "mean over groups (group-balanced)"}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def group_markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A table of group results (:func:`relevance_finetune.metrics.group_accuracy` with names), one column per run.

    A row per group (its name and test images), then the worst group and the means the results hold. Percent.
    """
    first = next(iter(results.values()))
    rows = [[f"{g}: {v.get('name', g)}", str(v["count"])] + [_percent(r["groups"][g]["accuracy"])
                                                             for r in results.values()]
            for g, v in first["groups"].items()]
    rows += [[title, str(sum(v["count"] for v in first["groups"].values()))] + [_percent(r[key]) for r in results.values()]
             for key, title in GROUP_MEANS.items() if first.get(key) is not None]
    return _markdown(["Group", "Images"] + [f"{label} (%)" for label in results], rows)


def suite_markdown(suite: str, runs: Mapping[str, Mapping[str, Any]], protocols: Sequence[str],
                    split: bool) -> str:
    """The ``<suite>.md`` report of ``runs`` (``{column label: run_suite result}``); ``split``: set A/B tables."""
    if suite == "folder":
        return folder_markdown(runs)
    if suite == "waterbirds":
        first = next(iter(runs.values()))
        return (f"Waterbirds test split ({first['root']}): accuracy per group (group = 2 * y + place), the worst "
                "group, the plain test mean and the test group accuracies weighted by the training split's group "
                "proportions.\n\n" + group_markdown(runs))
    datasets = list(next(iter(runs.values())))
    if suite == "segmentation":
        results = {label: r["segmentation"] for label, r in runs.items()}
        first = next(iter(results.values()))
        return (f"Preprocessing: `{first['protocol']}` (mean {first['mean']}, std {first['std']})\n\n"
                + metric_table(results, SEGMENTATION_METRICS))
    if suite == "shortcuts":
        rows = {label: shortcut_rows(r) for label, r in runs.items()}
        return metric_table(rows, {k: k for k in next(iter(rows.values()))})
    if suite == "perturbation":
        parts = []
        for d in datasets:
            rows = {label: _perturbation_rows(r[d]) for label, r in runs.items()}
            parts.append(f"### {d}\n\n" + metric_table(rows, {k: k for k in next(iter(rows.values()))}))
        return "\n".join(parts)
    rows = [((label,), r) for label, r in runs.items()]
    baselines = [None] + [0] * (len(rows) - 1)
    splits = (None, "set_a", "set_b") if split else (None,)
    parts = []
    for protocol in protocols:
        for s in splits:
            title = f"Protocol: {protocol}" + (f", set {s[-1].upper()} classes" if s else "")
            parts.append(f"### {title}\n\n" + robustness_table(
                rows, datasets, ("Run",), protocol, split=s, baselines=baselines))
    return "\n".join(parts)


def write_table(path: str | Path, markdown: str, rows: Sequence[tuple[Sequence[str], Any]]) -> None:
    """Write a table's markdown to ``path`` and its raw results to ``path`` with ``.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown)
    path.with_suffix(".json").write_text(json.dumps([{"row": list(labels), "results": results}
                                                      for labels, results in rows], indent=2))
    print(markdown)
