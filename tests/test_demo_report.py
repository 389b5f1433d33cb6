"""What the demo says: its plan, a line per stage, captions over every table, no spread for one seed,
and a conclusion whose numbers are the results'. Small made-up results; no training."""
from __future__ import annotations

import argparse
import pickle
import re
import time

import pytest
from torch import nn

from relevance_finetune.bench import demo
from relevance_finetune.bench.ceiling import ceiling_note
from relevance_finetune.bench.demo import markdown_tables, summarize
from relevance_finetune.bench.narration import StageReporter, conclusion, plan
from relevance_finetune.bench.runner import BenchConfig


def _run(id_acc: float, ood: float, background_only: float, lr: float | None = None, sets: bool = False) -> dict:
    """One model's results on one seed (percent), as run_seed gives them."""
    result = {"id_acc": id_acc, "ood_acc": ood, "adv_acc": ood - 20.0, "miou": 40.0, "pixel_acc": 50.0, "map": 60.0,
              "perturbation_positive_auc": 20.0, "perturbation_negative_auc": 60.0,
              "probes": {"object_only": 70.0, "background_only": background_only,
                         "background_reliance": background_only - 70.0}}
    if sets:
        result.update(ood_acc_set_a=ood + 1.0, ood_acc_set_b=ood - 1.0)
    return result if lr is None else {**result, "lr": lr}


def _seed(shift: float = 0.0, oracle_ood: float = 82.2, sets: bool = False) -> dict:
    """The docs' default run, seed 0: original 91.8 / 50.2, oracle +32.0 OOD, recommended +15.6 OOD at -5.2 ID."""
    return {"original": _run(91.8, 50.2 + shift, 69.5, sets=sets),
            "oracle": _run(82.2, oracle_ood + shift, 10.9, sets=sets),
            "ours": _run(90.8, 47.0 + shift, 61.8, 1e-4, sets), "swap": _run(92.2, 52.2 + shift, 53.9, 3e-5, sets),
            "recommended": _run(86.6, 65.8 + shift, 32.2, 1e-4, sets)}


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, (pattern, text)
    return float(match.group(1))


def test_conclusion_quotes_the_results():
    methods = summarize([_seed()])
    text = conclusion("hue", methods, [0])
    change = {name: methods[name]["change"] for name in ("oracle", "ours", "swap", "recommended")}
    assert text.startswith("On hue, seed 0, the original scored 91.8% ID and 50.2% OOD")
    recommended = change["recommended"]
    assert _number(r"raised OOD accuracy by ([\d.]+) points", text) == round(recommended["ood_acc"]["mean"], 1)
    assert _number(r"\(to ([\d.]+)%", text) == round(methods["original"]["ood_acc"]["mean"]
                                                     + recommended["ood_acc"]["mean"], 1)
    assert _number(r"([\d.]+)% of the way to the oracle", text) == \
        round(methods["recommended"]["gap_closed"]["ood_acc"])
    assert _number(r"at an ID cost of ([\d.]+) points", text) == round(-recommended["id_acc"]["mean"], 1)
    assert _number(r"ours\) moved OOD by ([-+\d.]+) points", text) == round(change["ours"]["ood_acc"]["mean"], 1)
    assert _number(r"swap ([-+\d.]+) points", text) == round(change["swap"]["ood_acc"]["mean"], 1)
    assert _number(r"reached ([\d.]+)% OOD", text) == 82.2
    # the docs' numbers, by hand: +15.6 OOD of a +32.0 gap (49%) at -5.2 ID; ours -3.2; swap +2.0
    assert "by 15.6 points (to 65.8%, 49% of the way to the oracle) at an ID cost of 5.2 points" in text
    assert "moved OOD by -3.2 points" in text and "swap +2.0 points" in text and "One seed" in text
    assert "±" not in text


