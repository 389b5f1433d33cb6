"""Segmentation and perturbation metrics against values computed by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from relevance_finetune.metrics import (
    group_accuracy,
    SegmentationMeter, area_under_curve, average_precision, perturb, perturbation_curve, pointing_game,
    relevance_mass_accuracy, relevance_rank_accuracy)


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


@pytest.mark.parametrize("mask", [[[1, 0], [0, 0]], [[1, 1], [1, 0]], [[0, 0], [0, 1]]])
def test_constant_map_scores_ap_one_half_whatever_the_mask(mask):
    # the reference: min-max without epsilon gives NaN, then 0 in both AP channels: every score
    # tied, so AP = share of positives among the 2 x labelled entries = 1/2
    # (the 0/1 channels [1, 0] of before gave 68.75% for the first mask)
    meter = SegmentationMeter()
    meter.update(torch.zeros(1, 2, 2), torch.tensor([mask]))
    assert meter.compute()["map"] == pytest.approx(50.0)


def test_pixels_labelled_minus_one_are_ignored_by_every_metric():
    # raw [[4, 3], [0, 0]] -> [[1, .75], [0, 0]], mean .4375 -> fg at (0, 0) and (0, 1);
    # (0, 1) is ignored, the 3 labelled pixels are all right.  Counted, it would give
    # pixel acc 3/4, IoU bg 2/3 fg 1/2, AP .95
    meter = SegmentationMeter()
    meter.update(torch.tensor([[[4.0, 3.0], [0.0, 0.0]]]), torch.tensor([[[1, -1], [0, 0]]]))
    result = meter.compute()
    assert (result["pixel_acc"], result["miou"], result["map"]) == pytest.approx((100.0, 100.0, 100.0))


# -- localisation ------------------------------------------------------------------------------------
LOCALISATION_RELEVANCE = torch.tensor([
    [[0.9, 0.5, 0.0], [0.5, 0.2, 0.5]],   # K = 3 with a three-way tie at the 3rd value
    [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]],   # the maximum misses the object
    [[5.0, 1.0, 0.0], [0.0, 0.0, 0.0]],   # the maximum is on an ignored pixel
    [[0.3, 0.3, 0.3], [0.3, 0.3, 0.3]],   # constant
    [[0.3, 0.2, 0.1], [0.0, 0.0, 0.0]],   # no object
])
LOCALISATION_MASKS = torch.tensor([
    [[1, 0, 0], [1, 1, 0]],
    [[1, 0, 0], [0, 0, 0]],
    [[-1, 1, 0], [0, 0, 0]],
    [[1, 0, 0], [0, 0, 0]],
    [[0, 0, 0], [0, 0, 0]],
])


def _scores(values: torch.Tensor) -> list[float | None]:
    return [None if v != v else pytest.approx(v) for v in values.tolist()]


def test_relevance_mass_accuracy_hand_computed():
    # (.9 + .5 + .2) / 2.6; 0 / 1; 1 / 1 (the 5 is ignored); 1/6 of a uniform map; no object
    scores = relevance_mass_accuracy(LOCALISATION_RELEVANCE, LOCALISATION_MASKS)
    assert _scores(scores) == [pytest.approx(1.6 / 2.6), 0.0, 1.0, pytest.approx(1 / 6), None]
    assert relevance_mass_accuracy(torch.zeros(1, 2, 2), torch.ones(1, 2, 2)).tolist() == [0.0]  # no mass


def test_relevance_rank_accuracy_hand_computed():
    # image 1: .9 is on the object; the last 2 places go to three tied .5 of which one is on it:
    # (1 + 2/3) / 3.  Constant map: the one object pixel holds 1/6 of the single place.
    scores = relevance_rank_accuracy(LOCALISATION_RELEVANCE, LOCALISATION_MASKS)
    assert _scores(scores) == [pytest.approx(5 / 9), 0.0, 1.0, pytest.approx(1 / 6), None]
    untied = relevance_rank_accuracy(torch.tensor([[[4.0, 3.0], [2.0, 1.0]]]), torch.tensor([[[1, 0], [1, 0]]]))
    assert untied.tolist() == [0.5]  # top-2 = {4, 3}, one on the object


def test_pointing_game_hand_computed():
    # a constant map hits (every pixel holds the maximum), as Quantus counts it
    scores = pointing_game(LOCALISATION_RELEVANCE, LOCALISATION_MASKS[:, None])
    assert _scores(scores) == [1.0, 0.0, 1.0, 1.0, None]


def test_segmentation_meter_reports_localisation_means():
    meter = SegmentationMeter()
    meter.update(LOCALISATION_RELEVANCE, LOCALISATION_MASKS)
    result = meter.compute()
    # the meter scores the min-max normalised maps: the constant map becomes all-zero (mass 0)
    # and image 1 becomes [[1, .556, 0], [.556, .222, .556]]: mass (1 + .556 + .222) / 2.889
    mass_1 = (1 + 5 / 9 + 2 / 9) / (1 + 3 * 5 / 9 + 2 / 9)
    assert result["mass_accuracy"] == pytest.approx(100 * (mass_1 + 0 + 1 + 0) / 4)
    assert result["rank_accuracy"] == pytest.approx(100 * (5 / 9 + 0 + 1 + 1 / 6) / 4)
    assert result["pointing_game"] == pytest.approx(100 * 3 / 4)
    assert result["localised_images"] == 4 and result["images"] == 5


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


def _reference_segmentation(maps: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The behaviour of the reference segmentation test (imagenet_seg_eval.py), restated image by
    image in float32: min-max without epsilon, NaN -> 0, ties to the first channel, -1 ignored."""
    from sklearn.metrics import average_precision_score
    correct = labeled = 0
    inter, union, aps = np.zeros(2), np.zeros(2), []
    for res, lab in zip(maps.float(), labels.long()):
        res = (res - res.min()) / (res.max() - res.min())
        mean = res.mean()
        channels = torch.stack([res.le(mean), res.gt(mean)]).float()
        ap_channels = torch.nan_to_num(torch.stack([1 - res, res]), nan=0.0)
        pred = channels.max(dim=0).indices  # first index on ties (a constant map: background)
        keep = lab != -1
        correct += int((pred[keep] == lab[keep]).sum())
        labeled += int(keep.sum())
        for c in (0, 1):
            p, t = (pred == c) & keep, (lab == c) & keep
            inter[c] += int((p & t).sum())
            union[c] += int((p | t).sum())
        onehot = torch.stack([lab == 0, lab == 1])
        aps.append(average_precision_score(onehot[:, keep].numpy().ravel(), ap_channels[:, keep].numpy().ravel()))
    return {"pixel_acc": 100 * correct / labeled, "miou": 100 * float(np.mean(inter / union)),
            "map": 100 * float(np.mean(aps))}


