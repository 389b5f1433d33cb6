"""Where timm users already work: model arguments, the model card and Hub push, NaFlexVit,
and the recipes of docs/integrations.md (accelerate, Lightning, torch.compile, autocast,
gradient checkpointing), each on a tiny random-weight model on the CPU."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import timm
import torch
import torch.multiprocessing as mp
import yaml
from PIL import Image
from timm.data import resolve_model_data_config
from timm.models._hub import generate_readme
from torch.utils.data import DataLoader

from conftest import TINY_MODELS, cli_error, tiny_model
from relevance_finetune import RelevanceRegularizer, UnsupportedModelError, attach_gae, cli
from relevance_finetune import export as export_module
from relevance_finetune.data import model_data_config
from relevance_finetune.export import PushError, finetune_metadata, save_finetuned
from relevance_finetune.models import create_model, merge_model_kwargs, parse_model_kwarg
from relevance_finetune.train import TrainConfig, finetune
from test_train import SyntheticMasked, config, free_port, write_masked_folder

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]

TINY_VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "depth=1", "embed_dim=32", "num_heads=2",
            "patch_size=8"]


# -- --model-kwargs and --img-size ---------------------------------------------------------------
def test_model_kwargs_are_read_as_timm_reads_them():
    assert parse_model_kwarg("depth=2") == ("depth", 2)
    assert parse_model_kwarg("drop_path_rate=0.1") == ("drop_path_rate", 0.1)
    assert parse_model_kwarg("img_size=(32, 24)") == ("img_size", (32, 24))
    assert parse_model_kwarg("global_pool=avg") == ("global_pool", "avg")  # not a literal: the string
    assert parse_model_kwarg("class_token=False") == ("class_token", False)
    for bad in ("depth", "=2", "two words=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected KEY=VALUE"):
            parse_model_kwarg(bad)


@pytest.mark.parametrize("command, required", [("train", []), ("masks", ["--images", "i", "--out", "o"]),
                                               ("evaluate", ["--out", "o"]), ("explain", ["i", "--out", "o"])])
def test_every_model_command_takes_model_kwargs_and_img_size(command, required, capsys):
    args = cli.build_parser(command).parse_args(
        [command, *required, "--model", "m", "--model-kwargs", "depth=1", "global_pool=avg", "--img-size", "48"])
    assert args.model_kwargs == {"depth": 1, "global_pool": "avg"} and args.img_size == 48
    for bad in (["--img-size", "0"], ["--model-kwargs", "depth"]):
        with pytest.raises(SystemExit):
            cli.build_parser(command).parse_args([command, *required, "--model", "m", *bad])
        assert "expected" in capsys.readouterr().err


def test_img_size_and_model_kwargs_merge_into_one_call():
    assert merge_model_kwargs({"depth": 1}, img_size=48, num_classes=None) == {"depth": 1, "img_size": 48}
    assert merge_model_kwargs({"img_size": 48}, img_size=48) == {"img_size": 48}
    with pytest.raises(ValueError, match="img_size is given twice"):
        merge_model_kwargs({"img_size": 32}, img_size=48)
    with pytest.raises(ValueError, match="does not take the arguments"):
        create_model("vit_tiny_patch16_224", no_such_argument=1)


def test_train_then_export_rebuild_the_configured_model(tmp_path):
    write_masked_folder(tmp_path / "data", per_class=2)
    run = tmp_path / "run"
    assert cli.main(["train", *TINY_VIT, "--img-size", "24", "--num-classes", "2", "--data",
                     str(tmp_path / "data"), "--out", str(run), "--epochs", "1", "--batch-size", "2",
                     "--workers", "0", "--no-progress"]) == 0
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["img_size"] == 24 and recorded["model_kwargs"]["patch_size"] == 8
    assert cli.main(["export", str(run / "last.safetensors"), "--out", str(tmp_path / "export")]) == 0
    exported = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)
    assert tuple(exported.patch_embed.img_size) == (24, 24) and len(exported.blocks) == 1


def test_explain_feeds_the_size_the_model_was_built_for(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert cli.main(["explain", *TINY_VIT, "num_classes=3", "--img-size", "48", str(tmp_path / "a.png"),
                     "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["images"][0]["top5"]


def test_data_config_follows_the_size_the_model_was_built_for():
    model = tiny_model(img_size=48)
    assert resolve_model_data_config(model)["input_size"] != (3, 48, 48)  # timm's: the pretrained size
    assert model_data_config(model)["input_size"] == (3, 48, 48)


# -- the model card and the Hub --------------------------------------------------------------------
def train_run(tmp_path):
    """A one-epoch run with validation on disk: its directory."""
    run = tmp_path / "run"
    finetune(tiny_model(num_classes=4), SyntheticMasked(4), SyntheticMasked(2, seed=1),
             config(out=str(run), model="vit_tiny_patch16_224", model_kwargs=TINY_MODELS["vit_cls"][1], num_classes=4,
                    data="data/train"))
    return run


def test_every_export_has_a_model_card(tmp_path):
    out = save_finetuned(tiny_model(), tmp_path / "export", base_model="vit_tiny_patch16_224.augreg_in21k",
                         finetune_config=TrainConfig(lambda_bg=1.5, data_format="imagenet-s", masks="ImageNetS919"),
                         metrics={"epoch": 3, "train_loss": 0.5, "val_loss": 0.25, "val_accuracy": 0.75},
                         evaluations={"robustness": "## robustness: vit\n\n| Run | A |\n|---|---|\n| after | 2.5 |\n"},
                         probes={"object_only": 80.5, "background_only": 12.25})
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    card = (out / "README.md").read_text()
    assert card.startswith("---\ntags:\n") and "library_name: timm" in card
    for expected in ("**Base model:** vit_tiny_patch16_224.augreg_in21k", "lambda_bg: 1.5", "method: ours",
                     "ImageNet-S919 semi-supervised segmentation masks, 500 classes x 3 images per class",
                     "**Validation metrics (epoch 3):**", "  - loss: 0.25", "  - accuracy: 0.75",
                     "### robustness", "#### robustness: vit", "| after | 2.5 |", "| background_only | 12.25 |",
                     "timm.create_model('local-dir:", "@inproceedings{chefer2022optimizing"):
        assert expected in card, expected
    bare = (save_finetuned(tiny_model(), tmp_path / "bare") / "README.md").read_text()
    assert "**Base model:** vit_tiny_patch16_224" in bare and "**Run metrics:** not recorded" in bare
    assert "No evaluation tables or reliance probes were given" in bare and "**Head refit:** none" in bare


def test_export_command_writes_the_runs_metrics_tables_and_probes(tmp_path, capsys):
    run = train_run(tmp_path)
    (tmp_path / "robustness.md").write_text("## robustness: tiny\n\n| Run | ImageNet-A |\n|---|---|\n| after | 1.5 |\n")
    (tmp_path / "probes.json").write_text(json.dumps({"full": 75.0, "object_only": 50.0}))
    assert cli.main(["export", str(run / "best.safetensors"), "--out", str(tmp_path / "export"), "--evaluation",
                     str(tmp_path / "robustness.md"), "--probes", str(tmp_path / "probes.json")]) == 0
    assert "README.md" in capsys.readouterr().out
    card = (tmp_path / "export" / "README.md").read_text()
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"  - loss: {record['val_loss']:.4g}" in card and "**Validation metrics (epoch 1):**" in card
    assert "the mask folder `train/masks`" in card and "| after | 1.5 |" in card and "| object_only | 50 |" in card
    assert "model card input not found: nothing.json" in cli_error(
        capsys, ["export", str(run / "best.safetensors"), "--out", str(tmp_path / "x"), "--probes", "nothing.json"])


def test_push_goes_through_timm_with_the_local_card(tmp_path, monkeypatch):
    pushed = {}
    monkeypatch.setattr(export_module, "push_to_hf_hub", lambda model, repo_id, **kwargs: pushed.update(
        kwargs, repo_id=repo_id))
    out = save_finetuned(tiny_model(), tmp_path / "export", finetune_config={"lr": 1e-5},
                         data_config={"mean": (0.5,) * 3, "std": (0.5,) * 3}, push_to_hub="someone/tiny-vit",
                         private=True)
    assert pushed["repo_id"] == "someone/tiny-vit" and pushed["private"] and pushed["safe_serialization"] is True
    assert pushed["model_config"] == {"relevance_finetune": finetune_metadata(out)}
    assert pushed["data_config"] == {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    # the Hub's README.md (timm writes it from the card) is the local one
    assert generate_readme(pushed["model_card"], "tiny-vit") == (out / "README.md").read_text()
    assert "timm.create_model('hf-hub:someone/tiny-vit'" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match="someone/bad/id"):
        save_finetuned(tiny_model(), tmp_path / "never", push_to_hub="someone/bad/id")
    assert not (tmp_path / "never").exists()


def test_push_without_network_is_one_line_after_a_complete_export(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    run = train_run(tmp_path)
    out = tmp_path / "export"
    assert cli.main(["export", str(run / "last.safetensors"), "--out", str(out), "--push-to-hub", "someone/tiny"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("relevance-finetune export: error: could not push to the Hub repository 'someone/tiny'")
    assert err.count("\n") == 1 and f"the export in {out} is complete" in err
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    assert timm.create_model(f"local-dir:{out}", pretrained=True).num_classes == 4
    with pytest.raises(PushError, match="could not push"):
        save_finetuned(tiny_model(), tmp_path / "again", push_to_hub="someone/tiny")
    assert (tmp_path / "again" / "README.md").is_file()


# -- NaFlexVit -------------------------------------------------------------------------------------
NAFLEX = ["--model", "naflexvit_base_patch16_gap", "--model-kwargs", "depth=1", "embed_dim=32", "num_heads=2"]


def test_naflexvit_is_refused_with_the_reason(tmp_path, capsys):
    pytest.importorskip("timm.models.naflexvit")
    model = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(UnsupportedModelError, match=r"^NaFlexVit is not supported: .*\(patch_coord, patch_valid\)"):
        attach_gae(model)
    assert cli.main(["train", *NAFLEX, "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "cannot finetune naflexvit_base_patch16_gap: NaFlexVit is not supported" in capsys.readouterr().err


# -- the recipes of docs/integrations.md -------------------------------------------------------------
LR = 1e-3


def adamw(parameters) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=LR, weight_decay=1e-4)


def sgd(parameters) -> torch.optim.Optimizer:
    """For comparisons across processes: Adam's first step turns float noise in a zero gradient into
    a step of up to ``lr`` (the key bias has no gradient), SGD keeps it noise."""
    return torch.optim.SGD(parameters, lr=0.1)


def full_batch():
    images, masks, labels = (torch.stack([torch.as_tensor(s[i]) for s in SyntheticMasked(4)]) for i in range(3))
    return images, masks, labels


def plain_step(model: torch.nn.Module, optimizer=adamw) -> torch.nn.Module:
    """The README's drop-in loop, one step on the full batch: what every recipe must equal."""
    images, masks, labels = full_batch()
    optimizer = optimizer(model.parameters())
    with attach_gae(model) as gae:
        RelevanceRegularizer(gae)(model(images), masks, labels=labels).loss.backward()
    optimizer.step()
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-6) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def accelerate():
    accelerate = pytest.importorskip("accelerate")
    yield accelerate
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)


