"""Where timm users already work: model arguments, the model card and Hub push, NaFlexVit,
and the recipes of docs/integrations.md (accelerate, Lightning, torch.compile, autocast,
gradient checkpointing), each on a tiny random-weight model on the CPU."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from timm.data import resolve_model_data_config

from conftest import tiny_images, tiny_model
from relevance_finetune import cli
from relevance_finetune.data import model_data_config
from relevance_finetune.models import create_model, merge_model_kwargs, parse_model_kwarg
from test_train import SyntheticMasked, write_masked_folder

TINY_VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "depth=1", "embed_dim=32", "num_heads=2",
            "patch_size=8"]


# -- --model-kwargs and --img-size ---------------------------------------------------------------
def test_model_kwargs_are_read_as_timm_reads_them():
    assert parse_model_kwarg("depth=2") == ("depth", 2)
    assert parse_model_kwarg("drop_path_rate=0.1") == ("drop_path_rate", 0.1)
    assert parse_model_kwarg("img_size=(32, 24)") == ("img_size", (32, 24))
    assert parse_model_kwarg("global_pool=avg") == ("global_pool", "avg")  # not a literal: the string
    assert parse_model_kwarg("class_token=False") == ("class_token", False)
    for bad in ("depth", "=2", "two words=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE"):
            parse_model_kwarg(bad)


@pytest.mark.parametrize("command, required", [
    ("train", []), ("masks", ["--images", "i", "--out", "o"]), ("evaluate", ["--out", "o"]), ("explain", ["i", "--out", "o"])])
def test_every_model_command_takes_model_kwargs_and_img_size(command, required, capsys):
    args = cli.build_parser(command).parse_args(
        [command, *required, "--model", "m", "--model-kwargs", "depth=1", "global_pool=avg", "--img-size", "48"])
    assert args.model_kwargs == {"depth": 1, "global_pool": "avg"} and args.img_size == 48
    for bad in (["--img-size", "0"], ["--model-kwargs", "depth"]):
        with pytest.raises(SystemExit):
            cli.build_parser(command).parse_args([command, *required, "--model", "m", *bad])
        assert "expected" in capsys.readouterr().err


def test_img_size_and_model_kwargs_merge_into_one_call():
    assert merge_model_kwargs({"depth": 1}, img_size=48, num_classes=None) == {"depth": 1, "img_size": 48}
    assert merge_model_kwargs({"img_size": 48}, img_size=48) == {"img_size": 48}
    with pytest.raises(ValueError, match="img_size is given twice"):
        merge_model_kwargs({"img_size": 32}, img_size=48)
    with pytest.raises(ValueError, match="does not take the arguments"):
        create_model("vit_tiny_patch16_224", no_such_argument=1)


def test_train_then_export_rebuild_the_configured_model(tmp_path):
    write_masked_folder(tmp_path / "data", per_class=2)
    run = tmp_path / "run"
    assert cli.main(["train", *TINY_VIT, "--img-size", "24", "--num-classes", "2", "--data",
                     str(tmp_path / "data"), "--out", str(run), "--epochs", "1", "--batch-size", "2",
                     "--workers", "0", "--no-progress"]) == 0
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["img_size"] == 24 and recorded["model_kwargs"]["patch_size"] == 8
    assert cli.main(["export", str(run / "last.safetensors"), "--out", str(tmp_path / "export")]) == 0
    exported = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)
    assert tuple(exported.patch_embed.img_size) == (24, 24) and len(exported.blocks) == 1


def test_explain_feeds_the_size_the_model_was_built_for(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert cli.main(["explain", *TINY_VIT, "num_classes=3", "--img-size", "48", str(tmp_path / "a.png"),
                     "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["images"][0]["top5"]


def test_data_config_follows_the_size_the_model_was_built_for():
    model = tiny_model(img_size=48)
    assert resolve_model_data_config(model)["input_size"] != (3, 48, 48)  # timm's: the pretrained size
    assert model_data_config(model)["input_size"] == (3, 48, 48)
