"""Group labels in a run: validation accuracy by group, ``--select worst_group``, and their errors."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset, Subset

from conftest import tiny_model
from relevance_finetune import cli
from relevance_finetune.checkpoint import load_checkpoint
from relevance_finetune.groups import WATERBIRDS_GROUPS
from relevance_finetune.metrics import group_accuracy
from relevance_finetune.head import refit_head, refit_head_groups
from relevance_finetune.train import TrainConfig, finetune, refit_stage
from relevance_finetune.train.selection import best_epoch
from test_train import free_port, tiny_hub
from waterbirds_fixture import write_mini_waterbirds

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("landbird_on_land", "landbird_on_water", "waterbird_on_land", "waterbird_on_water")


class Grouped(Dataset):
    """Waterbirds-like samples: class y in the object (a bright or dark square), place in the
    background; ``group = 2 * y + place``, ``per_group[g]`` samples of group g."""

    group_names = NAMES

    def __init__(self, per_group: tuple[int, ...], seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.groups = [g for g, count in enumerate(per_group) for _ in range(count)]
        groups = torch.tensor(self.groups)
        self.labels, place = (groups // 2).tolist(), groups % 2
        self.masks = torch.zeros(len(groups), 1, 32, 32)
        self.masks[:, :, 8:24, 8:24] = 1
        self.images = 0.3 * torch.randn(len(groups), 3, 32, 32, generator=generator)
        self.images += (2.0 * groups.div(2, rounding_mode="floor") - 1).view(-1, 1, 1, 1) * self.masks
        self.images += (2.0 * place - 1).view(-1, 1, 1, 1) * (1 - self.masks)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int):
        return self.images[index], self.masks[index], self.labels[index]


def config(**overrides) -> TrainConfig:
    settings = dict(epochs=1, batch_size=4, lr=1e-3, workers=0, progress=False)
    return TrainConfig(**{**settings, **overrides})


@torch.no_grad()
def _by_hand(model, val_set: Grouped, train_counts: dict[int, int]) -> dict:
    model.eval()
    predictions = model(val_set.images).argmax(1)
    return group_accuracy(predictions, val_set.labels, val_set.groups, train_counts)


def test_validation_reports_each_group_the_worst_and_both_means(tmp_path, caplog):
    train_set, val_set = Grouped((6, 2, 2, 6)), Grouped((3, 3, 2, 3), seed=1)
    model = tiny_model(num_classes=2)
    with caplog.at_level(logging.INFO):
        history = finetune(model, train_set, val_set, config(out=str(tmp_path / "run"), select="worst_group"))
    expected = _by_hand(model, val_set, {0: 6, 1: 2, 2: 2, 3: 6})
    record = history[-1]
    assert record["val_worst_group_accuracy"] == pytest.approx(expected["worst_group_accuracy"])
    assert record["val_mean_accuracy"] == pytest.approx(expected["mean_accuracy"]) == pytest.approx(
        record["val_accuracy"])
    assert record["val_weighted_mean_accuracy"] == pytest.approx(expected["weighted_mean_accuracy"])
    assert list(record["val_groups"]) == list(NAMES)
    for group, name in enumerate(NAMES):
        assert record["val_groups"][name] == {"group": group, "accuracy": pytest.approx(
            expected["groups"][group]["accuracy"]), "count": (3, 3, 2, 3)[group]}
    written = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert written["val_groups"]["waterbird_on_land"]["count"] == 2
    assert "validation groups: landbird_on_land" in caplog.text
    assert "(plain, over images)" in caplog.text and "(weighted by the training groups' proportions)" in caplog.text
    assert "best.safetensors holds epoch 1 of 1 (--select worst_group" in caplog.text


def test_a_subset_has_the_groups_of_its_indices():
    """--val-fraction's split: the validation Subset's groups, the training Subset's proportions."""
    data = Grouped((4, 4, 4, 4))
    train_set, val_set = Subset(data, list(range(0, 16, 2))), Subset(data, list(range(1, 16, 2)))
    model = tiny_model(num_classes=2)
    record = finetune(model, train_set, val_set, config())[-1]
    assert {name: entry["count"] for name, entry in record["val_groups"].items()} == dict.fromkeys(NAMES, 2)


