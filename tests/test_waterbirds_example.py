"""examples/waterbirds.py, run as it is on a miniature Waterbirds in the release layout (a smoke test, not a result)."""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

from test_train import tiny_hub
from waterbirds_fixture import write_mini_waterbirds

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _example():
    spec = importlib.util.spec_from_file_location("waterbirds_example", ROOT / "examples" / "waterbirds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_runs_end_to_end_and_its_table_is_the_evaluations(tmp_path, capsys):
    data = write_mini_waterbirds(tmp_path / "data")
    hub = tiny_hub(tmp_path / "hub", num_classes=2)
    out = tmp_path / "out"
    example = _example()
    assert example.main(["--waterbirds", str(data["root"]), "--segmentations", str(data["segmentations"]),
                         "--out", str(out), "--model", hub, "--epochs", "1", "--batch-size", "4",
                         "--erm-lrs", "1e-3", "3e-3", "--recipe-lrs", "1e-3", "--workers", "0", "--no-progress"]) == 0
    results = json.loads((out / "table.json").read_text())["results"]
    assert list(results) == list(example.METHODS)
    table = (out / "table.md").read_text()
    for name, result in results.items():
        evaluated = json.loads((out / "eval" / name / "waterbirds.json").read_text())
        assert result == evaluated
        row = next(line for line in table.splitlines() if line.startswith(f"| {name}: "))
        cells = [cell.strip() for cell in row.split("|")[2:5]]
        assert cells == [f"{100 * evaluated[key]:.1f}" for key in
                         ("worst_group_accuracy", "mean_accuracy", "weighted_mean_accuracy")]
    assert "| DFR (Kirichenko et al. 2023), ResNet-50, published (cited, not measured here) | 92.9 ± 0.2 | " \
           "not reported | 94.2 ± 0.4 |" in table
    commands = (out / "commands.sh").read_text().splitlines()[2:]
    trains = [shlex.split(line) for line in commands if line.startswith("relevance-finetune train")]
    assert len(trains) == 2 + 1 + 1 + 1 + 1  # two ERM rates, head, dfr, recommended, two_stage_head
    assert all(command[command.index("--data-format") + 1] == "waterbirds" for command in trains)
    dfr = next(command for command in trains if "--head-labels" in command)
    assert dfr[dfr.index("--head-labels") + 1] == "groups" and dfr[dfr.index("--recipe") + 1] == "head"
    # the later methods start from the exported ERM run of the better rate
    erm_runs = [out / "runs" / "erm" / name for name in ("lr_0.001", "lr_0.003")]
    chosen = max(erm_runs, key=example.best_worst_group)
    assert f"relevance-finetune export {chosen / 'best.safetensors'} --out {out / 'models' / 'erm'}" in commands
    erm = ["--model", f"local-dir:{out / 'models' / 'erm'}"]
    assert sum(command[2:4] == erm for command in trains) == 4
    assert re.search(r"worst-group accuracy", capsys.readouterr().out)
