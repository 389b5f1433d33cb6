"""The benchmark's finetuning methods: the paper's loss and its ablations, the baselines, the recipes.

A ``Method`` names a loss (the relevance loss with settings, or an input-gradient baseline), the
counterfactual images it trains on and the rule that chooses its learning rate and checkpoint, and
its stages: the finetune, then (``head_refit``) the head refit of ``relevance_finetune.head``;
``METHODS`` is the table that ``relevance-finetune demo --methods`` chooses from.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, get_args

from .. import recipes

__all__ = ["DEFAULT_METHODS", "EXTENSIONS", "METHODS", "SELECTIONS", "Method"]


# How a method's learning rate and checkpoint are chosen on the masked validation images: the paper's
# rule, the reliance rule (lowest background-only accuracy within the accuracy limit), or the
# counterfactual rule (highest accuracy on the validation objects moved onto each other's backgrounds);
# the same names as the train command's rules (but "worst_group": the benchmark's images have no group
# labels), applied by runner.choose_lr.
SELECTIONS: tuple[str, ...] = tuple(rule for rule in get_args(recipes.Selection) if rule != "worst_group")


@dataclass(frozen=True)
class Method:
    """A finetuning method: the relevance loss with settings, or an input-gradient baseline."""

    name: str
    loss: str = "relevance"  # "relevance" | "gradmask" | "rrr"
    kwargs: dict[str, Any] = field(default_factory=dict)
    second_order: bool = False
    description: str = ""
    tune_lr: bool = False  # pick its own lr by its rule; otherwise reuse ours's (Table 4)
    consistency: float = 0.0  # extension, not the paper's: weight of the object-consistency term
    background_swap: float = 0.0  # probability of moving each object onto another image's background
    paired: bool = False  # every batch holds each image and its counterfactual (twice the images per step)
    jsd: float = 0.0  # paired only: weight of the Jensen-Shannon divergence between the two views' predictions
    selection: str = "paper"  # lr (and checkpoint) rule on the validation set: one of SELECTIONS
    finetune: bool = True  # finetune the model by the settings above (False: the original, unchanged)
    head_refit: bool = False  # then refit the head on the finetuning images' counterfactual views (head.py)

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if not (self.finetune or self.head_refit):
            raise ValueError(f"method {self.name!r} does nothing: finetune, head_refit or both must be true")
        if self.jsd < 0 or self.consistency < 0:
            raise ValueError(f"method {self.name!r}: consistency weights must be >= 0, got jsd={self.jsd}, "
                             f"consistency={self.consistency}")
        if (self.paired or self.jsd) and not self.background_swap:
            raise ValueError(f"method {self.name!r}: paired views and the JSD term need background_swap > 0")
        if self.jsd and not self.paired:
            raise ValueError(f"method {self.name!r}: the JSD term compares paired views: set paired=True")

    @classmethod
    def from_recipe(cls, name: str, recipe: recipes.Recipe, description: str, **loss: Any) -> "Method":
        """The benchmark's method for ``recipe`` (``loss`` overrides its regulariser settings)."""
        if recipe.object_only:
            raise ValueError("the benchmark's methods take no object-only images")
        return cls(name, kwargs={**recipe.loss, **loss}, description=description, tune_lr=True,
                   background_swap=recipe.background_swap, selection=recipe.selection, finetune=recipe.finetune,
                   head_refit=recipe.head_refit)

    def finetune_settings(self) -> "Method":
        """This method's finetune alone (no name, description or head refit): two methods whose
        finetunes are equal share one model per seed."""
        return replace(self, name="", description="", head_refit=False)