def test_worst_group_picks_the_epoch_of_the_best_worst_group():
    history = [{"val_loss": 1.0, "val_accuracy": 0.9, "val_worst_group_accuracy": 0.5},
               {"val_loss": 0.5, "val_accuracy": 0.8, "val_worst_group_accuracy": 0.7},
               {"val_loss": 0.4, "val_accuracy": 0.95, "val_worst_group_accuracy": 0.6},
               {"val_loss": 0.3, "val_accuracy": 0.85, "val_worst_group_accuracy": 0.7}]
    assert best_epoch(history, config(select="worst_group")) == 4  # a tie goes to the higher accuracy
    assert best_epoch(history[:3], config(select="worst_group")) == 2
    assert best_epoch(history, config(select="paper")) == 4


def test_worst_group_without_groups_or_with_an_empty_group_is_refused():
    model = tiny_model(num_classes=2)
    plain = Grouped((2, 2, 2, 2))
    plain.groups = None
    with pytest.raises(ValueError, match="select='worst_group' needs validation data with group labels"):
        finetune(model, Grouped((2, 2, 2, 2)), plain, config(select="worst_group"))
    with pytest.raises(ValueError, match=r"too few of 'waterbird_on_land' \(group 2\): 0"):
        finetune(model, Grouped((2, 2, 2, 2)), Grouped((2, 2, 0, 2)), config(select="worst_group"))
    record = finetune(model, Grouped((2, 2, 2, 2)), Grouped((2, 2, 0, 2)), config())[-1]  # other rules: reported
    assert "waterbird_on_land" not in record["val_groups"] and record["val_weighted_mean_accuracy"] is None


def test_the_group_head_refit_is_refit_head_groups_on_the_validation_images(tmp_path, caplog):
    train_set, val_set = Grouped((6, 2, 2, 6)), Grouped((4, 4, 4, 4), seed=1)
    model, reference = tiny_model(num_classes=2), tiny_model(num_classes=2)
    settings = config(finetune=False, head_refit=True, head_labels="groups", head_fits=3, out=str(tmp_path / "run"))
    with caplog.at_level(logging.INFO):
        refit = refit_stage(model, train_set, val_set, settings)
    direct = refit_head_groups(reference, val_set.images, torch.tensor(val_set.labels), torch.tensor(val_set.groups),
                               fits=3, seed=0, batch_size=64, progress=False)
    assert torch.equal(model.head.weight, reference.head.weight) and refit.C == direct.C
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["labels"] == "groups" and record["selected_on"] == "held_out_validation" and record["rows"] == 16
    assert {"C", "worst_group_accuracy", "mean_accuracy"} == set(record["scores"][0])
    assert "head refit on group labels (DFR's protocol): C=" in caplog.text


def test_the_mask_head_refit_under_worst_group_chooses_c_by_the_validation_groups(tmp_path):
    train_set, val_set = Grouped((6, 2, 2, 6)), Grouped((3, 3, 3, 3), seed=1)
    model, reference = tiny_model(num_classes=2), tiny_model(num_classes=2)
    settings = config(finetune=False, head_refit=True, select="worst_group", head_fits=2, head_views=1,
                      out=str(tmp_path / "run"))
    refit_stage(model, train_set, val_set, settings)
    direct = refit_head(reference, train_set.images, train_set.masks, torch.tensor(train_set.labels), views=1, fits=2,
                        validation=(val_set.images, val_set.masks, torch.tensor(val_set.labels)),
                        validation_groups=torch.tensor(val_set.groups), progress=False)
    assert torch.equal(model.head.weight, reference.head.weight)
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert record["labels"] == "masks" and record["selected_on"] == "validation_groups" and record["C"] == direct.C
    assert [score["worst_group_accuracy"] for score in record["scores"]] == [w for w, _ in direct.scores.values()]
    plain = Grouped((2, 2, 2, 2))
    plain.groups = None
    with pytest.raises(ValueError, match="--select worst_group: the head refit reads the validation images' group"):
        refit_stage(model, train_set, plain, settings)


def test_the_group_head_refit_names_what_it_lacks():
    model = tiny_model(num_classes=2)
    settings = config(finetune=False, head_refit=True, head_labels="groups")
    plain = Grouped((2, 2, 2, 2))
    plain.groups = None
    with pytest.raises(ValueError, match="--head-labels groups: the head refit reads the validation images' group labels"):
        refit_stage(model, Grouped((2, 2, 2, 2)), plain, settings)
    with pytest.raises(ValueError, match=r"needs 2 validation image\(s\) of every group; too few of "
                                         r"'landbird_on_water' \(group 1\): 1"):
        refit_stage(model, Grouped((2, 2, 2, 2)), Grouped((2, 1, 2, 2)), settings)


