"""relevance_finetune.gae.fused: the chunked increment kernel against autograd, chunk sizes, fallbacks."""
from __future__ import annotations

import warnings

import pytest
import torch

from relevance_finetune import attach_gae
from relevance_finetune.gae import fused
from relevance_finetune.gae.fused import FusedIncrement, SDPACall, chunk_rows, fused_increment

from conftest import tiny_images, tiny_model


def operands(tokens=7, bias_shape=(2, 3, 7, 7), dtype=torch.float64, seed=0):
    """row (B, N), q, k, v, grad_out (B, heads, N, d), a bias of ``bias_shape`` (or None)."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v, grad_out = (torch.randn(2, 3, tokens, 4, generator=generator, dtype=dtype) for _ in range(4))
    row = torch.rand(2, tokens, generator=generator, dtype=dtype)
    bias = None if bias_shape is None else torch.randn(*bias_shape, generator=generator, dtype=dtype)
    return row, q, k, v, grad_out, bias


def autograd_increment(row, q, k, v, grad_out, bias, scale=0.5):
    """The increment by plain autograd operators on the whole (B, heads, N, N) map."""
    scores = (q * scale) @ k.transpose(-2, -1)
    attn = (scores if bias is None else scores + bias).softmax(-1)
    cam = ((grad_out @ v.transpose(-2, -1)).clamp(min=0) * attn).mean(1)
    return torch.einsum("bn,bnm->bm", row, cam.to(row.dtype))


@pytest.mark.parametrize("bias_shape", [None, (2, 3, 7, 7), (3, 7, 7), (1, 3, 7, 7), (2, 1, 1, 7)])
@pytest.mark.parametrize("rows", [1, 3, 7, 20])
def test_kernel_gradients_are_exact(bias_shape, rows):
    """gradcheck of row, q, k and the bias; rows that do not divide N, and more rows than N."""
    row, q, k, v, grad_out, bias = operands(bias_shape=bias_shape)
    inputs = [t.requires_grad_() for t in (row, q, k) + (() if bias is None else (bias,))]

    def increment(row, q, k, bias=None):
        return FusedIncrement.apply(row, q, k, bias, v, grad_out, 0.5, rows)

    assert torch.autograd.gradcheck(increment, inputs)
    torch.testing.assert_close(increment(*inputs), autograd_increment(row, q, k, v, grad_out, bias))


@pytest.mark.parametrize("bias_shape", [None, (1, 3, 7, 7)])
def test_kernel_from_a_given_log_sum_exp_is_exact(bias_shape):
    """With the softmax's log-sum-exp given (as SDPA's CPU flash kernel returns it): the increment
    and every gradient equal autograd's (no gradcheck: a fixed log-sum-exp does not follow q, k)."""
    row, q, k, v, grad_out, bias = operands(bias_shape=bias_shape)
    row[:, 5:] = 0  # rows the forward skips, which the row's gradient still needs
    scores = (q * 0.5) @ k.transpose(-2, -1)
    lse = (scores if bias is None else scores + bias).logsumexp(-1)
    leaves = [t.requires_grad_() for t in (row, q, k) + (() if bias is None else (bias,))]
    got = FusedIncrement.apply(*leaves[:3], bias, v, grad_out, 0.5, 3, lse)
    got.square().sum().backward()
    wide = [t.detach().requires_grad_() for t in leaves]
    expected = autograd_increment(*wide[:3], v, grad_out, wide[3] if bias is not None else None)
    expected.square().sum().backward()
    torch.testing.assert_close(got, expected)
    for leaf, reference in zip(leaves, wide):
        torch.testing.assert_close(leaf.grad, reference.grad)


def test_rows_the_readout_does_not_weight_are_skipped(monkeypatch):
    """A class-token readout row weights one query row: without the row's gradient, the forward and
    the backward build that row's chunk only, and still equal autograd."""
    row, q, k, v, grad_out, bias = operands(tokens=9, bias_shape=None)
    row = torch.zeros_like(row)
    row[:, 0] = 1.0
    built = []
    attention = fused._Chunks.attention
    monkeypatch.setattr(fused._Chunks, "attention", lambda self, start, stop: built.append((start, stop))
                        or attention(self, start, stop))
    leaves = [t.requires_grad_() for t in (q, k)]
    got = FusedIncrement.apply(row, *leaves, None, v, grad_out, 0.5, 2)
    got.square().sum().backward()
    assert built == [(0, 1), (0, 1)]
    wide = [t.detach().requires_grad_() for t in (q, k)]
    expected = autograd_increment(row, *wide, v, grad_out, None)
    expected.square().sum().backward()
    torch.testing.assert_close(got, expected)
    for leaf, reference in zip(leaves, wide):
        torch.testing.assert_close(leaf.grad, reference.grad)


def test_capture_keeps_the_cpu_flash_log_sum_exp():
    """On CPU the capture runs the flash kernel SDPA would run: the same output, and its
    log-sum-exp recorded; a boolean mask or autocast takes SDPA itself, without one."""
    q, k, v = (torch.randn(2, 3, 11, 8) for _ in range(3))
    bias = torch.randn(1, 3, 11, 11)
    calls = []
    with fused.SDPACapture(calls.append):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(11, 11, dtype=torch.bool))
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3))
    expected = ((q * 0.3) @ k.transpose(-2, -1) + bias).logsumexp(-1)
    torch.testing.assert_close(calls[0].lse, expected)
    assert calls[1].lse is None
    with torch.autocast("cpu", dtype=torch.bfloat16), fused.SDPACapture(calls.append):  # SDPA casts, so runs
        assert torch.nn.functional.scaled_dot_product_attention(q, k, v).dtype == torch.bfloat16
    assert calls[2].lse is None


