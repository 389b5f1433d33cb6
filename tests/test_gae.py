"""attach_gae: the relevance equals a naive N x N GAE; recording, restoring and bad input."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import TINY_MODELS, tiny_images, tiny_model
from relevance_finetune import RelevanceRegularizer, UnsupportedModelError, attach_gae, explicit_attention
from relevance_finetune.gae import recording as gae_module
from relevance_finetune.gae.fused import SDPACall, SDPACapture, fused_increment


def naive_gae(model, images, target=None, second_order=None):
    """The reference algorithm: own hooks, one autograd.grad per block, full N x N rollout.

    Detached by default; with ``second_order`` set, differentiable (the map gradients too if True).
    """
    maps = []
    hooks = [m.attn_drop.register_forward_hook(lambda mod, args, out: maps.append(args[0]))
             for m in model.modules() if hasattr(m, "attn_drop") and hasattr(m, "fused_attn")]
    with explicit_attention(model):
        logits = model(images)
    for hook in hooks:
        hook.remove()
    target = logits.argmax(1) if target is None else target
    score = logits[torch.arange(len(images)), target].sum()
    batch, _, tokens, _ = maps[0].shape
    rollout = torch.eye(tokens).expand(batch, tokens, tokens)
    for attn in maps:
        (grad,) = torch.autograd.grad(score, attn, retain_graph=True, create_graph=bool(second_order))
        cam = (grad * attn).clamp(min=0).mean(1)
        rollout = rollout + cam @ rollout
    rollout = rollout - torch.eye(tokens)  # relevance is what the blocks add to the identity
    prefix = model.num_prefix_tokens
    if model.global_pool == "token":
        row = rollout[:, :2].mean(1) if getattr(model, "dist_token", None) is not None else rollout[:, 0]
    else:
        row = rollout[:, prefix:].mean(1)
    gh, gw = model.patch_embed.grid_size
    row = row[:, prefix:].reshape(batch, gh, gw)
    return row.detach() if second_order is None else row


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("given_target", [False, True])
def test_relevance_matches_naive_gae(model_key, second_order, given_target):
    model = tiny_model(model_key)
    images = tiny_images(model)
    target = torch.tensor([3, 1]) if given_target else None
    expected = naive_gae(model, images, target)
    with attach_gae(model, second_order=second_order) as gae:
        logits = model(images)
        relevance = gae.relevance(logits, target)
    assert relevance.shape == expected.shape
    torch.testing.assert_close(relevance.detach(), expected, rtol=1e-4, atol=1e-6)
    assert relevance.requires_grad


@pytest.mark.parametrize("second_order", [False, True])
def test_weight_gradients_match_naive_gae(second_order):
    """A loss on the relevance trains the weights exactly as through the naive GAE."""
    model = tiny_model("vit_cls")
    images = tiny_images(model)
    weights = torch.rand(2, *model.patch_embed.grid_size)

    def weight_grads(relevance):
        model.zero_grad()
        (relevance * weights).sum().backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.blocks.parameters()]

    expected = weight_grads(naive_gae(model, images, second_order=second_order))
    with attach_gae(model, second_order=second_order) as gae:
        got = weight_grads(gae.relevance(model(images)))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_relevance_under_no_grad_is_detached_and_equal():
    model = tiny_model("vit_cls")
    images = tiny_images(model)
    with attach_gae(model) as gae:
        logits = model(images)
        maps = [m.clone() for m in gae.attention_maps]
        with torch.no_grad():
            detached = gae.relevance(logits)
        attached = gae.relevance(logits)
        for before, after in zip(maps, gae.attention_maps):
            assert torch.equal(before, after)  # the in-place rollout leaves the maps alone
    assert not detached.requires_grad and attached.requires_grad
    torch.testing.assert_close(detached, attached.detach())


def test_readout_rows_differ_between_pools():
    """The CLS row and the patch-mean row are different rows: the pool really selects."""
    model = tiny_model("vit_cls")
    images = tiny_images(model)
    with attach_gae(model) as gae:
        token = gae.relevance(model(images)).detach()
    model.global_pool = "avg"
    with attach_gae(model) as gae:
        avg = gae.relevance(model(images)).detach()
    assert not torch.allclose(token, avg)


def test_grid_non_square_and_dynamic_size():
    model = tiny_model("vit_cls", img_size=(32, 48))
    with attach_gae(model) as gae:
        assert gae.relevance(model(torch.randn(2, 3, 32, 48))).shape == (2, 4, 6)
    dynamic = tiny_model("vit_cls", dynamic_img_size=True)
    with attach_gae(dynamic) as gae:
        assert gae.relevance(dynamic(torch.randn(1, 3, 40, 24))).shape == (1, 5, 3)
        assert gae.explain(torch.randn(1, 3, 40, 24)).shape == (1, 40, 24)


def test_remove_restores_fused_path_and_outputs():
    model = tiny_model("vit_cls")
    images = tiny_images(model)
    attn = model.blocks[0].attn
    fused_before = attn.fused_attn
    with torch.no_grad():
        before = model(images)
    gae = attach_gae(model)
    assert attn.fused_attn is False
    gae.remove()
    assert attn.fused_attn == fused_before
    with torch.no_grad():
        after = model(images)
    assert torch.equal(before, after)
    with attach_gae(model):
        pass
    assert attn.fused_attn == fused_before
    assert not attn.attn_drop._forward_hooks


def test_attach_twice_raises_until_removed():
    model = tiny_model()
    gae = attach_gae(model)
    with pytest.raises(RuntimeError, match="already attached"):
        attach_gae(model)
    gae.remove()
    attach_gae(model).remove()


def test_wrappers_are_unwrapped_and_record_the_wrapped_forward(tmp_path):
    """DataParallel (no GPU: it calls the model), DDP and torch.compile: the handle instruments the
    inner model, and the wrapper's forward gives the bare model's relevance."""
    import torch.distributed as dist
    model = tiny_model()
    images = tiny_images(model)
    with attach_gae(model) as gae:
        expected = gae.relevance(model(images)).detach()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrappers = [torch.nn.DataParallel(model), torch.nn.parallel.DistributedDataParallel(model),
                    torch.compile(model, backend="eager")]
        for wrapper in wrappers:
            with attach_gae(wrapper) as gae:
                assert gae.model is model
                torch.testing.assert_close(gae.relevance(wrapper(images)).detach(), expected)
    finally:
        dist.destroy_process_group()


def test_attach_through_another_wrapper_is_refused_and_remove_restores_fused():
    model = tiny_model()
    attn = model.blocks[0].attn
    fused_before = attn.fused_attn
    gae = attach_gae(model)
    for wrapper in (torch.compile(model, backend="eager"), torch.nn.Sequential(model)):
        with pytest.raises(RuntimeError, match="already attached to this .*'s attention"):
            attach_gae(wrapper)
    gae.remove()
    assert attn.fused_attn == fused_before
    attach_gae(torch.compile(model, backend="eager")).remove()
    assert attn.fused_attn == fused_before


def test_a_removed_handle_says_so():
    model = tiny_model()
    gae = attach_gae(model)
    gae.remove()
    logits = model(tiny_images(model))
    with pytest.raises(RuntimeError, match="handle was removed"):
        gae.relevance(logits)


def test_explain_needs_a_batch():
    model = tiny_model()
    with attach_gae(model) as gae:
        with pytest.raises(ValueError, match=r"\(B, C, H, W\), got shape \(3, 32, 32\): add the batch dimension"):
            gae.explain(tiny_images(model)[0])


def test_no_grad_forward_is_refused():
    model = tiny_model()
    images = tiny_images(model)
    with attach_gae(model) as gae:
        model(images).sum()  # a forward with grad...
        with torch.no_grad():
            logits = model(images)  # ...then one without: its maps replace the earlier ones
        with pytest.raises(RuntimeError, match="without gradients"):
            gae.relevance(logits)


def test_logits_of_an_earlier_forward_are_refused():
    model = tiny_model()
    images = tiny_images(model)
    with attach_gae(model) as gae:
        old_logits = model(images)
        model(images + 1)
        with pytest.raises(RuntimeError, match="latest recorded forward"):
            gae.relevance(old_logits)


def test_relevance_before_any_forward_is_refused():
    model = tiny_model()
    with attach_gae(model) as gae:
        with pytest.raises(RuntimeError, match="no complete forward"):
            gae.relevance(torch.zeros(2, 5))


@pytest.mark.parametrize("attention", ["explicit", "fused"])
def test_gradient_checkpointing_keeps_the_first_forward_maps(attention):
    model = tiny_model()
    images = tiny_images(model)
    with attach_gae(model) as gae:
        expected = gae.relevance(model(images)).detach()
    model.set_grad_checkpointing(True)
    model.train()  # timm checkpoints only in training mode; dropout rates are 0
    with attach_gae(model, attention=attention) as gae:
        logits = model(images)
        maps = gae.attention_maps
        relevance = gae.relevance(logits)
        relevance.sum().backward()  # re-runs the blocks: their maps must not be recorded
        assert all(a is b for a, b in zip(maps, gae.attention_maps))
    torch.testing.assert_close(relevance.detach(), expected, rtol=1e-4, atol=1e-6)


def test_explain_restores_mode_and_caller_maps():
    model = tiny_model().train()
    images = tiny_images(model)
    with attach_gae(model) as gae:
        logits = model(images)
        maps = gae.attention_maps
        heat = gae.explain(images)
        assert model.training
        assert all(a is b for a, b in zip(maps, gae.attention_maps))
        gae.relevance(logits)  # still usable after explain
        raw = gae.explain(images, normalize=False, upsample=False)
    assert heat.shape == (2, 32, 32) and not heat.requires_grad
    assert heat.min() >= 0 and heat.max() <= 1
    assert raw.shape == (2, 4, 4)
    assert all(p.grad is None for p in model.parameters())


def test_explain_target_selects_classes():
    model = tiny_model()
    images = tiny_images(model)
    with attach_gae(model) as gae:
        a = gae.explain(images, target=0, normalize=False, upsample=False)
        b = gae.explain(images, target=torch.tensor([1, 2]), normalize=False, upsample=False)
        assert not torch.allclose(a, b)
        with pytest.raises(ValueError, match="target classes"):
            gae.explain(images, target=7)
        with pytest.raises(ValueError, match="target must be"):
            gae.explain(images, target=torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("name, kwargs, match", [
    ("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=24, depths=(1, 1), num_heads=(1, 1)), "WindowAttention"),
    ("xcit_nano_12_p16_224", dict(img_size=32, depth=1), "XCA"),
    ("resnet18", dict(), "patch_embed"),
    ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1, global_pool="map"), "global_pool='map'"),
])
def test_unsupported_models_fail_clearly(name, kwargs, match):
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)
    with pytest.raises(UnsupportedModelError, match=match) as info:
        attach_gae(model)
    assert type(model).__name__ in str(info.value)


def test_attach_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        attach_gae("vit_base_patch16_224")


def test_second_order_needs_and_gets_explicit_attention():
    """A double backward through SDPA fails; through the attached model it works."""
    model = tiny_model()
    images = tiny_images(model).requires_grad_(True)
    if model.blocks[0].attn.fused_attn:
        (grad,) = torch.autograd.grad(model(images).sum(), images, create_graph=True)
        with pytest.raises(RuntimeError, match="not implemented"):
            grad.square().sum().backward()
        model.zero_grad()
    with attach_gae(model, second_order=True):
        logits = model(images)
        (grad,) = torch.autograd.grad(logits.sum(), images, create_graph=True)
        grad.square().sum().backward()
        assert model.blocks[0].attn.qkv.weight.grad is not None
        assert F.cross_entropy(logits, logits.argmax(1)).isfinite()


def test_attention_arguments_pass_through_while_attached():
    """attach_gae never replaces forward: an attention mask still reaches the explicit path."""
    import inspect
    model = tiny_model()
    attn = model.blocks[0].attn
    if "attn_mask" not in inspect.signature(attn.forward).parameters:
        pytest.skip("this timm's Attention.forward takes no attn_mask")
    x = torch.randn(1, 17, 32)
    mask = torch.ones(17, 17, dtype=torch.bool).tril()
    with torch.no_grad():
        fused = attn(x, attn_mask=mask)
        with attach_gae(model):
            explicit = attn(x, attn_mask=mask)
            unmasked = attn(x)
    torch.testing.assert_close(explicit, fused, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(explicit, unmasked)


# -- attention="fused" and "auto" ------------------------------------------------------------

def relevance_and_grads(model, images, attention, chunk_elements=None):
    """Raw relevance and the paper loss's parameter gradients (flattened) in one attention mode."""
    masks = torch.zeros(len(images), *images.shape[-2:])
    masks[:, 4:-4, 4:-4] = 1
    model.zero_grad()
    with attach_gae(model, attention=attention) as gae:
        if chunk_elements:
            gae.chunk_elements = chunk_elements
        out = RelevanceRegularizer(gae)(model(images), masks, labels=torch.tensor([1, 2]))
        out.loss.backward()
        recorded = gae.attention_maps
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return out.relevance.detach(), grads, recorded


