"""docs/index.md's own-data flows, run verbatim: a labelled folder without masks, end to end, twice;
and a labelled folder with a few masks (propagated to the rest), end to end, once.

The ```bash block under :data:`HEADING` (:data:`FEW_MASKS_HEADING`) runs unchanged with bash
(``-euo pipefail``, so any failing step fails it) in fresh directories, on a generated folder of
64x64 photos (an object whose shape and texture is the class, on a background whose colour agrees
with the class most of the time) and a tiny ViT classifier of those classes that has learnt from
them, saved as ``local-dir:``. Only the block's variables are set (the folders, the models, two
epochs, a larger learning rate), with no GPU visible and one thread per process.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import TINY_MODELS, cli_error
from relevance_finetune.cli import main

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Your own labelled folder, end to end"
FEW_MASKS_HEADING = "## A few masks of your own, end to end"
ANNOTATED = 2  # masks per class given to the few-masks flow
_BASH = re.compile(r"^```bash[ \t]*\n(?P<code>.*?)^```[ \t]*$", re.M | re.S)
SIZE = 64
BACKGROUNDS = {"checks": (60, 160, 70), "disc": (200, 70, 50), "stripes": (60, 90, 200)}  # class -> usual colour
PER_CLASS = {"train": 8, "heldout": 4}
AGREE = 0.85  # share of photos on their class's background colour
MODEL_ARGS = dict(TINY_MODELS["vit_cls"][1], img_size=SIZE)
RUN_SECONDS = 300  # a run takes ~22 s of CPU, ~18 s of it the five commands importing torch and timm


def flow_block(heading: str = HEADING, path: Path = ROOT / "docs" / "index.md") -> str:
    """The first ```bash block of the section ``heading`` of ``path``."""
    text = path.read_text(encoding="utf-8")
    start = text.find(heading + "\n")
    assert start >= 0, f"{path.name} has no section {heading!r}"
    end = text.find("\n## ", start + len(heading))
    match = _BASH.search(text, start, len(text) if end < 0 else end)
    assert match, f"the section {heading!r} of {path.name} has no ```bash block"
    return match["code"]


def _photo(name: str, background: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A ``(SIZE, SIZE, 3)`` uint8 photo of class ``name`` on ``background``, and its object's mask."""
    y, x = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.integers(26, 38, 2)
    r = int(rng.integers(13, 17))
    if name == "disc":
        mask, texture = (y - cy) ** 2 + (x - cx) ** 2 <= r * r, np.ones((SIZE, SIZE), bool)
    else:
        mask = (abs(y - cy) <= r) & (abs(x - cx) <= r)
        texture = (x // 4 + y // 4) % 2 == 0 if name == "checks" else (x + y) // 4 % 2 == 0
    pixels = np.asarray(background, np.float32) + rng.normal(0, 8, (SIZE, SIZE, 3))
    pixels[mask & texture], pixels[mask & ~texture] = 235, 35
    return np.clip(pixels, 0, 255).astype(np.uint8), mask


def write_photos(root: Path) -> dict[str, np.ndarray]:
    """``root/<split>/<class>/<i>.png`` for the splits of :data:`PER_CLASS`; returns ``{relative path: mask}``."""
    rng, names, masks = np.random.default_rng(0), sorted(BACKGROUNDS), {}
    for split, count in PER_CLASS.items():
        for c, name in enumerate(names):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                other = names[(c + 1 + i % 2) % len(names)]
                pixels, mask = _photo(name, BACKGROUNDS[name if rng.random() < AGREE else other], rng)
                path = f"{split}/{name}/{i:02d}.png"
                Image.fromarray(pixels).save(root / path)
                masks[path] = mask
    return masks


def _fit(model: torch.nn.Module, folder: Path, steps: int = 30) -> None:
    """A few full-batch cross-entropy steps on ``folder``'s photos: a classifier that uses colour and shape."""
    paths = sorted(folder.glob("*/*.png"))
    names = sorted({p.parent.name for p in paths})
    images = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in paths]) / 127.5 - 1
    labels = torch.tensor([names.index(p.parent.name) for p in paths])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def save_models(root: Path) -> tuple[str, str]:
    """A tiny classifier of the training classes and a headless random ViT for TokenCut, as ``local-dir:``."""
    names = sorted(BACKGROUNDS)
    torch.manual_seed(0)
    classifier = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=len(names), **MODEL_ARGS)
    _fit(classifier, root / "train")
    timm.models.save_for_hf(classifier, str(root / "classifier"), model_config={"label_names": names},
                            model_args=dict(MODEL_ARGS, num_classes=len(names)), safe_serialization=True)
    torch.manual_seed(1)
    dino = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **MODEL_ARGS)
    timm.models.save_for_hf(dino, str(root / "dino"), model_args=dict(MODEL_ARGS, num_classes=0),
                            safe_serialization=True)
    return f"local-dir:{root / 'classifier'}", f"local-dir:{root / 'dino'}"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("photos")
    masks = write_photos(root)
    model, mask_model = save_models(root)
    return {"root": root, "masks": masks, "model": model, "mask_model": mask_model}


