"""Named recipes, and the train command's counterfactual images and reliance selection."""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import torch

from conftest import tiny_images, tiny_model
from relevance_finetune import RelevanceRegularizer, attach_gae, recipes
from relevance_finetune.train import loop as train_module
from relevance_finetune.augment import BackgroundSwap
from relevance_finetune.checkpoint import read_checkpoint_info
from relevance_finetune.train import TrainConfig, finetune, resolve_config
from relevance_finetune.train.selection import SELECTION_RULES, newest_is_best
from test_train import SyntheticMasked
from relevance_finetune.bench.methods import METHODS


def _batch(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = tiny_images(model, batch=4)
    masks = torch.zeros(4, *images.shape[-2:])
    masks[:, 8:24, 8:24] = 1
    return images, masks, torch.tensor([0, 1, 2, 3])


def test_paper_recipe_is_the_papers_loss_and_changes_no_image():
    model = tiny_model()
    recipe = recipes.get("paper")
    images, masks, labels = _batch(model)
    with attach_gae(model) as gae:
        assert recipe.regularizer(gae).extra_repr() == RelevanceRegularizer(gae).extra_repr()
        augmented, same_masks = recipe.augment(images, masks)
        assert augmented is images and same_masks is masks
        paper = recipe.regularizer(gae)(model(images), masks, labels).loss
        default = RelevanceRegularizer(gae)(model(images), masks, labels).loss
    assert torch.equal(paper, default) and recipe.selection == "paper"


def test_recommended_recipe_in_a_users_loop():
    model = tiny_model()
    recipe = recipes.get("recommended")
    assert recipe.evidence and recipe.selection == "counterfactual" and recipe.background_swap > 0
    images, masks, labels = _batch(model)
    torch.manual_seed(0)
    with attach_gae(model) as gae:
        criterion = recipe.regularizer(gae)
        swapped, swapped_masks = recipe.augment(images, masks)
        out = criterion(model(swapped), swapped_masks, labels=labels)
        out.loss.backward()
    assert criterion.classification == recipe.loss["classification"]
    assert not torch.equal(swapped, images) and torch.equal(swapped_masks, masks)
    inside = masks[:, None].expand_as(images) > 0
    assert torch.equal(swapped[inside], images[inside])
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_recipes_are_fresh_frozen_and_named():
    first, second = recipes.get("recommended"), recipes.get("recommended")
    torch.manual_seed(0)
    for _ in range(4):
        first.augment(torch.rand(2, 3, 8, 8), torch.tensor([[[1.0] * 4 + [0.0] * 4] * 8] * 2))
    assert first._swap.swapped > 0 and second._swap.swapped == 0
    with pytest.raises(AttributeError):
        first.background_swap = 0.0
    with pytest.raises(TypeError):
        first.loss["lambda_bg"] = 0.0
    assert recipes.names() == ("paper", "recommended", "head", "two_stage_head")
    with pytest.raises(ValueError, match="unknown recipe 'best'"):
        recipes.get("best")
    with pytest.raises(ValueError, match="selection must be"):
        recipes.Recipe("x", selection="lowest")
    with pytest.raises(ValueError, match="recipe 'x' does nothing"):
        recipes.Recipe("x", finetune=False)
    assert first.replace(background_swap=0.5).background_swap == 0.5
    assert isinstance(first.swap(seed=0), BackgroundSwap)


def test_train_config_takes_the_recipe_and_flags_win():
    config = resolve_config({"recipe": "recommended"})
    recipe = recipes.get("recommended")
    assert (config.background_swap, config.select) == (recipe.background_swap, recipe.selection)
    assert config.classification == recipe.loss["classification"]
    assert resolve_config({"recipe": "recommended", "background_swap": 0.25}).background_swap == 0.25
    assert resolve_config({"recipe": "paper"}) == resolve_config({"recipe": "paper", "lambda_bg": 2.0})
    with pytest.raises(ValueError, match="unknown recipe"):
        resolve_config({"recipe": "nope"})
    with pytest.raises(ValueError, match=r"background_swap must lie in \[0, 1\]"):
        TrainConfig(background_swap=1.5)


def _config(tmp_path, **overrides) -> TrainConfig:
    settings = dict(epochs=2, batch_size=4, lr=1e-3, workers=0, progress=False, out=str(tmp_path))
    return TrainConfig(**{**settings, **overrides})


def test_train_swaps_backgrounds(tmp_path, monkeypatch):
    calls = []

    class Spy(BackgroundSwap):
        def __call__(self, images, masks):
            out = super().__call__(images, masks)
            calls.append((images.clone(), out[0].clone()))
            return out
    monkeypatch.setattr(train_module, "BackgroundSwap", Spy)
    finetune(tiny_model(num_classes=4), SyntheticMasked(8), None, _config(tmp_path, background_swap=1.0))
    assert len(calls) == 4 and all(not torch.equal(before, after) for before, after in calls)
    calls.clear()
    finetune(tiny_model(num_classes=4), SyntheticMasked(8), None, _config(tmp_path / "plain"))
    assert not calls


def test_reliance_selection_needs_validation_images(tmp_path):
    with pytest.raises(ValueError, match="needs masked validation images"):
        finetune(tiny_model(num_classes=4), SyntheticMasked(8), None, _config(tmp_path, select="reliance"))


def test_reliance_selection_records_and_keeps_the_rule_s_epoch(tmp_path):
    history = finetune(tiny_model(num_classes=4), SyntheticMasked(8), SyntheticMasked(8, seed=1),
                       _config(tmp_path, epochs=3, select="reliance", max_val_drop=100.0))
    assert all({"val_background_only", "val_start_accuracy", "val_start_background_only"} <= set(r) for r in history)
    best = min(history, key=lambda r: (r["val_background_only"], -r["val_accuracy"]))
    info = read_checkpoint_info(tmp_path / "best.safetensors")
    assert info["epoch"] == best["epoch"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]


@pytest.mark.parametrize("history, expected", [
    # within the limit (start 0.50, drop 0.10): the lowest background-only wins
    ([dict(val_accuracy=0.45, val_background_only=0.3), dict(val_accuracy=0.42, val_background_only=0.2)], True),
    # the newest is lower but falls beyond the limit
    ([dict(val_accuracy=0.45, val_background_only=0.3), dict(val_accuracy=0.39, val_background_only=0.1)], False),
    # a tie in background-only: the higher accuracy wins
    ([dict(val_accuracy=0.45, val_background_only=0.2), dict(val_accuracy=0.48, val_background_only=0.2)], True),
    ([dict(val_accuracy=0.48, val_background_only=0.2), dict(val_accuracy=0.45, val_background_only=0.2)], False),
])
def test_newest_is_best_by_reliance(history, expected):
    history = [{**record, "val_loss": 1.0, "val_start_accuracy": 0.5} for record in history]
    config = TrainConfig(select="reliance", max_val_drop=10.0)
    assert newest_is_best(history, config) is expected


@pytest.mark.parametrize("history, expected", [
    ([dict(val_accuracy=0.9, val_counterfactual=0.3), dict(val_accuracy=0.5, val_counterfactual=0.4)], True),  # no limit
    ([dict(val_accuracy=0.9, val_counterfactual=0.4), dict(val_accuracy=0.8, val_counterfactual=0.3)], False),
    ([dict(val_accuracy=0.8, val_counterfactual=0.4), dict(val_accuracy=0.9, val_counterfactual=0.4)], True),  # tie
    ([dict(val_accuracy=0.9, val_counterfactual=0.4), dict(val_accuracy=0.9, val_counterfactual=0.4)], False),
])
def test_newest_is_best_by_counterfactual_accuracy(history, expected):
    history = [{**record, "val_loss": 1.0} for record in history]
    assert newest_is_best(history, TrainConfig(select="counterfactual")) is expected


def test_counterfactual_selection_measures_moved_objects_and_keeps_the_rule_s_epoch(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="needs masked validation images"):
        finetune(tiny_model(num_classes=4), SyntheticMasked(8), None, _config(tmp_path / "none", select="counterfactual"))
    seen = []
    real_swap = train_module.BackgroundSwap.__call__
    monkeypatch.setattr(train_module.BackgroundSwap, "__call__",
                        lambda self, images, masks: seen.append(real_swap(self, images, masks)[0]) or seen[-1:] * 2)
    history = finetune(tiny_model(num_classes=4), SyntheticMasked(8), SyntheticMasked(8, seed=1),
                       _config(tmp_path, epochs=3, select="counterfactual"))
    assert all("val_counterfactual" in r and "val_background_only" not in r for r in history)
    assert len(seen) == 3 * 2  # every validation pass: 8 images in batches of 4, the same draw each time
    assert torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[5]) and not torch.equal(seen[0], seen[1])
    best = max(history, key=lambda r: (r["val_counterfactual"], r["val_accuracy"]))
    assert read_checkpoint_info(tmp_path / "best.safetensors")["epoch"] == best["epoch"]


