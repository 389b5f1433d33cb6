"""Fused vs explicit relevance vs the plain step at growing resolution (``--fused-scaling``)."""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, replace

import timm

from step_table import _fmt, run_config, write_report
from step_workload import Config

# attention="fused" vs "explicit" (issues 14, 22): vit_base by default, growing resolution, two batches
FUSED_MODEL = "vit_base_patch16_224"
FUSED_SIZES = (224, 384, 448, 518)
FUSED_BATCHES = (2, 4)
FUSED_CASES = ("plain_fused", "relevance", "relevance_fused", "relevance_fused_autograd", "relevance_fused_floor",
               "relevance_fused_products")
# (name, case, base case, entry key, limit, which runs (tokens, img)): case / base <= limit
FUSED_TARGETS = (
    ("fused relevance step / plain fused, >= 1024 tokens", "relevance_fused", "plain_fused", "median_s", 1.8,
     lambda tokens, img: tokens >= 1024),
    ("fused relevance memory above the model / plain fused, >= 1024 tokens", "relevance_fused", "plain_fused",
     "delta_mib", 1.3, lambda tokens, img: tokens >= 1024),
    ("fused relevance peak RSS / plain fused, >= 1024 tokens", "relevance_fused", "plain_fused", "peak_mib", 1.3,
     lambda tokens, img: tokens >= 1024),
    ("fused relevance step / plain fused, 224 px", "relevance_fused", "plain_fused", "median_s", 1.6,
     lambda tokens, img: img == 224),
    ("fused kernel step / autograd chunks (before), every size", "relevance_fused", "relevance_fused_autograd",
     "median_s", 1.0, lambda tokens, img: True),
)

# Per block: products of attention size (N x N x head_dim, summed over heads) and passes over the
# linear layers (a forward is one, a backward with weight gradients two, the map-gradient pass one).
ATTENTION_MATMULS = {
    "plain_fused": 2 + 5,  # flash forward (q k^T, A v); flash backward (q k^T again, dO v^T, A^T dO, dS k, dS^T q)
    "relevance": 2 + 4 + 4,  # forward; map gradients through the kept maps (dO v^T, A^T dO, dS k, dS^T q); backward
    "relevance_fused": 2 + 5 + 2 + 4 + 5,  # forward; map gradients (flash backward); kernel forward (q k^T,
    # dO v^T); kernel backward (both rebuilt, dS k, dS^T q); the model's flash backward
    "relevance_fused_floor": 2 + 5 + 5,  # the same without the kernel
    "relevance_fused_products": 2 + 5 + 2 + 4 + 5,  # the floor and the kernel's products alone
}
LINEAR_PASSES = {"plain_fused": 3, "relevance": 4, "relevance_fused": 4, "relevance_fused_floor": 4,
                 "relevance_fused_products": 4}


def matmul_floor(tokens: int, dim: int, mlp_ratio: float = 4.0) -> dict[str, float]:
    """Each case's multiply-adds per block and image over the plain step's (attention and linear
    layers only: softmax, elementwise work and the optimiser are left out)."""
    attention = tokens * tokens * dim
    linear = tokens * dim * dim * (4 + 2 * mlp_ratio)  # qkv, proj, fc1, fc2
    work = {case: ATTENTION_MATMULS[case] * attention + LINEAR_PASSES[case] * linear for case in ATTENTION_MATMULS}
    return {case: value / work["plain_fused"] for case, value in work.items()}


def tokens_of(config: dict) -> int:
    """Sequence length of a patch-16 ViT with a class token at ``config``'s image size."""
    return (config["img_size"] // 16) ** 2 + 1


def fused_configs(base: Config, sizes: tuple[int, ...] = FUSED_SIZES,
                  batches: tuple[int, ...] = FUSED_BATCHES) -> list[Config]:
    """``base.model`` at each image size for each batch size."""
    return [replace(base, img_size=size, batch=batch) for batch in batches for size in sizes]


def fused_table(runs: list[dict]) -> str:
    """One row per configuration and case: step time, peak memory, memory above the model, and
    each as a ratio to the plain fused step."""
    lines = ["| batch | img | tokens | case | wall ms | × plain | CPU × plain | peak MiB | × plain "
             "| above model MiB | × plain |", "|---:|---:|---:|---|" + "---:|" * 7]
    for run in runs:
        c = run["config"]
        for name, e in run["steps"].items():
            cells = [f"{e['median_s'] * 1e3:.0f}", _fmt(e.get("median_s_vs_plain"), ".2f"),
                     _fmt(e.get("median_cpu_s_vs_plain"), ".2f"), _fmt(e.get("peak_mib"), ".0f"),
                     _fmt(e.get("peak_mib_vs_plain"), ".2f"), _fmt(e.get("delta_mib"), ".0f"),
                     _fmt(e.get("delta_mib_vs_plain"), ".2f")]
            lines.append(f"| {c['batch']} | {c['img_size']} | {tokens_of(c)} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fused_targets(runs: list[dict]) -> list[dict]:
    """Each fused target on every run it applies to and has both cases for: the ratio and its limit."""
    results = []
    for name, case, base, key, limit, applies in FUSED_TARGETS:
        for run in runs:
            c, steps = run["config"], run["steps"]
            if case not in steps or base not in steps or not applies(tokens_of(c), c["img_size"]):
                continue
            value = steps[case].get(key, math.nan) / steps[base].get(key, math.nan)
            if not math.isnan(value):
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
        for case, color in zip(FUSED_CASES[:3], ("tab:gray", "tab:red", "tab:blue")):
            label = {"plain_fused": "plain step (fused)", "relevance": "relevance, explicit",
                     "relevance_fused": "relevance, fused"}[case]
            axes.plot(tokens, [r["steps"][case]["peak_mib"] / 1024 for r in chosen], style, color=color,
                      marker="o", label=f"{label}, batch {batch}")
    axes.set_xlabel(f"tokens ({runs[0]['config']['model']})")
    axes.set_ylabel("peak RSS (GiB)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def run_fused_scaling(base: Config, args: argparse.Namespace, report: dict, started: float) -> dict:
    """The fused-vs-explicit sweep, one configuration at a time; the JSON is rewritten after each."""
    configs = fused_configs(base, tuple(args.sizes or FUSED_SIZES), tuple(args.batches or FUSED_BATCHES))
    cases = tuple(args.cases or FUSED_CASES)
    fused = dict(runs=[], targets=[])
    report["fused"] = fused
    for config in configs:
        repeats = 0 if args.no_memory else args.memory_repeats
        fused["runs"].append(run_config(config, cases, memory_repeats=repeats, timed=not args.no_time))
        fused["targets"] = fused_targets(fused["runs"])
        write_report(report, args.json, started)
        print(fused_table(fused["runs"][-1:]), flush=True)
    print(fused_table(fused["runs"]))
    fused["matmul_floor"] = {}
    for config in configs:
        dim = timm.create_model(config.model, pretrained=False, **config.model_kwargs).embed_dim
        floor = matmul_floor(tokens_of(asdict(config)), dim)
        fused["matmul_floor"][config.img_size] = floor
        print(f"{config.img_size} px: floor from the matmul count, x plain: "
              + ", ".join(f"{case} {value:.2f}" for case, value in floor.items()))
    write_report(report, args.json, started)
    for t in fused["targets"]:
        print(f"{t['name']} (batch {t['batch']}): {t['value']:.2f} <= {t['limit']}: {'met' if t['met'] else 'NOT met'}")
    if args.plot and set(FUSED_CASES[:3]) <= set(cases):
        plot_fused(fused["runs"], args.plot)
    return fused
