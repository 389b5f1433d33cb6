"""``train --recipe head`` and ``--recipe two_stage_head``: the head refit as a stage of a run."""
from __future__ import annotations

import functools
import json
import logging

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_MODELS, cli_error, tiny_model
from relevance_finetune import cli
from relevance_finetune.checkpoint import load_checkpoint
from relevance_finetune.head import DFR_C, refit_head
from relevance_finetune.train import refit as refit_module
from relevance_finetune.models import create_model_from_spec, load_weights
from test_train import tiny_hub
from test_train_runs import TINY_RANDOM, train_args, write_folder

HEAD = ("head.weight", "head.bias")


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def differing(a: dict, b: dict) -> set[str]:
    assert a.keys() == b.keys()
    return {key for key in a if not torch.equal(a[key], b[key])}


@pytest.fixture
def data(tmp_path) -> str:
    return write_folder(tmp_path / "data", per_class=3)


@pytest.fixture
def hub(tmp_path) -> str:
    return tiny_hub(tmp_path / "hub", num_classes=3)


def test_head_recipe_refits_only_the_head_and_exports_as_any_run(tmp_path, data, hub, caplog):
    caplog.set_level(logging.INFO)
    run = tmp_path / "run"
    assert cli.main(train_args(data, run, "--model", hub, "--recipe", "head")) == 0
    assert {p.name for p in run.iterdir()} == {"config.yaml", "metrics.jsonl", "last.safetensors", "best.safetensors"}
    start, best = load_file(tmp_path / "hub" / "model.safetensors"), load_file(run / "best.safetensors")
    assert differing(start, best) == set(HEAD)
    assert differing(best, load_file(run / "last.safetensors")) == set()
    (record,) = records(run)  # no epoch: the refit alone
    assert record["stage"] == "head_refit" and record["selected_on"] == "held_out" and record["source"] == "model"
    assert record["C"] in DFR_C and [s["C"] for s in record["scores"]] == sorted(DFR_C)
    assert record["rows"] == 9 * 5 and record["features"] == 32 and record["seconds"] > 0
    assert f"C={record['C']:g} of 7 by the worst-class accuracy on the held-out training images'" in caplog.text
    assert "best.safetensors holds the model given with its head refit; wrote config.yaml, metrics.jsonl, " \
           "last.safetensors, best.safetensors in" in caplog.text
    _, info, trainer_state = load_checkpoint(run / "best.safetensors")
    assert trainer_state is None and info["head_refit"]["C"] == record["C"] and info["config"]["finetune"] is False

    assert cli.main(["export", str(run / "best.safetensors"), "--out", str(tmp_path / "export")]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "**Head refit:** the linear head refit on counterfactual views of the masked images without a " \
           f"finetune" in card and f"C={record['C']:.4g}, chosen on held-out training images' views" in card
    assert "with its linear head refit by relevance-finetune" in card and "no relevance objective" in card
    assert "**Loss weights:** none (no finetune)" in card and "**Run metrics:** none measured after the head refit" in card
    for claim in ("RobustViT objective", "lambda_", "  - lr:", "  - epochs:", "  - batch_size:", "robustvit",
                  "chefer2022"):
        assert claim not in card, claim
    assert "  - head_views: 4" in card and "kirichenko2023last" in card
    exported = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    refit = load_weights(create_model_from_spec(info["model"]), run / "best.safetensors").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(exported(images), refit(images))


def test_two_stage_head_refits_the_finetunes_best_and_resumes(tmp_path, data, hub, caplog):
    caplog.set_level(logging.INFO)
    run, val = tmp_path / "run", write_folder(tmp_path / "val", per_class=1)
    args = train_args(data, run, "--model", hub, "--recipe", "two_stage_head", "--val-data", val)
    assert cli.main(args) == 0
    before, best = load_file(run / "best_before_head.safetensors"), load_file(run / "best.safetensors")
    assert differing(before, best) == set(HEAD)
    assert [r.get("epoch") for r in records(run)] == [1, None]
    refit = records(run)[-1]
    assert (refit["source"], refit["selected_on"], refit["rows"]) == ("best_before_head.safetensors", "validation", 45)
    assert "best_before_head.safetensors holds epoch 1 of 1 (--select counterfactual" in caplog.text
    assert "on the validation images' counterfactual views" in caplog.text
    assert "best.safetensors holds best_before_head.safetensors's model with its head refit" in caplog.text
    _, info, _ = load_checkpoint(run / "best.safetensors")
    assert info["epoch"] == 1 and info["config"]["head_refit"] and info["head_refit"]["source"] == refit["source"]
    assert cli.main(["export", str(run / "best.safetensors"), "--out", str(tmp_path / "export")]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert cli.main(["evaluate", "--model", f"local-dir:{tmp_path / 'export'}", "--suite", "folder", "--split",
                     f"val={val}/images", "--out", str(tmp_path / "eval"), "--workers", "0", "--no-progress"]) == 0
    top1 = json.loads((tmp_path / "eval" / "folder.json").read_text())["runs"]["before"]["splits"]["val"]["top1"]
    accuracy = refit["val_accuracy"]
    assert 100 * accuracy == pytest.approx(top1)  # the refit model's, as `evaluate` scores it
    assert f"validation accuracy {accuracy:.3f} after it" in caplog.text
    finetuned = records(run)[0]
    assert f"**Validation metrics (after the head refit):**\n  - accuracy: {accuracy:.4g}\n" in card
    assert "**Validation metrics of the finetune, before the head refit (epoch 1):**\n" \
           f"  - loss: {finetuned['val_loss']:.4g}" in card
    assert "RobustViT objective" in card and "Its linear head was then refit" in card and "  - lr:" in card

    epochs = args.index("--epochs")  # a longer run continues the finetune, then refits its best again
    assert cli.main([*args[:epochs], "--epochs", "2", "--resume", *args[epochs + 2:]]) == 0
    assert [r.get("epoch") for r in records(run)] == [1, 2, None]
    assert differing(load_file(run / "best_before_head.safetensors"), load_file(run / "best.safetensors")) == set(HEAD)


def test_c_is_chosen_on_the_held_out_validation_images(tmp_path, caplog):
    data = write_folder(tmp_path / "data", per_class=4)
    hub = tiny_hub(tmp_path / "hub", num_classes=3)
    # seed 1 holds out 4 of the 12 images, at least one of each class: only the other 8 are refit
    assert cli.main(train_args(data, tmp_path / "run", "--model", hub, "--recipe", "head", "--val-fraction", "0.34",
                               "--seed", "1")) == 0
    (record,) = records(tmp_path / "run")
    assert record["selected_on"] == "validation" and record["rows"] == 8 * 5


def test_one_candidate_c_is_recorded_and_summarised(tmp_path, data, hub, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(refit_module, "refit_head", functools.partial(refit_head, C=(0.1,)))
    assert cli.main(train_args(data, tmp_path / "run", "--model", hub, "--recipe", "head")) == 0
    (record,) = records(tmp_path / "run")
    assert (record["C"], record["scores"], record["selected_on"]) == (0.1, [], None)
    assert "head refit: C=0.1, the one candidate (nothing to choose); 45 images" in caplog.text


def test_a_model_without_a_head_gets_one_sized_from_the_data_and_says_so(tmp_path, data, caplog):
    caplog.set_level(logging.INFO)
    hub = tiny_hub(tmp_path / "hub", num_classes=0)  # a feature extractor: no head at all
    assert cli.main(train_args(data, tmp_path / "run", "--model", hub, "--recipe", "head")) == 0
    said = [r.getMessage() for r in caplog.records if "training a new 3-class head" in r.getMessage()]
    assert said == ["train: the data have 3 classes and the model 0 outputs: training a new 3-class head (seeded by "
                    "--seed); --num-classes N keeps another size"]
    best = load_file(tmp_path / "run" / "best.safetensors")
    assert best["head.weight"].shape == (3, 32) and records(tmp_path / "run")[0]["stage"] == "head_refit"


def test_the_same_command_and_seed_give_the_same_refit(tmp_path, data, hub):
    for run in ("a", "b"):
        torch.manual_seed(len(run))  # whatever the process drew before
        assert cli.main(train_args(data, tmp_path / run, "--model", hub, "--recipe", "head", "--seed", "3")) == 0
    assert differing(load_file(tmp_path / "a" / "best.safetensors"), load_file(tmp_path / "b" / "best.safetensors")) \
        == set()
    assert cli.main(train_args(data, tmp_path / "c", "--model", hub, "--recipe", "head", "--seed", "4")) == 0
    assert differing(load_file(tmp_path / "a" / "best.safetensors"), load_file(tmp_path / "c" / "best.safetensors")) \
        == set(HEAD)


def test_resuming_a_head_run_refits_again_and_refuses_other_settings(tmp_path, data, hub, capsys):
    args = train_args(data, tmp_path / "run", "--model", hub, "--recipe", "head")
    assert cli.main(args) == 0
    first = load_file(tmp_path / "run" / "best.safetensors")
    assert cli.main([*args, "--resume"]) == 0
    assert differing(first, load_file(tmp_path / "run" / "best.safetensors")) == set()
    assert len(records(tmp_path / "run")) == 1
    error = cli_error(capsys, [*args, "--resume", "--head-views", "2"])
    assert "cannot resume" in error and "head_views: 4 -> 2" in error


# -- bad input ----------------------------------------------------------------------------------------------
def tiny_args(name: str, *kwargs: str) -> list[str]:
    """A tiny random ``name`` built by --model-kwargs (as TINY_RANDOM, with more arguments)."""
    return ["--model", name, *TINY_RANDOM[2:], *kwargs]


@pytest.mark.parametrize("model, message", [
    (tiny_args("vit_tiny_patch16_224", "num_classes=0"), "refit_head needs a linear classifier"),
    (tiny_args("deit_tiny_distilled_patch16_224"), "has 2 heads (e.g. DeiT's head and head_dist"),
])
def test_a_model_without_one_linear_head_is_one_line(tmp_path, data, capsys, model, message):
    assert message in cli_error(capsys, train_args(data, tmp_path / "run", *model, "--recipe", "head"))


def test_a_class_without_masked_images_is_named(tmp_path, hub, capsys):
    data = write_folder(tmp_path / "data", per_class=3)
    for i in range(3):  # fox's masks cover nothing: no object to move
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "data" / "masks" / "fox" / f"{i}.png")
    error = cli_error(capsys, train_args(data, tmp_path / "run", "--model", hub, "--recipe", "head"))
    assert "needs 2 training image(s) with a mask of both object and background" in error
    assert "too few of 'fox' (index 2): 0" in error


def test_validation_without_a_class_stops_a_two_stage_run_before_it_trains(tmp_path, data, hub, capsys):
    val = write_folder(tmp_path / "val", classes=("cat", "dog"), per_class=1)
    error = cli_error(capsys, train_args(data, tmp_path / "run", "--model", hub, "--recipe", "two_stage_head",
                                         "--val-data", val))
    assert "needs 1 validation image(s)" in error and "too few of 'fox' (index 2): 0" in error
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_images_beyond_the_memory_limit_are_refused(tmp_path, data, hub, capsys):
    error = cli_error(capsys, train_args(data, tmp_path / "run", "--model", hub, "--recipe", "head",
                                         "--head-max-gib", "1e-5"))
    assert "the head refit holds its images in memory: 9 images of 32x32 with their masks take 0.0 GiB, above " \
           "--head-max-gib 1e-05" in error


def test_head_refit_on_tokencut_masks(tmp_path, capsys):
    for name in ("cat", "dog", "fox"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(3):
            pixels = np.full((64, 64, 3), 20, np.uint8)
            pixels[8 + 4 * i:40, 10:44 + 3 * i] = 230
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    _, kwargs = TINY_MODELS["vit_cls"]
    timm.models.save_for_hf(tiny_model("vit_cls", num_classes=0), str(tmp_path / "dino"),
                            model_args=dict(kwargs, num_classes=0))
    hub = tiny_hub(tmp_path / "hub", num_classes=3)
    run = tmp_path / "run"
    assert cli.main(train_args(str(tmp_path / "images"), run, "--model", hub, "--recipe", "head",
                               "--masks", f"tokencut:local-dir:{tmp_path / 'dino'}")) == 0
    assert (run / "masks" / "summary.json").is_file() and records(run)[-1]["stage"] == "head_refit"