def assert_relative(got, expected, tol=1e-5):
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= tol * expected.abs().max()


@pytest.mark.parametrize("model_key, dynamic", [(key, False) for key in sorted(TINY_MODELS)]
                         + [("vit_cls", True), ("eva", True)])
def test_fused_equals_explicit(model_key, dynamic):
    """Relevance and the loss's gradients agree to 1e-5, with the maps rebuilt in several chunks."""
    model = tiny_model(model_key, **(dict(dynamic_img_size=True) if dynamic else {}))
    patch = model.patch_embed.patch_size[0]
    images = torch.randn(2, 3, 5 * patch, 3 * patch) if dynamic else tiny_images(model)
    explicit, explicit_grads, maps = relevance_and_grads(model, images, "explicit")
    fused, fused_grads, calls = relevance_and_grads(model, images, "fused", chunk_elements=100)
    assert all(isinstance(m, torch.Tensor) for m in maps)
    assert all(isinstance(c, SDPACall) for c in calls)
    assert_relative(fused, explicit)
    assert_relative(fused_grads, explicit_grads)


def test_fused_keeps_the_model_as_it_runs():
    """The fused forward is the model's own: same logits, fused flags kept, restored on remove."""
    model = tiny_model()
    images = tiny_images(model)
    attn = model.blocks[0].attn
    attn.fused_attn = False  # as with TIMM_FUSED_ATTN=0
    with torch.no_grad():
        before = model(images)
    with attach_gae(model, attention="fused") as gae:
        assert attn.fused_attn is True
        logits = model(images)
        explained = gae.explain(images, normalize=False, upsample=False)
        torch.testing.assert_close(gae.relevance(logits).detach(), explained)
    torch.testing.assert_close(logits.detach(), before, rtol=1e-5, atol=1e-6)
    assert attn.fused_attn is False
    assert not attn._forward_hooks and not attn._forward_pre_hooks


