"""The finetuning loop: resume, checkpoints, config files, accumulation, DDP, the train command."""
from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from conftest import cli_error, tiny_model
from relevance_finetune import UnsupportedModelError, cli
from relevance_finetune import checkpoint as checkpoint_module
from relevance_finetune.checkpoint import load_checkpoint, save_checkpoint
from relevance_finetune.models import load_weights
from relevance_finetune.train import PRESETS, TrainConfig, finetune, read_config_file, resolve_config


pytestmark = pytest.mark.usefixtures("one_thread")


class SyntheticMasked(Dataset):
    """A bright square on noise; the mask is the square, the label its quadrant.

    With ``flip`` a sample is flipped with the global torch RNG, so runs depend on RNG state.
    """

    def __init__(self, size: int = 8, image_size: int = 32, seed: int = 0, flip: bool = False) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(size, 3, image_size, image_size, generator=generator) * 0.3
        self.masks = torch.zeros(size, 1, image_size, image_size)
        self.labels = torch.randint(0, 4, (size,), generator=generator)
        half = image_size // 2
        for i, label in enumerate(self.labels.tolist()):
            top, left = half * (label // 2), half * (label % 2)
            self.masks[i, :, top:top + half, left:left + half] = 1
            self.images[i, :, top:top + half, left:left + half] += 1.5
        self.flip = flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image, mask = self.images[index], self.masks[index]
        if self.flip and torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask, int(self.labels[index])


def config(**overrides) -> TrainConfig:
    settings = dict(epochs=1, batch_size=4, lr=1e-3, workers=0, progress=False)
    return TrainConfig(**{**settings, **overrides})


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_states_close(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "time_s"} for record in history]


# -- resume and checkpoints ------------------------------------------------------------------------
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    train_set, val_set = SyntheticMasked(8, flip=True), SyntheticMasked(4, seed=1)
    settings = dict(epochs=3, lr_decay_epochs=2, lr_decay=0.5)  # interrupted between two decays

    straight = tiny_model(num_classes=4)
    straight_history = finetune(straight, train_set, val_set, config(out=str(tmp_path / "a"), **settings))

    interrupted = tiny_model(num_classes=4)
    finetune(interrupted, train_set, val_set, config(out=str(tmp_path / "b"), **{**settings, "epochs": 1}))
    resumed = tiny_model(num_classes=4)  # a new process: fresh model, RNG elsewhere
    torch.manual_seed(1234)
    resumed_history = finetune(resumed, train_set, val_set, config(out=str(tmp_path / "b"), resume=True, **settings))

    assert_states_close(state_of(resumed), state_of(straight))
    assert without_time(resumed_history) == without_time(straight_history)
    assert [r["lr"] for r in resumed_history] == [1e-3, 1e-3, 5e-4]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_checkpoints_are_safetensors_that_timm_and_load_weights_read(tmp_path):
    model = tiny_model(num_classes=4)
    history = finetune(model, SyntheticMasked(8), SyntheticMasked(4, seed=1), config(epochs=3, out=str(tmp_path)))
    last, best = tmp_path / "last.safetensors", tmp_path / "best.safetensors"
    with safe_open(str(last), framework="pt") as f:
        assert f.metadata()["format"] == "relevance_finetune.checkpoint"
        assert any(k.startswith("trainer_state/") for k in f.keys())
    _, info, trainer_state = load_checkpoint(last)
    assert info["epoch"] == 3 and info["architecture"] == "vit_tiny_patch16_224"
    assert set(trainer_state) == {"optimizer", "scheduler", "scaler", "rng"}
    assert_states_close(load_weights(tiny_model(num_classes=4, seed=5), last).state_dict(), state_of(model))
    with pytest.raises(ValueError, match=r"weights of vit_tiny_patch16_224, which do not fit the model deit_tiny_distilled"):
        load_weights(tiny_model("deit_distilled", num_classes=4), last)

    best_state, best_info, best_trainer_state = load_checkpoint(best)
    assert best_trainer_state is None
    losses = [r["val_loss"] for r in history]
    assert best_info["epoch"] == 1 + losses.index(min(losses))
    fresh = tiny_model(num_classes=4, seed=5)
    timm.models.load_checkpoint(fresh, str(best))  # timm's own reader, strict
    assert_states_close(state_of(fresh), best_state)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["lr"] == 1e-3


