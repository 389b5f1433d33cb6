"""A user's own labelled folder end to end: the head fits the classes, runs repeat, the command says
what it trains on and what it chose, and a fresh run never overwrites another run's directory."""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from conftest import cli_error, tiny_model
from relevance_finetune import cli
from relevance_finetune.checkpoint import load_checkpoint
from relevance_finetune.train import finetune
from test_train import SyntheticMasked, assert_states_close, config, tiny_hub

CLASSES = ("cat", "dog", "fox")
TINY_RANDOM = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--model-kwargs", "patch_size=8", "depth=2",
               "embed_dim=32", "num_heads=2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_folder(root, classes=CLASSES, per_class: int = 2, size: int = 40) -> str:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / "images" / name).mkdir(parents=True)
        (root / "masks" / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "images" / name / f"{i}.jpg")
            mask = np.zeros((size, size), np.uint8)
            mask[8:30, 5:25] = 255
            Image.fromarray(mask).save(root / "masks" / name / f"{i}.png")
    return str(root)


def train_args(data: str, out, *more: str) -> list[str]:
    return ["train", "--data", data, "--out", str(out), "--epochs", "1", "--batch-size", "2", "--workers", "0",
            "--no-progress", "--lr", "1e-3", *more]


# -- classes from the data ------------------------------------------------------------------------------
def test_a_folder_of_three_classes_gets_a_three_class_head_with_its_names(tmp_path, caplog):
    data = write_folder(tmp_path / "data")
    hub = tiny_hub(tmp_path / "hub", num_classes=5)  # as an ImageNet model's 1000 outputs
    caplog.set_level(logging.INFO)
    assert cli.main(train_args(data, tmp_path / "run", "--model", hub, "--pretrained")) == 0
    assert "the data have 3 classes and the model 5 outputs: training a new 3-class head" in caplog.text
    weights, info, _ = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert weights["head.weight"].shape[0] == 3 and info["model"]["model_args"]["num_classes"] == 3
    assert info["model"]["pretrained_cfg"]["label_names"] == list(CLASSES)

    assert cli.main(["export", str(tmp_path / "run" / "last.safetensors"), "--out", str(tmp_path / "export")]) == 0
    exported = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)
    assert exported.num_classes == 3 and exported.pretrained_cfg["label_names"] == list(CLASSES)


def test_an_explicit_num_classes_that_cannot_hold_the_classes_is_one_line(tmp_path, capsys):
    data = write_folder(tmp_path / "data")
    error = cli_error(capsys, train_args(data, tmp_path / "run", "--model", tiny_hub(tmp_path / "hub"),
                                         "--num-classes", "2"))
    assert "class index 2 but the model has 2 classes: pass --num-classes 3" in error


def test_imagenet_wnid_folders_keep_the_model_head(tmp_path, caplog):
    """The first two ImageNet classes have the indices 0 and 1, as sorted folders would: still ImageNet's."""
    data = write_folder(tmp_path / "data", classes=("n01440764", "n01443537"))
    caplog.set_level(logging.INFO)
    assert cli.main(train_args(data, tmp_path / "run", "--model", tiny_hub(tmp_path / "hub"), "--pretrained")) == 0
    weights, _, _ = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert weights["head.weight"].shape[0] == 5 and "new" not in caplog.text


# -- repeatable runs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["replaced head", "random model"])
def test_the_same_command_and_seed_give_the_same_weights(tmp_path, model):
    data = write_folder(tmp_path / "data")
    flags = TINY_RANDOM if model == "random model" else ["--model", tiny_hub(tmp_path / "hub"), "--pretrained"]
    for run, earlier_draws in (("a", 1), ("b", 2)):
        torch.manual_seed(earlier_draws)  # whatever the process drew before
        assert cli.main(train_args(data, tmp_path / run, *flags, "--seed", "3")) == 0
    weights = load_file(tmp_path / "a" / "last.safetensors")
    assert weights["head.weight"].shape[0] == 3  # a new head for the folder's classes
    assert_states_close(weights, load_file(tmp_path / "b" / "last.safetensors"))
    assert cli.main(train_args(data, tmp_path / "c", *flags, "--seed", "4")) == 0
    assert not torch.equal(load_file(tmp_path / "a" / "last.safetensors")["head.weight"],
                           load_file(tmp_path / "c" / "last.safetensors")["head.weight"])


# -- what the command says -------------------------------------------------------------------------------
def test_the_command_summarises_the_data_and_the_chosen_epoch(tmp_path, caplog):
    data = write_folder(tmp_path / "data", per_class=3)
    (tmp_path / "data" / "masks" / "dog" / "0.png").unlink()
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    assert cli.main(train_args(data, out, "--model", tiny_hub(tmp_path / "hub", num_classes=3), "--pretrained",
                               "--skip-unmasked", "--val-fraction", "0.25", "--epochs", "2")) == 0
    assert ("train: 6 training images of 3 classes (cat, dog, fox), each with its mask; 2 validation images; "
            "left out: 1 image(s) without a mask (--skip-unmasked)\n") in caplog.text  # once: val is a view
    losses = [r["val_loss"] for r in load_checkpoint(out / "last.safetensors")[1]["history"]]
    assert (f"best.safetensors holds epoch {1 + losses.index(min(losses))} of 2 (--select paper: the lowest "
            f"validation loss); wrote config.yaml, metrics.jsonl, last.safetensors, best.safetensors in {out}"
            ) in caplog.text


def test_a_run_without_validation_says_why_there_is_no_best_checkpoint(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    finetune(tiny_model(num_classes=4), SyntheticMasked(4), None, config(out=str(tmp_path)))
    assert "no best.safetensors: no validation data (--val-data or --val-fraction)" in caplog.text


# -- the run directory -----------------------------------------------------------------------------------
def test_a_directory_with_another_runs_config_and_metrics_is_refused(tmp_path):
    finetune(tiny_model(num_classes=4), SyntheticMasked(4), None, config(out=str(tmp_path)))
    (tmp_path / "last.safetensors").unlink()  # e.g. the user removed the checkpoint, kept the record
    before = {name: (tmp_path / name).read_text() for name in ("config.yaml", "metrics.jsonl")}
    with pytest.raises(FileExistsError, match=r"already holds a run \(config.yaml, metrics.jsonl\): pass --resume "
                                              r".* --overwrite to replace it"):
        finetune(tiny_model(num_classes=4), SyntheticMasked(4), None, config(out=str(tmp_path), lr=1e-2))
    assert {name: (tmp_path / name).read_text() for name in before} == before


def test_overwrite_replaces_the_whole_run(tmp_path):
    finetune(tiny_model(num_classes=4), SyntheticMasked(4), SyntheticMasked(4, seed=1), config(out=str(tmp_path)))
    assert (tmp_path / "best.safetensors").is_file()
    finetune(tiny_model(num_classes=4), SyntheticMasked(4), None, config(out=str(tmp_path), lr=1e-2, overwrite=True))
    assert not (tmp_path / "best.safetensors").exists()  # not the old run's
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["lr"] == 1e-2
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_the_same_run_stopped_before_its_first_epoch_may_start_again(tmp_path):
    settings = config(out=str(tmp_path))
    tmp_path.joinpath("config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(settings)))
    tmp_path.joinpath("metrics.jsonl").write_text("")
    finetune(tiny_model(num_classes=4), SyntheticMasked(4), None, settings)
    assert (tmp_path / "last.safetensors").is_file()
