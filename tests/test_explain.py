"""`relevance-finetune explain`: overlays, grids and predictions.json from tiny local models."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import ImageNetInfo, create_transform, resolve_model_data_config

from conftest import tiny_model
from relevance_finetune import attach_gae, explain, viz
from relevance_finetune.cli import main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A 1000-class tiny ViT saved as local-dir, a second checkpoint of it, and an image folder."""
    root = tmp_path_factory.mktemp("explain")
    timm.models.save_for_hf(tiny_model(num_classes=1000, seed=0), root / "vit", safe_serialization=True)
    save_file(tiny_model(num_classes=1000, seed=1).state_dict(), root / "other.safetensors")
    save_file(tiny_model(num_classes=5).state_dict(), root / "five_classes.safetensors")
    rng = np.random.default_rng(0)
    (root / "images" / "nested").mkdir(parents=True)
    for name, size in [("a.png", (40, 48)), ("nested/b.jpg", (36, 36)), ("nested/c.png", (50, 32))]:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "images" / name)
    (root / "images" / "notes.txt").write_text("not an image, skipped in directories")
    return root


def explain_cli(workspace, *args) -> int:
    return main(["explain", "--model", f"local-dir:{workspace / 'vit'}", "--pretrained", *map(str, args)])


def model_view(path):
    """What the tiny models see for an image file: the timm transform's output (1, 3, 32, 32)."""
    config = resolve_model_data_config(tiny_model())
    config["input_size"] = (3, 32, 32)
    return create_transform(**config)(Image.open(path).convert("RGB"))[None]


def test_overlays_show_the_models_relevance(workspace, tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(explain, "save_overlay", lambda path, *drawn: saved.append((path, *drawn)))
    assert explain_cli(workspace, workspace / "images", "--out", tmp_path, "--target", 7) == 0
    model = timm.create_model(f"local-dir:{workspace / 'vit'}", pretrained=True).eval()
    paths = sorted((workspace / "images").rglob("*.[jp][pn]g"))
    assert [p.name for p, *_ in saved] == ["000_a.png", "001_b.png", "002_c.png"]
    for image_path, (_, image, heat, title) in zip(paths, saved):
        batch = model_view(image_path)
        with attach_gae(model) as gae:
            torch.testing.assert_close(heat, gae.explain(batch, 7)[0])
        torch.testing.assert_close(image, viz.denormalize(batch[0], resolve_model_data_config(model)))
        assert title.endswith("relevance for " + ImageNetInfo().index_to_description(7).split(",")[0])


def test_predictions_json_holds_top5_with_imagenet_names(workspace, tmp_path):
    assert explain_cli(workspace, workspace / "images" / "a.png", "--out", tmp_path) == 0
    record, = json.loads((tmp_path / "predictions.json").read_text())["images"]
    model = timm.create_model(f"local-dir:{workspace / 'vit'}", pretrained=True).eval()
    with torch.no_grad():
        probabilities = model(model_view(workspace / "images" / "a.png"))[0].softmax(0)
    expected = probabilities.topk(5)
    assert [p["index"] for p in record["top5"]] == expected.indices.tolist()
    np.testing.assert_allclose([p["probability"] for p in record["top5"]], expected.values, atol=1e-5)
    names = [ImageNetInfo().index_to_description(i).split(",")[0] for i in expected.indices.tolist()]
    assert [p["label"] for p in record["top5"]] == names
    with Image.open(tmp_path / record["overlay"]) as png:
        assert png.format == "PNG"


def test_checkpoint_without_imagenet_classes_uses_indices(workspace, tmp_path):
    timm.models.save_for_hf(tiny_model(num_classes=5, seed=3), tmp_path / "vit5", safe_serialization=True)
    args = ["explain", "--model", f"local-dir:{tmp_path / 'vit5'}", "--checkpoint",
            workspace / "five_classes.safetensors", workspace / "images" / "a.png", "--out", tmp_path / "out"]
    assert main(list(map(str, args))) == 0
    top5 = json.loads((tmp_path / "out" / "predictions.json").read_text())["images"][0]["top5"]
    with torch.no_grad():  # the --checkpoint weights (tiny_model seed 0), not the directory's
        expected = tiny_model(num_classes=5)(model_view(workspace / "images" / "a.png"))
    assert [p["label"] for p in top5] == [str(i) for i in expected[0].argsort(descending=True).tolist()]


def test_compare_writes_before_after_grids(workspace, tmp_path, monkeypatch):
    grids = []
    monkeypatch.setattr(explain, "before_after_grid", lambda *a, **k: grids.append(a))
    out = tmp_path / "out"
    assert explain_cli(workspace, workspace / "images", "--compare", workspace / "other.safetensors",
                       "--batch-size", 2, "--out", out) == 0
    assert [len(grid[0]) for grid in grids] == [2, 1]
    assert [grid[-1].name for grid in grids] == ["compare_000.png", "compare_001.png"]
    after = tiny_model(num_classes=1000, seed=1)
    with attach_gae(after) as gae:
        torch.testing.assert_close(grids[1][2], gae.explain(model_view(workspace / "images" / "nested" / "c.png")))
    records = json.loads((out / "predictions.json").read_text())["images"]
    assert [(r["grid"], r["column"]) for r in records] == [("compare_000.png", 0), ("compare_000.png", 1),
                                                           ("compare_001.png", 0)]
    assert all(r["top5"] != r["top5_compare"] for r in records)


def test_compare_names_each_models_classes_and_the_true_one(tmp_path, monkeypatch):
    """The compare model's own label_names (another order) name its predictions and its true class."""
    from relevance_finetune.export import save_finetuned
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / name / "0.png")
    timm.models.save_for_hf(tiny_model(num_classes=2, seed=0), tmp_path / "base", safe_serialization=True,
                            model_config={"label_names": ["dog", "cat"]})
    other = tiny_model(num_classes=2, seed=1)
    other.pretrained_cfg = {**other.pretrained_cfg, "label_names": ["cat", "dog"]}
    save_finetuned(other, tmp_path / "other")
    grids = []
    monkeypatch.setattr(explain, "before_after_grid", lambda *a, **k: grids.append(a))
    assert main(["explain", "--model", f"local-dir:{tmp_path / 'base'}", "--compare", str(tmp_path / "other"),
                 str(tmp_path / "images"), "--out", str(tmp_path / "out")]) == 0
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())["images"]
    assert [r["true"] for r in records] == [{"label": "cat", "index": 1, "index_compare": 0},
                                            {"label": "dog", "index": 0, "index_compare": 1}]
    for record in records:
        assert {p["index"]: p["label"] for p in record["top5"]} == {0: "dog", 1: "cat"}
        assert {p["index"]: p["label"] for p in record["top5_compare"]} == {0: "cat", 1: "dog"}
    titles_after = grids[0][4]
    assert [t.split(", true: ")[1] for t in titles_after] == ["cat", "dog"]
    assert [t.split(": ")[1].split(" (")[0] for t in titles_after] == [r["top5_compare"][0]["label"] for r in records]