def test_train_on_waterbirds_selects_by_worst_group_and_refits_on_groups(tmp_path, capsys):
    """The command on a miniature release: the validation split's groups by Waterbirds' names,
    weighted by the training split's 6 / 2 / 2 / 6; then DFR's refit of that model on them."""
    data = write_mini_waterbirds(tmp_path / "data")
    hub = tiny_hub(tmp_path / "hub", num_classes=2)
    common = ["--data-format", "waterbirds", "--data", str(data["root"]), "--masks", str(data["segmentations"]),
              "--model", hub, "--workers", "0", "--no-progress"]
    run = tmp_path / "run"
    assert cli.main(["train", *common, "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--select", "worst_group",
                     "--out", str(run)]) == 0
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    names = list(WATERBIRDS_GROUPS.values())
    assert all(list(record["val_groups"]) == names for record in epochs)
    assert all(entry["count"] == 3 for entry in epochs[-1]["val_groups"].values())
    accuracies = [epochs[-1]["val_groups"][name]["accuracy"] for name in names]
    assert epochs[-1]["val_weighted_mean_accuracy"] == pytest.approx(
        sum(weight * accuracy for weight, accuracy in zip((6, 2, 2, 6), accuracies)) / 16)
    assert epochs[-1]["val_worst_group_accuracy"] == min(accuracies)
    chosen = max(range(2), key=lambda i: (epochs[i]["val_worst_group_accuracy"], epochs[i]["val_accuracy"], -i))
    _, info, _ = load_checkpoint(run / "best.safetensors")
    assert info["epoch"] == chosen + 1
    refit = tmp_path / "dfr"
    assert cli.main(["train", *common, "--checkpoint", str(run / "best.safetensors"), "--recipe", "head",
                     "--head-labels", "groups", "--head-fits", "2", "--out", str(refit)]) == 0
    (record,) = [json.loads(line) for line in (refit / "metrics.jsonl").read_text().splitlines()]
    assert record["labels"] == "groups" and record["rows"] == 12
    assert cli.main(["export", str(refit / "best.safetensors"), "--out", str(tmp_path / "export")]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "refit on the validation images with their group labels without a finetune" in card
    assert "`relevance_finetune.head.refit_head_groups`" in card and "counterfactual views" not in card
    one_val = write_mini_waterbirds(tmp_path / "short", per_group={0: (2, 1, 1, 2), 1: (2, 1, 1, 0), 2: (1, 1, 1, 1)})
    capsys.readouterr()
    short = ["--data", str(one_val["root"]), "--masks", str(one_val["segmentations"])]
    assert cli.main(["train", *common, *short, "--select", "worst_group", "--out", str(tmp_path / "x")]) != 0
    assert "too few of 'waterbird on water' (group 3): 0" in capsys.readouterr().err


def _ddp_worker(rank: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        history = finetune(tiny_model(num_classes=2, qkv_bias=False), Grouped((2, 2, 2, 2)),
                           Grouped((3, 2, 1, 3), seed=1), config())
        if rank == 0:
            Path(path).write_text(json.dumps(history[-1]))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_report_the_groups_of_every_validation_image(tmp_path):
    """Each process validates its shard (9 images: 5 and 4); the groups are those of all 9, as in one process."""
    path = str(tmp_path / "record.json")
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_worker, args=(free_port(), path), nprocs=2, join=True, start_method=start_method)
    single = finetune(tiny_model(num_classes=2, qkv_bias=False), Grouped((2, 2, 2, 2)), Grouped((3, 2, 1, 3), seed=1),
                      config())[-1]
    ddp = json.loads(Path(path).read_text())
    assert [entry["count"] for entry in ddp["val_groups"].values()] == [3, 2, 1, 3]
    for key in ("val_worst_group_accuracy", "val_mean_accuracy", "val_weighted_mean_accuracy"):
        assert ddp[key] == pytest.approx(single[key])
    assert {name: entry["accuracy"] for name, entry in ddp["val_groups"].items()} == pytest.approx(
        {name: entry["accuracy"] for name, entry in single["val_groups"].items()})
