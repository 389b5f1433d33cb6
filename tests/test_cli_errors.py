"""The command line on a broken install, on errors raised in data-loader workers, on a small machine."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cli_error
from relevance_finetune import cli
from relevance_finetune.data import default_workers
from relevance_finetune.train.config import TrainConfig
from test_evaluate_folder import _bad_split, _common, _save_model
from test_train_runs import TINY_RANDOM, train_args, write_folder

ROOT = Path(__file__).resolve().parents[1]
MISMATCH = "operator torchvision::nms does not exist"  # torchvision's import, built for another torch


# -- errors in data-loader workers ------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["mask size", "corrupt image"])
def test_train_reports_a_worker_error_as_its_own_line(tmp_path, capsys, case):
    data = write_folder(tmp_path / "data", classes=("cat", "dog"))
    if case == "mask size":
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "data" / "masks" / "cat" / "0.png")
    else:
        (tmp_path / "data" / "images" / "cat" / "0.jpg").write_bytes(b"not a JPEG")
    args = [*train_args(data, tmp_path / "run", *TINY_RANDOM), "--workers", "1"]
    error = cli_error(capsys, args)
    assert "DataLoader worker" not in error and "Traceback" not in error and "cat/0." in error
    expected = "is 16x16 but image" if case == "mask size" else "cannot"
    assert expected in error
    assert error == cli_error(capsys, [*args[:-1], "0"])  # what --workers 0 says


def test_evaluate_reports_a_worker_error_as_its_own_line(tmp_path, capsys):
    model = _save_model(tmp_path / "model", 1)
    flags = ["evaluate", "--model", model, "--suite", "folder", *_bad_split(tmp_path, "mask size"),
             *_common(tmp_path / "out")]
    flags[flags.index("--workers") + 1] = "1"
    error = cli_error(capsys, flags)
    assert "DataLoader worker" not in error and "red/0.png is 16x16 but image" in error


# -- a broken install ---------------------------------------------------------------------------------------
def test_torch_and_torchvision_from_different_builds_is_one_line_saying_what_to_reinstall(monkeypatch, capsys):
    def broken_import(name, package=None):
        raise RuntimeError(MISMATCH)  # what `import torchvision` raises then, from timm or the command's module

    monkeypatch.setattr(cli.importlib, "import_module", broken_import)
    error = cli_error(capsys, ["explain", "--help"])
    assert MISMATCH in error and "pip install --force-reinstall torch torchvision" in error
    with pytest.raises(ImportError, match="matching builds"):
        cli.main(["--debug", "explain", "--help"])


def test_the_command_line_imports_neither_torch_nor_torchvision_before_a_command_runs():
    """So the line above is what a broken install prints: ``import relevance_finetune`` runs first."""
    code = "import sys, relevance_finetune.cli; assert not {'torch', 'torchvision', 'timm'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


# -- a small machine ----------------------------------------------------------------------------------------
def test_loaders_default_to_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert default_workers() == 2 and default_workers(1) == 1
    for command, more in (("evaluate", ["--out", "o"]), ("masks", ["--images", "i", "--out", "o"])):
        assert cli.build_parser(command).parse_args([command, "--model", "m", *more]).workers == 2, command
    assert TrainConfig().workers == min(2, len(os.sched_getaffinity(0)))