def test_every_selection_name_has_a_rule():
    assert typing.get_type_hints(TrainConfig)["select"] == recipes.Selection
    assert set(typing.get_args(recipes.Selection)) == set(SELECTION_RULES)


def test_evidence_quotes_the_committed_benchmark_results():
    """The numbers in a recipe's evidence are those of the committed run it names."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    runs = {"paper": ("demo_hue_full.json", None, "ours"), "recommended": ("ceiling_all_base.json", "hue", "recommended"),
            "head": ("per_mask_exact8.json", "hue", "head"),
            "two_stage_head": ("per_mask_exact8.json", "hue", "two_stage_head")}
    for name, (file, family, method) in runs.items():
        report = json.loads((results / file).read_text())
        report = report["families"][family] if family else report
        change = report["methods"][method]["change"]
        if family:  # measured as shipped (older results did not record the settings; fields added since at
            # their defaults)
            recorded, now = report["methods"][method]["settings"], dataclasses.asdict(METHODS[method])
            defaults = dataclasses.asdict(type(METHODS[method])(""))
            assert {**{k: v for k, v in now.items() if k not in recorded}, **recorded} == now
            assert all(now[k] == defaults[k] for k in now if k not in recorded), set(now) - set(recorded)
        for metric in ("background_only", "ood_acc"):
            assert f"{change[metric]['mean']:+.1f}" in recipes.get(name).evidence, (name, metric)


def test_head_recipes_name_their_stages_and_the_train_command_runs_them():
    head, two_stage, recommended = recipes.get("head"), recipes.get("two_stage_head"), recipes.get("recommended")
    assert (head.finetune, head.head_refit) == (False, True)
    assert (recommended.finetune, recommended.head_refit) == (True, False)
    assert two_stage == recommended.replace(name="two_stage_head", head_refit=True, evidence=two_stage.evidence)
    for recipe in (head, two_stage):
        assert METHODS[recipe.name].head_refit and METHODS[recipe.name].finetune == recipe.finetune
    refit_alone, both = resolve_config({"recipe": "head"}), resolve_config({"recipe": "two_stage_head"})
    assert (refit_alone.finetune, refit_alone.head_refit) == (False, True)
    assert refit_alone.select == "paper" and refit_alone.background_swap == 0  # a finetune's settings stay unset
    assert (both.finetune, both.head_refit, both.select, both.background_swap, both.classification) == (
        True, True, "counterfactual", 0.5, "ground_truth")
    assert resolve_config({"recipe": "recommended"}).head_refit is False
    with pytest.raises(ValueError, match="finetune and head_refit are both off"):
        resolve_config({"recipe": "head", "head_refit": False})