def test_checkpoint_round_trips_nested_state_without_pickle(tmp_path):
    state = {"optimizer": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2, 2)}},
             "tuple": (1, 2.5, None, "x"), "list": [True, torch.arange(3)], "inf": float("inf")}
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, tiny_model(), {"epoch": 7}, state)
    _, info, loaded = load_checkpoint(path)
    assert info == {"epoch": 7}
    assert list(loaded["optimizer"]) == [0] and torch.equal(loaded["optimizer"][0]["exp_avg"], torch.ones(2, 2))
    assert loaded["tuple"] == (1, 2.5, None, "x") and loaded["inf"] == float("inf")
    assert loaded["list"][0] is True and torch.equal(loaded["list"][1], torch.arange(3))
    with pytest.raises(TypeError, match="cannot store a object"):
        save_checkpoint(path, tiny_model(), {}, {"bad": object()})
    with pytest.raises(ValueError, match="not a relevance-finetune checkpoint"):
        plain = tmp_path / "plain.safetensors"
        save_file({"a": torch.zeros(1)}, str(plain))
        load_checkpoint(plain)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    model = tiny_model()
    save_checkpoint(path, model, {"epoch": 1})

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, tiny_model(seed=3), {"epoch": 2})
    _, info, _ = load_checkpoint(path)
    assert info == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]


def test_resume_refuses_other_settings_and_fresh_runs_refuse_used_directories(tmp_path):
    data = SyntheticMasked(4)
    finetune(tiny_model(num_classes=4), data, None, config(out=str(tmp_path)))
    with pytest.raises(ValueError, match=r"lr: 0.001 -> 0.01"):
        finetune(tiny_model(num_classes=4), data, None, config(out=str(tmp_path), resume=True, epochs=2, lr=1e-2))
    with pytest.raises(FileExistsError, match="already holds a run .*: pass --resume"):
        finetune(tiny_model(num_classes=4), data, None, config(out=str(tmp_path)))


# -- the step ----------------------------------------------------------------------------------------
def exact_step_model() -> torch.nn.Module:
    """A tiny ViT without qkv bias: the key bias has a zero gradient in exact arithmetic, which
    Adam would turn into steps of +-lr from rounding noise."""
    return tiny_model(num_classes=4, qkv_bias=False)


def test_gradient_accumulation_matches_the_full_batch():
    data = SyntheticMasked(4)
    full, accumulated = exact_step_model(), exact_step_model()
    finetune(full, data, None, config())
    finetune(accumulated, data, None, config(grad_accum=2))
    assert_states_close(state_of(accumulated), state_of(full), atol=1e-6)
    assert not torch.equal(full.head.weight, exact_step_model().head.weight)


def test_a_short_last_step_weights_its_images_as_a_full_batch():
    """5 images, batch 4: the last step holds one image; accumulated, it is one short micro-batch."""
    data = SyntheticMasked(5)
    full, accumulated = exact_step_model(), exact_step_model()
    finetune(full, data, None, config())
    finetune(accumulated, data, None, config(grad_accum=2))
    assert_states_close(state_of(accumulated), state_of(full), atol=1e-6)


@pytest.mark.parametrize("method", ["gradmask", "rrr"])
def test_baselines_train_through_the_input_gradient(method):
    model = tiny_model(num_classes=4)
    before = state_of(model)
    history = finetune(model, SyntheticMasked(4), None, config(method=method))
    assert np.isfinite(history[0]["train_mask_penalty"]) and history[0]["train_mask_penalty"] > 0
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # fp16 skips overflowing steps
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains(amp):
    model = tiny_model(num_classes=4)
    history = finetune(model, SyntheticMasked(4), SyntheticMasked(4, seed=1), config(amp=amp))
    assert all(np.isfinite(v) for v in history[0].values())
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float32


def test_batch_must_divide_over_processes_and_accumulation():
    with pytest.raises(ValueError, match="batch_size 6 must divide evenly"):
        finetune(tiny_model(), SyntheticMasked(4), None, config(batch_size=6, grad_accum=4))


