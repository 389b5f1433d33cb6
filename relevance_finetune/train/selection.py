"""Selection rules: which epoch ``best.safetensors`` holds (``TrainConfig.select``).

A rule reads the run's metric records (one per epoch, newest last) and says whether the newest
beats every earlier one. A new rule is a function here, an entry in ``SELECTION_RULES`` and its
name in ``TrainConfig.select``'s choices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .config import TrainConfig

__all__ = ["SELECTION_RULES", "SelectionRule", "best_epoch", "newest_is_best"]

History = list[dict[str, Any]]


@dataclass(frozen=True)
class SelectionRule:
    """How the best epoch is chosen.

    Attributes
    ----------
    summary:
        What the rule picks, in a few words (the run's end summary says it).
    is_best:
        ``(history, config) -> bool``: whether the newest record beats every earlier one; called
        only for records that have validation metrics.
    background_only:
        Validation also measures the accuracy on images whose objects are replaced
        (``val_background_only``), and once before the first epoch (``val_start_*``).
    counterfactual:
        Validation also measures the accuracy on the images with their objects moved onto the
        other images' backgrounds in the same batch (``val_counterfactual``).
    groups:
        The rule reads the validation accuracy by group (``val_worst_group_accuracy``, measured
        whenever the validation data have group labels); data without groups are refused.
    """

    summary: str
    is_best: Callable[[History, TrainConfig], bool]
    background_only: bool = False
    counterfactual: bool = False
    groups: bool = False


def _lowest_val_loss(history: History, config: TrainConfig) -> bool:
    """``"paper"``: a lower validation loss than every earlier epoch."""
    return history[-1]["val_loss"] < min((r["val_loss"] for r in history[:-1]), default=float("inf"))


def _least_background_reliance(history: History, config: TrainConfig) -> bool:
    """``"reliance"``: among epochs whose validation accuracy is within ``max_val_drop`` points of
    the starting accuracy, lower background-only accuracy (ties: higher accuracy, then the earlier epoch)."""
    floor = history[0]["val_start_accuracy"] - config.max_val_drop / 100
    earlier = [(r["val_background_only"], -r["val_accuracy"]) for r in history[:-1] if r["val_accuracy"] >= floor]
    newest = (history[-1]["val_background_only"], -history[-1]["val_accuracy"])
    return history[-1]["val_accuracy"] >= floor and newest < min(earlier, default=(float("inf"),))


def _best_counterfactual_accuracy(history: History, config: TrainConfig) -> bool:
    """``"counterfactual"``: higher accuracy on counterfactual validation images, an estimate of the
    accuracy once the shortcut stops agreeing (ties: higher accuracy, then the earlier epoch); no limit."""
    earlier = [(r["val_counterfactual"], r["val_accuracy"]) for r in history[:-1] if "val_counterfactual" in r]
    return (history[-1]["val_counterfactual"], history[-1]["val_accuracy"]) > max(earlier, default=(-1.0,))


def _best_worst_group_accuracy(history: History, config: TrainConfig) -> bool:
    """``"worst_group"``: higher worst-group validation accuracy (ties: higher accuracy, then the
    earlier epoch); no limit."""
    earlier = [(r["val_worst_group_accuracy"], r["val_accuracy"]) for r in history[:-1]
               if "val_worst_group_accuracy" in r]
    return (history[-1]["val_worst_group_accuracy"], history[-1]["val_accuracy"]) > max(earlier, default=(-1.0,))


SELECTION_RULES: dict[str, SelectionRule] = {
    "paper": SelectionRule("the lowest validation loss", _lowest_val_loss),
    "reliance": SelectionRule("the lowest background-only accuracy within --max-val-drop of the start",
                              _least_background_reliance, background_only=True),
    "counterfactual": SelectionRule("the highest accuracy on counterfactual validation images",
                                    _best_counterfactual_accuracy, counterfactual=True),
    "worst_group": SelectionRule("the highest worst-group validation accuracy", _best_worst_group_accuracy,
                                 groups=True),
}


def newest_is_best(history: History, config: TrainConfig) -> bool:
    """Whether the newest epoch of ``history`` beats every earlier one by ``config.select``
    (never without validation metrics)."""
    return "val_loss" in history[-1] and SELECTION_RULES[config.select].is_best(history, config)


def best_epoch(history: History, config: TrainConfig) -> int | None:
    """The epoch (1-based) that ``best.safetensors`` holds after ``history``, or None."""
    chosen = None
    for end in range(1, len(history) + 1):
        if newest_is_best(history[:end], config):
            chosen = end
    return chosen
