"""The built-in benchmark's automatic (TokenCut) and propagated finetuning masks, their quality, the step budget."""
from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from relevance_finetune.bench import automatic_masks, demo
from relevance_finetune.bench.automatic_masks import mask_quality, mask_source_model, patch_level, warn_degenerate
from relevance_finetune.bench.config import BenchConfig
from relevance_finetune.bench.originals import train_first_phase, train_original
from relevance_finetune.bench.propagated_masks import annotated_images
from relevance_finetune.bench.runner import epoch_batches, make_data

# a 3 x 3 grid, trained in a few seconds
TINY = dict(image_size=24, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=4, pretrain_images=32,
            pretrain_epochs=1, biased_images=32, biased_epochs=1, original_attempts=1, train_batch=8,
            finetune_classes="all", finetune_per_class=3, val_per_class=2, test_images=8, perturbation_images=4,
            finetune_masks="tokencut")


def test_tokencut_masks_replace_the_finetuning_and_validation_masks(tmp_path):
    config = BenchConfig(**TINY)
    data = make_data(config, 0, tmp_path)
    exact = make_data(dataclasses.replace(config, finetune_masks="exact"), 0)
    for split in ("train", "val"):
        masks = data[split].tensors[1]
        assert masks.shape == exact[split].tensors[1].shape == (len(data[split]), 24, 24)
        assert set(masks.unique().tolist()) <= {0.0, 1.0} and masks.dtype == torch.float32
        for ours, theirs in zip(data[split].tensors[::2], exact[split].tensors[::2]):  # images, shortcut values
            assert torch.equal(ours, theirs)
        assert torch.equal(data[split].tensors[2], exact[split].tensors[2])
    assert torch.equal(data["tests"]["ood"].tensors[1], exact["tests"]["ood"].tensors[1])  # tests keep exact masks
    quality = data["masks"]
    assert quality["images"] == 12 + 8 and quality["source"] == config.mask_source and 0 <= quality["iou"] <= 100
    truth = torch.cat([exact["train"].tensors[1], exact["val"].tensors[1]])
    assert quality == mask_quality(torch.cat([data["train"].tensors[1], data["val"].tensors[1]]), truth) | {
        "unrefined": quality["unrefined"], "source": config.mask_source, "patch_iou": quality["patch_iou"],
        "chance_iou": quality["chance_iou"]}
    assert quality["chance_iou"] == mask_quality(truth.roll(1, 0), truth)["iou"]
    cached = sorted(tmp_path.glob("masks-*.safetensors"))
    assert len(cached) == 1 and "masks" not in exact
    again = make_data(config, 0, tmp_path)  # read back from the cache
    assert torch.equal(again["train"].tensors[1], data["train"].tensors[1]) and again["masks"] == quality


def test_mask_source_picks_the_original_or_its_first_phase(tmp_path):
    config = BenchConfig(**TINY)
    original = train_original(config, 0, tmp_path)
    first = train_first_phase(config, 0, tmp_path)
    for source, expected in (("original", original), ("first_phase", first)):
        model = mask_source_model(dataclasses.replace(config, mask_source=source), 0, tmp_path)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    assert not torch.equal(original.head.weight, first.head.weight)


def test_mask_quality_against_hand_made_masks():
    exact = torch.zeros(4, 4, 4)
    exact[:, :, :2] = 1  # the left half
    assert mask_quality(exact, exact) == {"iou": 100.0, "empty": 0, "full": 0, "images": 4}
    masks = exact.clone()
    masks[0] = 0  # empty: IoU 0
    masks[1] = 1  # the whole image: IoU 8 / 16
    masks[2] = 0
    masks[2, :2] = 1  # the top half: IoU 4 / 12
    quality = mask_quality(masks, exact)
    assert quality["empty"] == 1 and quality["full"] == 1 and quality["images"] == 4
    assert quality["iou"] == pytest.approx(100 * (0 + 0.5 + 1 / 3 + 1) / 4)
    assert mask_quality(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))["iou"] == 100.0  # nothing to find, nothing found
    nearly = torch.ones(1, 5, 5)
    nearly[0, 0, 0] = 0  # 96% of the image
    assert mask_quality(nearly, nearly)["full"] == 1
    with pytest.raises(ValueError, match="one shape"):
        mask_quality(masks[:, :3], exact)