def run_block(block: str, variables: dict[str, str], dirs: list[Path]) -> None:
    """Run ``block`` with bash in each of ``dirs`` at once, with ``variables`` set; assert each succeeds."""
    env = {**os.environ, **variables, "OUT": "out", "EPOCHS": "2", "LR": "1e-4",
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    processes = []
    try:
        for d in dirs:
            with open(d / "log.txt", "w") as log:
                processes.append(subprocess.Popen(["bash", "-euo", "pipefail", "-c", block], cwd=d, env=env,
                                                  stdout=log, stderr=subprocess.STDOUT))
        codes = [process.wait(timeout=RUN_SECONDS) for process in processes]
    finally:
        for process in processes:
            process.kill()  # only if still running: a timeout
    for d, code in zip(dirs, codes):
        assert code == 0, f"the block failed (exit {code}):\n{(d / 'log.txt').read_text()[-4000:]}"


@pytest.fixture(scope="module")
def flow(photos, tmp_path_factory) -> dict:
    """The block run twice, at once, each in a fresh directory: ``{"runs": [dir, dir], "data": before, after}``."""
    root = photos["root"]
    before = _files(root / "train") | _files(root / "heldout")
    dirs = [tmp_path_factory.mktemp(f"run{i}") for i in range(2)]
    run_block(flow_block(), {"DATA": str(root / "train"), "HELDOUT": str(root / "heldout"), "MODEL": photos["model"],
                             "MASK_MODEL": photos["mask_model"]}, dirs)
    after = _files(root / "train") | _files(root / "heldout")
    return {"runs": [d / "out" for d in dirs], "data": (before, after)}


@pytest.fixture(scope="module")
def few_masks_flow(photos, tmp_path_factory) -> dict:
    """The few-masks block run once: the exact masks of the first :data:`ANNOTATED` photos of each
    class (training and held-out) are the annotated ones. ``{"out": dir, "data": before, after}``."""
    root, annotated = photos["root"], tmp_path_factory.mktemp("annotated")
    for path, mask in photos["masks"].items():
        if int(Path(path).stem) < ANNOTATED:
            (annotated / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(annotated / path)
    before = _files(root / "train") | _files(root / "heldout") | _files(annotated)
    run = tmp_path_factory.mktemp("few_masks")
    run_block(flow_block(FEW_MASKS_HEADING), {
        "DATA": str(root / "train"), "MASKS": str(annotated / "train"), "HELDOUT": str(root / "heldout"),
        "HELDOUT_MASKS": str(annotated / "heldout"), "MODEL": photos["model"]}, [run])
    after = _files(root / "train") | _files(root / "heldout") | _files(annotated)
    return {"out": run / "out", "annotated": annotated, "data": (before, after)}


def test_the_block_is_found_and_reads_its_variables():
    block = flow_block()
    for name in ("DATA", "HELDOUT", "MODEL", "MASK_MODEL", "OUT", "EPOCHS", "LR"):
        assert re.search(rf"^{name}=\$\{{{name}:-", block, re.M), f"the block does not default ${name}"
    for command in ("train", "export", "masks", "evaluate", "explain"):
        assert f"relevance-finetune {command} " in block


def test_the_few_masks_block_reads_its_variables():
    block = flow_block(FEW_MASKS_HEADING)
    for name in ("DATA", "MASKS", "HELDOUT", "HELDOUT_MASKS", "MODEL", "OUT", "EPOCHS", "LR"):
        assert re.search(rf"^{name}=\$\{{{name}:-", block, re.M), f"the block does not default ${name}"
    for command in ("masks --method propagate", "train", "export", "evaluate"):
        assert f"relevance-finetune {command} " in block


def test_a_few_masks_propagate_train_export_and_report(few_masks_flow):
    out, annotated = few_masks_flow["out"], few_masks_flow["annotated"]
    before, after = few_masks_flow["data"]
    assert before == after  # nothing written into the user's folders
    for masks, split in (("masks", "train"), ("heldout_masks", "heldout")):
        summary = json.loads((out / masks / "summary.json").read_text())
        assert summary["images"] == 3 * PER_CLASS[split] and summary["annotated"] == 3 * ANNOTATED
        assert 0 <= summary["held_out_iou"] <= 1 and (out / masks / "preview.png").is_file()
        for path in (annotated / split).glob("*/*.png"):  # the annotated photos keep their own masks
            copied = out / masks / path.relative_to(annotated / split)
            assert np.array_equal(np.asarray(Image.open(copied)) > 0, np.asarray(Image.open(path)) > 0)
    assert (out / "export" / "model.safetensors").is_file() and (out / "run" / "best.safetensors").is_file()
    report = json.loads((out / "report" / "folder.json").read_text())
    runs = {label: run["splits"]["heldout"] for label, run in report["runs"].items()}
    assert list(runs) == ["before", "after"]
    for split in runs.values():
        assert split["n"] + split.get("unmasked", 0) == 3 * PER_CLASS["heldout"] and split["n"] > 0
        assert {"background_only", "background_reliance"} <= set(split["probes"]) and "miou" in split["localisation"]


def test_two_runs_give_the_same_export_and_report(flow):
    first, second = flow["runs"]
    weights = [(out / "export" / "model.safetensors").read_bytes() for out in (first, second)]
    assert weights[0] == weights[1]
    for folder in ("export", "heldout_masks", "report", "explained"):  # every file, pictures included, bit for bit
        assert _files(first / folder) == _files(second / folder), folder
    before, after = flow["data"]
    assert before == after  # nothing written into the user's folders


def test_the_report_shows_reliance_and_localisation_before_and_after(flow):
    out = flow["runs"][0]
    report = json.loads((out / "report" / "folder.json").read_text())
    runs = {label: run["splits"]["heldout"] for label, run in report["runs"].items()}
    assert list(runs) == ["before", "after"]
    masked = len(list((out / "heldout_masks").glob("*/*.png")))  # TokenCut drops some: --skip-unmasked
    for split in runs.values():
        assert split["n"] == masked > 0 and split["n"] + split.get("unmasked", 0) == 3 * PER_CLASS["heldout"]
        assert {"object_only", "background_only", "background_reliance"} <= set(split["probes"])
        assert {"miou", "mass_accuracy", "pointing_game"} <= set(split["localisation"])
    change = report["change"]["heldout"]
    for key in ("probes/background_only", "probes/background_reliance", "localisation/miou"):
        section, name = key.split("/")
        assert change[key] == pytest.approx(runs["after"][section][name] - runs["before"][section][name])
    assert (out / "run" / "best.safetensors").is_file() and (out / "run" / "masks" / "summary.json").is_file()
    markdown = (out / "report" / "folder.md").read_text()
    for text in ("| heldout | before |", "| heldout | after |", "| heldout | change |", "| Background-only |",
                 "| BG reliance |", "| mIoU |"):
        assert text in markdown
    pictures = ["report/folder_probes.png", "report/folder_relevance.png", *(
        str(p.relative_to(out)) for p in (out / "explained").glob("compare_*.png"))]
    assert len(pictures) > 2
    for picture in pictures:
        with Image.open(out / picture) as image:
            assert image.format == "PNG", picture


def test_evaluate_leaves_out_held_out_images_without_a_mask_when_asked(photos, tmp_path, capsys):
    """TokenCut writes no mask for some photos: ``--skip-unmasked`` scores the rest and counts them."""
    for path, mask in photos["masks"].items():
        if path.startswith("heldout/") and path != "heldout/disc/01.png":
            (tmp_path / "masks" / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "masks" / path)
    argv = ["evaluate", "--model", photos["model"], "--suite", "folder", "--split", f"heldout={photos['root']}/heldout",
            "--split-masks", f"heldout={tmp_path / 'masks' / 'heldout'}", "--out", str(tmp_path / "report"),
            "--workers", "0", "--no-progress", "--device", "cpu"]
    assert "(or `evaluate --skip-unmasked`)" in cli_error(capsys, argv)
    assert main([*argv, "--skip-unmasked"]) == 0
    split = json.loads((tmp_path / "report" / "folder.json").read_text())["runs"]["before"]["splits"]["heldout"]
    assert (split["n"], split["unmasked"], split["per_class"]["disc"]["n"]) == (11, 1, 3)
    assert "probes" in split and "localisation" in split
    assert "Split `heldout`: 1 image(s) without a mask left out (--skip-unmasked)." in (
        tmp_path / "report" / "folder.md").read_text()
