"""The built-in benchmark: the generator's distributions, the probes, and the demo's files."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import cli_error
from relevance_finetune.bench.synthetic import SpuriousConfig, make_split, render_image
from relevance_finetune.probes import reliance_probes, replace_region


def test_generator_is_deterministic_and_masks_are_exact():
    a = make_split(40, "biased", seed=3)
    b = make_split(40, "biased", seed=3)
    c = make_split(40, "biased", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))
    assert not torch.equal(a.tensors[0], c.tensors[0])
    images, masks, labels, _ = a.tensors
    assert images.shape == (40, 3, 64 if SpuriousConfig().image_size == 64 else SpuriousConfig().image_size,
                            SpuriousConfig().image_size)
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert 0.05 < masks.mean() < 0.6
    assert torch.bincount(labels, minlength=10).tolist() == [4] * 10
    assert images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("distribution, low, high", [
    ("biased", 0.85, 0.95), ("independent", 0.03, 0.2), ("adversarial", 0.0, 0.0)])
def test_background_agreement(distribution, low, high):
    _, _, labels, backgrounds = make_split(1000, distribution, p=0.9, seed=0, config=SpuriousConfig(image_size=16)).tensors
    agreement = (labels == backgrounds).float().mean().item()
    assert low <= agreement <= high


def test_classes_subset_and_bad_input():
    _, _, labels, _ = make_split(20, "biased", seed=0, classes=(0, 1), config=SpuriousConfig(image_size=16)).tensors
    assert set(labels.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="distribution"):
        make_split(4, "shifted")
    with pytest.raises(ValueError, match="num_classes"):
        SpuriousConfig(num_classes=11)


def test_replace_region():
    images = torch.rand(2, 3, 4, 4)
    masks = torch.zeros(2, 4, 4)
    masks[:, :2] = 1
    obj_only = replace_region(images, masks, "background", "grey")
    assert torch.equal(obj_only[:, :, :2], images[:, :, :2])
    assert torch.all(obj_only[:, :, 2:] == 0.5)
    bg_only = replace_region(images, masks, "object", "mean")
    assert torch.equal(bg_only[:, :, 2:], images[:, :, 2:])
    torch.testing.assert_close(bg_only[0, :, 0, 0], images.mean(dim=(0, 2, 3)))
    with pytest.raises(ValueError, match="do not match"):
        replace_region(images, masks[:, :3], "object")
    with pytest.raises(ValueError, match="region"):
        replace_region(images, masks, "sky")


class _BackgroundReader(nn.Module):
    """Predicts from the mean colour of the bottom rows (the background in the probe below)."""

    def forward(self, x):
        return x[:, :, 2:].mean(dim=(2, 3))


def test_probes_see_background_reliance():
    images = torch.zeros(30, 3, 4, 4)
    labels = torch.arange(30) % 3
    images[torch.arange(30), labels, 2:] = 1.0  # the class lives in the background rows
    masks = torch.zeros(30, 4, 4)
    masks[:, :2] = 1
    probes = reliance_probes(_BackgroundReader(), images, masks, labels, fills=("grey", "mean"))
    assert probes["full"] == 100.0
    assert probes["background_only"] == 100.0
    assert probes["object_only"] < 50.0
    assert probes["background_reliance"] > 50.0


def test_demo_quick_writes_results_figure_and_weights(tmp_path, capsys):
    from relevance_finetune.cli import main
    from relevance_finetune.bench.demo import METRICS

    out = tmp_path / "demo"
    args = ["demo", "--quick", "--family", "hue", "mark", "--seeds", "2", "--methods", "ours", "recommended",
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Smoke test" in printed and "background-only: top-1 with" in printed
    assert "| method | OOD gap closed | bg-only gap closed | ID vs oracle | object-only gap closed |" in printed
    assert "| oracle |" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["families"]) == {"hue", "mark"}
    for family, report in results["families"].items():
        assert report["seeds"] == [0, 1] and report["config"]["family"] == family
        assert set(report["methods"]) == {"original", "oracle", "ours", "recommended"}
        assert set(report["methods"]["ours"]["gap_closed"]) == {"ood_acc", "background_only", "object_only"}
        assert report["config"]["finetune_classes"] == "all"  # the command's default: no set A/B columns
        metrics = [metric for metric in METRICS if not metric.startswith("ood_acc_set_")]
        for name, entry in report["methods"].items():
            assert "ood_acc_set_b" not in entry
            for metric in metrics:
                assert set(entry[metric]) == {"mean", "std"}
                assert entry[metric]["std"] >= 0.0
            assert {"object_only", "background_only", "background_reliance"} <= set(entry["probes"])
            if name != "original":
                assert set(metrics) <= set(entry["change"])
        assert (out / f"relevance_before_after_{family}.png").stat().st_size > 10_000
    table = (out / "results.md").read_text()
    assert "## Shortcut family: mark" in table and "Smoke test" in table
    assert all(f"| {name} |" in table for name in results["families"]["hue"]["methods"])
    assert (out / "recommended" / "model.safetensors").is_file()
    cached = sorted(path.name for path in (out / "cache").iterdir())
    assert main(args) == 0  # a rerun reuses every finished seed
    assert sorted(path.name for path in (out / "cache").iterdir()) == cached
    assert json.loads((out / "results.json").read_text())["families"]["mark"]["methods"] == \
        results["families"]["mark"]["methods"]


def test_demo_one_family_keeps_the_flat_schema(tmp_path):
    from relevance_finetune.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--family", "texture", "--methods", "ours", "--finetune-classes", "half",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"original", "oracle", "ours"} and results["config"]["family"] == "texture"
    assert results["config"]["set_b"] == [5, 6, 7, 8, 9] and "ood_acc_set_b" in results["methods"]["ours"]["change"]
    assert (out / "relevance_before_after.png").is_file() and (out / "ours" / "config.json").is_file()


def test_demo_checks_that_out_is_writable_before_training(tmp_path, capsys, monkeypatch):
    from relevance_finetune.bench import demo
    monkeypatch.setattr(demo, "run_benchmark", lambda *args: pytest.fail("trained before checking --out"))
    (tmp_path / "file").write_text("not a folder")
    assert "cannot write to --out" in cli_error(capsys, ["demo", "--quick", "--out", str(tmp_path / "file" / "out")])


def test_extension_adds_a_term_and_stays_out_of_the_default_methods():
    from relevance_finetune.bench.runner import EXTENSIONS, METHODS, BenchConfig, create_original, finetune

    config = BenchConfig(image_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, finetune_epochs=1,
                         finetune_batch=4)
    data = make_split(8, "biased", config=config.spurious(), classes=(0, 1))
    torch.manual_seed(0)
    original = create_original(config)
    ours = finetune(original, METHODS["ours"], data, 1e-3, config, seed=0)
    extended = finetune(original, METHODS["ext_object_consistency"], data, 1e-3, config, seed=0)
    assert not torch.equal(ours.head.weight, extended.head.weight)
    assert EXTENSIONS and not set(EXTENSIONS) & set(BenchConfig().methods)


@pytest.mark.parametrize("max_val_drop, expected_lr", [(-1e9, 1e-4), (1e9, None)])
def test_choose_lr_follows_the_rule_and_trains_each_lr_once(monkeypatch, max_val_drop, expected_lr):
    """Nothing passes (an impossible accuracy bar): the smallest lr's model is kept, not retrained."""
    from relevance_finetune.bench import runner

    config = runner.BenchConfig(image_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                                finetune_epochs=1, finetune_batch=4, lr_grid=(1e-3, 1e-4),
                                max_val_drop=max_val_drop)
    train = make_split(8, "biased", config=config.spurious(), classes=(0, 1))
    val = make_split(8, "biased", config=config.spurious(), classes=(0, 1), seed=1)
    torch.manual_seed(0)
    original = runner.create_original(config)
    trained = []
    real_epochs = runner._finetune_epochs
    monkeypatch.setattr(runner, "_finetune_epochs", lambda *a, **k: trained.append(a[3]) or real_epochs(*a, **k))
    real_finetune = runner.finetune
    lr, model, trials = runner.choose_lr(original, runner.METHODS["ours"], train, val, config, seed=0)
    assert trained == [1e-3, 1e-4] and [t["lr"] for t in trials] == [0.0, 1e-3, 1e-4]
    reference, *scores = trials
    passing = [t["lr"] for t in scores if t["acc"] >= reference["acc"] - max_val_drop
               and t["l_cls"] <= reference["l_cls"] + 1e-6]
    assert lr == (expected_lr if expected_lr is not None else max(passing, default=1e-4))
    expected = real_finetune(original, runner.METHODS["ours"], train, lr, config, 0)
    assert torch.equal(model.head.weight, expected.head.weight)


