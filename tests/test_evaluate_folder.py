"""The folder suite of ``relevance-finetune evaluate``: the user's own classes, with and without masks."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models import save_for_hf

from conftest import TINY_MODELS, cli_error, tiny_model
from relevance_finetune.cli import main
from relevance_finetune.evaluate import FolderSplit, evaluate_folder, folder_class_indices, imagenet_synsets
from relevance_finetune.evaluate.folder import _relabel, folder_datasets, unit_transform
from relevance_finetune.gae import attach_gae
from relevance_finetune.models import build_model
from relevance_finetune.probes import replace_region

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
LABEL_NAMES = ["red", "blue", "green"]  # the model's order, not the folders' sorted order
COUNTS = {"red": 1, "green": 2, "blue": 3}  # unequal, so a wrong class order changes top-1
SIZE = 32  # the tiny ViT's input: with crop_pct 1 the eval transform keeps the images as they are


def _write_split(root: Path, seed: int, masks: bool = True, counts: dict[str, int] = COUNTS) -> FolderSplit:
    """Random-noise images, each with its class's coloured square; masks mark the square."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        (root / "masks" / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
            top, left = rng.integers(0, SIZE // 2, 2)
            image[top:top + 12, left:left + 12] = COLOURS[name]
            mask[top:top + 12, left:left + 12] = 255
            Image.fromarray(image).save(root / "images" / name / f"{i}.png")
            Image.fromarray(mask).save(root / "masks" / name / f"{i}.png")
    return FolderSplit(str(root / "images"), str(root / "masks") if masks else None)


def _save_model(path: Path, seed: int, label_names: list[str] | None = LABEL_NAMES, num_classes: int = 3) -> str:
    model = tiny_model("vit_cls", num_classes=num_classes, seed=seed)
    with torch.no_grad():
        model.head.weight.mul_(50)  # a sharp head: predictions that vary from image to image
    model.pretrained_cfg = {**model.pretrained_cfg, "crop_pct": 1.0}
    config = {"label_names": label_names} if label_names else None
    save_for_hf(model, str(path), model_config=config, model_args=TINY_MODELS["vit_cls"][1], safe_serialization=True)
    return f"local-dir:{path}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("folder")
    _save_model(root / "compare", 0)  # other weights for the same model: an export folder
    return {"id": _write_split(root / "id", 0), "ood": _write_split(root / "ood", 1, masks=False),
            "model": _save_model(root / "model", 1), "compare": str(root / "compare")}


def _tensor(path: str | Path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.5  # the tiny ViT's mean and std


def _common(out: Path) -> list[str]:
    return ["--out", str(out), "--workers", "0", "--batch-size", "4", "--no-progress", "--device", "cpu"]


# -- numbers against a direct computation ---------------------------------------------------------------
def test_top1_and_per_class_match_a_hand_computation(data):
    model = build_model(data["model"])
    result = evaluate_folder(model, {"id": data["id"], "ood": data["ood"]}, batch_size=4, num_workers=0,
                             progress=False)
    assert result["classes"] == {"blue": 1, "green": 2, "red": 0}  # from label_names, not sorted order
    for split in ("id", "ood"):
        hits = {}
        for name in COUNTS:
            files = sorted((Path(data[split].images) / name).iterdir())
            with torch.no_grad():
                predicted = model(_normalize(torch.stack([_tensor(f) for f in files]))).argmax(dim=1)
            hits[name] = (predicted == LABEL_NAMES.index(name)).tolist()
        every = sum(hits.values(), [])
        got = result["splits"][split]
        assert got["n"] == 6 and got["top1"] == pytest.approx(100 * sum(every) / len(every))
        for name, correct in hits.items():
            expected = 100 * sum(correct) / len(correct)
            assert got["per_class"][name] == {"n": COUNTS[name], "top1": pytest.approx(expected)}
    id_split, ood = result["splits"]["id"], result["splits"]["ood"]
    assert id_split["probes"]["full"] == pytest.approx(id_split["top1"])  # the probes' own forward agrees
    assert "probes" not in ood and "localisation" not in ood and "masks" in ood["note"]
    assert [e["split"] for e in result["examples"]] == ["id"] * 4
    assert {e["true"] for e in result["examples"][:3]} == set(COUNTS)  # one of each class first
    assert np.array(result["examples"][0]["relevance"]).shape == (4, 4)  # the patch grid


def test_background_only_and_localisation_by_hand_on_one_image(data, tmp_path):
    model = build_model(data["model"])
    split = _write_split(tmp_path, 2, counts={"red": 1})
    image = _tensor(Path(split.images) / "red/0.png")[None]
    mask = _tensor(Path(split.masks) / "red/0.png")[:1][None]
    probed = {"grey": image * (1 - mask) + 0.5 * mask,
              "mean": image * (1 - mask) + image.mean(dim=(2, 3), keepdim=True) * mask,
              "blur": replace_region(image, mask, "object", "blur")}
    with torch.no_grad():
        predicted = {fill: int(model(_normalize(x)).argmax()) for fill, x in probed.items()}
    truth = LABEL_NAMES[predicted["grey"]]  # the class the grey-filled background is taken for
    for folder in (split.images, split.masks):
        (Path(folder) / "red").rename(Path(folder) / truth)
    result = evaluate_folder(model, {"one": split}, num_workers=0, progress=False)["splits"]["one"]
    for fill, index in predicted.items():
        assert result["probes"][f"background_only/{fill}"] == 100.0 * (index == predicted["grey"])
    assert result["probes"]["background_only/grey"] == 100.0
    assert result["probes"]["background_only"] == pytest.approx(
        100 * sum(i == predicted["grey"] for i in predicted.values()) / 3)
    with attach_gae(model) as gae:
        relevance = gae.explain(_normalize(image))[0]
    inside = mask[0, 0] > 0.5
    assert result["localisation"]["mass_accuracy"] == pytest.approx(
        100 * float(relevance[inside].sum() / relevance.sum()), rel=1e-5)
    peak = relevance == relevance.max()  # a hit when any pixel holding the maximum is on the object
    assert result["localisation"]["pointing_game"] == 100.0 * bool((peak & inside).any())


def test_relabelling_moves_the_class_indices_with_the_labels(data):
    dataset = folder_datasets({"id": data["id"]}, unit_transform(build_model(data["model"]).pretrained_cfg))["id"]
    index = {"red": 0, "blue": 1, "green": 2}  # the model's order; the folders' sorted order is blue, green, red
    _relabel(dataset, index)
    assert dataset.class_to_idx == index and dataset.label_names == LABEL_NAMES
    assert all(sample.label == index[Path(sample.image).parent.name] for sample in dataset.samples)


def test_class_indices_rules():
    named = tiny_model("vit_cls", num_classes=3)
    named.pretrained_cfg = {**named.pretrained_cfg, "label_names": LABEL_NAMES}
    assert folder_class_indices(named, ["blue", "red"]) == ({"blue": 1, "red": 0}, LABEL_NAMES)
    with pytest.raises(ValueError, match=r"class folder\(s\) \['cyan'\] are not among the model's 3 label_names"):
        folder_class_indices(named, ["cyan", "red"])
    unnamed = tiny_model("vit_cls", num_classes=3)
    assert folder_class_indices(unnamed, ["c", "a", "b"])[0] == {"a": 0, "b": 1, "c": 2}
    with pytest.raises(ValueError, match="2 class folders .* the model has 3 outputs and no label_names"):
        folder_class_indices(unnamed, ["a", "b"])
    imagenet = tiny_model("vit_cls", num_classes=1000)
    wnids = [imagenet_synsets()[i] for i in (7, 3)]
    index, names = folder_class_indices(imagenet, wnids)
    assert index == {wnids[0]: 7, wnids[1]: 3} and names[7] == wnids[0]


# -- the command --------------------------------------------------------------------------------------
def test_command_compare_writes_both_rows_changes_and_pictures(data, tmp_path):
    argv = ["evaluate", "--model", data["model"], "--compare", data["compare"], "--suite", "folder",
            "--split", f"id={data['id'].images}", "--split-masks", f"id={data['id'].masks}",
            "--split", f"ood_noise={data['ood'].images}", *_common(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "folder.json").read_text())
    before, after = report["runs"]["before"]["splits"], report["runs"]["after"]["splits"]
    assert list(before) == ["id", "ood_noise"]
    assert report["change"]["id"]["top1"] == pytest.approx(after["id"]["top1"] - before["id"]["top1"])
    assert report["change"]["id"]["probes/background_only"] == pytest.approx(
        after["id"]["probes"]["background_only"] - before["id"]["probes"]["background_only"])
    assert set(report["change"]["ood_noise"]) == {"top1"}  # nothing else measured without masks
    markdown = (tmp_path / "folder.md").read_text()
    for row in ("| id | before | 6 |", "| id | after | 6 |", "| id | change |", "| ood_noise | change |"):
        assert row in markdown
    assert "| Background-only |" in markdown and "Split `ood_noise`: no masks" in markdown
    for picture in ("folder_probes.png", "folder_relevance.png"):
        with Image.open(tmp_path / picture) as image:
            assert image.format == "PNG" and min(image.size) > 100
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_command_without_masks_omits_the_probe_columns(data, tmp_path):
    assert main(["evaluate", "--model", data["model"], "--suite", "folder", "--split", f"ood={data['ood'].images}",
                 *_common(tmp_path)]) == 0
    markdown = (tmp_path / "folder.md").read_text()
    assert "| Split | Run | Images | Top-1 |\n" in markdown and "Object-only" not in markdown
    assert "no masks: reliance probes and localisation not measured" in markdown
    split = json.loads((tmp_path / "folder.json").read_text())["runs"]["before"]["splits"]["ood"]
    assert "probes" not in split and "localisation" not in split
    assert not list(tmp_path.glob("*.png"))


def _blank_masks(split: FolderSplit, count: int | None = None) -> None:
    """Make the first ``count`` masks (default all) empty."""
    for path in sorted(Path(split.masks).glob("*/*.png"))[:count]:
        Image.fromarray(np.zeros((SIZE, SIZE), dtype=np.uint8)).save(path)


def test_empty_masks_give_no_localisation_figures(data, tmp_path):
    split = _write_split(tmp_path / "data", 4)
    _blank_masks(split)
    argv = ["evaluate", "--model", data["model"], "--compare", data["compare"], "--suite", "folder",
            "--split", f"blank={split.images}", "--split-masks", f"blank={split.masks}", *_common(tmp_path / "out")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out/folder.json").read_text())
    result = report["runs"]["after"]["splits"]["blank"]
    assert result["probes"] is None and result["localisation"] is None and result["unusable_masks"] == 6
    assert "no mask has both object and background (6 empty, 0 full)" in result["not_measured"]
    assert set(report["change"]["blank"]) == {"top1"}
    markdown = (tmp_path / "out/folder.md").read_text()
    assert markdown.count("n/a (no usable mask)") == 2 * 6  # two runs, six probe and localisation columns
    assert "Split `blank`: no mask has both object and background" in markdown
    assert not (tmp_path / "out/folder_probes.png").exists()


def test_images_with_unusable_masks_are_left_out_of_the_probes(data, tmp_path):
    model = build_model(data["model"])
    split = _write_split(tmp_path, 5)
    _blank_masks(split, 2)
    result = evaluate_folder(model, {"some": split}, num_workers=0, progress=False)["splits"]["some"]
    assert result["unusable_masks"] == 2 and result["localisation"]["images"] == 4
    assert "2 image(s) whose mask is empty or full (2 empty) left out" in result["note"]
    kept = sorted(Path(split.images).glob("*/*.png"))[2:]  # the blanked masks are the first two (blue/0, blue/1)
    with torch.no_grad():
        predicted = model(_normalize(torch.stack([_tensor(f) for f in kept]))).argmax(dim=1).tolist()
    correct = [p == LABEL_NAMES.index(f.parent.name) for p, f in zip(predicted, kept)]
    assert result["probes"]["full"] == pytest.approx(100 * sum(correct) / 4)


def _bad_split(root: Path, case: str) -> list[str]:
    """The ``--split``/``--split-masks`` flags of a broken split ``case``."""
    split = _write_split(root / "data", 3, counts={"red": 1, "blue": 1})
    images, masks = Path(split.images), Path(split.masks)
    if case == "empty class":
        (images / "green").mkdir()
    elif case == "no classes":
        images = root / "nothing"
        images.mkdir()
    elif case == "unknown class":
        (images / "red").rename(images / "cyan")
        (masks / "red").rename(masks / "cyan")
    elif case == "mask size":
        Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(masks / "red/0.png")
    elif case == "missing mask":
        (masks / "red/0.png").unlink()
    return ["--split", f"id={images}", "--split-masks", f"id={masks}"]


@pytest.mark.parametrize("case, message", [
    ("empty class", "class folder .*green holds no images"),
    ("no classes", "holds no class folders"),
    ("unknown class", r"class folder\(s\) \['cyan'\] are not among the model's 3 label_names"),
    ("mask size", r"mask .*red/0.png is 16x16 but image .*red/0.png is 32x32"),
    ("missing mask", "no mask for image .*red/0.png"),
])
def test_bad_splits_give_one_line_errors(case, message, data, tmp_path, capsys):
    error = cli_error(capsys, ["evaluate", "--model", data["model"], "--suite", "folder",
                               *_bad_split(tmp_path, case), *_common(tmp_path / "out")])
    assert re.search(message, error), error


@pytest.mark.parametrize("flags, message", [
    (["--suite", "folder"], "--suite folder needs --split NAME=DIR"),
    (["--suite", "folder", "--split", "id=x", "--split-masks", "val=y"], r"--split-masks names \['val'\]"),
    (["--suite", "folder", "--split", "id=x", "--split", "id=y"], "NAME=PATH with a new NAME each time"),
    (["--split", "id=x"], "read by --suite folder only"),
])
def test_bad_flags_give_one_line_errors(flags, message, data, tmp_path, capsys):
    error = cli_error(capsys, ["evaluate", "--model", data["model"], *flags, *_common(tmp_path)])
    assert re.search(message, error), error


def test_head_without_label_names_of_another_size_is_refused(data, tmp_path, capsys):
    model = _save_model(tmp_path / "five", 0, label_names=None, num_classes=5)
    error = cli_error(capsys, ["evaluate", "--model", model, "--suite", "folder", "--split",
                               f"id={data['id'].images}", *_common(tmp_path)])
    assert "3 class folders ['blue', 'green', 'red'] but the model has 5 outputs and no label_names" in error


# -- groups ------------------------------------------------------------------------------------------------
def test_groups_file_gives_per_group_accuracy_equal_to_a_hand_computation(data, tmp_path, capsys):
    model = build_model(data["model"])
    files = {name: sorted((Path(data["id"].images) / name).iterdir()) for name in COUNTS}
    # group "dark" = the first two images of each class, "bright" the rest (one): unequal groups
    rows = [(f"{name}/{f.name}", "dark" if i < 2 else "bright") for name, fs in files.items() for i, f in enumerate(fs)]
    (tmp_path / "groups.csv").write_text("path,group\n" + "".join(f"{p},{g}\n" for p, g in rows))
    out = tmp_path / "out"
    assert main(["evaluate", "--model", data["model"], "--suite", "folder", "--split", f"id={data['id'].images}",
                 "--groups", str(tmp_path / "groups.csv"), *_common(out)]) == 0
    got = json.loads((out / "folder.json").read_text())["runs"]["before"]["splits"]["id"]["groups"]
    hits = {"bright": [], "dark": []}
    for name, fs in files.items():
        with torch.no_grad():
            predicted = model(_normalize(torch.stack([_tensor(f) for f in fs]))).argmax(dim=1).tolist()
        for i, p in enumerate(predicted):
            hits["dark" if i < 2 else "bright"].append(p == LABEL_NAMES.index(name))
    accuracy = {g: sum(h) / len(h) for g, h in hits.items()}
    assert accuracy["bright"] != accuracy["dark"], accuracy  # the groups differ, so the two means do
    assert got["groups"] == {"0": {"name": "bright", "accuracy": accuracy["bright"], "count": 1},
                             "1": {"name": "dark", "accuracy": accuracy["dark"], "count": 5}}
    assert got["worst_group_accuracy"] == min(accuracy.values())
    assert got["mean_accuracy"] == pytest.approx(sum(hits["bright"] + hits["dark"]) / 6)
    assert got["group_balanced_mean_accuracy"] == pytest.approx((accuracy["bright"] + accuracy["dark"]) / 2)
    markdown = (out / "folder.md").read_text()
    assert "Groups of split `id`" in markdown and "| mean over groups (group-balanced) |" in markdown
    (tmp_path / "groups.csv").write_text("path,group\n" + "".join(f"{p},{g}\n" for p, g in rows[1:]))
    error = cli_error(capsys, ["evaluate", "--model", data["model"], "--suite", "folder", "--split",
                               f"id={data['id'].images}", "--groups", str(tmp_path / "groups.csv"), *_common(out)])
    assert "gives no group to 1 of the 6 images" in error and rows[0][0] in error
    assert "read by --suite folder only" in cli_error(capsys, ["evaluate", "--model", data["model"], "--groups",
                                                               str(tmp_path / "groups.csv"), *_common(out)])
