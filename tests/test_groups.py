"""Group-labelled data: the miniature Waterbirds fixture, the readers and their bad input."""
from __future__ import annotations

import csv

import numpy as np
from PIL import Image

from waterbirds_fixture import write_mini_waterbirds


def test_mini_waterbirds_has_the_release_layout(tmp_path):
    paths = write_mini_waterbirds(tmp_path, per_group={"train": (2, 1, 1, 2), 2: (1, 1, 1, 1)})
    assert paths["root"] == tmp_path / "waterbirds" and paths["segmentations"] == tmp_path / "CUB_200_2011/segmentations"
    with open(paths["metadata"], newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    assert reader.fieldnames == ["img_id", "img_filename", "y", "split", "place", "place_filename"]
    assert [(r["split"], r["y"], r["place"]) for r in rows] == [
        ("0", "0", "0"), ("0", "0", "0"), ("0", "0", "1"), ("0", "1", "0"), ("0", "1", "1"), ("0", "1", "1"),
        ("2", "0", "0"), ("2", "0", "1"), ("2", "1", "0"), ("2", "1", "1")]
    sizes, soft = set(), False
    for row in rows:
        folder, name = row["img_filename"].split("/")
        assert folder[:3].isdigit() and folder[3] == "." and name.endswith(".jpg")
        image = Image.open(paths["root"] / row["img_filename"])
        mask = np.asarray(Image.open(paths["segmentations"] / row["img_filename"].replace(".jpg", ".png")))
        assert mask.shape == (image.height, image.width) and mask.dtype == np.uint8 and mask.max() == 255
        soft |= bool(((mask > 0) & (mask < 255)).any())
        sizes.add(image.size)
    assert soft and len(sizes) > 1


# -- readers -----------------------------------------------------------------------------------
import pytest  # noqa: E402
import torch  # noqa: E402

from relevance_finetune.groups import (CelebADataset, GroupedCsvDataset, WaterbirdsDataset,  # noqa: E402
                                       csv_dataset, read_group_file)


@pytest.fixture(scope="module")
def waterbirds(tmp_path_factory):
    return write_mini_waterbirds(tmp_path_factory.mktemp("wb"))


def test_waterbirds_splits_groups_and_thresholded_masks(waterbirds):
    train = WaterbirdsDataset(waterbirds["root"], "train", masks=waterbirds["segmentations"])
    rows = [r for r in waterbirds["rows"] if r["split"] == 0]
    assert len(train) == len(rows) and train.classes == ["landbird", "waterbird"]
    assert train.groups.tolist() == [2 * r["y"] + r["place"] for r in rows]
    assert train.group_counts == {0: 6, 1: 2, 2: 2, 3: 6} == train.training_group_counts
    assert train.group_names[1] == "landbird on water"
    image, mask, label = train[0]
    soft = np.asarray(Image.open(waterbirds["segmentations"] / rows[0]["img_filename"].replace(".jpg", ".png")))
    assert torch.equal(mask[0], torch.as_tensor(soft >= 128).float()) and label == rows[0]["y"]
    assert image.shape == (3, *soft.shape)
    test = WaterbirdsDataset(waterbirds["root"], 2)  # no masks: accuracy only
    assert test.group_counts == {0: 3, 1: 3, 2: 3, 3: 3} and test.training_group_counts == train.group_counts
    assert bool(test[0][1].all())


def test_waterbirds_release_folder_names(tmp_path):
    paths = write_mini_waterbirds(tmp_path, per_group={0: (1, 1, 1, 1), 1: (1, 1, 1, 1)}, folder="waterbirds_v1.0")
    assert len(WaterbirdsDataset(tmp_path, "val", masks=paths["segmentations"])) == 4
    with pytest.raises(FileNotFoundError, match="no Waterbirds metadata.csv"):
        WaterbirdsDataset(tmp_path / "waterbirds_v1.0" / "001.Black_footed_Albatross")


def _rewrite_metadata(paths, edit):
    with open(paths["metadata"], newline="") as file:
        rows = list(csv.DictReader(file))
    rows = edit(rows)
    with open(paths["metadata"], "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_waterbirds_bad_metadata(tmp_path):
    paths = write_mini_waterbirds(tmp_path, per_group={0: (1, 1, 1, 1)})
    _rewrite_metadata(paths, lambda rows: [{k: v for k, v in r.items() if k != "place"} for r in rows])
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['place'\]"):
        WaterbirdsDataset(paths["root"])
    paths = write_mini_waterbirds(tmp_path / "b", per_group={0: (1, 1, 1, 1)})
    _rewrite_metadata(paths, lambda rows: [{**r, "split": "3" if i == 2 else r["split"]} for i, r in enumerate(rows)])
    with pytest.raises(ValueError, match=r"metadata.csv:4: split '3' is not one of 0, 1, 2"):
        WaterbirdsDataset(paths["root"])


def test_waterbirds_missing_files_are_counted_and_refused_unless_skip_bad(tmp_path):
    paths = write_mini_waterbirds(tmp_path, per_group={0: (2, 1, 1, 2)})
    rows = paths["rows"]
    (paths["root"] / rows[0]["img_filename"]).unlink()
    (paths["segmentations"] / rows[1]["img_filename"].replace(".jpg", ".png")).unlink()
    with pytest.raises(FileNotFoundError, match="2 of the 6 train images .* lack their file, first: image .*--skip-bad"):
        WaterbirdsDataset(paths["root"], masks=paths["segmentations"])
    with pytest.warns(UserWarning, match="skipped 2 bad input"):
        kept = WaterbirdsDataset(paths["root"], masks=paths["segmentations"], skip_bad=True)
    assert len(kept) == 4 and len(kept.skipped) == 2 and kept.groups.tolist() == [2 * r["y"] + r["place"] for r in rows[2:]]


def test_celeba_groups(tmp_path):
    (tmp_path / "img_align_celeba").mkdir()
    names = ["Attractive", "Blond_Hair", "Male"]
    attributes = [(1, -1, 1), (-1, 1, -1), (1, 1, 1), (-1, -1, -1)]
    lines = ["4", " ".join(names)]
    for index, values in enumerate(attributes, 1):
        Image.new("RGB", (10, 12), (index * 40, 0, 0)).save(tmp_path / "img_align_celeba" / f"{index:06d}.jpg")
        lines.append(f"{index:06d}.jpg " + " ".join(f"{v:2d}" for v in values))
    (tmp_path / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 0\n000004.jpg 2\n")
    train = CelebADataset(tmp_path, "train")
    assert [s.label for s in train.samples] == [0, 1, 1] and train.groups.tolist() == [1, 2, 3]
    with pytest.warns(UserWarning, match="blond .* no usable image|no usable image"):
        assert CelebADataset(tmp_path, "test").groups.tolist() == [0]
    assert train.group_names[2] == "blond, female"
    (tmp_path / "list_eval_partition.txt").write_text("000001.jpg 5\n")
    with pytest.raises(ValueError, match="split '5' is not one of 0, 1, 2"):
        CelebADataset(tmp_path)


def test_csv_group_column_and_group_file(tmp_path):
    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
        Image.new("L", (8, 8), 1).save(tmp_path / f"{name}_mask.png")
    (tmp_path / "train.csv").write_text("image,mask,label,group\na.png,a_mask.png,0,night\n"
                                        "b.png,b_mask.png,1,day\nc.png,c_mask.png,1,night\n")
    dataset = csv_dataset(tmp_path / "train.csv")
    assert isinstance(dataset, GroupedCsvDataset)
    assert dataset.groups.tolist() == [1, 0, 1] and dataset.group_names == {0: "day", 1: "night"}
    assert dataset.group_counts == {0: 1, 1: 2}
    (tmp_path / "groups.csv").write_text("path,group\ncat/a.jpg,2\ndog/b.jpg,0\n")
    assert read_group_file(tmp_path / "groups.csv") == ({"cat/a.jpg": 2, "dog/b.jpg": 0}, {0: "0", 2: "2"})
    (tmp_path / "groups.csv").write_text("image,group\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['path'\]"):
        read_group_file(tmp_path / "groups.csv")


# -- train -------------------------------------------------------------------------------------
import json  # noqa: E402

import timm  # noqa: E402

from conftest import cli_error, tiny_model  # noqa: E402
from relevance_finetune import cli  # noqa: E402
from relevance_finetune.data import paired_transforms  # noqa: E402
from relevance_finetune.export import load_finetuned  # noqa: E402


def _tiny_hub(path) -> str:
    timm.models.save_for_hf(tiny_model(num_classes=2), path, safe_serialization=True)
    return f"local-dir:{path}"


def test_train_on_waterbirds_with_cub_masks(waterbirds, tmp_path, capsys):
    args = ["train", "--model", _tiny_hub(tmp_path / "hub"), "--pretrained", "--data-format", "waterbirds",
            "--data", str(waterbirds["root"]), "--epochs", "3", "--batch-size", "4", "--workers", "0",
            "--no-progress", "--lr", "1e-3", "--classification", "ground_truth"]
    assert "pass --masks" in cli_error(capsys, [*args, "--out", str(tmp_path / "nomasks")])
    assert cli.main([*args, "--masks", str(waterbirds["segmentations"]), "--out", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "val_accuracy" in record  # validated on split 1
    assert cli.main(["export", str(tmp_path / "run" / "best.safetensors"), "--out", str(tmp_path / "model")]) == 0
    model = load_finetuned(tmp_path / "model")
    assert model.pretrained_cfg["label_names"] == ["landbird", "waterbird"]

    # evaluate --suite waterbirds equals a by-hand computation from the exported model's predictions
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--model", f"local-dir:{tmp_path / 'model'}", "--suite", "waterbirds",
                     "--data-root", str(waterbirds["root"]), "--out", str(out), "--workers", "0", "--no-progress",
                     "--batch-size", "5", "--device", "cpu"]) == 0
    report = json.loads((out / "waterbirds.json").read_text())
    test_rows = [r for r in waterbirds["rows"] if r["split"] == 2]
    transform = paired_transforms(model)  # the train command's evaluation transform
    predicted = []
    with torch.no_grad():
        for row in test_rows:
            image = Image.open(waterbirds["root"] / row["img_filename"]).convert("RGB")
            tensor, _ = transform(image, np.ones((image.height, image.width), bool))
            predicted.append(int(model(tensor[None]).argmax()))
    accuracy = {}
    for g in range(4):
        hits = [p == r["y"] for p, r in zip(predicted, test_rows) if 2 * r["y"] + r["place"] == g]
        accuracy[g] = sum(hits) / len(hits)
        assert report["groups"][str(g)] == {"name": WaterbirdsDataset.group_names[g], "accuracy": accuracy[g],
                                            "count": 3, "y": g // 2, "place": g % 2}
    assert report["worst_group_accuracy"] == min(accuracy.values())
    assert report["mean_accuracy"] == pytest.approx(sum(p == r["y"] for p, r in zip(predicted, test_rows)) / 12)
    weights = {0: 6 / 16, 1: 2 / 16, 2: 2 / 16, 3: 6 / 16}  # the training split's groups
    assert report["weighted_mean_accuracy"] == pytest.approx(sum(weights[g] * accuracy[g] for g in range(4)))
    assert report["runs"]["before"]["worst_group_accuracy"] == report["worst_group_accuracy"]
    markdown = (out / "waterbirds.md").read_text()
    assert "| mean (test) |" in markdown and "| mean weighted by training groups |" in markdown
    assert f"| 1: landbird on water | 3 | {100 * accuracy[1]:.1f} |" in markdown


def test_train_names_a_missing_metadata_column_in_one_line(tmp_path, capsys):
    paths = write_mini_waterbirds(tmp_path, per_group={0: (1, 1, 1, 1), 1: (1, 1, 1, 1)})
    _rewrite_metadata(paths, lambda rows: [{k: v for k, v in r.items() if k != "split"} for r in rows])
    error = cli_error(capsys, ["train", "--model", _tiny_hub(tmp_path / "hub"), "--data-format", "waterbirds",
                               "--data", str(paths["root"]), "--masks", str(paths["segmentations"]), "--out",
                               str(tmp_path / "run"), "--workers", "0"])
    assert "lacks the column(s) ['split']" in error


def test_evaluate_waterbirds_bad_input(tmp_path, capsys):
    paths = write_mini_waterbirds(tmp_path, per_group={0: (1, 1, 1, 1), 2: (1, 1, 1, 2)})
    hub = _tiny_hub(tmp_path / "hub")
    args = ["evaluate", "--model", hub, "--suite", "waterbirds", "--out", str(tmp_path / "out"), "--workers", "0",
            "--no-progress", "--device", "cpu"]
    assert "needs --data-root WATERBIRDS_DIR" in cli_error(capsys, args)
    timm.models.save_for_hf(tiny_model(num_classes=3), tmp_path / "three", safe_serialization=True)
    three = [*args[:2], f"local-dir:{tmp_path / 'three'}", *args[3:], "--data-root", str(paths["root"])]
    assert "a Waterbirds model has 2 outputs" in cli_error(capsys, three)
    (paths["root"] / paths["rows"][-1]["img_filename"]).unlink()
    args += ["--data-root", str(paths["root"])]
    assert "1 of the 5 test images" in cli_error(capsys, args)
    with pytest.warns(UserWarning, match="skipped 1 bad input"):
        assert cli.main([*args, "--skip-bad"]) == 0
    report = json.loads((tmp_path / "out" / "waterbirds.json").read_text())
    assert report["n"] == 4 and report["groups"]["3"]["count"] == 1
    (paths["root"] / paths["rows"][-2]["img_filename"]).unlink()  # group 3 has no test image left
    with pytest.warns(UserWarning):
        assert "group(s) [3] have training images but none here" in cli_error(capsys, [*args, "--skip-bad"])
