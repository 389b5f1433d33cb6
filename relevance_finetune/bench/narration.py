"""What the demo says in words: its plan, a line per stage, the tables' captions and a conclusion.

Every number these sentences quote comes from ``demo.summarize``'s summary: accuracies in percent,
a change as the paired difference from the same seed's original in percentage points ("points").
"""
from __future__ import annotations

import math
import time
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from .ceiling import MIN_GAP, format_stat
from .config import BenchConfig
from .methods import METHODS

__all__ = ["CAPTIONS", "SECONDS_PER_RUN", "SHORTCUTS", "StageReporter", "caption", "conclusion", "elapsed", "plan",
           "seed_phrase"]

# What each family's shortcut is (synthetic.py draws them).
SHORTCUTS = {"hue": "the background's colour", "texture": "the background's texture",
             "mark": "a small plate in the top-left corner, like a watermark"}
# One (family, seed) run's wall time on 2 idle CPU cores at each scale of the demo (docs/benchmark.md).
SECONDS_PER_RUN = {"quick": 120.0, "default": 180.0, "full": 600.0}
# Each table's caption before its units: what its rows and columns are.
CAPTIONS = {
    "comparison": "Accuracy under shift and reliance on the shortcut. Rows: the original model, then every "
                  "other model as its change from the original; columns: top-1 accuracy on ID, OOD and "
                  "adversarial test images, mIoU of the relevance map with the object mask, top-1 with only "
                  "the object / only the background left in the image.",
    "ceiling": "How far each model gets towards the oracle. Rows: the oracle and each finetuned model; columns: "
               "the share of the original-to-oracle gap closed on OOD and on background-only top-1 (percent of "
               "the means; 100% = the oracle's level), ID top-1 minus the oracle's (percentage points), and the "
               "share closed of the gap from the original's OOD to its object-only top-1 (percent).",
    "details": "Details. Rows: the models, as in Table 1; columns: {sets}pixel accuracy and mAP of the relevance "
               "map against the object mask, background reliance (background-only minus object-only top-1), and the "
               "perturbation AUCs (top-1 averaged over 10-90% of the pixels removed, most relevant first (+) "
               "or least relevant first (−)).",
}
_SETS = "OOD top-1 on the classes with (set A) and without (set B) masked finetuning images, "


def _units(n_seeds: int | None) -> str:
    if n_seeds == 1:
        return " The original's row in percent, the others in percentage points; one seed, so no spread."
    over = f"{n_seeds} seeds" if n_seeds else "the seeds"
    return (" The original's row in percent, the others in percentage points paired per seed; "
            f"mean ± std over {over}.")


def caption(number: int, kind: str, n_seeds: int | None, keys: Sequence[str] = ()) -> str:
    """``"Table N. <what the rows and columns are> <units>"`` for a table of ``kind`` (a ``CAPTIONS``
    key) whose columns are ``keys``."""
    text = CAPTIONS[kind].format(sets=_SETS if "ood_acc_set_a" in keys else "")
    if kind == "ceiling":
        spread = "" if n_seeds == 1 else " ID vs oracle: mean ± std of the per-seed differences."
        return f"Table {number}. {text}{spread}"
    return f"Table {number}. {text}{_units(n_seeds)}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _schedule(config: BenchConfig) -> str:
    """``30 epochs``, or under a step budget ``30 epochs of 10 steps (300 optimiser steps)``."""
    if config.steps_per_epoch is None:
        return _count(config.finetune_epochs, "epoch")
    return (f"{_count(config.finetune_epochs, 'epoch')} of {_count(config.steps_per_epoch, 'step')} "
            f"({config.finetune_steps} optimiser steps)")


def seed_phrase(seeds: Sequence[int]) -> str:
    """``seed 0`` or ``3 seeds (0, 1, 2)``."""
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds ({', '.join(map(str, seeds))})"


def _expected(scale: str, runs: int, custom: bool) -> str:
    per_run = SECONDS_PER_RUN[scale]
    minutes, seconds = divmod(int(per_run), 60)
    each = f"{minutes} min" + (f" {seconds} s" if seconds else "")
    text = (f"about {math.ceil(per_run * runs / 60)} min on 2 idle CPU cores ({each} per family and seed; a busy "
            "machine takes longer)")
    return text + (", measured with this scale's own methods and settings; yours differ" if custom else "")