def test_warning_when_many_masks_are_empty_or_whole(tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_degenerate({"empty": 1, "full": 0, "images": 10})  # 10%: no warning
    with pytest.warns(UserWarning, match="2 of 10 automatic masks are empty \\(1\\) or cover the whole image \\(1\\)"):
        warn_degenerate({"empty": 1, "full": 1, "images": 10})
    monkeypatch.setattr(automatic_masks, "automatic_masks", lambda model, images, patch: (
        torch.zeros(images.shape[0], *images.shape[2:]), 0))
    with pytest.warns(UserWarning, match="20 of 20 automatic masks are empty \\(20\\)"):
        data = make_data(BenchConfig(**TINY), 0, tmp_path)
    assert data["masks"]["empty"] == 20 and data["masks"]["iou"] == 0.0


def test_config_checks_the_mask_source_and_the_image_counts():
    with pytest.raises(ValueError, match="mask_source"):
        BenchConfig(mask_source="dino")
    with pytest.raises(ValueError, match="finetune_per_class and val_per_class must be at least 1"):
        BenchConfig(finetune_per_class=0)


def test_demo_quick_with_tokencut_masks(tmp_path):
    from relevance_finetune.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--family", "hue", "--methods", "ours", "--finetune-masks", "tokencut",
                 "--set", "mask_source=original", "oracle=false", "image_size=24", "embed_dim=16", "depth=1",
                 "pretrain_images=64", "biased_images=64", "test_images=20", "perturbation_images=10",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert config["finetune_masks"] == "tokencut" and config["mask_source"] == "original"
    assert "masks" not in results["methods"]  # the masks' quality is reported beside the methods, not as one
    (quality,) = results["masks"]
    assert quality["source"] == "original" and 0 <= quality["iou"] <= 100
    assert f"mean IoU {quality['iou']:.1f} with the exact masks" in (out / "results.md").read_text()


def test_propagated_masks_keep_the_annotated_ones_and_replace_the_rest(tmp_path):
    config = BenchConfig(**{**TINY, "finetune_masks": "propagate", "finetune_per_class": 5, "annotated_per_class": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a one-block random-ish model: its held-out IoU may be low
        data = make_data(config, 0, tmp_path)
    exact = make_data(dataclasses.replace(config, finetune_masks="exact"), 0)
    labels = data["train"].tensors[2]
    annotated = annotated_images(labels, 2)
    assert annotated.sum() == 8 and all(annotated[labels == c].sum() == 2 for c in range(4))
    assert torch.nonzero(annotated[labels == 0]).squeeze(1).tolist() == [0, 1]  # the first of each class
    train_masks, exact_masks = data["train"].tensors[1], exact["train"].tensors[1]
    assert torch.equal(train_masks[annotated], exact_masks[annotated])
    for split in ("train", "val"):
        assert torch.equal(data[split].tensors[0], exact[split].tensors[0])
        assert set(data[split].tensors[1].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(data["tests"]["ood"].tensors[1], exact["tests"]["ood"].tensors[1])
    quality = data["masks"]
    propagated = torch.cat([train_masks[~annotated], data["val"].tensors[1]])
    truth = torch.cat([exact_masks[~annotated], exact["val"].tensors[1]])
    assert quality["images"] == 12 + 8 and quality["annotated"] == 8 and quality["source"] == "original"
    assert quality["iou"] == mask_quality(propagated, truth)["iou"] and 0 <= quality["held_out_iou"] <= 100
    assert quality["patch_iou"] == mask_quality(patch_level(truth, 8), truth)["iou"]
    assert quality["chance_iou"] == mask_quality(truth.roll(1, 0), truth)["iou"]


def test_step_budget_keeps_the_steps_whatever_the_images():
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = BenchConfig(finetune_per_class=8, finetune_classes="all")
    budget = dataclasses.replace(plain, finetune_steps=300)
    assert budget.steps_per_epoch == 10 and plain.steps_per_epoch is None
    same = [torch.cat(b) for b in epoch_batches(80, budget, generator())]
    assert all(torch.equal(a, torch.cat(b)) for a, b in zip(same, epoch_batches(80, plain, generator())))
    more = list(epoch_batches(320, dataclasses.replace(budget, finetune_per_class=32), generator()))
    assert len(more) == 30 and all(len(epoch) == 10 and all(len(b) == 8 for b in epoch) for epoch in more)
    seen = torch.cat([torch.cat(epoch) for epoch in more[:4]])  # the first 40 steps: one pass over the 320
    assert torch.equal(seen.sort().values, torch.arange(320))
    assert sum(len(epoch) for epoch in epoch_batches(320, plain, generator())) == 30 * 40
    with pytest.raises(ValueError, match="finetune_steps must be 0 or a multiple of finetune_epochs \\(30"):
        BenchConfig(finetune_steps=301)
    with pytest.raises(ValueError, match="annotated_per_class must lie in 1..finetune_per_class \\(4\\), got 8"):
        BenchConfig(finetune_masks="propagate", finetune_per_class=4)


def test_demo_quick_with_propagated_masks_and_a_step_budget(tmp_path):
    from relevance_finetune.cli import main

    out = tmp_path / "demo"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["demo", "--quick", "--family", "hue", "--methods", "ours", "--finetune-masks", "propagate",
                     "--set", "annotated_per_class=2", "finetune_steps=4", "oracle=false", "image_size=24",
                     "embed_dim=16", "depth=1", "pretrain_images=64", "biased_images=64", "test_images=20",
                     "perturbation_images=10", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert config["finetune_masks"] == "propagate" and config["annotated_per_class"] == 2
    assert config["finetune_steps"] == 4 and config["finetune_epochs"] == 2
    (quality,) = results["masks"]
    assert quality["annotated"] == 20 and quality["images"] == 20 + 40 and "held_out_iou" in quality
    text = (out / "results.md").read_text()
    assert f"mean IoU {quality['iou']:.1f} with the exact masks (references: patch-level exact masks " \
           f"{quality['patch_iou']:.1f}" in text and f"held-out IoU on the annotated masks {quality['held_out_iou']:.1f}" in text


def test_demo_reports_two_stage_head_on_propagated_masks_beside_the_methods(tmp_path, monkeypatch):
    """``propagated=True``: each seed also runs two_stage_head on masks propagated from the run's exact
    ones, cached under a key of its own, as one more row with the masks' quality; absent without it."""
    monkeypatch.setattr(demo, "PROPAGATED_PER_CLASS", 5)
    config = BenchConfig(**{**TINY, "finetune_masks": "exact", "methods": ("head",), "lr_grid": (1e-4,),
                            "finetune_epochs": 2, "oracle": False})
    extra = demo.propagated_config(config)
    assert (extra.methods, extra.finetune_masks, extra.annotated_per_class, extra.finetune_per_class,
            extra.finetune_steps) == (("two_stage_head",), "propagate", 3, 5, 2 * 2)  # 12 images, batch 8: 2 steps
    assert extra.original_key(0) == config.original_key(0)
    results = demo.run_benchmark(config, [0], tmp_path / "with", propagated=True)
    row = results["methods"][demo.PROPAGATED]
    assert "head_C" in row and row["settings"]["name"] == "two_stage_head" and "propagated" in row["description"]
    assert demo.PROPAGATED in results["per_seed"][0] and "masks" not in results
    (quality,) = results["propagated_masks"]
    assert quality["annotated"] == 4 * 3 and 0 <= quality["iou"] <= 100 and 0 <= quality["held_out_iou"] <= 100
    assert len(list((tmp_path / "with" / "cache").glob("results-hue-*.json"))) == 2
    text = (tmp_path / "with" / "results.md").read_text()
    assert f"| {demo.PROPAGATED} |" in text and f"The {demo.PROPAGATED} row: masks propagated from 12" in text
    without = demo.run_benchmark(config, [0], tmp_path / "without")
    assert demo.PROPAGATED not in without["methods"] and "propagated_masks" not in without
