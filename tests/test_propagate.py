"""Masks propagated from a few annotated images by a patch classifier on a ViT's tokens (masks/propagate.py)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from conftest import tiny_model
from relevance_finetune.masks import Propagation, propagate_masks
from relevance_finetune.masks.propagate import patch_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def square_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark noisy 32 x 32 images, each with a bright 16 x 16 square on the 8 px patch grid, and its mask."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, 32, 32, generator=generator) * 0.2 - 1
    masks = torch.zeros(count, 32, 32)
    for image, mask, (row, col) in zip(images, masks, torch.randint(0, 3, (count, 2), generator=generator) * 8):
        image[:, row:row + 16, col:col + 16] += 2.5
        mask[row:row + 16, col:col + 16] = 1
    return images, masks


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0.5, b > 0.5
    return ((a & b).flatten(1).sum(1) / (a | b).flatten(1).sum(1)).mean().item()


def test_masks_follow_the_objects_the_tokens_carry():
    model = tiny_model()
    images, masks = square_images(12, seed=0)
    targets, truth = square_images(10, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # good masks: no warning
        out = propagate_masks(model, images, masks[:, None], targets, progress=False)
    assert isinstance(out, Propagation)
    assert out.masks.shape == (10, 32, 32) and out.masks.dtype == torch.float32
    assert set(out.masks.unique().tolist()) <= {0.0, 1.0}
    assert isinstance(out.held_out_iou, float) and 0.8 < out.held_out_iou <= 1
    assert iou(out.masks, truth) > 0.8
    assert len(out.fold_iou) == 3 and out.threshold == 0.5 and out.classifier in ("linear", "mlp")
    assert out.blocks in ((1,), (0, 1)) and len(out.scores) == 4  # last block / all (= last four), two classifiers
    assert out.held_out_iou == max(out.scores.values()) and not out.low_quality
    assert out.empty == 0 and out.whole == 0 and out.annotated == 12
    summary = out.summary()
    assert summary["held_out_iou"] == out.held_out_iou and summary["images"] == 10 and "masks" not in summary
    again = propagate_masks(model, images, masks, targets, progress=False)  # seeded: the same masks and scores
    assert torch.equal(again.masks, out.masks) and dict(again.scores) == dict(out.scores)


def test_settings_refinement_and_no_targets():
    model = tiny_model("vit_reg_avg")  # prefix tokens (class and registers) are dropped
    images, masks = square_images(6, seed=2)
    out = propagate_masks(model, images, masks, images[:2], blocks=[[-1]], classifiers=["linear"],
                          thresholds=[0.4, 0.6], folds=2, refine=True, steps=20, progress=False)
    assert out.blocks == (1,) and out.classifier == "linear" and out.threshold in (0.4, 0.6)
    assert len(out.scores) == 2 and out.masks.shape == (2, 32, 32)
    assert set(out.masks.unique().tolist()) <= {0.0, 1.0}
    none = propagate_masks(model, images, masks, images[:0], folds=2, steps=5, progress=False)
    assert none.masks.shape == (0, 32, 32) and none.empty == none.whole == 0
    tokens, grid = patch_tokens(model, images, [0, 1])
    assert tokens.shape == (6, 16, 64) and grid == (4, 4)


def test_random_masks_warn_with_the_held_out_iou():
    model = tiny_model()
    images, _ = square_images(9, seed=3)
    noise = (torch.rand(9, 32, 32, generator=torch.Generator().manual_seed(0)) < 0.1).float()  # no object to learn
    with pytest.warns(UserWarning, match=r"held-out IoU 0\.\d\d with the annotated masks is below 0\.3"):
        out = propagate_masks(model, images, noise, images[:3], steps=20, progress=False)
    assert out.low_quality and out.held_out_iou < 0.3 and out.warn_below == 0.3


@pytest.mark.parametrize("case, error, match", [
    ("cnn", TypeError, "needs a vision transformer with patch tokens .*Sequential"),
    ("mask size", ValueError, r"masks \(N, \[1,\] H, W\) of the same N, H and W; got images \(6, 3, 32, 32\), "
                              r"masks \(6, 16, 16\)"),
    ("target size", ValueError, r"targets must be \(M, C, H, W\) like the images \(3, 32, 32\); got \(2, 3, 16, 16\)"),
    ("too few", ValueError, "3-fold cross-validation needs 2 <= folds <= the 2 annotated images"),
    ("empty masks", ValueError, "every annotated mask is empty"),
    ("whole masks", ValueError, "every annotated mask is the whole image"),
    ("blocks", ValueError, "blocks must be non-empty sets of indices into the model's 2 blocks"),
    ("classifier", ValueError, "classifiers must be some of"),
])
def test_bad_input_is_named(case, error, match):
    model = tiny_model()
    images, masks = square_images(6, seed=4)
    targets = images[:2]
    options = {}
    if case == "cnn":
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    elif case == "mask size":
        masks = masks[:, ::2, ::2]
    elif case == "target size":
        targets = targets[..., ::2, ::2]
    elif case == "too few":
        images, masks = images[:2], masks[:2]
    elif case in ("empty masks", "whole masks"):
        masks = torch.full_like(masks, float(case == "whole masks"))
    elif case == "blocks":
        options["blocks"] = [[5]]
    else:
        options["classifiers"] = ["svm"]
    with pytest.raises(error, match=match):
        propagate_masks(model, images, masks, targets, progress=False, **options)
