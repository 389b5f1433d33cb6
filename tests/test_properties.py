"""Property-based tests (Hypothesis) of the public API: generated inputs end in a finite result or a
one-line ValueError/TypeError, never a NaN, a crash from deep inside torch or a silent wrong answer.
The NaNs that remain are documented: a localisation score of an image without foreground, and the
loss of non-finite images (which the training loop stops on).

Covers ``attach_gae`` (relevance and ``explain``), ``RelevanceRegularizer``, the metrics and
``BackgroundSwap`` over batch sizes 1..4, mask and model dtypes, empty/full/NaN/inf masks, odd patch
grids and image sizes. The tiny models are built once per module; every test is derandomized.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from relevance_finetune import RelevanceRegularizer, attach_gae
from relevance_finetune.augment import BackgroundSwap
from relevance_finetune.metrics import (LOCALISATION_METRICS, SegmentationMeter, area_under_curve,
                                        average_precision, perturb)


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
MASK_DTYPES = FLOATS + (torch.bool, torch.uint8)
# name -> (conftest key, overrides): every readout, every family, a 3x5 grid, dynamic sizes
MODELS = {
    "vit_cls": ("vit_cls", {}),
    "vit_reg_avg": ("vit_reg_avg", {}),
    "deit_distilled": ("deit_distilled", {}),
    "beit": ("beit", {}),
    "eva": ("eva", {}),
    "grid_3x5": ("vit_cls", dict(img_size=(24, 40))),
    "dynamic": ("vit_cls", dict(dynamic_img_size=True)),
    "dynamic_pad": ("vit_cls", dict(dynamic_img_size=True, dynamic_img_pad=True)),
}
NUM_CLASSES = 5


@functools.cache
def _attached(name: str, dtype: torch.dtype = torch.float32):
    """A tiny model of ``MODELS[name]`` in ``dtype`` with its GAE handle, built once per module."""
    key, overrides = MODELS[name]
    model = tiny_model(key, num_classes=NUM_CLASSES, **overrides).to(dtype)
    return model, attach_gae(model)


def _images(model: torch.nn.Module, batch: int, seed: int, size=None, dtype=torch.float32) -> torch.Tensor:
    size = size or model.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _mask(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A valid foreground mask: all background, all object, random binary or soft values, or the left half."""
    values = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    half = (torch.arange(shape[-1]) < shape[-1] // 2).float().expand(shape)
    mask = {"zeros": torch.zeros(shape), "ones": torch.ones(shape), "half": half,
            "binary": (values > 0.5).float(), "soft": values}[kind]
    if dtype in (torch.bool, torch.uint8):
        mask = mask > 0.5
    return mask.to(dtype)


def _refused(call, *args, **kwargs) -> str:
    """Assert that ``call`` raises a ValueError or TypeError with a one-line message; return it."""
    with pytest.raises((ValueError, TypeError)) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert message.strip() and "\n" not in message, repr(message)
    return message


def _finite(*tensors: torch.Tensor | None) -> None:
    for tensor in tensors:
        if tensor is not None:
            assert torch.isfinite(tensor).all(), tensor


masks = st.fixed_dictionaries({
    "kind": st.sampled_from(["zeros", "ones", "binary", "soft"]),
    "dtype": st.sampled_from(MASK_DTYPES),
    "channel": st.booleans(),  # (B, 1, H, W) instead of (B, H, W)
    "scale": st.integers(1, 6),  # mask pixels per patch, along each side
    "seed": st.integers(0, 2 ** 16),
})


# -- RelevanceRegularizer and attach_gae ---------------------------------------------------------------
@_settings(30)
@given(
    name=st.sampled_from(sorted(MODELS)),
    batch=st.integers(1, 4),
    mask=masks,
    labels=st.one_of(st.none(), st.integers(0, NUM_CLASSES - 1), st.just("tensor")),
    lambdas=st.tuples(st.sampled_from([0.0, 0.3, 2.0]), st.sampled_from([0.0, 0.3]),
                      st.sampled_from([0.0, 0.8])),
    classification=st.sampled_from(["confidence", "ground_truth", "off"]),
    relevance_target=st.sampled_from(["label", "prediction"]),
)
@example(name="vit_cls", batch=2, mask=dict(kind="zeros", dtype=torch.float32, channel=False, scale=1, seed=0),
         labels=1, lambdas=(2.0, 0.3, 0.8), classification="ground_truth", relevance_target="prediction")
def test_regularizer_is_finite_for_valid_masks(name, batch, mask, labels, lambdas, classification, relevance_target):
    model, gae = _attached(name)
    if labels == "tensor":
        labels = torch.arange(batch) % NUM_CLASSES
    if labels is None and classification == "ground_truth":
        classification = "confidence"
    lambda_bg, lambda_fg, lambda_relevance = lambdas
    criterion = RelevanceRegularizer(gae, lambda_bg=lambda_bg, lambda_fg=lambda_fg,
                                     lambda_relevance=lambda_relevance, classification=classification,
                                     relevance_target=relevance_target)
    images = _images(model, batch, mask["seed"])
    logits = model(images)
    gh, gw = gae.grid_size()
    lead = (batch, 1) if mask["channel"] else (batch,)
    shape = (*lead, gh * mask["scale"], gw * mask["scale"])
    out = criterion(logits, _mask(mask["kind"], shape, mask["dtype"], mask["seed"]), labels=labels)
    _finite(out.loss, out.background, out.foreground, out.classification, out.relevance)
    if out.relevance is not None:
        assert out.relevance.shape == (batch, *shape[-2:])
        assert out.relevance.min() >= 0 and out.relevance.max() <= 1
    if out.loss.requires_grad:
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        _finite(*(p.grad for p in model.parameters()))


bad_masks = st.sampled_from(["nan", "inf", "-inf", "above_one", "negative", "uint8_255", "int64", "empty",
                             "wrong_batch", "wrong_rank", "wrong_aspect", "not_tensor"])


@_settings(15)
@given(name=st.sampled_from(sorted(MODELS)), batch=st.integers(1, 4), bad=bad_masks,
       dtype=st.sampled_from(FLOATS), seed=st.integers(0, 2 ** 16))
@example(name="vit_cls", batch=2, bad="empty", dtype=torch.float32, seed=0)
def test_regularizer_refuses_bad_masks(name, batch, bad, dtype, seed):
    model, gae = _attached(name)
    logits = model(_images(model, batch, seed))
    gh, gw = gae.grid_size()
    mask = torch.rand(batch, gh * 2, gw * 2, generator=torch.Generator().manual_seed(seed))
    corrupt = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf"), "above_one": 1.5, "negative": -0.5}
    if bad in corrupt:
        mask.view(-1)[seed % mask.numel()] = corrupt[bad]
        mask = mask.to(dtype)
    else:
        mask = {"uint8_255": (mask > 0.5).to(torch.uint8) * 255, "int64": (mask > 0.5).long(),
                "empty": mask[:, :0], "wrong_batch": mask[:1].expand(batch + 1, -1, -1),
                "wrong_rank": mask[:, None, None], "wrong_aspect": mask.new_ones(batch, gw * 4, gh * 4 + 8),
                "not_tensor": mask.tolist()}[bad]
    _refused(RelevanceRegularizer(gae), logits, mask)


@_settings(10)
@given(name=st.sampled_from(["vit_cls", "deit_distilled", "grid_3x5"]), batch=st.integers(1, 4),
       bad=st.sampled_from(["float", "too_large", "negative", "wrong_shape", "bool"]),
       relevance=st.booleans())
def test_regularizer_refuses_bad_labels(name, batch, bad, relevance):
    """Labels are checked whether they reach the relevance, the cross-entropy or both."""
    model, gae = _attached(name)
    labels = {"float": torch.full((batch,), 1.5), "too_large": torch.full((batch,), NUM_CLASSES),
              "negative": torch.full((batch,), -1), "wrong_shape": torch.zeros(batch + 1, dtype=torch.long),
              "bool": torch.ones(batch, dtype=torch.bool)}[bad]
    criterion = RelevanceRegularizer(gae, classification="ground_truth", lambda_relevance=0.8 * relevance)
    _refused(criterion, model(_images(model, batch, 0)), torch.ones(batch, *gae.grid_size()), labels=labels)


@_settings(6)
@given(name=st.sampled_from(["vit_cls", "vit_reg_avg", "eva"]), batch=st.integers(1, 4),
       value=st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_nonfinite_images_give_a_nonfinite_loss_and_are_refused_by_explain(name, batch, value):
    """The loss stays NaN or inf (never masked to a finite value) for the training loop to stop on in
    every process; ``explain``, which no loop checks, refuses the images."""
    model, gae = _attached(name)
    images = _images(model, batch, 0)
    images[-1, 0, 0, 0] = value
    out = RelevanceRegularizer(gae)(model(images), torch.ones(batch, *gae.grid_size()))
    assert not torch.isfinite(out.loss)
    _refused(gae.explain, images)


@_settings(10)
@given(name=st.sampled_from(["vit_cls", "vit_reg_avg", "beit"]), dtype=st.sampled_from(FLOATS),
       batch=st.integers(1, 4), kind=st.sampled_from(["zeros", "ones", "soft"]))
def test_models_in_any_float_dtype(name, dtype, batch, kind):
    model, gae = _attached(name, dtype)
    images = _images(model, batch, 0, dtype=dtype)
    out = RelevanceRegularizer(gae)(model(images), _mask(kind, (batch, 32, 32), torch.float32, 0))
    _finite(out.loss, out.relevance)
    heat = gae.explain(images)
    assert heat.dtype == torch.float32 and heat.shape == (batch, *images.shape[-2:])
    assert heat.min() >= 0 and heat.max() <= 1


@_settings(12)
@given(name=st.sampled_from(sorted(MODELS)), batch=st.integers(1, 4),
       target=st.one_of(st.none(), st.integers(0, NUM_CLASSES - 1), st.just("tensor")),
       normalize=st.booleans(), upsample=st.booleans())
def test_explain_shapes_and_range(name, batch, target, normalize, upsample):
    model, gae = _attached(name)
    images = _images(model, batch, batch)
    if target == "tensor":
        target = torch.arange(batch) % NUM_CLASSES
    heat = gae.explain(images, target=target, normalize=normalize, upsample=upsample)
    size = images.shape[-2:] if upsample else gae.grid_size()
    assert heat.shape == (batch, *size)
    _finite(heat)
    if normalize:
        assert heat.min() >= 0 and heat.max() <= 1


@_settings(10)
@given(name=st.sampled_from(["dynamic", "dynamic_pad", "grid_3x5"]), batch=st.integers(1, 3),
       height=st.integers(1, 44), width=st.integers(1, 44))
@example(name="dynamic", batch=1, height=30, width=32)
@example(name="grid_3x5", batch=1, height=40, width=24)
def test_image_sizes_the_patch_embedding_cannot_take_are_refused(name, batch, height, width):
    """Dynamic models take multiples of the patch size (any size with padding); fixed ones their own size."""
    model, gae = _attached(name)
    patch = model.patch_embed.patch_size
    embed = model.patch_embed
    fits = (embed.dynamic_img_pad or (height % patch[0] == 0 and width % patch[1] == 0)) \
        if not embed.strict_img_size else (height, width) == tuple(embed.img_size)
    images = _images(model, batch, 0, size=(height, width))
    if not fits:
        _refused(gae.explain, images)
        return
    heat = gae.explain(images)
    assert heat.shape == (batch, height, width)
    _finite(heat)


# -- metrics ------------------------------------------------------------------------------------------
def _relevance(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    values = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    return {"random": values, "constant": torch.full(shape, 0.25), "zeros": torch.zeros(shape),
            "ties": (values * 3).round() / 3, "signed": values - 0.5}[kind].to(dtype)


def _truth(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Masks with 1 = object, 0 = background, -1 = ignored."""
    values = torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1))
    binary = (values > 0.5).float()
    return {"empty": torch.zeros(shape), "full": torch.ones(shape), "binary": binary, "soft": values,
            "ignored": torch.where(values < 0.2, -1.0, binary), "all_ignored": -torch.ones(shape)}[kind]


maps = st.fixed_dictionaries({
    "batch": st.integers(1, 4), "height": st.integers(1, 12), "width": st.integers(1, 12),
    "relevance": st.sampled_from(["random", "constant", "zeros", "ties", "signed"]),
    "masks": st.sampled_from(["empty", "full", "binary", "soft", "ignored", "all_ignored"]),
    "dtype": st.sampled_from(FLOATS), "seed": st.integers(0, 2 ** 16),
})


def _maps(spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (spec["batch"], spec["height"], spec["width"])
    return _relevance(spec["relevance"], shape, spec["dtype"], spec["seed"]), _truth(spec["masks"], shape, spec["seed"])


@_settings(15)
@given(spec=maps)
def test_segmentation_meter_scores_are_finite_percentages(spec):
    relevance, masks = _maps(spec)
    meter = SegmentationMeter()
    meter.update(relevance, masks)
    result = meter.compute()
    localised = int(((masks > 0.5) & (masks >= 0)).flatten(1).any(1).sum())
    assert result["images"] == spec["batch"] and result["localised_images"] == localised
    for name in ("pixel_acc", "miou", "map", *LOCALISATION_METRICS):
        if name in LOCALISATION_METRICS and not localised:
            assert result[name] is None
        else:
            assert np.isfinite(result[name]) and 0 <= result[name] <= 100, (name, result[name])


@_settings(15)
@given(spec=maps)
def test_localisation_scores_are_nan_exactly_without_foreground(spec):
    relevance, masks = _maps(spec)
    foreground = ((masks > 0.5) & (masks >= 0)).flatten(1).any(1)
    for name, metric in LOCALISATION_METRICS.items():
        scores = metric(relevance, masks)
        assert scores.shape == (spec["batch"],) and scores.dtype == torch.float64
        assert torch.equal(scores.isnan(), ~foreground), name
        assert torch.isfinite(scores[foreground]).all(), name
        if spec["relevance"] != "signed":
            assert ((scores[foreground] >= 0) & (scores[foreground] <= 1)).all(), (name, scores)


@_settings(12)
@given(spec=maps, where=st.sampled_from(["relevance", "masks"]),
       value=st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_metrics_refuse_nonfinite_maps(spec, where, value):
    relevance, masks = _maps(spec)
    target = relevance if where == "relevance" else masks
    target.view(-1)[spec["seed"] % target.numel()] = value
    _refused(SegmentationMeter().update, relevance, masks)
    for metric in LOCALISATION_METRICS.values():
        _refused(metric, relevance, masks)
    if where == "relevance":
        images = torch.zeros(spec["batch"], 3, spec["height"], spec["width"])
        _refused(perturb, images, relevance, 0.5)
        _refused(average_precision, relevance.float().numpy(), masks.numpy() > 0.5)


@_settings(5)
@given(batch=st.integers(1, 4), empty=st.sampled_from([(0, 5), (5, 0), (0, 0)]))
def test_metrics_refuse_empty_maps(batch, empty):
    relevance = torch.rand(batch, *empty)
    _refused(SegmentationMeter().update, relevance, relevance)
    for metric in LOCALISATION_METRICS.values():
        _refused(metric, relevance, relevance)


@_settings(10)
@given(spec=maps, fraction=st.floats(0, 1), mode=st.sampled_from(["positive", "negative"]),
       image_dtype=st.sampled_from(FLOATS), channels=st.integers(1, 3))
def test_perturb_replaces_the_requested_share(spec, fraction, mode, image_dtype, channels):
    relevance, _ = _maps(spec)
    batch, height, width = relevance.shape
    images = torch.rand(batch, channels, height, width).to(image_dtype) + 1  # never equal to the fill 0
    out = perturb(images, relevance, fraction, mode)
    assert out.shape == images.shape and out.dtype == images.dtype
    _finite(out)
    removed = (out == 0).all(dim=1).flatten(1).sum(1)
    assert (removed == int(height * width * fraction)).all()


@_settings(5)
@given(accuracy=st.lists(st.sampled_from([float("nan"), float("inf"), 50.0]), min_size=3, max_size=3)
       .filter(lambda values: not all(np.isfinite(values))))
def test_area_under_curve_refuses_nonfinite_accuracy(accuracy):
    _refused(area_under_curve, [0.1, 0.5, 0.9], accuracy)


# -- BackgroundSwap (public behaviour only) -------------------------------------------------------------
swaps = st.fixed_dictionaries({
    "batch": st.integers(1, 4), "height": st.integers(8, 24), "width": st.integers(8, 24),
    "masks": st.sampled_from(["zeros", "ones", "binary", "soft", "half"]), "channel": st.booleans(),
    "dtype": st.sampled_from(FLOATS), "p": st.sampled_from([0.0, 0.5, 1.0]),
    "object_only": st.sampled_from([0.0, 1.0]), "fill": st.sampled_from(["inpaint", "mean"]),
    "seed": st.integers(0, 2 ** 16),
})


def _swap(spec: dict) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    shape = (spec["batch"], spec["height"], spec["width"])
    generator = torch.Generator().manual_seed(spec["seed"])
    images = torch.rand(spec["batch"], 3, *shape[1:], generator=generator).to(spec["dtype"])
    masks = _mask(spec["masks"], shape, torch.float32, spec["seed"])
    masks = masks[:, None] if spec["channel"] else masks
    swap = BackgroundSwap(p=spec["p"], object_only=spec["object_only"], fill=spec["fill"], seed=spec["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning about all-background or all-object masks
        return images, masks, swap(images, masks)


@_settings(15)
@given(spec=swaps)
def test_background_swap_keeps_shapes_and_finite_values(spec):
    images, masks, (out_images, out_masks) = _swap(spec)
    assert out_images.shape == images.shape and out_images.dtype == images.dtype
    assert out_masks.shape == masks.shape
    _finite(out_images.float(), out_masks.float())
    assert out_masks.min() >= 0 and out_masks.max() <= 1


@_settings(5)
@given(spec=swaps, value=st.sampled_from([float("nan"), float("inf"), -float("inf"), 2.0, -1.0]))
def test_background_swap_refuses_bad_masks(spec, value):
    shape = (spec["batch"], spec["height"], spec["width"])
    masks = _mask("soft", shape, torch.float32, spec["seed"])
    masks.view(-1)[spec["seed"] % masks.numel()] = value
    _refused(BackgroundSwap(seed=0), torch.rand(spec["batch"], 3, *shape[1:]), masks)


@_settings(8)
@given(steps=st.lists(st.fixed_dictionaries({
    "batch": st.integers(1, 3), "size": st.sampled_from([(8, 8), (12, 8)]), "dtype": st.sampled_from(FLOATS),
    "masks": st.sampled_from(["zeros", "binary", "half"]), "seed": st.integers(0, 2 ** 16)}), min_size=2, max_size=4))
def test_background_swap_across_calls(steps):
    """One augmentation over batches of changing size and dtype (its donors may come from earlier calls)."""
    swap = BackgroundSwap(seed=0)
    for step in steps:
        shape = (step["batch"], *step["size"])
        images = torch.rand(step["batch"], 3, *step["size"], generator=torch.Generator().manual_seed(step["seed"]))
        images = images.to(step["dtype"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, masks = swap(images, _mask(step["masks"], shape, torch.float32, step["seed"]))
        assert out.shape == images.shape and out.dtype == images.dtype and masks.shape == shape
        _finite(out.float())


@pytest.mark.parametrize("height, width", [(1, 2), (1, 8), (2, 40)])
def test_background_swap_on_small_or_elongated_images(height, width):
    spec = {"batch": 2, "height": height, "width": width, "masks": "half", "channel": False,
            "dtype": torch.float32, "p": 1.0, "object_only": 0.0, "fill": "inpaint", "seed": 3}
    images, masks, (out_images, _) = _swap(spec)
    assert out_images.shape == images.shape
    _finite(out_images)


def test_background_swap_on_an_empty_batch():
    images, masks = torch.rand(0, 3, 8, 8), torch.rand(0, 8, 8)
    out_images, out_masks = BackgroundSwap(seed=0)(images, masks)
    assert out_images.shape == images.shape and out_masks.shape == masks.shape