def test_reliance_rule_picks_the_lowest_background_only_within_the_accuracy_limit(monkeypatch):
    """Checkpoints every ``select_every`` epochs of every lr compete; the kept model is the chosen one."""
    from relevance_finetune.bench import runner

    config = runner.BenchConfig(image_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                                finetune_epochs=2, select_every=1, finetune_batch=4, lr_grid=(1e-3, 1e-2),
                                max_val_drop=1e9)
    train = make_split(8, "biased", config=config.spurious(), classes=(0, 1))
    val = make_split(8, "biased", config=config.spurious(), classes=(0, 1), seed=1)
    torch.manual_seed(0)
    original = runner.create_original(config)
    method = runner.METHODS["swap"]
    assert method.selection == "reliance" and method.background_swap > 0
    seen = []
    real_score = runner.validation_score
    monkeypatch.setattr(runner, "validation_score",
                        lambda model, data, *rule: seen.append(model.head.weight.detach().clone())
                        or real_score(model, data, *rule))
    lr, model, trials = runner.choose_lr(original, method, train, val, config, seed=0)
    assert [(t["lr"], t["epoch"]) for t in trials] == [(0.0, 0), (1e-3, 1), (1e-3, 2), (1e-2, 1), (1e-2, 2)]
    best = min(range(1, len(trials)), key=lambda i: (trials[i]["background_only"], -trials[i]["acc"]))
    assert lr == trials[best]["lr"] and [i for i, t in enumerate(trials) if t.get("chosen")] == [best]
    assert torch.equal(model.head.weight, seen[best])
    strict = runner.choose_lr(original, method, train, val, dataclasses.replace(config, max_val_drop=-1e9), seed=0)
    assert strict[0] == 1e-3  # nothing passes: the smallest lr
    # test accuracies are recorded per trial for the trade-off curve, and change no choice
    ood = make_split(8, "independent", config=config.spurious(), classes=(0, 1), seed=2)
    traced_lr, traced, traced_trials = runner.choose_lr(original, method, train, val, config, seed=0,
                                                        tests={"ood": ood})
    assert traced_lr == lr and torch.equal(traced.head.weight, model.head.weight)
    chosen = next(t for t in traced_trials if t.get("chosen"))
    assert chosen["test"]["ood"] == runner.accuracy(runner.predict(traced, ood.tensors[0]), ood.tensors[2])
    assert all(set(t["test"]) == {"ood"} for t in traced_trials) and "test" not in trials[0]