def test_conclusion_wording_follows_what_ran():
    behind = summarize([_seed(oracle_ood=50.5)])  # the oracle not ahead by MIN_GAP: no ceiling, no share
    text = conclusion("mark", behind, [3])
    assert "is not ahead of the original on OOD (+0.3 points)" in text and "of the way" not in text
    assert "On mark, seed 3" in text
    no_oracle = {name: entry for name, entry in summarize([_seed()]).items() if name != "oracle"}
    text = conclusion("hue", no_oracle, [0])
    assert "No oracle ran" in text and "of the way" not in text
    only_ours = summarize([{name: _seed()[name] for name in ("original", "oracle", "ours")}])
    text = conclusion("hue", only_ours, [0])
    assert "The paper's loss alone (ours) lowered OOD accuracy by 3.2 points" in text
    assert "at an ID cost of 1.0 points" in text and "others" not in text
    flat = summarize([{"original": _seed()["original"], "swap": {**_seed()["original"], "id_acc": 93.0, "lr": 1e-4}}])
    assert "Swap left OOD accuracy unchanged (to 50.2%) while ID accuracy rose by 1.2 points" in \
        conclusion("hue", flat, [0])
    assert conclusion("hue", {"original": flat["original"]}, [0]).endswith("No finetuned method ran.")
    two = summarize([_seed(), _seed(shift=2.0)])
    text = conclusion("hue", two, [0, 1])
    assert "mean over 2 seeds (0, 1)" in text and "by 15.6 ± 0.0 points" in text and "within the spread" in text


def test_one_seed_has_no_spread_anywhere(tmp_path):
    methods = summarize([_seed()])
    assert methods["ours"]["n_seeds"] == 1
    tables = markdown_tables(methods, [0])
    assert "±" not in tables and "| ours | -1.0 | -3.2 |" in tables and "| ours | -10% | 13% | +8.6 |" in tables
    assert "±" not in markdown_tables({name: {k: v for k, v in entry.items() if k != "n_seeds"}  # an older summary
                                      for name, entry in methods.items()})
    demo.write_reports(tmp_path, {"hue": demo._family_results({}, [0], [_seed()], 12.0)})
    report = (tmp_path / "results.md").read_text()
    assert "±" not in report and "Seed 0, 12 s of runs" in report and "**Conclusion.** On hue, seed 0" in report
    several = markdown_tables(summarize([_seed(), _seed(shift=2.0)]))
    assert "| ours | -1.0 ± 0.0 | -3.2 ± 0.0 |" in several and "| ours | -10% | 13% | +8.6 ± 0.0 |" in several


def _captioned(text: str) -> list[int]:
    """The table numbers of the captions right above the tables in ``text``; fails on a table without one."""
    lines = [line for line in text.splitlines() if line.strip()]
    numbers = []
    for before, line in zip(lines, lines[1:]):
        if line.startswith("| method |"):
            assert re.match(r"Table \d+\. .+ Rows: .+; columns: .+", before), (before, line)
            numbers.append(int(before.split()[1].rstrip(".")))
    return numbers


@pytest.mark.parametrize("oracle, sets", [(True, False), (False, True)])
def test_every_table_has_a_caption(oracle, sets):
    per_seed = [{k: v for k, v in _seed(sets=sets).items() if oracle or k != "oracle"}]
    text = markdown_tables(summarize(per_seed), [0])
    assert _captioned(text) == ([1, 2, 3] if oracle else [1, 2])
    assert ("OOD top-1 on the classes with (set A)" in text) == sets
    assert "percentage points" in text
    assert ("in seed 0: the OOD gap closed has a ceiling to measure against" in text) == oracle


