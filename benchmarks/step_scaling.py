"""Step time and memory vs image size and depth (``--scaling``)."""
from __future__ import annotations

from dataclasses import replace

from step_table import _fmt
from step_workload import Config

SCALING_SIZES = (224, 288, 384)
SCALING_DEPTHS = (4, 8)  # plus the model's own depth, from the size sweep
SCALING_CASES = ("plain_fused", "relevance", "reference")


def scaling_configs(base: Config) -> list[Config]:
    """Image sizes at full depth, then smaller depths at the base image size."""
    sizes = [replace(base, img_size=size) for size in SCALING_SIZES]
    depths = [replace(base, depth=depth) for depth in SCALING_DEPTHS]
    return sizes + depths


def markdown_scaling(runs: list[dict]) -> str:
    """Median wall time (ms) and memory above the model (MiB) per case vs image size and depth."""
    cases = list(runs[0]["steps"])
    header = "| img | depth | tokens | " + " | ".join(f"{n} ms | {n} MiB" for n in cases) + " |"
    lines = [header, "|" + "---:|" * (3 + 2 * len(cases))]
    for run in runs:
        c = run["config"]
        tokens = (c["img_size"] // 16) ** 2 + 1
        cells = [f"{run['steps'][n]['median_s'] * 1e3:.0f} | {_fmt(run['steps'][n].get('delta_mib'), '.0f')}"
                 for n in cases]
        lines.append(f"| {c['img_size']} | {c['depth'] or 'default'} | {tokens} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
