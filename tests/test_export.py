"""Export: timm's hub layout with metadata, loading with timm, wrong architectures, the command."""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import cli_error, tiny_images, tiny_model
from relevance_finetune import __version__, cli
from relevance_finetune import export as export_module
from relevance_finetune.export import finetune_metadata, load_finetuned, save_finetuned
from relevance_finetune.models import load_weights
from relevance_finetune.train import TrainConfig, finetune
from test_train import SyntheticMasked, config, tiny_hub

pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with weights no initialiser would give, standing in for a finetune."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    return model


@pytest.mark.parametrize("key", ["vit_reg_avg", "deit_distilled", "beit", "eva"])
def test_timm_loads_the_export_with_identical_logits(tmp_path, key):
    model = perturbed(tiny_model(key))
    out = save_finetuned(model, tmp_path / "export", base_model="tiny", finetune_config=TrainConfig(lr=1e-5))
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    images = tiny_images(model)
    with torch.no_grad():
        expected = model(images)
        assert torch.equal(timm.create_model(f"local-dir:{out}", pretrained=True).eval()(images), expected)
        assert torch.equal(load_finetuned(out).eval()(images), expected)


def test_config_json_carries_the_finetune_metadata(tmp_path):
    model = tiny_model("deit_distilled")  # ImageNet mean/std of its own
    save_finetuned(model, tmp_path, finetune_config=TrainConfig(lr=1e-5, lambda_bg=1.5),
                   data_config={"mean": (0.5,) * 3, "std": (0.5,) * 3})
    metadata = finetune_metadata(tmp_path)
    assert metadata["library_version"] == __version__
    assert metadata["base_model"] == "deit_tiny_distilled_patch16_224"  # random weights: no pretrained tag
    assert metadata["finetune_config"]["lr"] == 1e-5
    assert metadata["lambdas"] == {"lambda_bg": 1.5, "lambda_fg": 0.3, "lambda_relevance": 0.8,
                                   "lambda_classification": 0.2, "lambda_mask": 1.0}
    hub_config = json.loads((tmp_path / "config.json").read_text())
    assert hub_config["architecture"] == "deit_tiny_distilled_patch16_224"
    assert hub_config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_finetuned(model, tmp_path / "bad", finetune_config={"optimizer": torch.optim.SGD})


def test_wrong_architecture_names_both(tmp_path):
    save_finetuned(tiny_model("vit_cls"), tmp_path / "vit")
    with pytest.raises(ValueError, match=r"weights of vit_tiny_patch16_224, which do not fit the model deit_tiny_distilled"):
        load_weights(tiny_model("deit_distilled"), tmp_path / "vit")
    with pytest.raises(ValueError, match=r"weights of vit_tiny_patch16_224 \(num_classes=5\), which do not fit the "
                                         r"model vit_tiny_patch16_224 \(num_classes=3\)"):
        load_weights(tiny_model("vit_cls", num_classes=3), tmp_path / "vit")


def test_export_replaces_files_atomically(tmp_path, monkeypatch):
    out = tmp_path / "export"
    first = tiny_model(seed=1)
    save_finetuned(first, out)

    def crash(model, directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module.timm.models, "save_for_hf", crash)
    with pytest.raises(KeyboardInterrupt):
        save_finetuned(tiny_model(seed=2), out)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    images = tiny_images(first)
    with torch.no_grad():
        assert torch.equal(load_finetuned(out).eval()(images), first(images))
    second = tiny_model(seed=2)
    save_finetuned(second, out)  # over an existing export
    with torch.no_grad():
        assert torch.equal(load_finetuned(out).eval()(images), second(images))


def test_export_command_turns_a_training_checkpoint_into_a_timm_model(tmp_path, capsys):
    hub = tiny_hub(tmp_path / "hub", key="deit_distilled", num_classes=4)
    model = timm.create_model(hub, pretrained=True)
    run = tmp_path / "run"
    finetune(model, SyntheticMasked(4), None, config(out=str(run), model=hub, pretrained=True, normalization="half"))

    assert cli.main(["export", str(run / "last.safetensors"), "--out", str(tmp_path / "export")]) == 0
    assert "local-dir:" in capsys.readouterr().out
    exported = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    images = tiny_images(exported)
    with torch.no_grad():
        assert torch.equal(exported(images), model.eval()(images))
    metadata = finetune_metadata(tmp_path / "export")
    assert metadata["base_model"] == hub and metadata["finetune_config"]["epochs"] == 1
    assert model.pretrained_cfg["mean"] != (0.5, 0.5, 0.5) and exported.pretrained_cfg["mean"] == [0.5] * 3


def test_export_command_needs_a_model_name_for_bare_weights(tmp_path, capsys):
    weights = tmp_path / "weights.safetensors"
    save_file(tiny_model().state_dict(), str(weights))
    assert "pass the timm model name" in cli_error(capsys, ["export", str(weights), "--out", str(tmp_path / "export")])
    hub = tiny_hub(tmp_path / "hub")
    assert cli.main(["export", str(weights), "--out", str(tmp_path / "export"), "--model", hub]) == 0
    assert "do not fit" in cli_error(
        capsys, ["export", str(weights), "--out", str(tmp_path / "x"), "--model", "deit_tiny_distilled_patch16_224"])