def test_fused_refuses_second_order_and_dropout():
    model = tiny_model()
    images = tiny_images(model)
    with pytest.raises(ValueError, match="attention='explicit'"):
        attach_gae(model, second_order=True, attention="fused")
    with pytest.raises(ValueError, match="attention must be one of"):
        attach_gae(model, attention="flash")
    with attach_gae(model, attention="fused") as gae:
        with pytest.raises(ValueError, match="attention='explicit'"):
            gae.relevance(model(images), second_order=True)
    dropout = tiny_model(attn_drop_rate=0.1).train()
    with attach_gae(dropout, attention="fused") as gae:
        with pytest.raises(RuntimeError, match="attention dropout .*attention='explicit'"):
            gae.relevance(dropout(images))
    with attach_gae(dropout, attention="auto") as gae:  # falls back to the explicit path
        gae.relevance(dropout(images)).sum().backward()
        assert isinstance(gae.attention_maps[0], torch.Tensor)


def test_auto_switches_by_token_count(monkeypatch):
    monkeypatch.setattr(gae_module, "AUTO_FUSED_TOKENS", 20)
    model = tiny_model(dynamic_img_size=True)
    with attach_gae(model, attention="auto") as gae:
        model(torch.randn(1, 3, 32, 32))  # 16 patches + CLS
        assert isinstance(gae.attention_maps[0], torch.Tensor)
        model(torch.randn(1, 3, 40, 40))  # 25 patches + CLS
        assert isinstance(gae.attention_maps[0], SDPACall)
        assert model.blocks[0].attn.fused_attn
    with attach_gae(model, second_order=True, attention="auto") as gae:
        model(torch.randn(1, 3, 40, 40))
        assert isinstance(gae.attention_maps[0], torch.Tensor)


