"""``relevance-finetune demo``: run the built-in benchmark and write its results.

Writes ``results.json`` (config, seeds, mean and std per method and metric, per-seed values;
under ``"families": {name: ...}`` when several shortcut families ran), ``results.md`` (the
tables), ``relevance_before_after[_FAMILY].png`` (original vs finetuned relevance on the same
out-of-distribution images) and the finetuned weights of the figure's method
(``<method>/model.safetensors``). Where every class is masked, by default it also runs
``two_stage_head`` on masks propagated from the finetuning images' exact ones (``propagated_config``) and
reports it as the ``two_stage_head_propagated`` row, the masks' quality under ``"propagated_masks"``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .._version import __version__
from .._files import atomic_path, write_text_atomic
from .ceiling import (CEILING_COLUMNS, ceiling_columns, ceiling_note, format_stat, gap_closed, no_oracle_note,
                      seed_count, seeds_with_a_ceiling)
from .narration import StageReporter, caption, conclusion, elapsed, plan, seed_phrase
from .runner import (ALL_CLASSES, DEFAULT_METHODS, FINETUNE_CLASSES, FINETUNE_MASKS, METHODS, BenchConfig,
                     config_dict, create_original, make_data, normalize, run_seed, train_original)
from .synthetic import CLASS_NAMES, FAMILIES

__all__ = ["COLUMNS", "DEMO_METHODS", "PROPAGATED", "PROPAGATED_PER_CLASS", "QUICK", "add_arguments",
           "markdown_tables", "propagated_config", "run", "run_benchmark", "summarize", "write_reports"]

# A smoke-test scale (about a minute on 2 CPU cores): small sets, few epochs, few methods.
QUICK = dict(
    pretrain_images=600, pretrain_epochs=2, biased_images=600, biased_epochs=1, original_attempts=1,
    finetune_per_class=4, annotated_per_class=2, val_per_class=4, finetune_epochs=2, lr_grid=(1e-4,), select_every=1,
    test_images=100, perturbation_images=50, methods=("ours", "control", "gradmask", "rrr", "swap", "recommended"),
)
# What the default run compares in about 10 minutes on 2 CPU cores; --full runs DEFAULT_METHODS on 3 seeds.
DEMO_METHODS = ("ours", "swap", "head", "recommended")
# The demo's extra row (issue 31's study): two_stage_head on PROPAGATED_PER_CLASS images per class whose
# masks are propagated from the run's annotated ones; the method it runs and what the row is.
PROPAGATED = "two_stage_head_propagated"
PROPAGATED_PER_CLASS = 128
_EXTRA_ROWS = {PROPAGATED: ("two_stage_head", f"two_stage_head on {PROPAGATED_PER_CLASS} finetuning images per class, "
                            "their masks propagated from the run's annotated ones (the same optimiser steps)")}
COLUMNS = (
    "ID: top-1 on test images drawn like the training data (the shortcut agrees with the class 90% of the time)",
    "OOD: top-1 when the shortcut is independent of the class",
    "adversarial: top-1 when the shortcut always names another class",
    "mIoU: the relevance map (thresholded at its mean) vs the object mask, on OOD images",
    "object-only / background-only: top-1 with the background / the object replaced (mean of grey, "
    "mean-colour and blurred fills); lower background-only = less reliance on the shortcut",
    "oracle: the original's architecture and schedule trained with the shortcut independent of the class, the "
    "ceiling; gap closed = (method - original) / (oracle - original) of the seeds' means; ID vs oracle: the "
    "method's ID minus the oracle's, paired per seed; object-only gap closed = the OOD change / (the original's "
    "object-only - its OOD accuracy), the part a change of reliance alone can close",
)
METRICS = ("id_acc", "ood_acc", "adv_acc", "ood_acc_set_a", "ood_acc_set_b", "pixel_acc", "miou", "map",
           "perturbation_positive_auc", "perturbation_negative_auc")
PROBES = ("object_only", "background_only", "background_reliance")
# The tables of a summary beside the ceiling's: (header, metric or probe) per column.
TABLES = {
    "comparison": (("ID", "id_acc"), ("OOD", "ood_acc"), ("adversarial", "adv_acc"), ("mIoU", "miou"),
                   ("object-only", "object_only"), ("background-only", "background_only")),
    "details": (("OOD set A", "ood_acc_set_a"), ("OOD set B", "ood_acc_set_b"), ("pixel acc", "pixel_acc"),
                ("mAP", "map"), ("background reliance", "background_reliance"),
                ("perturbation AUC + (lower = faithful)", "perturbation_positive_auc"),
                ("perturbation AUC − (higher = faithful)", "perturbation_negative_auc")),
}


_CACHE_LAYOUT = 2  # a cached seed is {"methods", "seconds", "masks"}; caches of the flat layout (1) are not read


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of every metric and probe, per method, and of the paired change
    vs the same seed's original (``"change"``); ``"n_seeds"``: how many seeds they are over."""
    methods: dict[str, Any] = {}
    originals = [seed_result["original"] for seed_result in per_seed]
    metrics = [metric for metric in METRICS if metric in originals[0]]  # no set A/B when every class is finetuned
    for name in per_seed[0]:
        runs = [seed_result[name] for seed_result in per_seed]
        entry = {metric: _mean_std([r[metric] for r in runs]) for metric in metrics}
        entry["n_seeds"] = len(runs)
        entry["probes"] = {probe: _mean_std([r["probes"][probe] for r in runs]) for probe in runs[0]["probes"]}
        entry["change"] = {metric: _mean_std([r[metric] - o[metric] for r, o in zip(runs, originals)])
                           for metric in metrics}
        entry["change"].update({probe: _mean_std([r["probes"][probe] - o["probes"][probe] for r, o in zip(runs, originals)])
                                for probe in PROBES})
        if "lr" in runs[0]:
            method, description = _EXTRA_ROWS.get(name) or (name, METHODS[name].description)
            entry["lr"] = [r["lr"] for r in runs]
            if "head_C" in runs[0]:
                entry["head_C"] = [r["head_C"] for r in runs]
            entry["description"] = description
            entry["settings"] = asdict(METHODS[method])  # what the method was when it ran
        if "oracle" in per_seed[0] and name not in ("original", "oracle"):
            entry["vs_oracle"] = {"id_acc": _mean_std([r["id_acc"] - s["oracle"]["id_acc"]
                                                       for r, s in zip(runs, per_seed)])}
        methods[name] = entry
    for name, entry in methods.items():
        gaps = gap_closed(methods, name)
        if gaps is not None:
            entry["gap_closed"] = {metric: value for metric, value in gaps.items() if metric != "id_vs_oracle"}
    if "oracle" in methods:
        methods["oracle"]["seeds_ahead"] = seeds_with_a_ceiling(per_seed)
    return methods


