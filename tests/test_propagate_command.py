"""Propagated masks of a folder: ``masks --method propagate`` and ``train --masks propagate:MASKS``
(made once, resumed, summed up, shown, shared across processes; bad input in one line)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from conftest import cli_error, tiny_model
from relevance_finetune.cli import main
from relevance_finetune.masks import propagate_folder as folder_module
from relevance_finetune.masks.propagate_folder import PropagationOptions, propagate_folder
from test_train_automatic_masks import free_port

CLASSES = ("cat", "dog")
PER_CLASS = 4
ANNOTATED = 2  # per class: the first images


def block_photo(i: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A bright block on a dark, slightly noisy image, and the block's mask."""
    rng = np.random.default_rng(i)
    pixels = rng.integers(10, 40, (size, size, 3)).astype(np.uint8)
    mask = np.zeros((size, size), bool)
    top, left = 4 + 3 * (i % 4), 6 + 2 * (i % 5)
    mask[top:top + 24, left:left + 20] = True
    pixels[mask] = 220
    return pixels, mask


@pytest.fixture
def folder(tmp_path) -> dict:
    """``images/<class>/<i>.png`` (48x48, PER_CLASS each), ``annotated/<class>/<i>.png`` for the first
    ANNOTATED of each class, and a tiny ViT (32x32 input) saved as ``local-dir:``."""
    for c, name in enumerate(CLASSES):
        (tmp_path / "images" / name).mkdir(parents=True)
        (tmp_path / "annotated" / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels, mask = block_photo(c * PER_CLASS + i)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
            if i < ANNOTATED:
                Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "annotated" / name / f"{i}.png")
    hub = tmp_path / "hub"
    timm.models.save_for_hf(tiny_model(num_classes=2), str(hub))
    return {"images": tmp_path / "images", "annotated": tmp_path / "annotated", "model": f"local-dir:{hub}"}


def command(folder: dict, out: Path, *extra: str) -> list[str]:
    return ["masks", "--method", "propagate", "--from", str(folder["annotated"]), "--images", str(folder["images"]),
            "--model", folder["model"], "--out", str(out), "--workers", "0", *extra]


def count_targets(monkeypatch) -> list[int]:
    """The number of target images each ``propagate_masks`` call gets, from here on."""
    seen = []
    real = folder_module.propagate_masks

    def counting(model, images, masks, targets, **options):
        seen.append(len(targets))
        return real(model, images, masks, targets, **options)

    monkeypatch.setattr(folder_module, "propagate_masks", counting)
    return seen


def masks_in(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.glob("*/*.png")}