def _swap(name: str, description: str, background_swap: float = 1.0, selection: str = "reliance",
          relevance: bool = False, **changes: Any) -> Method:
    """Counterfactual images with the labels' CE, the paper's relevance terms only with ``relevance``:
    the settings pinned here, so that a method's name means the same in every committed result."""
    kwargs = {"classification": "ground_truth", **({} if relevance else {"lambda_relevance": 0.0})}
    return Method(name, kwargs=kwargs, description=description, tune_lr=True, background_swap=background_swap,
                  selection=selection, **changes)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("ours", description="paper loss (Eq. 5), confidence boosting", tune_lr=True),
    Method("ours_ground_truth", kwargs=dict(classification="ground_truth"),
           description="paper loss, CE with the labels (Table 4)"),
    Method("control", kwargs=dict(lambda_relevance=0.0),
           description="confidence CE alone: the same finetune without relevance terms"),
    Method("gradmask", loss="gradmask", description="GradMask (input-gradient mask penalty + CE)", tune_lr=True),
    Method("rrr", loss="rrr", description="Right for the Right Reasons (+ CE)", tune_lr=True),
    Method("wo_classification", kwargs=dict(lambda_classification=0.0), description="w/o L_cls"),
    Method("wo_bg", kwargs=dict(lambda_bg=0.0), description="w/o L_bg"),
    Method("wo_fg", kwargs=dict(lambda_fg=0.0), description="w/o L_fg"),
    Method("only_bg", kwargs=dict(lambda_fg=0.0, lambda_classification=0.0), description="only L_bg"),
    Method("only_fg", kwargs=dict(lambda_bg=0.0, lambda_classification=0.0), description="only L_fg"),
    Method("ours_second_order", second_order=True, description="paper loss, second-order GAE"),
    Method("ext_object_consistency", consistency=1.0,
           description="EXTENSION, not the paper's: paper loss + KL(object-only prediction || prediction)"),
    Method.from_recipe("recommended", recipes.get("recommended"),
                       description="the recommended recipe (recipes.get('recommended'))"),
    _swap("swap", "counterfactual images alone: every object swapped, the labels' CE, the reliance rule"),
    _swap("recommended_v1", "the recommended recipe until 2026-12: swap + the paper's relevance terms, reliance rule",
          relevance=True),
    _swap("swap_p50", "swap with each object swapped with probability 0.5", background_swap=0.5),
    _swap("recommended_p50", "recommended_v1 with swap probability 0.5", background_swap=0.5, relevance=True),
    # the ceiling study (docs/benchmark.md): the counterfactual selection rule, views, consistency
    _swap("swap_cf", "swap, lr and checkpoint by counterfactual validation accuracy", selection="counterfactual"),
    _swap("recommended_cf", "swap_cf with the relevance terms (the paper's weights)", selection="counterfactual",
          relevance=True),
    _swap("swap_p50_cf", "swap_cf with each object swapped with probability 0.5", background_swap=0.5,
          selection="counterfactual"),
    _swap("paired_cf", "swap_cf with each image and its counterfactual in the same batch", selection="counterfactual",
          paired=True),
    _swap("paired_jsd_cf", "paired_cf + 12 x JSD between the two views' predictions (AugMix's weight)",
          selection="counterfactual", paired=True, jsd=12.0),
    _swap("paired_relevance_cf", "paired_cf with the relevance terms (the paper's weights)",
          selection="counterfactual", paired=True, relevance=True),
    # robustness per mask (issue 27): the head refit (Deep Feature Reweighting on counterfactual views)
    Method.from_recipe("head", recipes.get("head"),
                       description="the original's head refit on the finetuning images' counterfactual views, C "
                                   "chosen on the validation images' views (recipes.get('head'))"),
    Method.from_recipe("two_stage_head", recipes.get("two_stage_head"),
                       description="recommended's chosen model, then the head refit (recipes.get('two_stage_head'))"),
)}
EXTENSIONS = tuple(name for name in METHODS if name.startswith("ext_"))
# the comparison every family runs; the Table 4 ablations and extensions on request
DEFAULT_METHODS = ("ours", "control", "gradmask", "rrr", "swap", "recommended")