def test_folder_class_names_and_true_classes_title_the_panels(tmp_path, monkeypatch):
    """A run on cat/dog folders records the names; explain shows them, and the true class of an
    image in a cat/ or dog/ folder."""
    from test_train import tiny_hub, write_masked_folder
    write_masked_folder(tmp_path / "data", per_class=1)
    hub = tiny_hub(tmp_path / "hub", num_classes=2)
    assert main(["train", "--model", hub, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                 "--epochs", "1", "--batch-size", "2", "--workers", "0", "--no-progress"]) == 0
    titles = []
    monkeypatch.setattr(explain, "save_overlay", lambda path, image, heat, title: titles.append(title))
    assert main(["explain", "--model", hub, "--checkpoint", str(tmp_path / "run" / "last.safetensors"),
                 str(tmp_path / "data" / "images"), "--out", str(tmp_path / "out")]) == 0
    records = json.loads((tmp_path / "out" / "predictions.json").read_text())["images"]
    assert [r["true"] for r in records] == [{"index": 0, "label": "cat"}, {"index": 1, "label": "dog"}]
    assert all(p["label"] in ("cat", "dog") for r in records for p in r["top5"])
    assert [t.split(", true: ")[1] for t in titles] == ["cat", "dog"]


def test_explain_images_feeds_the_models_input_size(workspace, tmp_path):
    model = tiny_model()  # built for 32 x 32 while its pretrained config still says 224 x 224
    records = explain.explain_images(model, [workspace / "images" / "a.png"], tmp_path, batch_size=1)
    assert [r["overlay"] for r in records] == ["000_a.png"] and (tmp_path / "000_a.png").is_file()
    assert sorted(p["label"] for p in records[0]["top5"]) == ["0", "1", "2", "3", "4"]  # no ImageNet names


