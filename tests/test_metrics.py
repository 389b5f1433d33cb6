"""Segmentation and perturbation metrics against values computed by hand."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from relevance_finetune.metrics import (
    SegmentationMeter, area_under_curve, average_precision, perturb, perturbation_curve)


def test_average_precision_groups_tied_scores():
    # thresholds 0.9 (P=1, R=.5), 0.8 (P=2/3, R=1), 0.1 (P=.5, R=1): AP = .5 + .5 * 2/3
    assert average_precision([0.9, 0.8, 0.8, 0.1], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    assert average_precision([0.1, 0.9], [1, 0]) == pytest.approx(0.5)
    assert average_precision([0.3, 0.2], [0, 0]) == 0.0


def test_segmentation_meter_hand_computed():
    # image 1: raw [[4, 0], [2, 2]] -> [[1, 0], [.5, .5]], mean .5 -> fg only at (0, 0)
    #   vs mask [[1, 1], [0, 0]]: 3/4 correct; bg I/U 2/3, fg I/U 1/2;
    #   AP over [1-R, R] vs one-hot: thresholds 1 (P .5, R .25), .5 (P .5, R .75), 0 (P .5, R 1) -> .5
    # image 2: perfect -> 4/4, bg 2/2, fg 2/2, AP 1
    relevance = torch.tensor([[[4.0, 0.0], [2.0, 2.0]], [[0.0, 1.0], [0.0, 1.0]]])
    masks = torch.tensor([[[1, 1], [0, 0]], [[0, 1], [0, 1]]])
    meter = SegmentationMeter()
    meter.update(relevance[:1], masks[:1])
    meter.update(relevance[1:, None], masks[1:, None])  # (B, 1, H, W) accepted too
    result = meter.compute()
    assert result["pixel_acc"] == pytest.approx(100 * 7 / 8)
    assert result["miou"] == pytest.approx(100 * (4 / 5 + 3 / 4) / 2)  # accumulated, then averaged
    assert result["map"] == pytest.approx(100 * (0.5 + 1.0) / 2)
    assert result["images"] == 2


def test_segmentation_meter_constant_map_is_background_and_bad_input_raises():
    meter = SegmentationMeter()
    with pytest.raises(ValueError, match="before any update"):
        meter.compute()
    meter.update(torch.full((1, 2, 2), 3.0), torch.tensor([[[1, 0], [0, 0]]]))
    result = meter.compute()
    assert result["pixel_acc"] == pytest.approx(75.0)
    assert result["miou"] == pytest.approx(100 * (3 / 4 + 0) / 2)
    with pytest.raises(ValueError, match="same shape"):
        meter.update(torch.rand(1, 4, 4), torch.ones(1, 2, 2))


class PixelProbe(nn.Module):
    """Predicts class 1 while pixel (0, 0) of channel 0 is still 1, class 0 once it is removed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = x[:, 0, 0, 0]
        return torch.stack([1 - kept, kept], dim=1)


def test_perturbation_curve_hand_computed():
    images = torch.ones(2, 1, 2, 2)
    labels = torch.tensor([1, 1])
    # image 1 ranks pixel (0, 0) first; image 2 ranks it third
    relevance = torch.tensor([[[4.0, 3.0], [2.0, 1.0]], [[2.0, 1.0], [4.0, 3.0]]])
    fractions = (0.25, 0.5, 0.75)
    positive = perturbation_curve(PixelProbe(), images, labels, relevance, fractions, mode="positive")
    negative = perturbation_curve(PixelProbe(), images, labels, relevance, fractions, mode="negative")
    assert positive.tolist() == pytest.approx([50.0, 50.0, 0.0])
    assert negative.tolist() == pytest.approx([100.0, 50.0, 50.0])


def test_perturb_fills_per_channel_and_counts_pixels():
    images = torch.zeros(1, 2, 2, 2)
    relevance = torch.tensor([[[0.1, 0.9], [0.5, 0.2]]])
    out = perturb(images, relevance, 0.3, fill=(7.0, -1.0))  # int(4 * 0.3) = 1 pixel: (0, 1)
    assert out[0, :, 0, 1].tolist() == [7.0, -1.0]
    assert int((out != 0).sum()) == 2
    with pytest.raises(ValueError, match="mode"):
        perturb(images, relevance, 0.3, mode="random")
    with pytest.raises(ValueError, match="match images"):
        perturb(images, torch.rand(1, 3, 3), 0.3)


def test_area_under_curve_trapezoid():
    assert area_under_curve((0.1, 0.5, 0.9), torch.tensor([10.0, 20.0, 40.0])) == pytest.approx(18.0)
    with pytest.raises(ValueError):
        area_under_curve((0.1, 0.5), [1.0, 2.0, 3.0])
