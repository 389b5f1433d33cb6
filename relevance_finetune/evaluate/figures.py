"""Pictures of the ``folder`` suite's report, drawn from its results alone (the models are gone by then).

- :func:`probe_chart`: top-1 on full, object-only and background-only images, per split and run;
- :func:`relevance_grid`: the kept example images with each of two runs' relevance overlays
  (:func:`relevance_finetune.viz.before_after_grid`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..images import read_image
from ..gae import normalize_relevance, upsample_relevance
from ..viz import before_after_grid, prediction_title, save_figure
from .folder import unit_transform

__all__ = ["PROBE_BARS", "probe_chart", "relevance_grid", "write_folder_figures"]

PROBE_BARS = {"full": "full image", "object_only": "object only", "background_only": "background only"}
_HATCHES = ("", "//", "..", "xx")


def probe_chart(runs: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Bar chart of the reliance probes (top-1, percent) of every masked split: a bar per probe and run."""
    splits = [s for s, result in next(iter(runs.values()))["splits"].items() if result.get("probes")]
    if not splits:
        raise ValueError("no split has usable masks: the reliance probes were not measured")
    bars = [(label, r, key, m) for r, label in enumerate(runs) for m, key in enumerate(PROBE_BARS)]
    width = 0.8 / len(bars)
    figure = Figure(figsize=(max(6.0, 0.45 * len(bars) * len(splits) + 3), 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for i, (label, r, key, m) in enumerate(bars):
        values = [runs[label]["splits"][s]["probes"][key] for s in splits]
        ax.bar(np.arange(len(splits)) - 0.4 + width * (i + 0.5), values, width, color=f"C{m}",
               hatch=_HATCHES[r % len(_HATCHES)], edgecolor="white", label=f"{label}: {PROBE_BARS[key]}")
    ax.set_xticks(np.arange(len(splits)), splits)
    ax.set_ylim(0, 100)
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Reliance probes (background only: lower = less use of the background)", fontsize=8, wrap=True)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_figure(figure, path)


def _images(examples: list[Mapping[str, Any]], config: Mapping[str, Any]) -> torch.Tensor:
    """The example images in [0, 1], preprocessed as the run saw them."""
    transform, images = unit_transform(config), []
    for example in examples:
        image = read_image(example["path"])
        images.append(transform(image, np.ones((image.height, image.width), dtype=bool))[0])
    return torch.stack(images)


def _maps(examples: list[Mapping[str, Any]], size: tuple[int, int]) -> torch.Tensor:
    grids = torch.tensor([example["relevance"] for example in examples], dtype=torch.float32)
    return normalize_relevance(upsample_relevance(grids, size))


def relevance_grid(runs: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Input, first run's and second run's relevance overlays of the examples both runs kept.

    Titles give each run's prediction and probability and the true class; the input row is
    preprocessed as the first run's model saw it.
    """
    if len(runs) != 2:
        raise ValueError(f"the before/after grid compares two runs, got {len(runs)}")
    (first_label, first), (second_label, second) = runs.items()
    by_path = {example["path"]: example for example in second["examples"]}
    pairs = [(example, by_path[example["path"]]) for example in first["examples"] if example["path"] in by_path]
    if not pairs:
        raise ValueError("the two runs kept no example image in common (no split with masks?)")
    before, after = [p[0] for p in pairs], [p[1] for p in pairs]
    images = _images(before, first["input"])
    size = tuple(images.shape[-2:])

    def titles(examples, label):
        return [prediction_title(e["predicted"], e["probability"], label, e["true"]) for e in examples]

    return before_after_grid(images, _maps(before, size), _maps(after, size), titles(before, first_label),
                             titles(after, second_label), path, row_labels=(first_label, second_label))


def write_folder_figures(runs: Mapping[str, Mapping[str, Any]], out: str | Path) -> list[Path]:
    """``folder_probes.png`` (with usable masks) and ``folder_relevance.png`` (two runs, with masks) in ``out``."""
    out = Path(out)
    first = next(iter(runs.values()))
    if not first["examples"]:
        return []
    probed = any(result.get("probes") for result in first["splits"].values())
    written = [probe_chart(runs, out / "folder_probes.png")] if probed else []
    if len(runs) == 2:
        written.append(relevance_grid(runs, out / "folder_relevance.png"))
    return written