def test_segmentation_meter_matches_the_reference_on_ties_constants_and_ignored_pixels():
    pytest.importorskip("sklearn")
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(24, 16, 16, generator=generator)
    maps[:8] = (maps[:8] * 4).floor()        # few distinct values: ties at the mean and in AP
    maps[8:10] = 0.25                        # constant maps
    maps[10] = maps[10] * 1e-7 + 1.0         # spans a few float32 steps
    labels = (torch.rand(24, 16, 16, generator=generator) > 0.6).long()
    labels[12:18, :3] = -1                   # ignored borders
    meter = SegmentationMeter()
    meter.update(maps, labels)
    result, reference = meter.compute(), _reference_segmentation(maps, labels)
    for key in reference:
        assert result[key] == pytest.approx(reference[key], abs=1e-9), key


def test_group_accuracy_hand_computed():
    predictions = torch.tensor([0, 1, 1, 0, 1, 1, 0])
    labels = torch.tensor([0, 1, 0, 0, 1, 0, 0])
    groups = torch.tensor([0, 3, 1, 1, 3, 2, 0])
    result = group_accuracy(predictions, labels, groups, train_group_counts={0: 6, 1: 2, 2: 1, 3: 1})
    assert result["groups"] == {0: {"accuracy": 1.0, "count": 2}, 1: {"accuracy": 0.5, "count": 2},
                                2: {"accuracy": 0.0, "count": 1}, 3: {"accuracy": 1.0, "count": 2}}
    assert result["worst_group_accuracy"] == 0.0
    assert result["mean_accuracy"] == pytest.approx(5 / 7)
    assert result["weighted_mean_accuracy"] == pytest.approx(0.6 * 1.0 + 0.2 * 0.5 + 0.1 * 0.0 + 0.1 * 1.0)
    assert group_accuracy(predictions.numpy(), labels.tolist(), groups)["weighted_mean_accuracy"] is None


def test_group_accuracy_bad_input():
    with pytest.raises(ValueError, match=r"group\(s\) \[5\]"):
        group_accuracy([0, 1], [0, 1], [0, 1], train_group_counts={0: 1, 1: 1, 5: 3})
    with pytest.raises(ValueError, match="no samples"):
        group_accuracy([], [], [])
    with pytest.raises(ValueError, match="same length"):
        group_accuracy([0, 1], [0], [0, 1])
    with pytest.raises(TypeError, match="integers"):
        group_accuracy([0.5], [0], [0])