def test_families_are_deterministic_and_keep_the_shortcut_out_of_the_mask():
    from relevance_finetune.bench.synthetic import FAMILIES

    for family in FAMILIES:
        config = SpuriousConfig(image_size=24, family=family)
        a = make_split(6, "biased", config=config, seed=3).tensors
        b = make_split(6, "biased", config=config, seed=3).tensors
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # the mark family: moving the shortcut moves only background pixels
    config = SpuriousConfig(image_size=24, family="mark", noise=0.0)
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    image_a, mask = render_image(1, 2, config, rng_a)
    image_b, mask_b = render_image(1, 5, config, rng_b)
    assert np.array_equal(mask, mask_b)
    changed = np.abs(image_a - image_b).max(axis=0) > 0
    assert changed.any() and not (changed & mask).any()
    side = 4 * (24 // 12)
    assert not changed[side:].any() and not changed[:, side:].any()  # a watermark: always the same corner
    with pytest.raises(ValueError, match="family must be one of"):
        SpuriousConfig(family="colour")


def test_family_settings_apply_where_the_config_holds_the_default():
    from relevance_finetune.bench.runner import FAMILY_SETTINGS, BenchConfig

    assert BenchConfig().for_family("texture").biased_epochs == FAMILY_SETTINGS["texture"]["biased_epochs"] != 3
    assert BenchConfig(biased_epochs=1).for_family("texture").biased_epochs == 1  # the user's value wins
    assert BenchConfig().for_family("hue") == BenchConfig(family="hue")
    assert BenchConfig().for_family("texture").original_key(0) != BenchConfig(family="texture").original_key(0)


def test_finetune_classes_all_finetunes_and_validates_on_every_class():
    from relevance_finetune.bench.demo import markdown_tables, summarize
    from relevance_finetune.bench.runner import BenchConfig, create_original, evaluate_model, make_data

    config = BenchConfig(image_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=4,
                         finetune_classes="all", finetune_per_class=2, val_per_class=2, test_images=8,
                         perturbation_images=4)
    assert config.set_a == (0, 1, 2, 3) and config.set_b == () and config.val_classes == config.set_a
    assert BenchConfig(num_classes=4).val_classes == (2, 3)  # the paper's split: validation on set B
    data = make_data(config, seed=0)
    assert set(data["train"].tensors[2].tolist()) == set(data["val"].tensors[2].tolist()) == {0, 1, 2, 3}
    assert not set(map(tuple, data["train"].tensors[0].flatten(1).tolist())) & \
        set(map(tuple, data["val"].tensors[0].flatten(1).tolist()))  # held-out validation images
    torch.manual_seed(0)
    result = evaluate_model(create_original(config).eval(), data["tests"], config)
    assert "ood_acc" in result and "ood_acc_set_a" not in result  # no set B to compare with
    table = markdown_tables(summarize([{"original": result, "ours": {**result, "lr": 1e-5}}]))
    assert "| ours | +0.0 |" in table and "OOD set" not in table and "| pixel acc |" in table  # one seed: no ± std
    with pytest.raises(ValueError, match="finetune_classes"):
        BenchConfig(finetune_classes="some")


def test_patch_masks_cover_every_patch_the_object_touches():
    from relevance_finetune.bench.runner import BenchConfig, make_data, patch_masks

    data = make_split(6, "biased", config=SpuriousConfig(image_size=16), seed=0)
    exact = data.tensors[1]
    coarse = patch_masks(data, 4).tensors[1]
    assert torch.all(coarse >= exact) and coarse.sum() > exact.sum()
    blocks = coarse.unflatten(1, (4, 4)).unflatten(3, (4, 4))  # (n, row, 4, col, 4)
    assert torch.equal(blocks.amax(dim=(2, 4)), blocks.amin(dim=(2, 4)))  # constant on each patch
    touched = exact.unflatten(1, (4, 4)).unflatten(3, (4, 4)).amax(dim=(2, 4))
    assert torch.equal(blocks.amax(dim=(2, 4)), touched)
    assert all(torch.equal(a, b) for a, b in zip(patch_masks(data, 4).tensors[::2], data.tensors[::2]))
    config = BenchConfig(image_size=16, finetune_masks="patch", finetune_per_class=1, val_per_class=1, test_images=4)
    sets = make_data(config, seed=0)
    assert torch.equal(sets["train"].tensors[1], patch_masks(make_data(dataclasses.replace(
        config, finetune_masks="exact"), seed=0)["train"], 8).tensors[1])
    assert set(sets["tests"]["id"].tensors[1].unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="finetune_masks"):
        BenchConfig(finetune_masks="boxes")


def test_head_methods_run_record_seconds_and_share_the_recommended_finetune():
    from relevance_finetune.bench.runner import METHODS, BenchConfig, run_seed

    config = BenchConfig(image_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=4,
                         finetune_classes="all", finetune_per_class=3, val_per_class=2, test_images=8,
                         perturbation_images=4, pretrain_images=16, pretrain_epochs=1, biased_images=16,
                         biased_epochs=1, train_batch=8, original_attempts=1, finetune_epochs=1, lr_grid=(1e-3,),
                         oracle=False, methods=("two_stage_head", "head", "recommended"))
    seed_result = run_seed(config, seed=0)
    results = seed_result["methods"]
    assert all(results[name]["seconds"] > 0 for name in config.methods)
    head, two_stage, recommended = (results[name] for name in ("head", "two_stage_head", "recommended"))
    assert head["lr"] == 0.0 and head["lr_trials"] == [] and head["head_C"] in (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
    assert "head_C" not in recommended
    # two_stage_head is recommended's chosen model (one finetune for both), then the refit
    assert two_stage["lr"] == recommended["lr"] and two_stage["lr_trials"] is recommended["lr_trials"]
    assert two_stage["seconds"] > recommended["seconds"]
    models = seed_result["models"]
    assert set(models) == set(results) == {"original", *config.methods}
    backbone = [model.blocks[0].attn.qkv.weight for model in (models["two_stage_head"], models["recommended"])]
    assert torch.equal(*backbone)
    assert not torch.equal(models["two_stage_head"].head.weight, models["recommended"].head.weight)
    assert torch.equal(models["head"].patch_embed.proj.weight, models["original"].patch_embed.proj.weight)
    assert not torch.equal(models["head"].head.weight, models["original"].head.weight)
    assert METHODS["two_stage_head"].finetune_settings() == METHODS["recommended"].finetune_settings()
    with pytest.raises(ValueError, match=r"methods \['head'\] refit the head.*--finetune-classes all"):
        run_seed(dataclasses.replace(config, finetune_classes="half", methods=("head",)), seed=0)
    with pytest.raises(ValueError, match="does nothing"):
        dataclasses.replace(METHODS["head"], head_refit=False)