def _row(name: str, entry: dict[str, Any], keys: tuple[str, ...], n_seeds: int | None) -> str:
    """The original's values, or another model's paired change vs the original (``+x``)."""
    if name == "original":
        cells = [format_stat(entry["probes"][key] if key in PROBES else entry[key], n_seeds) for key in keys]
    else:
        cells = [format_stat(entry["change"][key], n_seeds, signed=True) for key in keys]
    return f"| {name} | " + " | ".join(cells) + " |"


def markdown_tables(methods: dict[str, Any], seeds: Sequence[int] | None = None) -> str:
    """The comparison (accuracy under shift, map agreement, reliance), the ceiling, then the
    details, each under a caption. The original's row holds its values; every other row the change
    vs the same seed's original; ``mean ± std`` over several seeds, the values alone for one.
    ``seeds``: the seeds' numbers (default 0, 1, ...), for the sentence on the ceiling."""
    tables = []
    for kind, columns in TABLES.items():
        columns = [(name, key) for name, key in columns  # e.g. no set A/B when every class is finetuned
                   if any(key in entry or key in entry["probes"] for entry in methods.values())]
        names, keys = zip(*columns)
        lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [_row(name, entry, keys, seed_count(methods)) for name, entry in methods.items()]
        number = 1 if kind == "comparison" else 2 + ("oracle" in methods)
        tables.append(caption(number, kind, seed_count(methods), keys) + "\n\n" + "\n".join(lines))
    tables.insert(1, _ceiling_table(methods, seeds))
    return "\n\n".join(tables) + "\n\n" + _chosen_settings(methods) + "\n"