def test_the_command_masks_every_image_copies_the_annotated_and_resumes(folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    seen = count_targets(monkeypatch)
    assert main(command(folder, out)) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert seen == [len(CLASSES) * (PER_CLASS - ANNOTATED)]  # the annotated images are not predicted
    assert (summary["images"], summary["annotated"]) == (len(CLASSES) * PER_CLASS, len(CLASSES) * ANNOTATED)
    assert summary["predicted"] + summary["empty"] == len(CLASSES) * (PER_CLASS - ANNOTATED)
    assert summary["per_class"]["cat"]["images"] == PER_CLASS and summary["per_class"]["dog"]["annotated"] == ANNOTATED
    assert 0 <= summary["held_out_iou"] <= 1 and summary["settings"] == {"refine": False, "folds": 3, "seed": 0}
    assert (summary["method"], summary["from"], summary["model"]) == ("propagate", str(folder["annotated"]),
                                                                      folder["model"])
    assert f"held-out IoU {summary['held_out_iou']:.2f}" in printed and "preview.png" in printed
    for name in CLASSES:
        for i in range(ANNOTATED):  # the annotated keep their own masks
            np.testing.assert_array_equal(np.asarray(Image.open(out / name / f"{i}.png")) > 0,
                                          np.asarray(Image.open(folder["annotated"] / name / f"{i}.png")) > 0)
    for path in out.glob("*/*.png"):  # at the image's size
        assert Image.open(path).size == Image.open(folder["images"] / path.relative_to(out)).size
    with Image.open(out / "preview.png") as preview:
        assert preview.format == "PNG"
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # written atomically

    written = masks_in(out)
    assert main(command(folder, out)) == 0
    assert seen == [len(CLASSES) * (PER_CLASS - ANNOTATED)] and masks_in(out) == written  # nothing made again
    assert "settings" in cli_error(capsys, command(folder, out, "--folds", "2"))  # other settings: refused


def test_empty_predictions_are_left_out_and_counted(folder, tmp_path, monkeypatch):
    real = folder_module.propagate_masks

    def first_empty(model, images, masks, targets, **options):
        result = real(model, images, masks, targets, **options)
        result.masks[0] = 0
        return result

    monkeypatch.setattr(folder_module, "propagate_masks", first_empty)
    summary = propagate_folder(folder["annotated"], folder["images"], tmp_path / "out",
                               timm.create_model(folder["model"], pretrained=True), folder["model"],
                               options=PropagationOptions(workers=0), progress=False)
    assert summary["empty"] >= 1 and summary["unmasked"][0] == "cat/2.png"
    assert summary["per_class"]["cat"]["empty"] >= 1 and not (tmp_path / "out" / "cat" / "2.png").exists()


def test_a_low_held_out_iou_warns_with_the_number(folder, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        assert main(command(folder, tmp_path / "out", "--warn-below", "1")) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    warnings = [r.getMessage() for r in caplog.records if "held-out IoU" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and f"{summary['held_out_iou']:.2f}" in warnings[0]
    assert summary["low_quality"] and summary["warning"] in warnings[0] and summary["warn_below"] == 1


def test_bad_input_fails_with_one_line(folder, tmp_path, capsys):
    out = tmp_path / "out"
    annotated = folder["annotated"]
    for mask in (annotated / "dog").iterdir():
        mask.rename(tmp_path / mask.name)
    assert "holds no annotated mask for the class(es) dog of" in cli_error(capsys, command(folder, out))
    for i in range(ANNOTATED):
        (tmp_path / f"{i}.png").rename(annotated / "dog" / f"{i}.png")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(annotated / "dog" / "1.png")
    error = cli_error(capsys, command(folder, out))
    assert f"the annotated mask {annotated / 'dog' / '1.png'} is 48x40 pixels but its image" in error
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(annotated / "dog" / "1.png")
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(annotated / "dog" / "nine.png")
    error = cli_error(capsys, command(folder, out))
    assert f"the annotated mask {annotated / 'dog' / 'nine.png'} has no image" in error
    (annotated / "dog" / "nine.png").unlink()
    assert "--method propagate needs --from MASKS" in cli_error(
        capsys, [a for a in command(folder, out) if a not in ("--from", str(annotated))])
    resnet = tmp_path / "resnet"
    timm.models.save_for_hf(timm.create_model("resnet18", pretrained=False, num_classes=2), str(resnet))
    error = cli_error(capsys, command({**folder, "model": f"local-dir:{resnet}"}, tmp_path / "cnn"))
    assert "needs a vision transformer with patch tokens" in error and "ResNet" in error
    assert not list(out.glob("*/*.png"))  # nothing written by the refused runs


# -- train --masks propagate:MASKS ---------------------------------------------------------------
def train_args(folder: dict, run: Path, *extra: str) -> list[str]:
    return ["train", "--model", folder["model"], "--data", str(folder["images"]), "--masks",
            f"propagate:{folder['annotated']}", "--out", str(run), "--epochs", "1", "--batch-size", "2",
            "--workers", "0", "--no-progress", *extra]


def test_train_propagates_once_into_the_run_and_resumes(folder, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    seen = count_targets(monkeypatch)
    validation = ["--val-data", str(folder["images"]), "--val-masks", f"propagate:{folder['annotated']}"]
    assert main(train_args(folder, run, *validation)) == 0
    summary = json.loads((run / "masks" / "summary.json").read_text())
    assert summary["model"] == folder["model"] and summary["images"] == len(CLASSES) * PER_CLASS
    assert seen == [len(CLASSES) * (PER_CLASS - ANNOTATED)] * 2 and (run / "masks" / "preview.png").is_file()
    assert json.loads((run / "val_masks" / "summary.json").read_text())["images"] == summary["images"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert main([*train_args(folder, run, "--resume", *validation), "--epochs", "2"]) == 0
    assert len(seen) == 2  # made once
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2

    missing = next(p for p in (run / "masks").glob("cat/*.png") if p.stem not in map(str, range(ANNOTATED)))
    missing.unlink()  # a resumed run no longer has the weights the masks were made from
    error = cli_error(capsys, [*train_args(folder, run, "--resume", *validation), "--epochs", "3"])
    assert "lacks the masks of 1 image(s) and no model is at hand" in error
    assert "'propagate:' names no folder" in cli_error(capsys, [*train_args(folder, tmp_path / "new"), "--masks",
                                                                 "propagate:"])
    tokencut = f"tokencut:{folder['model']}"  # the same model, another method: refused, as another model is
    assert f"{run / 'masks'} holds masks made by propagate, not TokenCut's" in cli_error(
        capsys, [*train_args(folder, run, "--resume", *validation), "--epochs", "3", "--masks", tokencut])
    manifest = tmp_path / "data.csv"
    manifest.write_text("image,mask,label\n")
    assert f"makes masks for a folder of <class>/<name> images, not for the file {manifest}" in cli_error(
        capsys, [*train_args(folder, tmp_path / "csv"), "--data", str(manifest)])


def shard_worker(rank: int, port: int, folder: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        seen = []
        real = folder_module.propagate_masks
        folder_module.propagate_masks = lambda model, images, masks, targets, **kw: (
            seen.append(len(targets)) or real(model, images, masks, targets, **kw))
        model = timm.create_model(folder["model"], pretrained=True)
        summary = propagate_folder(folder["annotated"], folder["images"], out, model, folder["model"],
                                   options=PropagationOptions(workers=0), progress=False)
        Path(out, f"seen{rank}").write_text(json.dumps([seen, summary.get("held_out_iou")]))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_processes_share_the_images_under_torch_distributed(folder, tmp_path):
    out = str(tmp_path / "out")
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(shard_worker, args=(free_port(), folder, out), nprocs=2, join=True, start_method=start_method)
    seen = [json.loads((tmp_path / "out" / f"seen{rank}").read_text()) for rank in (0, 1)]
    half = len(CLASSES) * (PER_CLASS - ANNOTATED) // 2
    assert [targets for targets, _ in seen] == [[half], [half]]  # each process its share, one fit each
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    made = summary["annotated"] + summary["predicted"] + summary["empty"]
    assert summary["images"] == len(CLASSES) * PER_CLASS == made
    assert seen[0][1] == summary["held_out_iou"]
