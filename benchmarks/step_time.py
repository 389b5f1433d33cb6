"""Step time and peak memory of relevance finetuning, in one process so that ratios are fair.

Cases (all on the same model, weights, batch and AdamW optimiser):

- ``plain_fused``      cross-entropy finetune step as timm runs it by default (fused SDPA attention)
- ``plain_explicit``   the same step on the explicit softmax path
- ``relevance_floor``  the work no exact GAE step can skip: a forward that keeps the maps, the
                       gradient of the target logits w.r.t. every map, the plain backward
- ``second_order_floor``  the same with the map gradients in the graph and the loss through them
- ``relevance``        ``attach_gae`` + ``RelevanceRegularizer``: constant gradients, one forward
- ``relevance_fused``  the same with ``attach_gae(model, attention="fused")``: SDPA kept, maps
                       rebuilt in row chunks
- ``second_order``     the same with ``attach_gae(model, second_order=True)``
- ``reference``        the paper's reference algorithm, re-implemented here from its description:
                       two forwards, one ``autograd.grad`` per block, full N x N rollout
- ``explain`` / ``reference_explain``   explanation throughput (images/s), no weight update

Timings interleave the cases round by round (warm-up rounds first) and report the median;
peak memory runs each case in a fresh subprocess (CPU: ``VmHWM`` of /proc/self/status after a
reset; CUDA: ``torch.cuda.max_memory_allocated``), counted above the resident model and batch.

Examples::

    python benchmarks/step_time.py                                  # vit_small, batch 8, 224 px
    python benchmarks/step_time.py --threads 1                      # a shared, busy machine
    python benchmarks/step_time.py --profile --cases relevance      # where the time goes
    python benchmarks/step_time.py --model vit_tiny_patch16_224 vit_base_patch16_224
    python benchmarks/step_time.py --scaling --quick                # vs image size and depth
    python benchmarks/step_time.py --fused-scaling --plot mem.png   # fused vs explicit, vit_base
    python benchmarks/step_time.py --device cuda --dtype bf16
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, ContextManager, Iterator

import timm
import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from relevance_finetune import RelevanceRegularizer, attach_gae

MODELS = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224")
STEP_CASES = ("plain_fused", "plain_explicit", "relevance_floor", "relevance", "relevance_fused", "second_order_floor",
              "second_order", "reference")
EXPLAIN_CASES = ("explain", "reference_explain")
SCALING_SIZES = (224, 288, 384)
SCALING_DEPTHS = (4, 8)  # plus the model's own depth, from the size sweep
SCALING_CASES = ("plain_fused", "relevance", "reference")
# attention="fused" vs "explicit" (issue 14): vit_base at growing resolution, two batch sizes
FUSED_MODEL = "vit_base_patch16_224"
FUSED_SIZES = (224, 384, 448, 518)
FUSED_BATCHES = (2, 4)
FUSED_CASES = ("plain_fused", "relevance", "relevance_fused")
# (name, case, measure, limit, which runs): fused relevance step / plain fused step
FUSED_TARGETS = (
    ("fused relevance peak RSS / plain fused, >= 1024 tokens", "peak_mib", 1.3, lambda tokens, img: tokens >= 1024),
    ("fused relevance step time / plain fused, 224 px", "median_s", 1.6, lambda tokens, img: img == 224),
    ("fused relevance step time / plain fused, 518 px", "median_s", 2.0, lambda tokens, img: img == 518),
)
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
MIB = 2 ** 20


Phase = Callable[[str], ContextManager]


def no_phase(name: str) -> ContextManager:
    """The phase marker of a plain timed step: does nothing."""
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Config:
    """One measured setting; ``model_kwargs`` go to ``timm.create_model`` (tests use tiny models)."""

    model: str = "vit_small_patch16_224"
    batch: int = 8
    img_size: int = 224
    depth: int | None = None
    device: str = "cpu"
    dtype: str = "fp32"  # "fp32" or "bf16" (autocast)
    steps: int = 5
    warmup: int = 2
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads; None: torch's default
    model_kwargs: dict = field(default_factory=dict)


@dataclass
class Workload:
    """A model in training mode with its optimiser and one fixed batch of images, masks, labels."""

    config: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    images: torch.Tensor  # (B, 3, H, W)
    masks: torch.Tensor  # (B, H, W) in {0, 1}
    labels: torch.Tensor  # (B,)

    def autocast(self) -> ContextManager:
        device_type = torch.device(self.config.device).type
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.config.dtype == "bf16")

    def update(self, loss: torch.Tensor, phase: Phase) -> None:
        """Backward, optimiser step, zero grads: the part every training step shares."""
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def make_workload(config: Config) -> Workload:
    """Random-weight model (``pretrained=False``), AdamW as in the paper, a random batch."""
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    kwargs = dict(img_size=config.img_size, **config.model_kwargs)
    if config.depth is not None:
        kwargs["depth"] = config.depth
    model = timm.create_model(config.model, pretrained=False, **kwargs).to(config.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=1e-4)
    size = model.patch_embed.img_size
    images = torch.randn(config.batch, 3, *size, device=config.device)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1]), indexing="ij")
    masks = (yy.square() + xx.square() < 0.5).float().expand(config.batch, -1, -1).to(config.device)
    labels = torch.randint(0, model.num_classes, (config.batch,), device=config.device)
    return Workload(config, model, optimizer, images, masks, labels)


# -- the reference algorithm, from its description (docs: reference-facts section 1) ---------

class ReferenceGAE:
    """GAE as the paper's code computes it: per-block ``autograd.grad`` and an N x N rollout.

    Use as a context manager: it switches the timm ``Attention`` modules to the explicit path
    and records their post-softmax maps during :meth:`forward`. CLS readout (the paper's models).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = [m for m in model.modules() if isinstance(m, Attention)]
        self.maps: list[torch.Tensor] = []
        self._recording = False
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> "ReferenceGAE":
        for module in self.modules:
            self._undo.append(lambda m=module, flag=module.fused_attn: setattr(m, "fused_attn", flag))
            module.fused_attn = False
            self._undo.append(module.attn_drop.register_forward_hook(self._record).remove)
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._recording:
            self.maps.append(args[0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """A forward whose attention maps are kept for :meth:`relevance`."""
        self.maps, self._recording = [], True
        try:
            return self.model(images)
        finally:
            self._recording = False

    def relevance(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Raw relevance (B, gh, gw) of ``target``: CLS row of the rollout, patch columns."""
        score = logits[torch.arange(logits.shape[0]), target].sum()
        batch, tokens = logits.shape[0], self.maps[0].shape[-1]
        rollout = torch.eye(tokens, device=logits.device).repeat(batch, 1, 1)
        for attn in self.maps:
            grad = torch.autograd.grad(score, attn, retain_graph=True)[0]
            cam = (grad * attn).clamp(min=0).mean(dim=1)
            rollout = rollout + torch.bmm(cam, rollout)
        gh, gw = self.model.patch_embed.grid_size
        return rollout[:, 0, self.model.num_prefix_tokens:].reshape(batch, gh, gw)


def reference_heatmap(relevance: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling to ``size`` and per-image min-max (an epsilon guards constant maps)."""
    heat = F.interpolate(relevance[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    low = heat.amin(dim=(1, 2), keepdim=True)
    high = heat.amax(dim=(1, 2), keepdim=True)
    return (heat - low) / (high - low + 1e-8)


def reference_loss(ref: ReferenceGAE, work: Workload, phase: Phase) -> torch.Tensor:
    """The paper's loss the reference way: relevance forward, then a second forward for L_cls."""
    with phase("forward"):
        logits = ref.forward(work.images)
    with phase("relevance"):
        relevance = ref.relevance(logits, work.labels)
    heat = reference_heatmap(relevance, tuple(work.masks.shape[-2:]))
    background = F.mse_loss(heat * (1 - work.masks), torch.zeros_like(heat))
    foreground = F.mse_loss(heat * work.masks, work.masks)
    with phase("second forward"):
        logits = work.model(work.images)
    classification = F.cross_entropy(logits, logits.argmax(dim=1))
    return 0.8 * (2.0 * background + 0.3 * foreground) + 0.2 * classification


def reference_explain(ref: ReferenceGAE, images: torch.Tensor, phase: Phase = no_phase) -> torch.Tensor:
    """The reference explanation of the predicted class: (B, H, W) in [0, 1]."""
    with torch.enable_grad():
        with phase("forward"):
            logits = ref.forward(images)
        with phase("relevance"):
            relevance = ref.relevance(logits, logits.argmax(dim=1)).detach()
    return reference_heatmap(relevance, tuple(images.shape[-2:]))


# -- cases: each yields a callable that runs one step, naming its phases -------------------

Step = Callable[[Phase], object]


@contextlib.contextmanager
def plain_case(work: Workload, explicit: bool) -> Iterator[Step]:
    """Cross-entropy with the labels; timm's default attention path unless ``explicit``."""
    attention = [m for m in work.model.modules() if isinstance(m, Attention)]
    flags = [m.fused_attn for m in attention]
    for module in attention:
        module.fused_attn = module.fused_attn and not explicit
    try:
        def step(phase: Phase) -> None:
            with work.autocast(), phase("forward"):
                loss = F.cross_entropy(work.model(work.images), work.labels)
            work.update(loss, phase)
        yield step
    finally:
        for module, flag in zip(attention, flags):
            module.fused_attn = flag


@contextlib.contextmanager
def relevance_case(work: Workload, second_order: bool, attention: str = "explicit") -> Iterator[Step]:
    with attach_gae(work.model, second_order=second_order, attention=attention) as gae:
        criterion = RelevanceRegularizer(gae)

        def step(phase: Phase) -> None:
            with work.autocast():
                with phase("forward"):
                    logits = work.model(work.images)
                with phase("relevance + loss"):
                    loss = criterion(logits, work.masks, labels=work.labels).loss
            work.update(loss, phase)
        yield step


@contextlib.contextmanager
def relevance_floor_case(work: Workload, second_order: bool) -> Iterator[Step]:
    """Only what any exact GAE step must compute: no rollout, no relevance loss.

    Second order: the map gradients stay in the graph and the loss reaches the weights through
    them (their sum), which costs the double backward every second-order loss pays.
    """
    with attach_gae(work.model) as gae:
        def step(phase: Phase) -> None:
            with work.autocast():
                with phase("forward"):
                    logits = work.model(work.images)
                with phase("map gradients"):
                    score = logits.gather(1, work.labels[:, None]).sum()
                    grads = torch.autograd.grad(score, gae.attention_maps, retain_graph=True,
                                                create_graph=second_order)
                loss = F.cross_entropy(logits, work.labels)
                if second_order:
                    loss = loss + sum(grad.sum() for grad in grads)
            work.update(loss, phase)
        yield step


@contextlib.contextmanager
def reference_case(work: Workload) -> Iterator[Step]:
    with ReferenceGAE(work.model) as ref:
        def step(phase: Phase) -> None:
            with work.autocast():
                loss = reference_loss(ref, work, phase)
            work.update(loss, phase)
        yield step


@contextlib.contextmanager
def explain_case(work: Workload) -> Iterator[Step]:
    with attach_gae(work.model) as gae:
        def step(phase: Phase) -> torch.Tensor:
            with work.autocast(), phase("explain"):
                return gae.explain(work.images)
        yield step


@contextlib.contextmanager
def reference_explain_case(work: Workload) -> Iterator[Step]:
    with ReferenceGAE(work.model) as ref, torch.no_grad():
        def step(phase: Phase) -> torch.Tensor:
            with work.autocast():
                return reference_explain(ref, work.images, phase)
        yield step


CASES: dict[str, Callable[[Workload], ContextManager[Step]]] = {
    "plain_fused": lambda work: plain_case(work, explicit=False),
    "plain_explicit": lambda work: plain_case(work, explicit=True),
    "relevance_floor": lambda work: relevance_floor_case(work, second_order=False),
    "relevance": lambda work: relevance_case(work, second_order=False),
    "relevance_fused": lambda work: relevance_case(work, second_order=False, attention="fused"),
    "second_order_floor": lambda work: relevance_floor_case(work, second_order=True),
    "second_order": lambda work: relevance_case(work, second_order=True),
    "reference": reference_case,
    "explain": explain_case,
    "reference_explain": reference_explain_case,
}


# -- measuring --------------------------------------------------------------------------------

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
    command = [sys.executable, os.path.abspath(__file__), "--memory-worker", case,
               "--config-json", json.dumps(asdict(config))]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory worker for {case!r} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# Each measure a target can be read in: (label, entry key), wall/CPU time and peak/delta memory.
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


def median_memory(config: Config, case: str, repeats: int) -> dict:
    """The median of ``repeats`` fresh-process peaks (RSS varies with the allocator by a few %)."""
    samples = [memory_in_subprocess(config, case) for _ in range(repeats)]
    medians = {key: statistics.median(s[key] for s in samples) for key in ("delta_mib", "peak_mib")}
    return dict(**medians, source=samples[0]["source"], peak_mib_samples=[s["peak_mib"] for s in samples])


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


# -- reporting --------------------------------------------------------------------------------

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


def tokens_of(config: dict) -> int:
    """Sequence length of a patch-16 ViT with a class token at ``config``'s image size."""
    return (config["img_size"] // 16) ** 2 + 1


def fused_table(runs: list[dict]) -> str:
    """Peak RSS (MiB) and step time (s) per case, and the fused and explicit ratios to plain."""
    lines = ["| batch | img | tokens | plain MiB | explicit MiB | fused MiB | explicit × | fused × "
             "| plain s | explicit s | fused s | explicit × | fused × |", "|" + "---:|" * 13]
    for run in runs:
        c, e = run["config"], run["steps"]
        plain, explicit, fused = (e[name] for name in FUSED_CASES)
        memory = [_fmt(x.get("peak_mib"), ".0f") for x in (plain, explicit, fused)]
        memory += [_fmt(x.get("peak_mib_vs_plain"), ".2f") for x in (explicit, fused)]
        time = [f"{x['median_s']:.1f}" for x in (plain, explicit, fused)]
        time += [f"{x['median_s_vs_plain']:.2f}" for x in (explicit, fused)]
        lines.append(f"| {c['batch']} | {c['img_size']} | {tokens_of(c)} | " + " | ".join(memory + time) + " |")
    return "\n".join(lines)


def fused_targets(runs: list[dict]) -> list[dict]:
    """Each fused target on every run it applies to: the fused case's ratio to the plain step."""
    results = []
    for name, key, limit, applies in FUSED_TARGETS:
        for run in runs:
            c, fused = run["config"], run["steps"]["relevance_fused"]
            value = fused.get(key + "_vs_plain", math.nan)
            if applies(tokens_of(c), c["img_size"]) and not math.isnan(value):
                results.append(dict(name=name, batch=c["batch"], img_size=c["img_size"], value=value,
                                    limit=limit, met=value <= limit))
    return results


def plot_fused(runs: list[dict], path: str) -> None:
    """Peak RSS vs tokens for each case and batch size, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(6, 4))
    for batch, style in zip(sorted({r["config"]["batch"] for r in runs}), ("-", "--")):
        chosen = [r for r in runs if r["config"]["batch"] == batch]
        tokens = [tokens_of(r["config"]) for r in chosen]
        for case, color in zip(FUSED_CASES, ("tab:gray", "tab:red", "tab:blue")):
            label = {"plain_fused": "plain step (fused)", "relevance": "relevance, explicit",
                     "relevance_fused": "relevance, fused"}[case]
            axes.plot(tokens, [r["steps"][case]["peak_mib"] / 1024 for r in chosen], style, color=color,
                      marker="o", label=f"{label}, batch {batch}")
    axes.set_xlabel("tokens (vit_base_patch16, 224-518 px)")
    axes.set_ylabel("peak RSS (GiB)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def markdown_phases(phases: dict[str, dict[str, dict]]) -> str:
    """Median wall and CPU milliseconds per phase of each case."""
    lines = ["| case | phase | wall (ms) | CPU (ms) |", "|---|---|---:|---:|"]
    for case, entries in phases.items():
        for phase, t in entries.items():
            lines.append(f"| {case} | {phase} | {t['wall'] * 1e3:.0f} | {t['cpu'] * 1e3:.0f} |")
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------

def fused_configs(base: Config) -> list[Config]:
    """``FUSED_MODEL`` at each of ``FUSED_SIZES`` for each of ``FUSED_BATCHES``."""
    return [replace(base, model=FUSED_MODEL, img_size=size, batch=batch)
            for batch in FUSED_BATCHES for size in FUSED_SIZES]


def scaling_configs(base: Config) -> list[Config]:
    """Image sizes at full depth, then smaller depths at the base image size."""
    sizes = [replace(base, img_size=size) for size in SCALING_SIZES]
    depths = [replace(base, depth=depth) for depth in SCALING_DEPTHS]
    return sizes + depths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["vit_small_patch16_224"],
                        help=f"timm model name(s), pretrained=False; measured: {', '.join(MODELS)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--depth", type=int, default=None, help="override the model's depth")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's); 1 avoids OpenMP barrier stalls on a shared machine")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 5; --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1)")
    parser.add_argument("--cases", nargs="+", choices=tuple(CASES), default=None,
                        help="default: all; with --scaling: " + " ".join(SCALING_CASES))
    parser.add_argument("--scaling", action="store_true", help="step time and memory vs image size and depth")
    parser.add_argument("--fused-scaling", action="store_true",
                        help=f"{FUSED_MODEL} at {FUSED_SIZES} px, batches {FUSED_BATCHES}: " + " ".join(FUSED_CASES))
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="with --fused-scaling: only these image sizes")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="with --fused-scaling: only these batch sizes")
    parser.add_argument("--plot", default=None, help="with --fused-scaling: PNG of peak memory vs tokens")
    parser.add_argument("--quick", action="store_true", help="3 steps, 1 warm-up (below the 5-step rule)")
    parser.add_argument("--profile", action="store_true",
                        help="instead: per-phase times and torch.profiler's top operators of each case")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-time", action="store_true", help="skip the timed steps (memory only)")
    parser.add_argument("--memory-repeats", type=int, default=1,
                        help="fresh processes per case; the median peak is reported (default 1)")
    parser.add_argument("--json", default="step_time.json", help="where to write the results")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_repeats < 1:
        parser.error(f"--memory-repeats must be at least 1, got {args.memory_repeats}")
    return args


def profile_cases(config: Config, cases: tuple[str, ...]) -> dict:
    """Print and return the phase medians and profiler tables of ``cases`` on one workload."""
    work = make_workload(config)
    phases = phase_medians(work, cases, rounds=config.steps)
    print(markdown_phases(phases), flush=True)
    tables = {case: profile_table(work, case) for case in cases}
    for case, table in tables.items():
        print(f"\n{case}\n{table}", flush=True)
    return dict(config=asdict(config), phases=phases, operators=tables)


def write_report(report: dict, path: str, started: float) -> None:
    report["environment"]["load_average_end"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - started
    with open(path, "w") as out:
        json.dump(report, out, indent=1)


def run_fused_scaling(base: Config, args: argparse.Namespace, report: dict, started: float) -> dict:
    """The fused-vs-explicit sweep, one configuration at a time; the JSON is rewritten after each."""
    configs = [c for c in fused_configs(base) if (args.sizes is None or c.img_size in args.sizes)
               and (args.batches is None or c.batch in args.batches)]
    fused = dict(runs=[], targets=[])
    report["fused"] = fused
    for config in configs:
        repeats = 0 if args.no_memory else args.memory_repeats
        fused["runs"].append(run_config(config, FUSED_CASES, memory_repeats=repeats, timed=not args.no_time))
        fused["targets"] = fused_targets(fused["runs"])
        write_report(report, args.json, started)
        print(fused_table(fused["runs"][-1:]), flush=True)
    print(fused_table(fused["runs"]))
    for t in fused["targets"]:
        print(f"{t['name']} (batch {t['batch']}): {t['value']:.2f} <= {t['limit']}: {'met' if t['met'] else 'NOT met'}")
    if args.plot:
        plot_fused(fused["runs"], args.plot)
    return fused


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.memory_worker:
        config = Config(**json.loads(args.config_json))
        print(json.dumps(measure_memory(config, args.memory_worker)))
        return {}
    steps = args.steps or (3 if args.quick else 5)
    warmup = 1 if args.warmup is None else args.warmup
    cases = tuple(args.cases or (SCALING_CASES if args.scaling else STEP_CASES + EXPLAIN_CASES))
    report = dict(environment=environment(), command=" ".join(sys.argv), runs=[], scaling=[])
    started = time.perf_counter()
    if args.fused_scaling:
        base = Config(device=args.device, dtype=args.dtype, steps=steps, warmup=warmup, threads=args.threads)
        report["fused"] = run_fused_scaling(base, args, report, started)
    for model in [] if args.fused_scaling else args.model:
        base = Config(model=model, batch=args.batch, img_size=args.img_size, depth=args.depth,
                      device=args.device, dtype=args.dtype, steps=steps, warmup=warmup,
                      threads=args.threads)
        if args.profile:
            report["profile"] = profile_cases(base, cases)
            continue
        configs = scaling_configs(base) if args.scaling else [base]
        repeats = 0 if args.no_memory else args.memory_repeats
        runs = [run_config(config, cases, memory_repeats=repeats) for config in configs]
        report["scaling" if args.scaling else "runs"].extend(runs)
        print(markdown_scaling(runs) if args.scaling else "\n\n".join(markdown_run(r) for r in runs), flush=True)
    write_report(report, args.json, started)
    print(f"\nwall {report['wall_s']:.0f} s; load average {report['environment']['load_average']} -> "
          f"{report['environment']['load_average_end']}; JSON: {args.json}")
    return report


if __name__ == "__main__":
    main()