def test_the_command_says_what_it_does_then_what_it_found(tmp_path, capsys, monkeypatch):
    """``run``'s screen: the plan, captioned tables, the conclusion (run_benchmark made up, no training)."""
    def fake_benchmark(config, seeds, out, families, note, jobs, propagated):
        return demo.write_reports(out, {families[0]: demo._family_results({}, seeds, [_seed()], 1.0)}, note)

    monkeypatch.setattr(demo, "run_benchmark", fake_benchmark)
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert demo.run(parser.parse_args(["--out", str(tmp_path)])) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("relevance-finetune demo: ")
    plan_text = printed.split("\n\nShortcut family")[0]
    for words in ("Shortcut family: hue", "Seeds: 1 (0)", "ours ", "swap ", "recommended ", "The original:",
                  "The oracle:", "Expected time: about 3 min", "two_stage_head_propagated "):
        assert words in plan_text
    assert _captioned(printed) == [1, 2, 3] and "±" not in printed
    assert "\nConclusion (hue): On hue, seed 0, the original scored 91.8%" in printed
    assert "runs 0 (0 = the first seed)" not in printed


def test_plan_describes_the_run():
    config = BenchConfig(methods=("ours", "recommended"), oracle=False, finetune_classes="all", finetune_per_class=8,
                         val_per_class=20)
    text = plan(config, ("hue", "mark"), range(3), "full", custom=True, cache="out/cache")
    assert "Shortcut families: hue (the background's colour); mark (a small plate" in text
    assert "Seeds: 3 (0, 1, 2)" in text and "No oracle" in text and "on 80 masked images" in text
    assert "200 masked validation images" in text and "about 60 min" in text and "yours differ" in text
    assert "Finished seeds in out/cache are reused." in text


def test_stage_lines_name_every_stage(tmp_path, capsys, monkeypatch):
    config = BenchConfig(methods=("ours", "control"))
    reporter = pickle.loads(pickle.dumps(StageReporter(config, 2, time.time() - 61)))  # worker processes get a copy
    for message in ("original model", "oracle", "ours", "control", "ours: learning rate 0.0001"):
        reporter(message)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[1:01] hue seed 2, step 1 of 4: the original: training it")
    assert "step 2 of 4: the oracle" in lines[1]
    assert "step 3 of 4: ours: finetuning, 4 learning rates x 30 epochs, kept by the paper rule" in lines[2]
    assert "step 4 of 4: control" in lines[3] and "ours's learning rate" in lines[3]
    assert lines[4].endswith("hue seed 2, ours: learning rate 0.0001")  # a finer message, as it comes

    def fake_run_seed(config, seed, cache, progress):
        for message in ("original model", "oracle", "ours"):
            progress(message)
        return {"methods": _seed(), "models": {"original": nn.Linear(1, 1), "ours": nn.Linear(1, 1)}}

    monkeypatch.setattr(demo, "run_seed", fake_run_seed)
    config = BenchConfig(methods=("ours",))
    demo._seed_result(config, 0, tmp_path, since=time.time())
    assert "step 3 of 3: ours" in capsys.readouterr().out
    demo._seed_result(config, 0, tmp_path, since=time.time())  # cached: nothing runs
    assert f"hue seed 0, found in {tmp_path}: reused" in capsys.readouterr().out


