"""timm's RoPE ViTs (``AttentionRope``) and the message for attention that GAE does not support."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from conftest import tiny_images
from relevance_finetune import attach_gae
from relevance_finetune.gae import UnsupportedModelError

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5)


@pytest.mark.parametrize("name", ["vit_small_patch16_rope_224", "vit_small_patch16_rope_mixed_ape_224"])
def test_rope_vits_are_explained_alike_on_both_paths(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **TINY).eval()
    assert type(model.blocks[0].attn).__name__ == "AttentionRope"
    images = tiny_images(model)
    relevance = {}
    for attention in ("explicit", "fused"):
        with attach_gae(model, attention=attention) as gae:
            relevance[attention] = gae.relevance(model(images))
    assert relevance["explicit"].shape == (2, 4, 4) and relevance["explicit"].abs().sum() > 0
    torch.testing.assert_close(relevance["fused"], relevance["explicit"])


class OwnAttention(nn.Module):
    """An attention module of no supported family."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.proj(x)


def test_unsupported_attention_is_named_with_its_path():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY)
    for block in model.blocks:
        block.attn = OwnAttention(model.embed_dim)
    with pytest.raises(UnsupportedModelError) as error:
        attach_gae(model)
    message = str(error.value)
    assert f"found {__name__}.OwnAttention at blocks.0.attn" in message
    assert "timm.layers.attention.AttentionRope (vit_*_rope_* ViTs, RoPE)" in message
    assert "timm.models.eva.EvaAttention" in message
