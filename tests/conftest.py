"""Shared fixtures: tiny random-weight timm transformers (no network)."""
from __future__ import annotations

import os

import pytest
import timm
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # small models: more threads only spin on a shared machine

# name -> (timm model, kwargs): one small config per supported family / readout
TINY_MODELS = {
    "vit_cls": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)),
    "vit_reg_avg": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                                                  reg_tokens=2, global_pool="avg")),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32,
                                                                num_heads=2)),
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)),
    "eva": ("eva02_tiny_patch14_224", dict(img_size=28, patch_size=7, depth=2, embed_dim=32, num_heads=2)),
}


def tiny_model(key: str = "vit_cls", num_classes: int = 5, seed: int = 0, **overrides) -> torch.nn.Module:
    name, kwargs = TINY_MODELS[key]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **{**kwargs, **overrides})
    return model.eval()


def tiny_images(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    size = model.patch_embed.img_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=generator)


def cli_error(capsys, argv: list[str]) -> str:
    """Run the command on bad input; assert it fails with one line and no traceback; return the line."""
    from relevance_finetune import cli
    capsys.readouterr()
    assert cli.main(argv) != 0
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error, error
    return error


@pytest.fixture(params=sorted(TINY_MODELS))
def model_key(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and OpenMP spinning hurts on a shared machine; a module
    takes it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
