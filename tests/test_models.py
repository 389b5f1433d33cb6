"""models.py: one meaning of a model name in every command (which weights a name loads)."""
from __future__ import annotations

import pytest
import timm
import torch

from conftest import cli_error, tiny_model
from relevance_finetune import attach_gae
from relevance_finetune.models import build_model, create_model, loads_source_weights, unasked_random_weights
from test_train_runs import TINY_RANDOM


@pytest.fixture
def hub(tmp_path) -> str:
    """A tiny random ViT saved with timm's save_for_hf: the offline stand-in for hub weights."""
    timm.models.save_for_hf(tiny_model(seed=3), tmp_path / "hub", safe_serialization=True)
    return f"local-dir:{tmp_path / 'hub'}"


def same_weights(model: torch.nn.Module, other: torch.nn.Module) -> bool:
    state = other.state_dict()
    return all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_the_rule():
    assert loads_source_weights("local-dir:x") and loads_source_weights("hf-hub:org/name")
    assert not loads_source_weights("vit_tiny_patch16_224") and loads_source_weights("vit_tiny_patch16_224", True)
    assert not loads_source_weights("local-dir:x", checkpoint="w.safetensors")  # the checkpoint replaces them
    assert not loads_source_weights("local-dir:x", random_weights=True)
    for other in (dict(pretrained=True), dict(checkpoint="w.safetensors")):
        with pytest.raises(ValueError, match="random weights exclude --pretrained and --checkpoint"):
            loads_source_weights("local-dir:x", random_weights=True, **other)


def test_a_local_dir_name_means_its_weights(hub):
    saved = tiny_model(seed=3)
    for seed in (0, 1):  # a random initialisation would differ between the two
        torch.manual_seed(seed)
        assert same_weights(create_model(hub), saved)
    assert same_weights(build_model(hub), saved)  # evaluate's path agrees
    assert not same_weights(create_model(hub, random_weights=True), saved)


def test_a_checkpoint_replaces_the_names_weights(hub, tmp_path):
    other = tiny_model(seed=4)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    assert same_weights(create_model(hub, checkpoint=tmp_path / "other.pth"), other)


def test_a_missing_local_dir_is_one_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match=f"cannot load 'local-dir:{tmp_path / 'nowhere'}'.*save_for_hf"):
        create_model(f"local-dir:{tmp_path / 'nowhere'}")


def test_random_weights_nobody_asked_for_are_named(hub):
    assert "has random weights" in unasked_random_weights("vit_tiny_patch16_224")
    assert unasked_random_weights("vit_tiny_patch16_224", random_weights=True) is None
    assert unasked_random_weights("vit_tiny_patch16_224", pretrained=True) is None
    assert unasked_random_weights("vit_tiny_patch16_224", checkpoint="w.safetensors") is None
    assert unasked_random_weights(hub) is None


def test_an_image_size_the_patches_do_not_divide_is_refused_naming_the_sizes_they_do(tmp_path, capsys):
    """img_size 30 with 8-pixel patches: a 3x3 grid would cover 24 of the 30 pixels a map is stretched over."""
    with pytest.raises(ValueError, match=r"30x30 are not a multiple of the patch size 8x8 .* use 24x24 or 32x32"):
        create_model("vit_tiny_patch16_224", img_size=30, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    assert create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32,
                        num_heads=2).patch_embed.grid_size == (4, 4)
    error = cli_error(capsys, ["train", *TINY_RANDOM[:2], "--img-size", "30", *TINY_RANDOM[4:], "--data",
                               str(tmp_path), "--out", str(tmp_path / "run")])
    assert "patch size 8x8" in error and "use 24x24 or 32x32" in error and "--img-size" in error
    assert not (tmp_path / "run").exists()


def test_attach_gae_refuses_a_fixed_size_model_whose_size_the_patches_do_not_divide():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=30, patch_size=8, depth=1,
                              embed_dim=32, num_heads=2)
    with attach_gae(model) as gae, pytest.raises(ValueError, match="not a multiple of the patch size 8x8"):
        gae.explain(torch.rand(1, 3, 30, 30))
