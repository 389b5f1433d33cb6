"""Which class index each folder gets in ``train``: the model's own ``label_names`` first, validation
classes by name, and what the command says when the data and the model disagree."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import timm
import torch

from conftest import cli_error, tiny_model
from relevance_finetune import cli
from relevance_finetune.checkpoint import load_checkpoint
from relevance_finetune.data import MaskedImageFolder, paired_transforms
from relevance_finetune.groups import csv_dataset
from test_train_runs import TINY_RANDOM, train_args, write_folder

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL_ORDER = ["face", "cat", "cup"]  # not sorted: sorted folders would index cat, cup, face


def hub_right_on(data: str, path, label_names=MODEL_ORDER, named: bool = True) -> str:
    """A tiny model whose head classifies every image of ``data`` right, in the order of ``label_names``
    (which it records if ``named``)."""
    model = tiny_model(num_classes=len(label_names))
    folder = MaskedImageFolder(data, paired_transforms(model, train=False))
    images = torch.stack([folder[i][0] for i in range(len(folder))])
    targets = torch.tensor([label_names.index(folder.classes[label]) for _, _, label in folder.samples])
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True)
        inputs = torch.cat([features, torch.ones(len(features), 1)], dim=1)
        solution = torch.linalg.lstsq(inputs.double(), 10 * torch.eye(len(label_names))[targets].double()).solution
        model.head.weight.copy_(solution[:-1].T)
        model.head.bias.copy_(solution[-1])
        assert torch.equal(model(images).argmax(1), targets)
    return labelled_hub(path, label_names if named else (), model)


def labelled_hub(path, label_names=MODEL_ORDER, model=None) -> str:
    """``model`` (a random tiny one by default) saved in timm's hub layout with these ``label_names`` (if any)."""
    model = model if model is not None else tiny_model(num_classes=len(label_names))
    names = {"label_names": list(label_names)} if label_names else {}
    timm.models.save_for_hf(model, path, model_config=names, safe_serialization=True)
    return f"local-dir:{path}"


def test_train_maps_class_folders_through_the_model_label_names(tmp_path, caplog):
    data = write_folder(tmp_path / "data", classes=sorted(MODEL_ORDER))
    hub = hub_right_on(data, tmp_path / "hub")
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    assert cli.main(train_args(data, out, "--model", hub, "--val-data", data, "--lr", "1e-9")) == 0
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["val_accuracy"] == 1.0
    assert "new" not in caplog.text
    _, info, _ = load_checkpoint(out / "last.safetensors")
    assert info["model"]["pretrained_cfg"]["label_names"] == MODEL_ORDER
    assert cli.main(["export", str(out / "last.safetensors"), "--out", str(tmp_path / "export")]) == 0
    assert timm.create_model(f"local-dir:{tmp_path / 'export'}").pretrained_cfg["label_names"] == MODEL_ORDER


def test_a_folder_of_some_of_the_model_classes_keeps_its_head_and_order(tmp_path, caplog):
    data = write_folder(tmp_path / "data", classes=sorted(MODEL_ORDER))
    hub = hub_right_on(data, tmp_path / "hub")
    some = shutil.copytree(data, tmp_path / "some")
    for folder in ("images", "masks"):
        shutil.rmtree(some / folder / "cat")
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    assert cli.main(train_args(str(some), out, "--model", hub, "--val-data", str(some), "--lr", "1e-9")) == 0
    assert json.loads((out / "metrics.jsonl").read_text())["val_accuracy"] == 1.0
    assert "the classes take the model's indices, in the order of its label_names (face, cat, cup)" in caplog.text
    weights, info, _ = load_checkpoint(out / "last.safetensors")
    assert weights["head.weight"].shape[0] == 3 and info["model"]["pretrained_cfg"]["label_names"] == MODEL_ORDER


def test_classes_the_model_does_not_name_get_a_new_head_and_the_command_says_why(tmp_path, caplog):
    data = write_folder(tmp_path / "data", classes=("cat", "cup", "dog"))
    hub = labelled_hub(tmp_path / "hub")
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    assert cli.main(train_args(data, out, "--model", hub)) == 0
    assert "the model's label_names lack the data's class(es) dog: training a new 3-class head" in caplog.text
    _, info, _ = load_checkpoint(out / "last.safetensors")
    assert info["model"]["pretrained_cfg"]["label_names"] == ["cat", "cup", "dog"]


def test_validation_classes_take_the_training_indices_by_name(tmp_path):
    data = write_folder(tmp_path / "data", classes=("cat", "dog", "fox"))
    hub = hub_right_on(data, tmp_path / "hub", label_names=["cat", "dog", "fox"], named=False)
    val = shutil.copytree(data, tmp_path / "val")
    for folder in ("images", "masks"):
        shutil.rmtree(val / folder / "dog")  # sorted alone, fox would be class 1: dog's index
    out = tmp_path / "run"
    assert cli.main(train_args(data, out, "--model", hub, "--val-data", str(val), "--lr", "1e-9")) == 0
    assert json.loads((out / "metrics.jsonl").read_text())["val_accuracy"] == 1.0


def test_an_extra_validation_class_is_refused_with_advice_that_works(tmp_path, capsys):
    data = write_folder(tmp_path / "data", classes=("cat", "dog"))
    val = write_folder(tmp_path / "val", classes=("cat", "dog", "emu"))
    args = train_args(data, tmp_path / "run", *TINY_RANDOM, "--val-data", val)
    error = cli_error(capsys, args)
    assert ("the validation data has class(es) ['emu'] that the run does not train (its classes: cat, dog): take "
            "their folders (or rows) out of the validation data, or add images of them to --data") in error
    for folder in ("images", "masks"):  # the advice, followed
        shutil.rmtree(tmp_path / "val" / folder / "emu")
    assert cli.main(args) == 0


def test_relabelling_a_grouped_dataset_keeps_each_sample_group(tmp_path):
    write_folder(tmp_path, classes=("cat", "dog"))
    rows = [f"images/{name}/{i}.jpg,masks/{name}/{i}.png,{name},{'land' if i else 'water'}"
            for name in ("cat", "dog") for i in range(2)]
    (tmp_path / "groups.csv").write_text("image,mask,label,group\n" + "\n".join(rows) + "\n")
    dataset = csv_dataset(tmp_path / "groups.csv")
    groups = dataset.groups.tolist()
    dataset.relabel({"dog": 0, "cat": 1})
    assert [sample.label for sample in dataset.samples] == [1, 1, 0, 0] and dataset.groups.tolist() == groups
    assert dataset.label_names == ["dog", "cat"]