def test_compare_grid_is_a_png(workspace, tmp_path):
    assert explain_cli(workspace, workspace / "images" / "a.png", "--compare", workspace / "other.safetensors",
                       "--out", tmp_path) == 0
    with Image.open(tmp_path / "compare_000.png") as png:
        assert png.format == "PNG" and png.height > png.width  # one column, three rows


@pytest.mark.parametrize("case, message", [
    ("unreadable", "cannot read image"),
    ("empty_dir", "no images"),
    ("missing", "no such file or directory"),
    ("target", r"--target must be a class index in \[0, 1000\)"),
    ("compare_mismatch", "do not fit"),
])
def test_bad_input_is_one_clear_error(workspace, tmp_path, capsys, case, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    inputs = {"unreadable": [tmp_path / "bad.jpg"], "empty_dir": [tmp_path / "empty"],
              "missing": [tmp_path / "nothing.png"]}.get(case, [workspace / "images"])
    extra = {"target": ["--target", 1000], "compare_mismatch": ["--compare", workspace / "five_classes.safetensors"]}
    assert explain_cli(workspace, *inputs, *extra.get(case, []), "--out", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert err.startswith("relevance-finetune explain: error:") and re.search(message, err)
    assert not (tmp_path / "out" / "predictions.json").exists()


def test_unsupported_model_is_one_clear_error(tmp_path, capsys):
    swin = timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=4, window_size=2,
                             embed_dim=8, depths=(1,), num_heads=(1,), num_classes=3)
    timm.models.save_for_hf(swin, tmp_path / "swin", safe_serialization=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    args = ["explain", "--model", f"local-dir:{tmp_path / 'swin'}", "--pretrained", tmp_path / "x.png",
            "--out", tmp_path / "out"]
    assert main(list(map(str, args))) == 1
    err = capsys.readouterr().err
    assert err.startswith("relevance-finetune explain: error: SwinTransformer uses WindowAttention")


def record_explained_weights(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """The state dicts of the models that ``explain`` runs, one per batch, as it runs them."""
    used, explain_batch = [], explain._explain_batch

    def recording(model, *args):
        used.append(model.state_dict())
        return explain_batch(model, *args)

    monkeypatch.setattr(explain, "_explain_batch", recording)
    return used


def test_local_dir_model_means_its_weights_without_pretrained(workspace, tmp_path, monkeypatch, capsys):
    """``local-dir:DIR`` loads DIR's weights in every command: no --pretrained needed, the same output twice."""
    saved = timm.create_model(f"local-dir:{workspace / 'vit'}", pretrained=True).state_dict()
    used = record_explained_weights(monkeypatch)
    for seed in (0, 1):  # a random initialisation would differ between the two runs
        torch.manual_seed(seed)
        args = ["explain", "--model", f"local-dir:{workspace / 'vit'}", workspace / "images" / "a.png",
                "--out", tmp_path / str(seed)]
        assert main(list(map(str, args))) == 0
    assert "random weights" not in capsys.readouterr().err
    assert len(used) == 2 and all(torch.equal(state[k], saved[k]) for state in used for k in saved)
    first, second = (json.loads((tmp_path / str(seed) / "predictions.json").read_text())["images"][0]["top5"]
                     for seed in (0, 1))
    assert first == second


def test_random_weights_are_asked_for(workspace, tmp_path, monkeypatch, capsys):
    """--random-weights ignores the folder's weights; it excludes --pretrained (argparse) and --checkpoint."""
    used = record_explained_weights(monkeypatch)
    base = ["explain", "--model", f"local-dir:{workspace / 'vit'}", str(workspace / "images" / "a.png"),
            "--out", str(tmp_path / "out")]
    assert main([*base, "--random-weights"]) == 0
    saved = timm.create_model(f"local-dir:{workspace / 'vit'}", pretrained=True).state_dict()
    assert not torch.equal(used[0]["head.weight"], saved["head.weight"])
    assert main([*base, "--random-weights", "--checkpoint", str(workspace / "other.safetensors")]) == 1
    assert "random weights exclude --pretrained and --checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--random-weights", "--pretrained"])