def test_unsupported_model_fails_early():
    cnn = timm.create_model("test_resnet", pretrained=False, num_classes=4)
    with pytest.raises(UnsupportedModelError, match="ResNet"):
        finetune(cnn, SyntheticMasked(4), None, config())


# -- configuration -----------------------------------------------------------------------------------
def test_config_precedence_defaults_preset_file_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "deit_base"\nlr = 1e-5\nbatch-size = 16\nepochs = 3\n')
    resolved = resolve_config({"batch_size": 4}, toml)
    assert resolved.model == PRESETS["deit_base"]["model"] and resolved.temperature == 0.65  # preset
    assert (resolved.lr, resolved.epochs, resolved.batch_size) == (1e-5, 3, 4)  # file, file, flag
    assert resolved.weight_decay == 1e-4 and resolved.lambda_classification == 0.2  # defaults

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lr: 3e-6\nmethod: rrr\n")  # YAML 1.1 reads 3e-6 as a string
    resolved = resolve_config({}, yaml_file)
    assert resolved.lr == 3e-6 and resolved.lambda_classification == 1.0

    (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match=r"unknown settings \['learning_rate'\]"):
        read_config_file(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="method must be one of"):
        TrainConfig(method="gradcam")
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_config({"preset": "vit_huge"})


# -- the command ---------------------------------------------------------------------------------------
def tiny_hub(path, **kwargs) -> str:
    """A tiny random ViT saved in timm's hub layout: the offline stand-in for hub weights."""
    timm.models.save_for_hf(tiny_model(**kwargs), path, safe_serialization=True)
    return f"local-dir:{path}"


def write_masked_folder(root, per_class: int = 3, size: int = 40) -> None:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        for i in range(per_class):
            (root / "images" / name).mkdir(parents=True, exist_ok=True)
            (root / "masks" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / "images" / name / f"{i}.jpg")
            mask = np.zeros((size, size), np.uint8)
            mask[8:30, 5:25] = 255
            Image.fromarray(mask).save(root / "masks" / name / f"{i}.png")


def test_train_command_runs_resumes_and_records_its_config(tmp_path, capsys):
    write_masked_folder(tmp_path / "data")
    hub = tiny_hub(tmp_path / "hub", num_classes=2)
    out = tmp_path / "run"
    args = ["train", "--model", hub, "--pretrained", "--data", str(tmp_path / "data"),
            "--out", str(out), "--epochs", "1", "--batch-size", "2", "--workers", "0", "--no-progress",
            "--val-fraction", "0.34", "--lr", "1e-4"]
    assert cli.main(args) == 0
    recorded = read_config_file(out / "config.yaml")
    assert recorded["model"] == hub and recorded["val_fraction"] == 0.34
    assert recorded["lambda_bg"] == 2.0 and recorded["lr_decay"] == 0.85
    epochs = args.index("--epochs")
    assert cli.main([*args[:epochs], "--epochs", "2", "--resume", *args[epochs + 2:]]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"train_loss", "val_loss", "val_background", "val_accuracy"} <= set(records[-1])
    assert {p.name for p in out.iterdir()} == {"config.yaml", "metrics.jsonl", "last.safetensors", "best.safetensors"}


def test_train_command_skips_unmasked_images_only_when_asked(tmp_path, capsys):
    write_masked_folder(tmp_path / "data")
    (tmp_path / "data" / "masks" / "cat" / "0.png").unlink()  # e.g. TokenCut's mask was too small
    hub = tiny_hub(tmp_path / "hub", num_classes=2)
    args = ["train", "--model", hub, "--pretrained", "--data", str(tmp_path / "data"), "--epochs", "1",
            "--batch-size", "2", "--workers", "0", "--no-progress", "--val-fraction", "0.34"]
    assert "0.png" in cli_error(capsys, [*args, "--out", str(tmp_path / "strict")])
    assert cli.main([*args, "--out", str(tmp_path / "run"), "--skip-unmasked"]) == 0