def test_method_names_never_collide_with_a_seeds_other_entries(tmp_path, monkeypatch):
    """Methods named like a seed's other entries (``masks``, ``seconds``, ``models``) are methods like any."""
    from relevance_finetune.bench.runner import METHODS
    names = ("masks", "seconds", "models")
    for name in names:
        monkeypatch.setitem(METHODS, name, METHODS["swap"])
    quality = {"source": "original", "iou": 50.0, "patch_iou": 60.0, "chance_iou": 10.0, "empty": 0, "full": 0,
               "images": 8}

    def fake_run_seed(config, seed, cache, progress):
        methods = {**_seed(), **{name: _run(90.0, 55.0, 50.0, 1e-4) for name in names}}
        return {"methods": methods, "models": {name: nn.Linear(1, 1) for name in methods}, "masks": quality}

    monkeypatch.setattr(demo, "run_seed", fake_run_seed)
    monkeypatch.setattr(demo, "create_original", lambda config: nn.Linear(1, 1))
    monkeypatch.setattr(demo, "train_original", lambda config, seed, cache: nn.Linear(1, 1))
    monkeypatch.setattr(demo, "make_data", lambda config, seed, cache: {"tests": {"ood": None}})
    monkeypatch.setattr(demo, "_figure", lambda seed_result, path: path)
    monkeypatch.setattr(demo, "_export", lambda model, config, out: None)
    config = BenchConfig(methods=("ours", "swap", "recommended", *names))
    results = demo.run_benchmark(config, [0], tmp_path, ("hue",))
    assert set(names) <= set(results["methods"]) and set(names) <= set(results["per_seed"][0])
    assert results["methods"]["masks"]["change"]["ood_acc"]["mean"] == pytest.approx(55.0 - 50.2)
    assert results["masks"] == [quality] and results["seconds"] >= 0
    assert "| masks |" in (tmp_path / "results.md").read_text()


def test_a_head_refit_shows_its_c_not_a_learning_rate():
    seed = {**_seed(), "head": {**_run(90.0, 60.0, 40.0, 0.0), "head_C": 0.3},
            "two_stage_head": {**_run(86.0, 70.0, 30.0, 1e-4), "head_C": 0.07}}
    text = markdown_tables(summarize([seed]))
    assert text.endswith("Chosen learning rate: ours 0.0001; swap 3e-05; recommended 0.0001; two_stage_head 0.0001. "
                         "Chosen head refit C: head 0.3; two_stage_head 0.07.\n")
    two_seeds = markdown_tables(summarize([seed, seed]))
    assert "Chosen learning rates per seed: ours 0.0001, 0.0001;" in two_seeds
    assert "Chosen head refit C per seed: head 0.3, 0.3; two_stage_head 0.07, 0.07." in two_seeds


def test_ceiling_note_names_the_seeds():
    assert ceiling_note([0], [0]) == ("The oracle is ahead of the original on OOD by at least 1 point in seed 0: "
                                      "the OOD gap closed has a ceiling to measure against.")
    assert "in every seed (0, 1, 2)" in ceiling_note([0, 1, 2], [0, 1, 2])
    assert "is not ahead of the original on OOD by at least 1 point in seed 4, so there is no OOD ceiling" in \
        ceiling_note([], [4])
    assert "in any of the 2 seeds" in ceiling_note([], [0, 1])
    assert "in seeds 5, 7 but not in seed 6;" in ceiling_note([0, 2], [5, 6, 7])


@pytest.mark.parametrize("classes, expected", [("all", demo.DEMO_METHODS),
                                                ("half", ("ours", "swap", "recommended"))])
def test_default_methods_show_the_head_refit_where_every_class_is_masked(tmp_path, monkeypatch, classes, expected):
    """The default demo runs the head refit beside the recommended recipe; with masks on half of the
    classes (where a head refit cannot run) the default methods go without it."""
    ran = {}

    def fake_benchmark(config, seeds, out, families, note, jobs, propagated):
        ran["methods"], ran["propagated"] = config.methods, propagated
        return demo.write_reports(out, {families[0]: demo._family_results({}, seeds, [_seed()], 1.0)}, note)

    monkeypatch.setattr(demo, "run_benchmark", fake_benchmark)
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert demo.run(parser.parse_args(["--out", str(tmp_path), "--finetune-classes", classes])) == 0
    assert ran["methods"] == expected and ("head" in expected) == (classes == "all")
    assert ran["propagated"] == (classes == "all")  # two_stage_head on propagated masks, where a head refit can run
    for flags in (["--no-propagated"], ["--quick"], ["--methods", "ours"]):
        demo.run(parser.parse_args(["--out", str(tmp_path), "--finetune-classes", classes, *flags]))
        assert ran["propagated"] is False