def test_export_into_a_mount_point_moves_within_it(tmp_path, monkeypatch):
    """On a mount point a rename from outside fails (EXDEV): the temporary folder must be inside."""
    out = tmp_path / "mount"
    out.mkdir()
    real_replace = os.replace

    def replace_within_one_file_system(src, dst):
        if Path(dst).parent not in Path(src).parents:
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src))
        real_replace(src, dst)

    monkeypatch.setattr(export_module.os, "replace", replace_within_one_file_system)
    model = tiny_model()
    save_finetuned(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def trained_checkpoint(tmp_path, **settings) -> tuple[str, torch.nn.Module, Path]:
    """A one-epoch run started from a local-dir hub model; returns (hub name, model, run dir)."""
    hub = tiny_hub(tmp_path / "hub", num_classes=4)
    model = timm.create_model(hub, pretrained=True)
    run = tmp_path / "run"
    finetune(model, SyntheticMasked(4), None, config(out=str(run), model=hub, **settings))
    return hub, model, run


def test_export_needs_overwrite_to_replace_an_export(tmp_path, capsys):
    _, _, run = trained_checkpoint(tmp_path, pretrained=True)
    args = ["export", str(run / "last.safetensors"), "--out", str(tmp_path / "export")]
    assert cli.main(args) == 0
    assert "already holds an export: pass --overwrite" in cli_error(capsys, args)
    assert cli.main([*args, "--overwrite"]) == 0


def test_checkpoints_are_self_contained(tmp_path):
    """The run started from local-dir:hub (its weights, --pretrained or not); the export still
    works after hub moved, and names hub as its base."""
    hub, model, run = trained_checkpoint(tmp_path)
    (tmp_path / "hub").rename(tmp_path / "moved")
    out = export_module.export_checkpoint(run / "last.safetensors", tmp_path / "export")
    images = tiny_images(model)
    with torch.no_grad():
        assert torch.equal(load_finetuned(out).eval()(images), model.eval()(images))
    assert finetune_metadata(out)["base_model"] == hub


def card_claims(out: Path) -> tuple[str, dict]:
    """The licence line of the model card and the pretrained_cfg of config.json."""
    licence = next(line for line in (out / "README.md").read_text().splitlines() if line.startswith("license:"))
    return licence, json.loads((out / "config.json").read_text())["pretrained_cfg"]


def test_a_random_init_export_claims_no_base_licence_or_tag(tmp_path):
    """A run from a plain timm name without --pretrained trained random weights: the export names
    the architecture alone, and neither the tag nor the licence of timm's pretrained config."""
    model = tiny_model(num_classes=4)
    assert model.pretrained_cfg["tag"] and model.pretrained_cfg["license"] == "apache-2.0"
    finetune(model, SyntheticMasked(4), None, config(out=str(tmp_path / "run"), model="vit_tiny_patch16_224"))
    out = export_module.export_checkpoint(tmp_path / "run" / "last.safetensors", tmp_path / "export")
    licence, pretrained_cfg = card_claims(out)
    assert licence == "license: unknown" and "tag" not in pretrained_cfg and "license" not in pretrained_cfg
    assert finetune_metadata(out)["base_model"] == "vit_tiny_patch16_224"
    assert model.pretrained_cfg["tag"]  # the model itself is left as it was
    save_finetuned(model, tmp_path / "from_base", base_model="vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    licence, pretrained_cfg = card_claims(tmp_path / "from_base")
    assert licence == "license: apache-2.0" and pretrained_cfg["tag"] == model.pretrained_cfg["tag"]


def test_export_of_a_missing_file_says_it_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "run" / "best.safetensors"
    error = cli_error(capsys, ["export", str(missing), "--out", str(tmp_path / "export")])
    assert f"{missing} does not exist" in error and "does not record" not in error


def test_non_finite_weights_are_refused(tmp_path, capsys):
    """A diverged run: export names the tensors and says what to do; nothing is written."""
    _, model, run = trained_checkpoint(tmp_path, pretrained=True)
    from relevance_finetune.checkpoint import load_checkpoint, save_checkpoint

    state, info, _ = load_checkpoint(run / "last.safetensors")
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    state["head.bias"][1] = float("inf")
    model.load_state_dict(state)
    save_checkpoint(run / "last.safetensors", model, info)
    error = cli_error(capsys, ["export", str(run / "last.safetensors"), "--out", str(tmp_path / "export")])
    assert "NaN or inf" in error and "blocks.0.attn.qkv.weight, head.bias" in error
    assert "export best.safetensors" in error and "lower lr" in error
    assert not (tmp_path / "export").exists()
    with pytest.raises(ValueError, match=r"NaN or inf values \(2 tensor\(s\): blocks.0.attn.qkv.weight, head.bias\)"):
        save_finetuned(model, tmp_path / "export")


@pytest.mark.parametrize("command", ["export", "resume"])
def test_truncated_checkpoints_are_named(tmp_path, capsys, command):
    hub, _, run = trained_checkpoint(tmp_path, pretrained=True)
    last = run / "last.safetensors"
    last.write_bytes(last.read_bytes()[:-100])
    if command == "export":
        error = cli_error(capsys, ["export", str(last), "--out", str(tmp_path / "export")])
        assert f"cannot read {last}" in error and "truncated" in error
    else:
        with pytest.raises(ValueError, match=f"cannot read {last}.*truncated"):
            finetune(tiny_model(num_classes=4), SyntheticMasked(4), None,
                     config(out=str(run), model=hub, pretrained=True, resume=True, epochs=2))


def test_exports_and_checkpoints_respect_the_umask(tmp_path):
    """safetensors writes its files readable by the owner only; outputs follow the umask instead."""
    from relevance_finetune.checkpoint import save_checkpoint

    previous = os.umask(0o022)
    try:
        model = tiny_model()
        save_finetuned(model, tmp_path / "export")
        save_checkpoint(tmp_path / "run" / "last.safetensors", model, {"epoch": 1})
    finally:
        os.umask(previous)
    written = [*(tmp_path / "export").iterdir(), tmp_path / "run" / "last.safetensors"]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in written} == {p.name: 0o644 for p in written}