def test_kernel_equals_autograd_in_float32_and_bfloat16():
    """float32 to 1e-5 relative. bfloat16 operands are computed in float32 chunk by chunk: the
    increment to 1e-5 of float32 autograd on the same operands, the gradients to bfloat16 rounding."""
    row, q, k, v, grad_out, bias = operands(tokens=23, bias_shape=(1, 3, 23, 23), dtype=torch.float32)
    for dtype, grad_tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, bias)]
        call = SDPACall(*leaves[:2], v.to(dtype), grad_out.to(dtype), leaves[2], 0.5, 0.0)
        got = fused_increment(row, call, grad_out.to(dtype), chunk_elements=3 * 2 * 3 * 23)  # 3 rows
        got.square().sum().backward()
        wide = [t.detach().float().requires_grad_() for t in leaves]
        expected = autograd_increment(row, wide[0], wide[1], v.to(dtype).float(), grad_out.to(dtype).float(), wide[2])
        expected.square().sum().backward()
        assert got.dtype == torch.float32 and leaves[0].grad.dtype == dtype
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
        for leaf, reference in zip(leaves, wide):
            assert (leaf.grad.float() - reference.grad).abs().max() <= grad_tol * reference.grad.abs().max()


def test_unhandled_dtype_falls_back_with_a_counted_warning(monkeypatch):
    monkeypatch.setattr(fused, "_KERNEL_DTYPES", {torch.float32: torch.float32})
    monkeypatch.setattr(fused, "FALLBACKS", fused.FALLBACKS.__class__())
    row, q, k, v, grad_out, bias = operands()
    call = SDPACall(q.requires_grad_(), k, v, grad_out, bias, 0.5, 0.0)
    with pytest.warns(UserWarning, match="does not handle torch.float64.*FALLBACKS"):
        first = fused_increment(row, call, grad_out, chunk_elements=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, counted every time
        fused_increment(row, call, grad_out, chunk_elements=50)
    assert fused.FALLBACKS[torch.float64] == 2
    torch.testing.assert_close(first, autograd_increment(row, q, k, v, grad_out, bias))
    first.sum().backward()
    assert q.grad is not None


def test_chunk_rows_from_tokens_and_free_memory(monkeypatch):
    cpu = torch.device("cpu")
    assert chunk_rows(2, 6, 1025, torch.float32, cpu, chunk_elements=2 ** 20) == 2 ** 20 // (12 * 1025)
    assert chunk_rows(2, 6, 1025, torch.float32, cpu, chunk_elements=5) == 1  # at least one row
    assert chunk_rows(2, 6, 17, torch.float32, cpu) == 17  # a small map is one chunk
    automatic = chunk_rows(2, 6, 1025, torch.float32, cpu)
    assert automatic * 12 * 1025 * 4 <= fused._CHUNK_BYTES["cpu"]
    assert chunk_rows(2, 6, 1025, torch.float64, cpu) == automatic // 2
    monkeypatch.setattr(fused, "free_memory", lambda device: 16 * 12 * 1025 * 4 * 10)  # room for 10 rows
    assert chunk_rows(2, 6, 1025, torch.float32, cpu) == 10
    with pytest.raises(ValueError, match="chunk_elements must be a positive number of elements, got 0"):
        chunk_rows(2, 6, 1025, torch.float32, cpu, chunk_elements=0)


def test_bad_gradients_are_refused():
    row, q, k, v, grad_out, bias = operands()
    call = SDPACall(q, k, v, grad_out, bias, 0.5, 0.0)
    with pytest.raises(ValueError, match=r"shape of the attention output \(2, 3, 7, 4\), got \(2, 3, 6, 4\)"):
        fused_increment(row, call, grad_out[..., :6, :])
    with pytest.raises(ValueError, match="constant .*attention='explicit'"):
        fused_increment(row, call, grad_out.requires_grad_())


@pytest.mark.parametrize("chunk_elements", [None, 7, 2 * 2 * 26 * 3])
def test_odd_token_counts_with_registers_and_dynamic_sizes(chunk_elements):
    """Register tokens and a dynamic 5x5 grid (26 or 29 tokens) in chunks that do not divide them."""
    for key, extra in (("vit_cls", {}), ("vit_reg_avg", {})):
        model = tiny_model(key, dynamic_img_size=True, **extra)
        images = torch.randn(2, 3, 40, 40)
        results = []
        for attention in ("explicit", "fused"):
            model.zero_grad()
            with attach_gae(model, attention=attention) as gae:
                gae.chunk_elements = chunk_elements
                relevance = gae.relevance(model(images), torch.tensor([0, 3]))
                relevance.square().sum().backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            results.append((relevance.detach(), grads))
        (explicit, explicit_grads), (got, got_grads) = results
        assert got.shape == (2, 5, 5)
        assert (got - explicit).abs().max() <= 1e-5 * explicit.abs().max()
        assert (got_grads - explicit_grads).abs().max() <= 1e-5 * explicit_grads.abs().max()


def test_explain_under_no_grad_needs_no_graph():
    model = tiny_model("beit")
    images = tiny_images(model)
    with attach_gae(model) as gae:
        expected = gae.explain(images, normalize=False, upsample=False)
    with attach_gae(model, attention="fused") as gae:
        gae.chunk_elements = 50
        torch.testing.assert_close(gae.explain(images, normalize=False, upsample=False), expected,
                                   rtol=1e-4, atol=1e-7)