def _chosen_settings(methods: dict[str, Any]) -> str:
    """The learning rate each finetuning method chose, and the L1 strength C of each head refit
    (a refit alone has no learning rate), per seed."""
    def values(numbers: list[float]) -> str:
        return ", ".join(f"{number:g}" for number in numbers)

    one = seed_count(methods) == 1
    learning_rates = [f"{name} {values(entry['lr'])}" for name, entry in methods.items()
                      if "lr" in entry and entry.get("settings", {}).get("finetune", True)]
    strengths = [f"{name} {values(entry['head_C'])}" for name, entry in methods.items() if "head_C" in entry]
    sentences = []
    if learning_rates:
        sentences.append(("Chosen learning rate: " if one else "Chosen learning rates per seed: ")
                         + "; ".join(learning_rates) + ".")
    if strengths:
        sentences.append(("Chosen head refit C: " if one else "Chosen head refit C per seed: ")
                         + "; ".join(strengths) + ".")
    return " ".join(sentences)


def _ceiling_table(methods: dict[str, Any], seeds: Sequence[int] | None = None) -> str:
    """Table 2, each method against the oracle: the share of the original-to-oracle gap it closes
    (OOD, background-only) and its ID accuracy minus the oracle's, under its caption and above the
    sentence on which seeds have a ceiling; a note instead without an oracle."""
    note = no_oracle_note(methods)
    if note:
        return note
    lines = [caption(2, "ceiling", seed_count(methods)), "",
             "| method | " + " | ".join(CEILING_COLUMNS) + " |", "|---|" + "---|" * len(CEILING_COLUMNS)]
    lines += [f"| {name} | " + " | ".join(ceiling_columns(methods, name)) + " |"
              for name in methods if name != "original"]
    ahead, count = methods["oracle"].get("seeds_ahead"), seed_count(methods)
    if ahead is not None and (seeds is not None or count):
        lines.append("\n" + ceiling_note(ahead, list(seeds) if seeds is not None else list(range(count))))
    return "\n".join(lines)


def _shown_method(names: Sequence[str]) -> str:
    """Of a seed's method ``names``, the finetuned model the figure and the export show: the
    recommended recipe when it ran."""
    return next(name for name in ("recommended", "ours", *names)
                if name in names and name not in ("original", "oracle"))


def _figure(seed_result: dict[str, Any], path: Path, count: int = 6) -> Path:
    from ..gae import attach_gae
    from ..viz import before_after_grid, prediction_title
    images, _, labels, _ = seed_result["samples"].tensors
    images, labels = images[:count], labels[:count]
    shown = _shown_method(list(seed_result["models"]))
    rows = {}
    for name in ("original", shown):
        model = seed_result["models"][name]
        with attach_gae(model) as gae:
            relevance = gae.explain(normalize(images))
        with torch.no_grad():
            probs = model(normalize(images)).softmax(1)
        titles = [f"true: {CLASS_NAMES[int(label)]}\n" + prediction_title(CLASS_NAMES[int(p.argmax())], float(p.max()))
                  for p, label in zip(probs, labels)]
        rows[name] = (relevance, titles)
    return before_after_grid(images, rows["original"][0], rows[shown][0], rows["original"][1], rows[shown][1],
                             path, row_labels=("original", shown))


def _family_results(config: dict[str, Any], seeds: list[int], per_seed: list[dict[str, Any]],
                    seconds: float | None) -> dict[str, Any]:
    """One family's report; ``seconds``: the seeds' run times summed (None when a cache predates them)."""
    return {"config": config, "seeds": seeds, "methods": summarize(per_seed), "per_seed": per_seed,
            "seconds": seconds}


def write_reports(out: Path, families: dict[str, dict[str, Any]], note: str = "") -> dict[str, Any]:
    """Write ``results.json`` and ``results.md`` from each family's results (``_family_results``);
    one family keeps the flat schema, several go under ``"families"``. Returns the results."""
    results = next(iter(families.values())) if len(families) == 1 else {"families": families}
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    text = ["# relevance-finetune demo\n", note] if note else ["# relevance-finetune demo\n"]
    for name, family in families.items():
        seeds = family["seeds"]
        count = seed_phrase(seeds)
        text.append(f"## Shortcut family: {name}\n\n{count[0].upper()}{count[1:]}, "
                    + ("run time not recorded" if family["seconds"] is None else
                       f"{family['seconds']:.0f} s of runs (each seed's wall time, summed)") + ".\n\n"
                    + _masks_line(family.get("masks"))
                    + _masks_line(family.get("propagated_masks"), PROPAGATED)
                    + markdown_tables(family["methods"], seeds)
                    + f"\n**Conclusion.** {conclusion(name, family['methods'], seeds)}\n")
    text.append("Columns:\n\n" + "\n".join(f"- {line}" for line in COLUMNS) + "\n")
    write_text_atomic(out / "results.md", "\n".join(text))
    return results


