"""RelevanceRegularizer and the input-gradient baselines against hand-computed equations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_images, tiny_model
from relevance_finetune import InputGradientRegularizer, RelevanceRegularizer, attach_gae
from relevance_finetune.losses import prepare_masks


def _setup(seed=0, **kwargs):
    model = tiny_model("vit_cls", seed=seed)
    images = tiny_images(model)
    gae = attach_gae(model, **kwargs)
    masks = torch.zeros(2, 32, 32)
    masks[:, 8:24, 4:20] = 1
    return model, images, gae, masks


def test_loss_equals_equations_by_hand():
    model, images, gae, masks = _setup()
    labels = torch.tensor([1, 4])
    logits = model(images)
    out = RelevanceRegularizer(gae)(logits, masks, labels=labels)
    raw = gae.relevance(logits, labels).detach()
    up = F.interpolate(raw[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    r = (up - lo) / (hi - lo + 1e-8)
    l_bg = ((r * (1 - masks)) ** 2).mean()
    l_fg = ((r * masks - masks) ** 2).mean()
    l_cls = F.cross_entropy(logits.detach(), logits.detach().argmax(1))
    expected = 0.8 * (2.0 * l_bg + 0.3 * l_fg) + 0.2 * l_cls
    torch.testing.assert_close(out.background.detach(), l_bg)
    torch.testing.assert_close(out.foreground.detach(), l_fg)
    torch.testing.assert_close(out.classification.detach(), l_cls)
    torch.testing.assert_close(out.loss.detach(), expected)
    assert out.relevance.shape == (2, 32, 32)


def test_gradients_reach_every_block_and_second_order_changes_them():
    grads = {}
    for second_order in (False, True):
        model, images, gae, masks = _setup(second_order=second_order)
        out = RelevanceRegularizer(gae, lambda_classification=0)(model(images), masks)
        out.loss.backward()
        for block in model.blocks:
            assert block.attn.qkv.weight.grad is not None
            assert block.attn.qkv.weight.grad.abs().sum() > 0
        grads[second_order] = torch.cat([b.attn.qkv.weight.grad.flatten() for b in model.blocks])
    assert not torch.allclose(grads[False], grads[True])


def test_constant_gradients_do_not_train_the_value_path_of_the_last_block():
    """With constant gradients the loss reaches the weights only through the attention maps."""
    model, images, gae, masks = _setup()
    RelevanceRegularizer(gae, lambda_classification=0)(model(images), masks).loss.backward()
    assert model.head.weight.grad is None or model.head.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("switch, expect_none", [
    (dict(lambda_bg=0), {"background"}),
    (dict(lambda_fg=0), {"foreground"}),
    (dict(lambda_classification=0), {"classification"}),
    (dict(classification="off"), {"classification"}),
    (dict(lambda_relevance=0), {"background", "foreground", "relevance"}),
])
def test_each_switch_changes_only_its_term(switch, expect_none):
    model, images, gae, masks = _setup()
    logits = model(images)
    full = RelevanceRegularizer(gae)(logits, masks)
    part = RelevanceRegularizer(gae, **switch)(logits, masks)
    for name in ("background", "foreground", "classification", "relevance"):
        if name in expect_none:
            assert getattr(part, name) is None
        else:
            torch.testing.assert_close(getattr(part, name), getattr(full, name))
    assert not torch.allclose(part.loss, full.loss)


def test_relevance_only_off_skips_autograd(monkeypatch):
    model, images, gae, masks = _setup()
    logits = model(images)
    monkeypatch.setattr(gae, "relevance", lambda *a, **k: pytest.fail("relevance computed"))
    RelevanceRegularizer(gae, lambda_relevance=0)(logits, masks)


def test_ground_truth_and_temperature_and_target():
    model, images, gae, masks = _setup()
    labels = torch.tensor([0, 2])
    logits = model(images)
    gt = RelevanceRegularizer(gae, classification="ground_truth")(logits, masks, labels=labels)
    torch.testing.assert_close(gt.classification, F.cross_entropy(logits, labels))
    warm = RelevanceRegularizer(gae, temperature=0.5)(logits, masks)
    torch.testing.assert_close(warm.classification, F.cross_entropy(logits / 0.5, logits.argmax(1)))
    by_label = RelevanceRegularizer(gae)(logits, masks, labels=labels)
    by_pred = RelevanceRegularizer(gae, relevance_target="prediction")(logits, masks, labels=labels)
    assert not torch.allclose(by_label.relevance, by_pred.relevance)
    with pytest.raises(ValueError, match="needs labels"):
        RelevanceRegularizer(gae, classification="ground_truth")(logits, masks)


def test_constant_map_gives_zero_not_nan():
    from relevance_finetune.gae import normalize_relevance
    out = normalize_relevance(torch.full((2, 4, 4), 3.0))
    assert torch.equal(out, torch.zeros(2, 4, 4))


@pytest.mark.parametrize("masks", [
    torch.ones(2, 1, 16, 16, dtype=torch.bool),
    torch.ones(2, 16, 16, dtype=torch.uint8),
    torch.full((2, 16, 16), 0.5),
])
def test_mask_encodings_and_resolutions(masks):
    model, images, gae, _ = _setup()
    out = RelevanceRegularizer(gae)(model(images), masks)
    assert out.relevance.shape == (2, 16, 16) and torch.isfinite(out.loss)


@pytest.mark.parametrize("masks, error, match", [
    (torch.ones(3, 32, 32), ValueError, "3 images"),
    (torch.ones(2, 2, 32, 32), ValueError, "shape"),
    (torch.full((2, 32, 32), 1.5), ValueError, r"\[0, 1\]"),
    (torch.full((2, 32, 32), float("nan")), ValueError, "NaN"),
    (torch.full((2, 32, 32), 255, dtype=torch.uint8), ValueError, "0/255"),
    (torch.ones(2, 32, 32, dtype=torch.int64), TypeError, "int64"),
    ([[1]], TypeError, "torch.Tensor"),
])
def test_bad_masks(masks, error, match):
    with pytest.raises(error, match=match):
        prepare_masks(masks, batch_size=2)


def test_masks_before_any_forward():
    model = tiny_model()
    with attach_gae(model) as gae:
        with pytest.raises(RuntimeError, match="no complete forward"):
            RelevanceRegularizer(gae)(torch.zeros(2, 5), torch.ones(2, 32, 32))


def test_masks_of_another_aspect_ratio_are_refused():
    model, images, gae, _ = _setup()
    with pytest.raises(ValueError, match="masks of 24x32 .* do not have the images' aspect ratio"):
        RelevanceRegularizer(gae)(model(images), torch.ones(2, 24, 32))


def test_distilled_training_tuple_says_what_to_pass():
    model = tiny_model("deit_distilled").train()
    model.set_distilled_training(True)
    with attach_gae(model) as gae:
        logits = model(tiny_images(model))
        assert isinstance(logits, tuple)
        with pytest.raises(TypeError, match=r"\(a \+ b\) / 2"):
            RelevanceRegularizer(gae)(logits, torch.ones(2, 32, 32))
        out = RelevanceRegularizer(gae)((logits[0] + logits[1]) / 2, torch.ones(2, 32, 32))
        assert torch.isfinite(out.loss)


def test_criterion_after_remove_says_the_handle_was_removed():
    model, images, gae, masks = _setup()
    criterion = RelevanceRegularizer(gae)
    gae.remove()
    with pytest.raises(RuntimeError, match="handle was removed"):
        criterion(model(images), masks)


def test_bad_settings():
    model = tiny_model()
    with attach_gae(model) as gae:
        with pytest.raises(ValueError, match="classification"):
            RelevanceRegularizer(gae, classification="soft")
        with pytest.raises(ValueError, match="temperature"):
            RelevanceRegularizer(gae, temperature=0)
    with pytest.raises(TypeError, match="attach_gae"):
        RelevanceRegularizer(model)


@pytest.mark.parametrize("method", ["gradmask", "rrr"])
def test_input_gradient_baselines_train_the_penalty(method):
    model, images, gae, masks = _setup()
    images.requires_grad_(True)
    labels = torch.tensor([1, 3])
    logits = model(images)
    out = InputGradientRegularizer(method, lambda_classification=0)(logits, images, masks, labels)
    (grad,) = torch.autograd.grad(
        logits.gather(1, labels[:, None]).sum() if method == "gradmask" else F.log_softmax(logits, 1).sum(),
        images, retain_graph=True)
    penalised = grad * (1 - masks)[:, None]
    expected = penalised.square().mean() if method == "gradmask" else penalised.square().sum()
    torch.testing.assert_close(out.mask_penalty.detach(), expected)
    out.loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # create_graph: the penalty trains


def test_input_gradient_needs_grad_images():
    model, images, gae, masks = _setup()
    logits = model(images)
    with pytest.raises(ValueError, match="requires_grad_"):
        InputGradientRegularizer("rrr")(logits, images, masks, torch.tensor([0, 1]))