def test_train_command_checks_num_classes_and_records_folder_class_names(tmp_path, capsys):
    write_masked_folder(tmp_path / "data", per_class=2)
    hub = tiny_hub(tmp_path / "hub", num_classes=2)
    args = ["train", "--model", hub, "--data", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "2",
            "--workers", "0", "--no-progress"]
    error = cli_error(capsys, [*args, "--num-classes", "1", "--out", str(tmp_path / "small")])
    assert "class index 1 but the model has 1 classes: pass --num-classes 2" in error
    assert not (tmp_path / "small").exists()  # refused before any output or training
    assert cli.main([*args, "--out", str(tmp_path / "run")]) == 0
    _, info, _ = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert info["model"]["pretrained_cfg"]["label_names"] == ["cat", "dog"]


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cli.main(["train", "--debug", "--model", tiny_hub(tmp_path / "hub"), "--data", str(tmp_path / "nowhere"),
                  "--out", str(tmp_path / "run")])


def write_csv_manifest(root) -> str:
    write_masked_folder(root, per_class=2)
    rows = [f"images/{name}/{i}.jpg,masks/{name}/{i}.png,{name}" for name in ("cat", "dog") for i in range(2)]
    (root / "train.csv").write_text("image,mask,label\n" + "\n".join(rows) + "\n")
    return str(root / "train.csv")


def write_imagenet_s(root, per_class: int = 2, size: int = 40) -> None:
    """ImageNet images and ImageNet-S masks (class id = R + 256 G) of the first three ImageNet classes."""
    rng = np.random.default_rng(0)
    for class_id, wnid in enumerate(("n01440764", "n01443537", "n01484850"), 1):
        for i in range(per_class):
            name = f"{wnid}_{i}"
            (root / "imagenet" / "train" / wnid).mkdir(parents=True, exist_ok=True)
            (root / "ImageNetS919" / "train-semi-segmentation" / wnid).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / "imagenet" / "train" / wnid / f"{name}.JPEG", format="JPEG")
            mask = np.zeros((size, size, 3), np.uint8)
            mask[10:30, 10:30, 0] = class_id
            Image.fromarray(mask).save(root / "ImageNetS919" / "train-semi-segmentation" / wnid / f"{name}.png")


@pytest.mark.parametrize("layout", ["csv", "imagenet-s"])
def test_train_command_reads_csv_and_imagenet_s(tmp_path, layout):
    if layout == "csv":
        manifest = write_csv_manifest(tmp_path)
        data = ["--data", manifest, "--val-data", manifest]
    else:
        write_imagenet_s(tmp_path)
        data = ["--data-format", "imagenet-s", "--data", str(tmp_path / "imagenet"), "--masks",
                str(tmp_path / "ImageNetS919"), "--split-classes", "2", "--images-per-class", "2"]
    out = tmp_path / "run"
    assert cli.main(["train", "--model", tiny_hub(tmp_path / "hub"), "--num-classes", "4", "--out", str(out),
                     "--epochs", "1", "--batch-size", "2", "--workers", "0", "--no-progress", *data]) == 0
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["train_accuracy"] >= 0 and "val_loss" in record and (out / "best.safetensors").is_file()


def test_train_command_explains_unsupported_models(tmp_path, capsys):
    code = cli.main(["train", "--model", "test_resnet", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2
    error = capsys.readouterr().err
    assert "cannot finetune test_resnet" in error and "Supported" in error


# -- torch.distributed -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, world_size: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = exact_step_model()
        history = finetune(model, SyntheticMasked(4), SyntheticMasked(3, seed=1), config())
        if rank == 0:
            save_file(state_of(model), path, metadata={"history": json.dumps(history)})
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_take_the_same_step_as_one(tmp_path):
    path = str(tmp_path / "ddp.safetensors")
    # fork where the platform has it: the children skip re-importing torch and timm
    start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(ddp_worker, args=(2, free_port(), path), nprocs=2, join=True, start_method=start_method)
    single = exact_step_model()
    history = finetune(single, SyntheticMasked(4), SyntheticMasked(3, seed=1), config())
    assert_states_close(load_file(path), state_of(single), atol=1e-6)
    assert not torch.equal(single.head.weight, exact_step_model().head.weight)
    with safe_open(path, framework="pt") as f:
        ddp_history = json.loads(f.metadata()["history"])[0]
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert ddp_history[key] == pytest.approx(history[0][key], rel=1e-5)