def _masks_line(quality: list[dict[str, Any]] | None, row: str | None = None) -> str:
    """One sentence on the automatic finetuning masks (none without them): their IoU with the exact
    masks beside the references, the held-out IoU of propagated ones, the empty and whole counts;
    ``row``: the one row whose masks they are (default: every row's)."""
    if not quality:
        return ""

    def mean(key: str) -> float:
        return statistics.fmean(q[key] for q in quality)

    empty, full, images = (sum(q[key] for q in quality) for key in ("empty", "full", "images"))
    propagated = "held_out_iou" in quality[0]
    what = (f"Masks propagated from {quality[0]['annotated']} annotated finetuning images (the {quality[0]['source']}'s "
            "tokens) to the other finetuning and the validation images" if propagated else
            f"Automatic ({quality[0]['source']}) finetuning and validation masks")
    what = f"The {row} row: {what[0].lower()}{what[1:]}" if row else what
    held_out = f"; held-out IoU on the annotated masks {mean('held_out_iou'):.1f}" if propagated else ""
    return (f"{what}: mean IoU {mean('iou'):.1f} with the exact masks (references: patch-level exact masks "
            f"{mean('patch_iou'):.1f}, another image's exact mask {mean('chance_iou'):.1f}){held_out}; {empty} empty "
            f"and {full} covering the whole image, of {images} (all seeds).\n\n")


def _seed_paths(config: BenchConfig, seed: int, cache: Path) -> tuple[Path, Path]:
    """Where one seed's results and its shown finetuned model are cached: keyed on every setting and
    on what each method is (a recipe's change is a new key)."""
    methods = {name: asdict(METHODS[name]) for name in config.methods}
    text = json.dumps({"config": config_dict(config), "methods": methods, "seed": seed, "version": __version__,
                       "layout": _CACHE_LAYOUT}, sort_keys=True)
    key = hashlib.sha1(text.encode()).hexdigest()[:12]
    return cache / f"results-{config.family}-{key}.json", cache / f"shown-{config.family}-{key}.safetensors"


def _seed_result(config: BenchConfig, seed: int, cache: Path, threads: int | None = None,
                 since: float | None = None) -> None:
    """Run one seed unless its results are cached (in ``cache``, with its shown finetuned model),
    writing a line per stage (times from ``since``, the benchmark's start)."""
    if threads:
        torch.set_num_threads(threads)
    results_path, model_path = _seed_paths(config, seed, cache)
    progress = StageReporter(config, seed, since or time.time())
    if results_path.is_file() and model_path.is_file():
        progress(f"found in {cache}: reused")
    else:
        started = time.time()
        result = run_seed(config, seed, cache, progress)
        stored = {"methods": result["methods"], "seconds": round(time.time() - started, 1),
                  **({"masks": result["masks"]} if "masks" in result else {})}
        with atomic_path(model_path) as temporary:
            save_file(result["models"][_shown_method(list(result["models"]))].state_dict(), str(temporary))
        write_text_atomic(results_path, json.dumps(stored))


def _cached(config: BenchConfig, seed: int, cache: Path) -> dict[str, Any]:
    """A cached seed's results: ``methods``, ``seconds``, ``masks`` if any."""
    return json.loads(_seed_paths(config, seed, cache)[0].read_text())


def _load_seed(config: BenchConfig, seed: int, cache: Path) -> dict[str, Any]:
    """A cached seed (``_cached``), the original and the shown finetuned model (``models``), the OOD samples."""
    model_path = _seed_paths(config, seed, cache)[1]
    result = _cached(config, seed, cache)
    shown = _shown_method(list(result["methods"]))
    model = create_original(config)
    model.load_state_dict(load_file(str(model_path)))
    models = {"original": train_original(config, seed, cache), shown: model.eval()}
    return {**result, "models": models, "samples": make_data(config, seed, cache)["tests"]["ood"]}


def propagated_config(config: BenchConfig) -> BenchConfig:
    """``config``'s ``two_stage_head`` on ``PROPAGATED_PER_CLASS`` finetuning images per class, masks
    propagated from the first ``config.finetune_per_class`` of each (their exact masks), under
    ``config``'s optimiser-step budget; the original and oracle are ``config``'s (the same cache key)."""
    steps = config.finetune_steps or config.finetune_epochs * math.ceil(
        config.finetune_per_class * len(config.set_a) / config.finetune_batch)
    return replace(config, methods=(_EXTRA_ROWS[PROPAGATED][0],), finetune_masks="propagate",
                   annotated_per_class=config.finetune_per_class, finetune_per_class=PROPAGATED_PER_CLASS,
                   finetune_steps=steps)