def accelerate_step(accelerate, optimizer=adamw, path: str | None = None) -> torch.nn.Module:
    """The accelerate recipe, one step: attach to the bare model, then prepare."""
    accelerator = accelerate.Accelerator(cpu=True)
    model = tiny_model(num_classes=4)
    gae = attach_gae(model)  # before prepare(): the bare model's own attention modules
    criterion = RelevanceRegularizer(gae)
    optimizer = optimizer(model.parameters())
    loader = DataLoader(SyntheticMasked(4), batch_size=4 // accelerator.num_processes)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for images, masks, labels in loader:
        out = criterion(model(images), masks, labels=labels)
        accelerator.backward(out.loss)
        optimizer.step()
        optimizer.zero_grad()
        break
    if path is not None and accelerator.is_main_process:
        torch.save({"state": accelerator.unwrap_model(model).state_dict(), "wrapper": type(model).__name__,
                    "processes": accelerator.num_processes}, path)
    return accelerator.unwrap_model(model)


def test_accelerate_one_process_takes_the_plain_step(accelerate):
    assert_same_weights(accelerate_step(accelerate), plain_step(tiny_model(num_classes=4)))


def accelerate_worker(rank: int, port: int, path: str) -> None:
    """One of two processes started as torchrun starts them (its environment variables), gloo."""
    import accelerate
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    accelerate_step(accelerate, sgd, path)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_accelerate_two_processes_take_the_one_process_step(accelerate, tmp_path):
    path = str(tmp_path / "rank0.pt")
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(accelerate_worker, args=(free_port(), path), nprocs=2, join=True, start_method=start_method)
    saved = torch.load(path, weights_only=True)
    assert saved["processes"] == 2 and saved["wrapper"] == "DistributedDataParallel"
    distributed = tiny_model(num_classes=4)
    distributed.load_state_dict(saved["state"])
    assert_same_weights(distributed, plain_step(tiny_model(num_classes=4), sgd))


def test_lightning_module_takes_the_plain_step_and_validates(tmp_path):
    L = pytest.importorskip("lightning")
    spec = importlib.util.spec_from_file_location("lightning_module", ROOT / "examples" / "lightning_module.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    module = example.RelevanceFinetune("vit_tiny_patch16_224", pretrained=False, lr=LR,
                                       model_kwargs={**TINY_MODELS["vit_cls"][1], "num_classes": 4})
    reference = tiny_model(num_classes=4)
    reference.load_state_dict(module.model.state_dict())
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path)
    val_loader = DataLoader(SyntheticMasked(2, seed=1), batch_size=2)
    trainer = L.Trainer(max_steps=1, num_sanity_val_steps=0, inference_mode=False, **options)
    trainer.fit(module, DataLoader(SyntheticMasked(4), batch_size=4), val_loader)
    assert_same_weights(module.model, plain_step(reference))
    assert {"train/loss", "val/loss", "val/background"} <= set(trainer.callback_metrics)
    with pytest.raises(RuntimeError, match="ran without gradients"):  # Lightning's default: inference mode
        L.Trainer(**options).validate(module, val_loader, verbose=False)


