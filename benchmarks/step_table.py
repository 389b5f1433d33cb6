"""The step-time table: medians, ratios to the plain step, the targets, and their markdown."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict

import timm
import torch

from step_cases import EXPLAIN_CASES
from step_measure import median_memory, phase_medians, profile_table, time_cases
from step_workload import Config, make_workload

# The targets (CPU, vit_small, batch 8): (name, case a, case b, measure, bound, limit),
# each a ratio a / b of median step times (wall, CPU) or of peak memory (RSS, above the model).
TARGETS = (
    ("relevance step / plain fused step", "relevance", "plain_fused", "time", "max", 1.3),
    # no exact implementation beats its floor: a floor above the limit puts the target out of reach
    ("relevance floor / plain fused step", "relevance_floor", "plain_fused", "time", "max", 1.3),
    ("reference step / relevance step", "reference", "relevance", "time", "min", 2.7),
    ("second-order step / plain fused step", "second_order", "plain_fused", "time", "max", 2.3),
    ("second-order floor / plain fused step", "second_order_floor", "plain_fused", "time", "max", 2.3),
    ("relevance peak memory / plain fused", "relevance", "plain_fused", "memory", "max", 1.25),
    ("explain() throughput / reference explanation", "reference_explain", "explain", "time", "min", 4.0),
)


MEASURES = {
    "time": (("wall", "median_s"), ("CPU", "median_cpu_s")),
    "memory": (("peak RSS", "peak_mib"), ("above model", "delta_mib")),
}


def summarize(config: Config, times: dict[str, dict[str, list[float]]], memory: dict[str, dict]) -> dict:
    """Medians, ratios to the plain fused step (or to the reference explanation), targets."""
    steps, explain = {}, {}
    for name, t in times.items():
        entry = dict(median_s=statistics.median(t["wall"]), median_cpu_s=statistics.median(t["cpu"]),
                     times_s=t["wall"], cpu_times_s=t["cpu"], **memory.get(name, {}))
        (explain if name in EXPLAIN_CASES else steps)[name] = entry
    for entry in explain.values():
        entry["images_per_s"] = config.batch / entry["median_s"]
    for key in ("median_s", "median_cpu_s", "delta_mib", "peak_mib"):
        _add_ratio(steps, "plain_fused", key, key + "_vs_plain", inverse=False)
        _add_ratio(explain, "reference_explain", key, key + "_speedup_vs_reference", inverse=True)
    return dict(config=asdict(config), steps=steps, explain=explain,
                targets=evaluate_targets({**steps, **explain}))


def _add_ratio(entries: dict[str, dict], base: str, key: str, name: str, inverse: bool) -> None:
    if key not in entries.get(base, {}):
        return
    for entry in entries.values():
        if key in entry:
            ratio = entry[key] / entries[base][key]
            entry[name] = 1 / ratio if inverse else ratio


def evaluate_targets(entries: dict[str, dict]) -> list[dict]:
    """The issue's targets that these cases allow to check, in each measure available."""
    results = []
    for name, a, b, measure, bound, limit in TARGETS:
        for label, key in MEASURES[measure]:
            if key in entries.get(a, {}) and key in entries.get(b, {}):
                value = entries[a][key] / entries[b][key]
                met = value >= limit if bound == "min" else value <= limit
                results.append(dict(name=name, measure=label, value=value, bound=bound, limit=limit, met=met))
    return results


def run_config(config: Config, cases: tuple[str, ...], memory_repeats: int, timed: bool = True) -> dict:
    """Time ``cases`` on one workload (one process; unless not ``timed``), then their memory in
    subprocesses (0: skip)."""
    no_times = dict(wall=[float("nan")], cpu=[float("nan")])
    times = time_cases(make_workload(config), cases) if timed else {name: no_times for name in cases}
    mem = {name: median_memory(config, name, memory_repeats) for name in cases} if memory_repeats else {}
    return summarize(config, times, mem)


def environment() -> dict:
    return dict(torch=torch.__version__, timm=timm.__version__, python=platform.python_version(),
                platform=platform.platform(), processor=_cpu_name(), threads=torch.get_num_threads(),
                cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                load_average=os.getloadavg())


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def write_report(report: dict, path: str, started: float) -> None:
    report["environment"]["load_average_end"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - started
    with open(path, "w") as out:
        json.dump(report, out, indent=1)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_run(run: dict) -> str:
    """One configuration: the step table, the explanation table and the targets."""
    c = run["config"]
    lines = [f"**{c['model']}**, batch {c['batch']}, {c['img_size']} px, depth {c['depth'] or 'default'}, "
             f"{c['device']}, {c['dtype']}; median of {c['steps']} steps after {c['warmup']} warm-up",
             "", "| step | wall (ms) | × plain | CPU (ms) | × plain | peak RSS (MiB) | × plain "
                 "| above model (MiB) | × plain |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in run["steps"].items():
        cells = [f"{e['median_s'] * 1e3:.0f}", _fmt(e.get("median_s_vs_plain"), ".2f"),
                 f"{e['median_cpu_s'] * 1e3:.0f}", _fmt(e.get("median_cpu_s_vs_plain"), ".2f"),
                 _fmt(e.get("peak_mib"), ".0f"), _fmt(e.get("peak_mib_vs_plain"), ".2f"),
                 _fmt(e.get("delta_mib"), ".0f"), _fmt(e.get("delta_mib_vs_plain"), ".2f")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if run["explain"]:
        lines += ["", "| explanation | wall (ms / batch) | images/s | × reference | CPU (ms) | × reference |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, e in run["explain"].items():
            cells = [f"{e['median_s'] * 1e3:.0f}", f"{e['images_per_s']:.2f}",
                     _fmt(e.get("median_s_speedup_vs_reference"), ".2f"), f"{e['median_cpu_s'] * 1e3:.0f}",
                     _fmt(e.get("median_cpu_s_speedup_vs_reference"), ".2f")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if run["targets"]:
        lines += ["", "| target | measure | measured | limit | met |", "|---|---|---:|---:|---|"]
        for t in run["targets"]:
            bound = "≥" if t["bound"] == "min" else "≤"
            lines.append(f"| {t['name']} | {t['measure']} | {t['value']:.2f} | {bound} {t['limit']} | "
                         f"{'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


def markdown_phases(phases: dict[str, dict[str, dict]]) -> str:
    """Median wall and CPU milliseconds per phase of each case."""
    lines = ["| case | phase | wall (ms) | CPU (ms) |", "|---|---|---:|---:|"]
    for case, entries in phases.items():
        for phase, t in entries.items():
            lines.append(f"| {case} | {phase} | {t['wall'] * 1e3:.0f} | {t['cpu'] * 1e3:.0f} |")
    return "\n".join(lines)


def profile_cases(config: Config, cases: tuple[str, ...]) -> dict:
    """Print and return the phase medians and profiler tables of ``cases`` on one workload."""
    work = make_workload(config)
    phases = phase_medians(work, cases, rounds=config.steps)
    print(markdown_phases(phases), flush=True)
    tables = {case: profile_table(work, case) for case in cases}
    for case, table in tables.items():
        print(f"\n{case}\n{table}", flush=True)
    return dict(config=asdict(config), phases=phases, operators=tables)