def run_benchmark(config: BenchConfig, seeds: list[int], out: Path, families: tuple[str, ...] = ("hue",),
                  note: str = "", jobs: int = 1, propagated: bool = False) -> dict[str, Any]:
    """Run every family and seed (``jobs`` at a time, one thread each when ``jobs > 1``), write the
    files into ``out`` and return the results. Finished seeds are cached in ``out/cache`` and
    reused by a rerun with the same settings. ``propagated``: also each (family, seed)'s
    ``propagated_config`` run, its method as the ``PROPAGATED`` row."""
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    configs = {family: config.for_family(family) for family in families}
    extra = {family: propagated_config(run_config) for family, run_config in configs.items()} if propagated else {}
    tasks = [(run_config, seed) for run_config in (*configs.values(), *extra.values()) for seed in seeds]
    started = time.time()
    with tqdm(total=len(tasks), desc="benchmark (family, seed)") as bar:
        if jobs == 1:
            for family_config, seed in tasks:
                bar.set_postfix_str(f"{family_config.family} seed {seed}")
                _seed_result(family_config, seed, cache, since=started)
                bar.update(1)
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(jobs, mp_context=context) as pool:
                for future in as_completed([pool.submit(_seed_result, c, s, cache, 1, started) for c, s in tasks]):
                    future.result()
                    bar.update(1)
    tqdm.write(f"{elapsed(started)} writing the figures, the finetuned weights and the tables")
    reports = {}
    for family, family_config in configs.items():
        loaded = [_load_seed(family_config, seed, cache) for seed in seeds]
        per_seed = [result["methods"] for result in loaded]
        seconds = [result.get("seconds") for result in loaded]
        extra_runs = [_cached(extra[family], seed, cache) for seed in seeds] if family in extra else []
        for methods, extra_run in zip(per_seed, extra_runs):
            methods[PROPAGATED] = extra_run["methods"][_EXTRA_ROWS[PROPAGATED][0]]
        seconds += [extra_run.get("seconds") for extra_run in extra_runs]
        total = None if None in seconds else round(sum(seconds), 1)
        reports[family] = _family_results(config_dict(family_config), seeds, per_seed, total)
        if "masks" in loaded[0]:  # automatic masks: their quality per seed
            reports[family]["masks"] = [result["masks"] for result in loaded]
        if extra_runs:
            reports[family]["propagated_masks"] = [extra_run["masks"] for extra_run in extra_runs]
        suffix = "" if len(families) == 1 else f"_{family}"
        _figure(loaded[0], out / f"relevance_before_after{suffix}.png")
        if family == families[0]:
            shown = _shown_method(list(loaded[0]["models"]))
            _export(loaded[0]["models"][shown], family_config, out / shown)
    return write_reports(out, reports, note)


def _export(model: torch.nn.Module, config: BenchConfig, out: Path) -> None:
    from ..export import save_finetuned
    save_finetuned(model, out, base_model="vit_tiny_patch16_224", finetune_config=config_dict(config))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default: demo-out)")
    parser.add_argument("--family", nargs="+", choices=(*FAMILIES, "all"), default=["hue"],
                        help="shortcut families: hue (background colour, the default), texture (background "
                             "texture), mark (a small plate in a corner, like a watermark), or all")
    parser.add_argument("--finetune-classes", choices=FINETUNE_CLASSES, default="all",
                        help="which classes have masked finetuning images: all (80 images over every class, "
                             "validated on held-out images of every class; the default, the setting the recommended "
                             "recipe was chosen in) or half (the paper's protocol: set A, validated on set B)")
    parser.add_argument("--finetune-masks", choices=FINETUNE_MASKS, default="exact",
                        help="the masks finetuning and validation see: exact (the default), patch (every patch "
                             "the object touches, as TokenCut's masks are), noisy (patch masks grown or shrunk "
                             "by 2 patches, a fifth of them another image's), tokencut (no annotation), or "
                             "propagate (exact masks on the first annotated_per_class finetuning images of each "
                             "class, propagated to the rest and to the validation images); the tests always use "
                             "exact masks")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", dest="overrides",
                        help="any other BenchConfig setting, e.g. --set finetune_per_class=5 pretrain_images=12000 "
                             "(tuples comma-separated)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 1; --full: 3)")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS),
                        help=f"methods to compare (default: {' '.join(DEMO_METHODS)}; --full: "
                             f"{' '.join(DEFAULT_METHODS)})")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--full", action="store_true",
                       help="the README's comparison: 3 seeds of every method against the original (about an "
                            "hour per family on 2 CPU cores)")
    scale.add_argument("--quick", action="store_true", help="a smoke test (about 2 minutes): its numbers mean nothing")
    parser.add_argument("--no-propagated", action="store_true",
                        help=f"skip the {PROPAGATED} row ({_EXTRA_ROWS[PROPAGATED][1]}), which runs by default "
                             "where every class is masked and neither --methods nor --quick is given")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--jobs", type=int, default=None,
                        help="(family, seed) runs in parallel processes, one thread each (default: as many as "
                             "there are runs, up to the CPU count)")