def plan(config: BenchConfig, families: Sequence[str], seeds: Sequence[int], scale: str = "default",
         custom: bool = False, cache: str = "", extra_rows: Mapping[str, str] | None = None) -> str:
    """What the demo is about to do: the families, seeds and methods, what the original and the oracle
    are, how each method is finetuned and tested, and the expected time. ``scale``: a
    ``SECONDS_PER_RUN`` key; ``custom``: methods or settings other than that scale's; ``extra_rows``:
    the name and description of each row run beside the methods, in a run of its own."""
    rows = {**{name: METHODS[name].description for name in config.methods}, **(extra_rows or {})}
    width = max(map(len, rows))
    shortcuts = "; ".join(f"{family} ({SHORTCUTS[family]})" for family in families)
    lines = [
        "relevance-finetune demo: does finetuning a ViT's relevance maps on a few masked images make it "
        "rely on the object rather than a shortcut?",
        f"  Shortcut famil{'y' if len(families) == 1 else 'ies'}: {shortcuts}; in the training images the "
        f"shortcut names the class {config.p:.0%} of the time.",
        f"  Seeds: {len(seeds)} ({', '.join(map(str, seeds))}). Methods, each compared with the same seed's "
        "original:",
        *(f"    {name:<{width}}  {description}" for name, description in rows.items()),
        f"  The original: a small ViT ({config.depth} blocks, width {config.embed_dim}, {config.image_size}-pixel "
        f"images, {config.num_classes} classes) trained first with the shortcut independent of the class, then "
        "with it agreeing: it learns both the object and the shortcut.",
        "  The oracle: the same architecture, first phase and schedule, its second phase with the shortcut "
        "independent of the class: the ceiling a finetune can hope for." if config.oracle else
        "  No oracle (oracle=false): there is no ceiling to measure the methods against.",
        f"  Each method finetunes a copy of the original on {config.finetune_per_class * len(config.set_a)} "
        f"masked images ({_schedule(config)} at each of "
        f"{_count(len(config.lr_grid), 'learning rate')}) and "
        f"keeps the model its rule picks on {config.val_per_class * len(config.val_classes)} masked validation "
        f"images; every model is then tested on {config.test_images} ID, OOD and adversarial images each.",
        f"  Expected time: {_expected(scale, len(families) * len(seeds), custom)}"
        + (f", plus the {', '.join(extra_rows)} run{'s' * (len(seeds) * len(families) > 1)}, not in this "
           "estimate." if extra_rows else ".")
        + (f" Finished seeds in {cache} are reused." if cache else ""),
    ]
    return "\n".join(lines)


def elapsed(started: float) -> str:
    """``[m:ss]`` since ``started`` (a ``time.time()``)."""
    minutes, seconds = divmod(int(time.time() - started), 60)
    return f"[{minutes}:{seconds:02d}]"


class StageReporter:
    """``run_seed``'s ``progress`` callback: one line per stage, ``[m:ss] hue seed 0, step 2 of 5:
    ...``, written through tqdm so that it leaves the bars whole. A message that names no stage is
    written as it comes. Picklable, for the demo's worker processes."""

    def __init__(self, config: BenchConfig, seed: int, started: float) -> None:
        self.config, self.seed, self.started = config, seed, started
        self.steps = 1 + config.oracle + len(config.methods)
        self.done = 0

    def _stage(self, message: str) -> str | None:
        config = self.config
        if message == "original model":
            return (f"the original: training it ({config.pretrain_epochs} + {_count(config.biased_epochs, 'epoch')})"
                    ", or loading it from the cache")
        if message == "oracle":
            return f"the oracle: its second phase, without the shortcut ({_count(config.biased_epochs, 'epoch')})"
        method = METHODS.get(message)
        if method is None:
            return None
        if not method.finetune:
            how = "no finetune"
        elif method.tune_lr or "ours" not in config.methods:
            how = (f"finetuning, {_count(len(config.lr_grid), 'learning rate')} x "
                   f"{_schedule(config)}, kept by the {method.selection} rule")
        else:
            how = f"finetuning at ours's learning rate, {_schedule(config)}"
        return f"{message}: {how}" + (", then the head refit" if method.head_refit else "")

    def __call__(self, message: str) -> None:
        stage = self._stage(message)
        if stage is not None:
            self.done += 1
            message = f"step {self.done} of {self.steps}: {stage}"
        tqdm.write(f"{elapsed(self.started)} {self.config.family} seed {self.seed}, {message}")


