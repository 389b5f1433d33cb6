"""The shared timing helper of the step-time benchmark: wall and CPU time per phase, interleaved
cases, profiles, and peak memory in fresh processes.

Timings interleave the cases round by round (warm-up rounds first) so that load from other
processes hits every case alike. Peak memory runs each case in a fresh subprocess (CPU: ``VmHWM``
of /proc/self/status after a reset; CUDA: ``torch.cuda.max_memory_allocated``), counted above
the resident model and batch.
"""
from __future__ import annotations

import contextlib
import gc
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from step_cases import CASES
from step_workload import Config, Workload, make_workload, no_phase

MIB = 2 ** 20
STEP_TIME = Path(__file__).with_name("step_time.py")  # runs the memory worker


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class PhaseTimer:
    """Wall and process CPU seconds per named phase, each phase also a profiler range."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        with record_function(name):
            _synchronize(self.device)
            wall, cpu = time.perf_counter(), time.process_time()
            yield
            _synchronize(self.device)
        self.wall.setdefault(name, []).append(time.perf_counter() - wall)
        self.cpu.setdefault(name, []).append(time.process_time() - cpu)


def time_cases(work: Workload, cases: tuple[str, ...]) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per step of each case, interleaved round by round, warm-up dropped."""
    config = work.config
    timers = {name: PhaseTimer(config.device) for name in cases}
    for _ in range(config.warmup + config.steps):
        for name in cases:
            with CASES[name](work) as step:
                with timers[name]("step"):
                    step(no_phase)
    return {name: dict(wall=t.wall["step"][config.warmup:], cpu=t.cpu["step"][config.warmup:])
            for name, t in timers.items()}


def phase_medians(work: Workload, cases: tuple[str, ...], rounds: int) -> dict[str, dict[str, dict]]:
    """Median wall and CPU seconds of each phase of each case (after one warm-up round)."""
    timers = {name: PhaseTimer(work.config.device) for name in cases}
    for _ in range(rounds + 1):
        for name in cases:
            with CASES[name](work) as step:
                step(timers[name])
    return {name: {phase: dict(wall=statistics.median(t.wall[phase][1:]), cpu=statistics.median(t.cpu[phase][1:]))
                   for phase in t.wall} for name, t in timers.items()}


def profile_table(work: Workload, case: str, rows: int = 15) -> str:
    """torch.profiler's busiest operators (self CPU time) in one step of ``case``."""
    with CASES[case](work) as step:
        step(no_phase)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(no_phase)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key} line")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure_memory(config: Config, case: str, steps: int = 1) -> dict:
    """Peak memory of ``steps`` steps of ``case`` in this process, in MiB.

    ``delta_mib``: the peak above the resident model, optimiser and batch (grads, AdamW state,
    activations, relevance); ``peak_mib``: the process's peak RSS (CPU) or allocated (CUDA).
    """
    work = make_workload(config)
    cuda = torch.device(config.device).type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        reset = _reset_peak_rss()
        baseline = _proc_status_kib("VmRSS") * 1024
    with CASES[case](work) as step:
        for _ in range(steps):
            step(no_phase)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        source = "torch.cuda.max_memory_allocated"
    else:
        peak = _proc_status_kib("VmHWM") * 1024
        source = "VmHWM" + ("" if reset else " (not reset: includes model creation)")
    return dict(delta_mib=(peak - baseline) / MIB, peak_mib=peak / MIB, source=source)


def memory_in_subprocess(config: Config, case: str) -> dict:
    """:func:`measure_memory` in a fresh interpreter, so that no other case's peak leaks in."""
    command = [sys.executable, str(STEP_TIME), "--memory-worker", case,
               "--config-json", json.dumps(asdict(config))]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory worker for {case!r} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_memory(config: Config, case: str, repeats: int) -> dict:
    """The median of ``repeats`` fresh-process peaks (RSS varies with the allocator by a few %)."""
    samples = [memory_in_subprocess(config, case) for _ in range(repeats)]
    medians = {key: statistics.median(s[key] for s in samples) for key in ("delta_mib", "peak_mib")}
    return dict(**medians, source=samples[0]["source"], peak_mib_samples=[s["peak_mib"] for s in samples])
