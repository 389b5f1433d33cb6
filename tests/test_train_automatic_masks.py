"""``train --masks tokencut:MODEL``: TokenCut masks made once into the run folder, resumed, summed up."""
from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from conftest import TINY_MODELS, cli_error, tiny_model
from relevance_finetune import cli
from relevance_finetune.masks import automatic
from relevance_finetune.models import create_model
from relevance_finetune.train import read_config_file

CLASSES = ("cat", "dog")
PER_CLASS = 3


@pytest.fixture
def dino(tmp_path) -> str:
    """A tiny headless random ViT in timm's hub layout, named as ``local-dir:``."""
    _, kwargs = TINY_MODELS["vit_cls"]
    timm.models.save_for_hf(tiny_model("vit_cls", num_classes=0), str(tmp_path / "dino"),
                            model_args=dict(kwargs, num_classes=0))
    return f"local-dir:{tmp_path / 'dino'}"


@pytest.fixture
def train_args(tmp_path) -> list[str]:
    """``train`` on a labelled folder without masks (a bright block on a dark image), one epoch."""
    for name in CLASSES:
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = np.full((64, 64, 3), 20, np.uint8)
            pixels[8 + 4 * i:40, 10:44 + 3 * i] = 230
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    hub = tmp_path / "hub"
    timm.models.save_for_hf(tiny_model(num_classes=2), str(hub))
    return ["train", "--model", f"local-dir:{hub}", "--data", str(tmp_path / "images"), "--out",
            str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2", "--workers", "0", "--no-progress"]


def count_images(monkeypatch) -> list[int]:
    """The batch sizes TokenCut reads keys for, from here on."""
    seen = []

    def counting(model, images):
        seen.append(len(images))
        return real(model, images)

    real = automatic.last_block_keys
    monkeypatch.setattr(automatic, "last_block_keys", counting)
    return seen


def masks_of(run) -> dict:
    return {p.relative_to(run / "masks"): p.stat().st_mtime_ns for p in (run / "masks").glob("*/*.png")}


def test_train_makes_masks_resumes_after_a_crash_and_trains(tmp_path, dino, train_args, monkeypatch, capsys):
    run = tmp_path / "run"
    real_write, writes = automatic.write_mask, []

    def full_disk(image, fp, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG")
        raise OSError("disk full")

    def crash_on_the_third(mask, path):  # the third write fails half-way: no partial file may stay
        writes.append(path)
        if len(writes) == 3:
            monkeypatch.setattr(Image.Image, "save", full_disk)
        real_write(mask, path)

    monkeypatch.setattr(automatic, "write_mask", crash_on_the_third)
    assert "disk full" in cli_error(capsys, [*train_args, "--masks", f"tokencut:{dino}"])
    monkeypatch.undo()
    first = masks_of(run)
    assert len(first) == 2 and not [p for p in (run / "masks").rglob("*") if p.name.startswith(".")]

    seen = count_images(monkeypatch)
    assert cli.main([*train_args, "--masks", f"tokencut:{dino}"]) == 0
    summary = json.loads((run / "masks" / "summary.json").read_text())
    assert sum(seen) == 2 * PER_CLASS - 2  # only the images without a mask yet
    assert {k: v for k, v in masks_of(run).items() if k in first} == first
    assert summary["model"] == dino and summary["images"] == 2 * PER_CLASS
    with Image.open(run / "masks" / "preview.png") as preview:  # a look at them before training
        assert preview.format == "PNG"
    assert summary["masks"] + summary["empty"] == 2 * PER_CLASS and summary["masks"] == len(masks_of(run)) > 2
    assert {p.parent.name for p in masks_of(run)} <= set(CLASSES)
    assert read_config_file(run / "config.yaml")["masks"] == f"tokencut:{dino}"  # which model made them
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1

    seen.clear()
    epochs = train_args.index("--epochs")
    resumed = [*train_args[:epochs], "--epochs", "2", *train_args[epochs + 2:], "--resume"]
    assert cli.main([*resumed, "--masks", f"tokencut:{dino}"]) == 0
    assert seen == [] and len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_validation_masks_go_to_their_own_folder(tmp_path, dino, train_args):
    run = tmp_path / "run"
    assert cli.main([*train_args, "--masks", f"tokencut:{dino}", "--val-data", str(tmp_path / "images"),
                     "--val-masks", f"tokencut:{dino}"]) == 0
    assert masks_of(run).keys() == {p.relative_to(run / "val_masks") for p in (run / "val_masks").glob("*/*.png")}
    assert json.loads((run / "val_masks" / "summary.json").read_text())["model"] == dino
    assert "val_loss" in json.loads((run / "metrics.jsonl").read_text())


def test_many_empty_or_full_masks_warn_once_and_are_counted(tmp_path, dino, train_args, monkeypatch, caplog):
    calls = []

    def degenerate(features, grid, tau, eps):  # the first image: nothing; the others: everything
        calls.append(1)
        return np.full(grid, len(calls) > 1)

    monkeypatch.setattr(automatic, "tokencut_partition", degenerate)
    monkeypatch.setattr(automatic, "bilateral_refine", lambda image, mask, component: mask)
    with caplog.at_level(logging.WARNING):
        assert cli.main([*train_args, "--masks", f"tokencut:{dino}"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "TokenCut" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("warning: the TokenCut masks of 6 of 6 images") and "empty (1" in warnings[0]
    summary = json.loads((tmp_path / "run" / "masks" / "summary.json").read_text())
    assert (summary["empty"], summary["full"], summary["masks"]) == (1, 5, 5)
    assert summary["unmasked"] == ["cat/0.png"] and summary["full_share"] == 0.95 and summary["warn_share"] == 0.1


def test_the_warning_threshold_is_more_than_a_tenth(tmp_path, caplog):
    def warned(empty: int, full: int) -> bool:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            automatic._warn_degenerate({"images": 20, "empty": empty, "full": full, "model": "m"}, tmp_path)
        return bool(caplog.records)

    assert not warned(1, 1) and warned(2, 1) and warned(0, 3)


def test_bad_masks_specs_fail_with_one_line(tmp_path, dino, train_args, capsys):
    def error(masks: str) -> str:
        return cli_error(capsys, [*train_args, "--masks", masks])

    assert "'tokencut:' names no model: expected tokencut:MODEL" in error("tokencut:")
    assert "timm has no model named 'no_such_vit'" in error("tokencut:no_such_vit")
    other = tmp_path / "run" / "masks"
    assert not other.exists()  # a mistyped model leaves nothing that would refuse the right one
    other.mkdir(parents=True)
    (other / "summary.json").write_text(json.dumps({"model": "local-dir:/elsewhere"}))
    assert f"holds the TokenCut masks of local-dir:/elsewhere, not of {dino}: delete {other}" in error(
        f"tokencut:{dino}")
    (other / "summary.json").unlink()
    (other / "mine.png").write_bytes(b"")
    assert "holds files but no summary.json" in error(f"tokencut:{dino}")
    (other / "summary.json").write_text("{")
    assert f"cannot read {other / 'summary.json'}" in error(f"tokencut:{dino}")
    manifest = tmp_path / "data.csv"
    manifest.write_text("image,mask,label\n")
    train_args[train_args.index("--data") + 1] = str(manifest)
    assert f"makes masks for a folder of <class>/<name> images, not for the file {manifest}" in error(
        f"tokencut:{dino}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_worker(rank: int, port: int, spec: str, images: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        seen = []
        real = automatic.last_block_keys
        automatic.last_block_keys = lambda model, batch: seen.append(len(batch)) or real(model, batch)
        assert automatic.tokencut_folder(spec, images, folder, create_model, workers=0, progress=False) == folder
        (Path(folder) / f"seen{rank}").write_text(str(sum(seen)))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_processes_share_the_masks_under_torch_distributed(tmp_path, dino, train_args):
    images, folder = train_args[train_args.index("--data") + 1], str(tmp_path / "masks")
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(shard_worker, args=(free_port(), f"tokencut:{dino}", images, folder), nprocs=2, join=True,
                       start_method=start_method)
    assert [(tmp_path / "masks" / f"seen{rank}").read_text() for rank in (0, 1)] == [str(PER_CLASS)] * 2
    summary = json.loads((tmp_path / "masks" / "summary.json").read_text())
    assert summary["images"] == 2 * PER_CLASS == summary["masks"] + summary["empty"]
