"""The built-in benchmark: the generator's distributions, the probes, and the demo's files."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import cli_error
from relevance_finetune.bench.synthetic import SpuriousConfig, make_split
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


def test_demo_quick_writes_results_figure_and_weights(tmp_path):
    from relevance_finetune.cli import main
    from relevance_finetune.bench.demo import METRICS, QUICK

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--seeds", "2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1]
    assert set(results["methods"]) == {"original", *QUICK["methods"]}
    for name, entry in results["methods"].items():
        for metric in ("id_acc", "ood_acc", "adv_acc", "ood_acc_set_a", "ood_acc_set_b", "pixel_acc", "miou", "map"):
            assert set(entry[metric]) == {"mean", "std"}
            assert 0.0 <= entry[metric]["mean"] <= 100.0 and entry[metric]["std"] >= 0.0
        assert {"object_only", "background_only", "background_reliance"} <= set(entry["probes"])
    assert set(METRICS) <= set(results["methods"]["ours"])
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in results["methods"])
    assert (out / "relevance_before_after.png").stat().st_size > 10_000
    assert (out / "ours" / "model.safetensors").is_file() and (out / "ours" / "config.json").is_file()


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
    real_finetune = runner.finetune
    monkeypatch.setattr(runner, "finetune", lambda *a, **k: trained.append(a[3]) or real_finetune(*a, **k))
    lr, model, trials = runner.choose_lr(original, runner.METHODS["ours"], train, val, config, seed=0)
    assert trained == [1e-3, 1e-4] and [t["lr"] for t in trials] == [0.0, 1e-3, 1e-4]
    reference, *scores = trials
    passing = [t["lr"] for t in scores if t["acc"] >= reference["acc"] - max_val_drop
               and t["l_cls"] <= reference["l_cls"] + 1e-6]
    assert lr == (expected_lr if expected_lr is not None else max(passing, default=1e-4))
    expected = real_finetune(original, runner.METHODS["ours"], train, lr, config, 0)
    assert torch.equal(model.head.weight, expected.head.weight)