def _points(stat: dict[str, float], n_seeds: int) -> str:
    """``12.3`` or ``12.3 ± 1.0`` points, of the magnitude."""
    return format_stat({"mean": abs(stat["mean"]), "std": stat["std"]}, n_seeds) + " points"


def _signed(entry: dict[str, Any], n_seeds: int) -> str:
    """The OOD change, ``+1.2`` or ``+1.2 ± 0.4``."""
    return format_stat(entry["change"]["ood_acc"], n_seeds, signed=True)


def _ood_move(entry: dict[str, Any], n_seeds: int) -> str:
    change = entry["change"]["ood_acc"]
    if round(change["mean"], 1) == 0:
        return "left OOD accuracy unchanged" + ("" if n_seeds == 1 else f" (± {change['std']:.1f})")
    return f"{'raised' if change['mean'] > 0 else 'lowered'} OOD accuracy by {_points(change, n_seeds)}"


def _id_cost(entry: dict[str, Any], n_seeds: int) -> str:
    change = entry["change"]["id_acc"]
    if round(change["mean"], 1) == 0:
        return "at no ID cost"
    if change["mean"] < 0:
        return f"at an ID cost of {_points(change, n_seeds)}"
    return f"while ID accuracy rose by {_points(change, n_seeds)}"


def _label(name: str) -> str:
    return {"recommended": "the recommended recipe", "ours": "the paper's loss alone (ours)"}.get(name, name)


def _oracle_sentence(methods: dict[str, Any]) -> str:
    if "oracle" not in methods:
        return " No oracle ran, so there is no ceiling to measure the methods against."
    ood = methods["original"]["ood_acc"]["mean"]
    gap = methods["oracle"]["change"]["ood_acc"]["mean"]
    if gap >= MIN_GAP:
        return f" The oracle, trained without the shortcut, reached {ood + gap:.1f}% OOD ({gap:+.1f} points)."
    return (f" The oracle, trained without the shortcut, is not ahead of the original on OOD ({gap:+.1f} "
            "points), so this run has no ceiling to measure the methods against.")


def conclusion(family: str, methods: dict[str, Any], seeds: Sequence[int]) -> str:
    """One paragraph in plain words from a family's summary (``demo.summarize``): the original, the
    oracle, the main method's OOD and ID change and share of the gap to the oracle, the paper's loss
    and the other methods' OOD change, and how far one seed or the spread of several can be trusted."""
    n_seeds = len(seeds)
    original = methods["original"]
    where = f"On {family}, {'' if n_seeds == 1 else 'mean over '}{seed_phrase(seeds)}"
    text = (f"{where}, the original scored {original['id_acc']['mean']:.1f}% ID and "
            f"{original['ood_acc']['mean']:.1f}% OOD top-1.") + _oracle_sentence(methods)
    finetuned = [name for name in methods if name not in ("original", "oracle")]
    if not finetuned:
        return text + " No finetuned method ran."
    main = next(name for name in ("recommended", "ours", *finetuned) if name in finetuned)
    entry = methods[main]
    share = entry.get("gap_closed", {}).get("ood_acc") if "oracle" in methods else None
    way = f", {share:.0f}% of the way to the oracle" if share is not None else ""
    text += (f" {_label(main)[0].upper()}{_label(main)[1:]} {_ood_move(entry, n_seeds)} (to "
             f"{original['ood_acc']['mean'] + entry['change']['ood_acc']['mean']:.1f}%{way}) "
             f"{_id_cost(entry, n_seeds)}.")
    if "ours" in finetuned and main != "ours":
        text += f" The paper's loss alone (ours) moved OOD by {_signed(methods['ours'], n_seeds)} points."
    others = [name for name in finetuned if name not in (main, "ours")]
    if others:
        text += " OOD change of the others: " + ", ".join(
            f"{name} {_signed(methods[name], n_seeds)}" for name in others) + " points."
    if n_seeds == 1:
        return text + " One seed: a change of a few points may be noise (--full runs 3 seeds)."
    return text + " A change smaller than its ± std is within the spread between seeds."