@pytest.mark.parametrize("mask", ["bool", "causal"])
def test_fused_increment_reads_masks(mask):
    """SDPA's boolean and causal masks become the bias of the rebuilt maps."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 4, generator=generator) for _ in range(3))
    allowed = torch.rand(7, 7, generator=generator) > 0.3
    allowed.fill_diagonal_(True)
    if mask == "causal":
        allowed = torch.ones(7, 7, dtype=torch.bool).tril()
    kwargs = dict(is_causal=True) if mask == "causal" else dict(attn_mask=allowed)
    calls = []
    with SDPACapture(calls.append):
        F.scaled_dot_product_attention(q, k, v, **kwargs)
    grad_out, row = torch.rand(2, 3, 7, 4, generator=generator), torch.rand(2, 7, generator=generator)
    attn = (q @ k.transpose(-2, -1) / 2).masked_fill(~allowed, float("-inf")).softmax(-1)
    cam = ((grad_out @ v.transpose(-2, -1)).clamp(min=0) * attn).mean(1)
    expected = torch.einsum("bn,bnm->bm", row, cam)
    torch.testing.assert_close(fused_increment(row, calls[0], grad_out, chunk_elements=20), expected)


@pytest.mark.parametrize("attention", ["explicit", "fused"])
def test_avg_pool_small_increments_survive(attention):
    """An avg-pool model whose rollout gains ~1e-10 beside the 1/N readout: the map survives."""
    model = tiny_model("vit_reg_avg", depth=1)
    images = tiny_images(model)
    with attach_gae(model) as gae:
        expected = gae.explain(images, upsample=False)
    with torch.no_grad():  # depth 1: the relevance scales with the head, its normalised map does not
        model.head.weight.mul_(1e-8)
        model.head.bias.mul_(1e-8)
    with attach_gae(model, attention=attention) as gae:
        got = gae.explain(images, upsample=False)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