def test_compiled_model_takes_the_plain_step(monkeypatch):
    # the relevance's autograd.grad retains the graph, which backward functions compiled with
    # donated buffers refuse (they are used once other compiled code ran in the process)
    monkeypatch.setattr(torch._functorch.config, "donated_buffer", False)
    model = tiny_model(num_classes=4)
    gae = attach_gae(model)  # before compiling: the hooks go on the model's own modules
    compiled = torch.compile(model, backend="aot_eager")  # the recipe's default inductor needs minutes here
    images, masks, labels = full_batch()
    optimizer = adamw(model.parameters())
    try:
        RelevanceRegularizer(gae)(compiled(images), masks, labels=labels).loss.backward()
        optimizer.step()
    finally:
        torch._dynamo.reset()
    assert_same_weights(model, plain_step(tiny_model(num_classes=4)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_relevance_and_loss_follow_float32(dtype):
    images, masks, labels = full_batch()
    results = []
    for autocast in (False, True):
        model = tiny_model(num_classes=4)
        with attach_gae(model) as gae:
            with torch.autocast("cpu", dtype=dtype, enabled=autocast):
                logits = model(images)
            out = RelevanceRegularizer(gae)(logits.float(), masks, labels=labels)
            results.append((out.loss.detach(), gae.relevance(logits, labels).detach()))
            out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    (loss32, relevance32), (loss, relevance) = results
    assert relevance.dtype == torch.float32  # the rollout runs in float32 whatever the maps' dtype
    assert torch.corrcoef(torch.stack([relevance.flatten(), relevance32.flatten()]))[0, 1] > 0.999
    assert loss == pytest.approx(float(loss32), rel=0.02)


def test_gradient_checkpointing_takes_the_same_step():
    checkpointed = tiny_model(num_classes=4).train()
    checkpointed.set_grad_checkpointing(True)
    assert_same_weights(plain_step(checkpointed), plain_step(tiny_model(num_classes=4).train()), atol=0)
    reentrant = pytest.importorskip("timm.layers").__dict__.get("set_reentrant_ckpt")
    if reentrant is not None:  # older timm checkpoints reentrantly: the maps then carry no gradient
        reentrant(True)
        try:
            with pytest.raises(RuntimeError, match="reentrant gradient checkpointing"):
                plain_step(checkpointed)
        finally:
            reentrant(False)