def _overrides(items: list[str]) -> dict[str, Any]:
    """``["field=value", ...]`` as BenchConfig settings, each value of its field's type."""
    defaults = {f.name: f.default for f in fields(BenchConfig)}
    out: dict[str, Any] = {}
    for item in items:
        name, equals, text = item.partition("=")
        if not equals or name not in defaults or name == "methods":
            raise ValueError(f"--set takes FIELD=VALUE with a BenchConfig field (not methods: use --methods), "
                             f"got {item!r}; fields: {', '.join(sorted(set(defaults) - {'methods'}))}")
        default = defaults[name]
        try:
            if isinstance(default, tuple):
                out[name] = tuple(type(default[0])(part) for part in text.split(","))
            elif isinstance(default, bool):
                out[name] = {"true": True, "false": False}[text.lower()]
            else:
                out[name] = type(default)(text)
        except (KeyError, ValueError):
            raise ValueError(f"--set {name}: {text!r} is not of type {type(default).__name__}") from None
    return out


def run(args: argparse.Namespace) -> int:
    seeds = args.seeds if args.seeds is not None else (3 if args.full else 1)
    if seeds < 1 or (args.jobs is not None and args.jobs < 1):
        raise SystemExit("--seeds and --jobs must be at least 1")
    try:  # before any training: a read-only --out would only fail once the models are trained
        args.out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out).close()
    except OSError as error:
        raise PermissionError(f"cannot write to --out {args.out} ({error.strerror}): choose another folder") from error
    if args.threads:
        torch.set_num_threads(args.threads)
    families = FAMILIES if "all" in args.family else tuple(dict.fromkeys(args.family))
    config = BenchConfig(methods=DEFAULT_METHODS if args.full else DEMO_METHODS)
    if args.finetune_classes == "all":
        config = replace(config, **ALL_CLASSES)
    else:  # a head refit needs masked images of every class: the default methods go without it
        config = replace(config, methods=tuple(name for name in config.methods if not METHODS[name].head_refit))
    changes: dict[str, Any] = {"finetune_masks": args.finetune_masks}  # one replace: checked once, all set
    note = ""
    if args.quick:
        changes.update(QUICK)
        note = "**Smoke test (`--quick`): tiny sets and 2 epochs; these numbers show that the pipeline runs, " \
               "nothing about the methods.**\n"
    if args.methods:
        changes["methods"] = tuple(args.methods)
    config = replace(config, **{**changes, **_overrides(args.overrides)})
    jobs = args.jobs or max(1, min(len(families) * seeds, os.cpu_count() or 1))
    propagated = not (args.no_propagated or args.quick or args.methods or config.set_b
                      or config.finetune_per_class >= PROPAGATED_PER_CLASS)
    scale = "quick" if args.quick else "full" if args.full else "default"
    extra_rows = {PROPAGATED: _EXTRA_ROWS[PROPAGATED][1]} if propagated else {}
    print(plan(config, families, range(seeds), scale, bool(args.methods or args.overrides), str(args.out / "cache"),
               extra_rows), flush=True)
    results = run_benchmark(config, list(range(seeds)), args.out, families, note, jobs, propagated)
    reports = results["families"] if "families" in results else {families[0]: results}
    for family, report in reports.items():
        print(f"\nShortcut family: {family}\n\n" + markdown_tables(report["methods"], report["seeds"]))
    print("\n".join(["Columns, in detail:", *(f"  {line}" for line in COLUMNS)]))
    if note:
        print("\n" + note.strip("*\n"))
    for family, report in reports.items():
        print(f"\nConclusion ({family}): {conclusion(family, report['methods'], report['seeds'])}")
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'results.md'}, the figures and the finetuned weights")
    return 0
