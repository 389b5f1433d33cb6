"""benchmarks/tradeoff.py, headline.py and per_mask_study.py: the figures and tables drawn from a demo's results.json."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tradeoff():
    return _load("tradeoff")


def _trials(shift: float) -> list[dict]:
    start = {"lr": 0.0, "epoch": 0, "acc": 90.0 + shift, "background_only": 60.0,
             "test": {"id": 94.0, "ood": 70.0 + shift}}
    later = {"lr": 1e-4, "epoch": 5, "acc": 88.0 + shift, "background_only": 40.0,
             "test": {"id": 92.0, "ood": 76.0 + 3 * shift}}
    return [start, later]


def test_points_are_paired_changes_averaged_over_seeds_and_drawn(tradeoff, tmp_path, monkeypatch):
    per_seed = [{"original": {}, "swap": {"lr_trials": _trials(shift)}, "ours": {"lr_trials": []}}
                for shift in (0.0, 2.0)]
    points = tradeoff.trial_points(per_seed, "swap")
    assert points == {(1e-4, 5): {"val_acc": -2.0, "val_background_only": -20.0, "test_id": -2.0, "test_ood": 8.0}}
    family = {"per_seed": per_seed, "seeds": [0, 1], "config": {"family": "hue", "max_val_drop": 2.5}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(family))
    monkeypatch.setattr(sys, "argv", ["tradeoff.py", str(path)])
    tradeoff.main()
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000
    assert "| swap | 0.0001 | 5 | -2.0 | -20.0 | - | -2.0 | +8.0 |" in (tmp_path / "tradeoff.md").read_text()


def test_headline_groups_runs_and_shows_paired_changes(tmp_path):
    headline = _load("headline")
    stat = {"mean": 50.0, "std": 1.0}
    original = {"id_acc": stat, "ood_acc": stat, "adv_acc": stat, "probes": {"background_only": stat,
                                                                          "object_only": {"mean": 60.0, "std": 1.0}}}
    swap = {**original, "change": {key: {"mean": -2.25, "std": 0.5} for key in ("id_acc", "ood_acc", "adv_acc",
                                                                                  "background_only")}}
    for family, classes in (("hue", "all"), ("mark", "half")):
        report = {"config": {"family": family, "finetune_classes": classes, "finetune_per_class": 16,
                             "set_a": [0, 1, 2, 3, 4]}, "seeds": [0],
                  "methods": {"original": original, "swap": swap}}
        (tmp_path / f"{family}.json").write_text(json.dumps(report))
    reports = headline.runs([tmp_path / "hue.json", tmp_path / "mark.json"])
    assert list(reports) == ["hue (all classes)", "mark (half classes)"]
    assert headline._label({"family": "hue", "finetune_classes": "all", "finetune_per_class": 32, "set_a": [0, 1],
                            "finetune_masks": "patch"}) == "hue (all classes, 64 masked images, patch masks)"
    assert headline._label({"family": "mark", "finetune_classes": "all", "finetune_per_class": 8, "set_a": list(range(10)),
                            "lr_grid": [1e-3], "pretrain_images": 12000}) == \
        "mark (all classes, lr 0.001, 12000 first-phase images)"
    table = headline.headline(reports, ["ours", "swap"]).splitlines()
    assert table[2] == "| hue (all classes) | original | 50.0 | 50.0 | 50.0 | 50.0 |"
    assert table[3] == "| | swap | -2.2 ± 0.5 | -2.2 ± 0.5 | -2.2 ± 0.5 | -2.2 ± 0.5 |" and len(table) == 8
    assert "no oracle" in table[-1] and table[-1].endswith("(hue (all classes), mark (half classes))")
    # a run with an oracle gets the gap-closed columns, its oracle's row first
    oracle = {**original, "change": {key: {"mean": -4.5 if key == "background_only" else 4.5, "std": 0.0}
                                     for key in ("id_acc", "ood_acc", "adv_acc", "background_only")}}
    report = json.loads((tmp_path / "hue.json").read_text())
    report["methods"]["oracle"] = oracle
    (tmp_path / "hue.json").write_text(json.dumps(report))
    table = headline.headline(headline.runs([tmp_path / "hue.json", tmp_path / "mark.json"]), ["swap"]).splitlines()
    assert table[0].endswith("| OOD gap closed | bg-only gap closed | ID vs oracle | object-only gap closed |")
    assert table[3] == "| | oracle | +4.5 ± 0.0 | +4.5 ± 0.0 | +4.5 ± 0.0 | -4.5 ± 0.0 | 100% | 100% | +0.0 |  |"
    assert table[4] == "| | swap | -2.2 ± 0.5 | -2.2 ± 0.5 | -2.2 ± 0.5 | -2.2 ± 0.5 | -50% | 50% | -6.8 | -22% |"
    assert table[-1].endswith("(mark (half classes))")
    # a run that held out classes adds their OOD column; the others leave it blank
    report = json.loads((tmp_path / "mark.json").read_text())
    report["methods"]["original"]["ood_acc_set_b"] = {"mean": 40.0, "std": 0.0}
    report["methods"]["swap"]["change"]["ood_acc_set_b"] = {"mean": 1.25, "std": 0.5}
    (tmp_path / "mark.json").write_text(json.dumps(report))
    table = headline.headline(headline.runs([tmp_path / "hue.json", tmp_path / "mark.json"]), ["swap"]).splitlines()
    assert table[0].startswith("| run | method | ID | OOD | adv | bg-only | OOD set B | OOD gap closed")
    assert table[2].endswith("| 50.0 |  |  |  |  |  |") and "| -2.2 ± 0.5 | +1.2 ± 0.5 |" in table[6]
    # a second run on the same originals joins the first; one on others is refused
    more = {"config": {"family": "hue", "finetune_classes": "all", "finetune_per_class": 16,
                       "set_a": [0, 1, 2, 3, 4]}, "seeds": [0],
            "methods": {"original": original, "ours": swap}}
    (tmp_path / "more.json").write_text(json.dumps(more))
    merged = headline.runs([tmp_path / "hue.json", tmp_path / "more.json"])
    assert list(merged["hue (all classes)"]["methods"]) == ["original", "swap", "oracle", "ours"]
    more["config"]["p"] = 0.5
    (tmp_path / "more.json").write_text(json.dumps(more))
    with pytest.raises(ValueError, match="other settings"):
        headline.runs([tmp_path / "hue.json", tmp_path / "more.json"])
    more["config"]["p"] = 0.9
    more["methods"]["original"] = {**original, "id_acc": {"mean": 51.0, "std": 1.0}}
    (tmp_path / "more.json").write_text(json.dumps(more))
    with pytest.raises(ValueError, match="other originals"):
        headline.runs([tmp_path / "hue.json", tmp_path / "more.json"])


def _study_seed(original_ood: float, oracle_ood: float, head_ood: float, seconds: float) -> dict:
    def entry(ood: float, id_acc: float, background: float, **extra) -> dict:
        return {"ood_acc": ood, "id_acc": id_acc, "probes": {"background_only": background}, **extra}
    return {"original": entry(original_ood, 90.0, 60.0), "oracle": entry(oracle_ood, 80.0, 20.0),
            "head": entry(head_ood, 84.0, 40.0, seconds=seconds)}


def test_per_mask_study_averages_only_seeds_with_a_ceiling(tmp_path):
    study = _load("per_mask_study")
    per_seed = [_study_seed(40.0, 80.0, 60.0, 2.0),   # the oracle 40 points ahead: half the gap closed
                _study_seed(40.0, 40.5, 10.0, 4.0)]   # the oracle not ahead: listed, not averaged in
    report = {"config": {"family": "hue", "finetune_masks": "tokencut", "finetune_per_class": 8},
              "seeds": [0, 1], "per_seed": per_seed}
    (tmp_path / "results.json").write_text(json.dumps(report))
    (row,) = [row for r in study.reports([tmp_path / "results.json"]) for row in study.study_rows(r, ("head", "swap"))]
    assert row["ood_gap_closed"] == pytest.approx(50.0) and row["bg_only_gap_closed"] == pytest.approx(50.0)
    assert row["id_vs_oracle"] == pytest.approx(4.0) and row["seeds"] == [0] and row["seeds_without_ceiling"] == [1]
    assert row["seconds"] == pytest.approx(3.0)  # wall time over every seed
    table = study.markdown([row])
    assert "| hue | tokencut | 8 | head | 50% | 50% | +20.0 ± 0.0 | +4.0 ± 0.0 | 3.0 | 0 (1) |" in table
    study.curve_figure([row], tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_per_mask_study_carries_the_propagated_masks_iou_and_the_step_budget(tmp_path):
    study = _load("per_mask_study")
    report = {"config": {"family": "mark", "finetune_masks": "propagate", "finetune_per_class": 32,
                         "annotated_per_class": 8, "finetune_steps": 300},
              "seeds": [0, 1], "per_seed": [_study_seed(40.0, 80.0, 60.0, 2.0), _study_seed(40.0, 80.0, 50.0, 2.0)],
              "masks": [{"iou": 50.0, "held_out_iou": 60.0}, {"iou": 54.0, "held_out_iou": 62.0}]}
    exact = {**report, "config": {"family": "mark", "finetune_masks": "exact", "finetune_per_class": 32}}
    del exact["masks"]
    for name, content in (("p.json", report), ("e.json", exact)):
        (tmp_path / name).write_text(json.dumps(content))
    propagated, plain = [row for r in study.reports([tmp_path / "p.json", tmp_path / "e.json"])
                         for row in study.study_rows(r, ("head",))]
    assert propagated["masks_iou"] == 52.0 and propagated["held_out_iou"] == 61.0
    assert propagated["annotated_per_class"] == 8 and propagated["finetune_steps"] == 300
    assert plain["masks_iou"] is None and plain["annotated_per_class"] is None and plain["finetune_steps"] is None
    table = study.markdown([propagated, plain])
    assert "| mark | propagate (8 annotated) | 32 | head | 38% | 50% | +15.0 ± 7.1 | +4.0 ± 0.0 | 2.0 | 0, 1 | " \
           "52.0 (61.0) | 300 |" in table
    assert "| mark | exact | 32 | head | 38% | 50% | +15.0 ± 7.1 | +4.0 ± 0.0 | 2.0 | 0, 1 | exact | epochs |" in table
    assert table.splitlines()[1] == "|---" * 12 + "|"


def test_per_mask_study_skips_files_that_are_not_demo_results(tmp_path, capsys):
    study = _load("per_mask_study")
    report = {"config": {"family": "hue", "finetune_per_class": 8}, "seeds": [0],
              "per_seed": [_study_seed(40.0, 80.0, 60.0, 2.0)]}
    (tmp_path / "per_mask_a.json").write_text(json.dumps(report))
    rows = study.study_rows(report, ("head",))
    (tmp_path / "per_mask_study.json").write_text(json.dumps(rows))  # its own output matches the glob too
    assert study.reports(sorted(tmp_path.glob("per_mask_*.json"))) == [report]
    assert f"skipping {tmp_path / 'per_mask_study.json'}: not a demo's results.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="none of the 1 file"):
        study.reports([tmp_path / "per_mask_study.json"])
