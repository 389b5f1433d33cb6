"""The benchmark's ceiling: the oracle, the gap-closed columns, the counterfactual rule, paired views."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from relevance_finetune.bench import originals, runner
from relevance_finetune.bench.ceiling import ceiling_columns, gap_closed, no_oracle_note
from relevance_finetune.bench.demo import _ceiling_table, summarize
from relevance_finetune.bench.synthetic import make_split

TINY = dict(image_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, pretrain_images=32, pretrain_epochs=1,
            biased_images=32, biased_epochs=1, train_batch=8, original_attempts=1, finetune_epochs=2,
            finetune_batch=4, select_every=1)


def test_oracle_shares_the_first_phase_and_breaks_the_shortcut_in_the_second(tmp_path, monkeypatch):
    config = runner.BenchConfig(**TINY)
    drawn = []
    real_split = originals.make_split
    monkeypatch.setattr(originals, "make_split", lambda n, distribution, *a, **k: drawn.append(distribution)
                        or real_split(n, distribution, *a, **k))
    original = runner.train_original(config, seed=0, cache_dir=tmp_path)
    oracle = runner.train_oracle(config, seed=0, cache_dir=tmp_path)
    # objects (independent), its restart check (independent), the original's biased phase; the oracle
    # reuses the cached first phase and draws its second phase with the shortcut independent of the class
    assert drawn == ["independent", "independent", "biased", "independent"]
    assert sorted(path.name.split("-")[0] for path in tmp_path.iterdir()) == ["objects", "oracle", "original"]
    assert not torch.equal(original.head.weight, oracle.head.weight)
    again = runner.train_oracle(config, seed=0, cache_dir=tmp_path)  # from the cache: nothing is drawn
    assert len(drawn) == 4 and torch.equal(again.head.weight, oracle.head.weight)
    fresh = runner.train_oracle(config, seed=0)  # the same model without a cache
    assert torch.equal(fresh.head.weight, oracle.head.weight)


def _entry(id_acc: float, ood: float, background_only: float, original=(90.0, 60.0, 50.0),
           object_only: float = 70.0) -> dict:
    values = {"id_acc": id_acc, "ood_acc": ood, "adv_acc": ood}
    entry = {key: {"mean": value, "std": 0.0} for key, value in values.items()}
    entry["probes"] = {"background_only": {"mean": background_only, "std": 0.0},
                       "object_only": {"mean": object_only, "std": 0.0}}
    change = dict(zip(("id_acc", "ood_acc", "background_only"), (id_acc, ood, background_only)))
    entry["change"] = {key: {"mean": change[key] - base, "std": 0.0}
                       for key, base in zip(("id_acc", "ood_acc", "background_only"), original)}
    entry["change"]["adv_acc"] = entry["change"]["ood_acc"]
    return entry


def test_gap_closed_is_the_change_over_the_oracle_s_change():
    methods = {"original": _entry(90, 60, 50), "oracle": _entry(80, 80, 10), "swap": _entry(85, 75, 20)}
    gaps = gap_closed(methods, "swap")
    # OOD 60 -> 75 of 60 -> 80; the original reads its objects alone at 70: 15 of 10 points of reliance
    assert gaps == pytest.approx({"ood_acc": 75.0, "background_only": 75.0, "id_vs_oracle": 5.0, "object_only": 150.0})
    assert ceiling_columns(methods, "swap") == ["75%", "75%", "+5.0", "150%"]
    weak = {**methods, "original": _entry(90, 60, 50, object_only=60.5)}  # its objects alone read no better
    assert gap_closed(weak, "swap")["object_only"] is None and ceiling_columns(weak, "swap")[-1] == "n/a (no gap)"
    assert gap_closed(methods, "oracle") is None and gap_closed(methods, "original") is None
    # an oracle that is not ahead of the original is no ceiling: no fraction of noise
    behind = {**methods, "oracle": _entry(80, 60.5, 60)}
    assert gap_closed(behind, "swap")["ood_acc"] is None and gap_closed(behind, "swap")["background_only"] is None
    assert ceiling_columns(behind, "swap")[:2] == ["n/a (oracle not ahead)"] * 2
    # no oracle (e.g. a user's own data): no gap columns, and a note that says why
    del methods["oracle"]
    assert gap_closed(methods, "swap") is None and ceiling_columns(methods, "swap") == []
    assert "no oracle" in no_oracle_note(methods)
    assert _ceiling_table(methods) == no_oracle_note(methods)


def test_summary_pairs_the_id_against_each_seed_s_oracle():
    def seed(original_id: float, oracle_id: float, swap_id: float) -> dict:
        def run(id_acc: float) -> dict:
            return {**{metric: 50.0 for metric in ("ood_acc", "adv_acc", "miou")}, "id_acc": id_acc,
                    "probes": {"object_only": 1.0, "background_only": 2.0, "background_reliance": 3.0}}
        return {"original": run(original_id), "oracle": run(oracle_id), "swap": {**run(swap_id), "lr": 1e-4}}

    methods = summarize([seed(90, 80, 84), seed(92, 78, 86)])
    assert methods["swap"]["vs_oracle"]["id_acc"]["mean"] == pytest.approx(6.0)
    assert methods["swap"]["vs_oracle"]["id_acc"]["std"] == pytest.approx(2.0 ** 0.5 * 2.0)
    assert methods["swap"]["gap_closed"] == {"ood_acc": None, "background_only": None,  # the oracle is not ahead
                                             "object_only": None}
    assert "vs_oracle" not in methods["oracle"] and "gap_closed" not in methods["original"]
    assert methods["oracle"]["seeds_ahead"] == []  # the same OOD in both seeds: no ceiling
    ahead = summarize([seed(90, 80, 84), {**seed(92, 78, 86), "oracle": {**seed(92, 78, 86)["oracle"], "ood_acc": 60.0}}])
    assert ahead["oracle"]["seeds_ahead"] == [1]
    assert "ahead of the original on OOD by at least 1 point in seed 1 but not in seed 0;" in _ceiling_table(ahead)


def _tiny_data(config):
    train = make_split(8, "biased", config=config.spurious(), classes=(0, 1))
    val = make_split(8, "biased", config=config.spurious(), classes=(0, 1), seed=1)
    return train, val


def test_counterfactual_images_move_objects_onto_other_backgrounds():
    config = runner.BenchConfig(**TINY)
    _, val = _tiny_data(config)
    images, masks, *_ = val.tensors
    moved = runner.counterfactual_images(val, seed=0)
    inside = masks[:, None].expand_as(images).bool()
    assert torch.equal(moved[inside], images[inside])  # every object stays
    assert not torch.equal(moved[~inside], images[~inside])  # on another image's background
    assert torch.equal(moved, runner.counterfactual_images(val, seed=0))  # one fixed draw


def test_counterfactual_rule_picks_the_best_counterfactual_accuracy_with_no_accuracy_limit():
    config = runner.BenchConfig(**TINY, lr_grid=(1e-3, 1e-2), max_val_drop=-1e9)  # no model passes a limit
    train, val = _tiny_data(config)
    torch.manual_seed(0)
    original = runner.create_original(config)
    method = runner.METHODS["swap_cf"]
    assert method.selection == "counterfactual" and method.kwargs["lambda_relevance"] == 0.0
    lr, model, trials = runner.choose_lr(original, method, train, val, config, seed=0)
    assert [(t["lr"], t["epoch"]) for t in trials] == [(0.0, 0), (1e-3, 1), (1e-3, 2), (1e-2, 1), (1e-2, 2)]
    best = max(range(1, len(trials)), key=lambda i: (trials[i]["counterfactual"], trials[i]["acc"]))
    assert [i for i, t in enumerate(trials) if t.get("chosen")] == [best] and lr == trials[best]["lr"]
    counterfactual = runner.counterfactual_images(val, seed=0)
    assert trials[best]["counterfactual"] == runner.accuracy(runner.predict(model, counterfactual), val.tensors[2])


def test_jensen_shannon():
    logits = torch.randn(4, 5)
    assert runner.jensen_shannon(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(4, 5)
    forward, backward = runner.jensen_shannon(logits, other), runner.jensen_shannon(other, logits)
    assert forward.item() == pytest.approx(backward.item()) and 0 < forward.item() <= torch.log(torch.tensor(2.0))


def test_paired_views_double_the_batch_and_the_jsd_term_changes_the_finetune(monkeypatch):
    config = runner.BenchConfig(**{**TINY, "finetune_epochs": 1})
    train, _ = _tiny_data(config)
    torch.manual_seed(0)
    original = runner.create_original(config)
    sizes = []
    real_loss = runner._loss_fn

    def recording_loss(*args):
        loss = real_loss(*args)
        return lambda images, masks, labels: sizes.append((len(images), len(masks), len(labels))) or \
            loss(images, masks, labels)

    monkeypatch.setattr(runner, "_loss_fn", recording_loss)
    paired = runner.finetune(original, runner.METHODS["paired_cf"], train, 1e-3, config, seed=0)
    assert sizes == [(8, 8, 8), (8, 8, 8)]  # 8 images in batches of 4: each with its counterfactual
    consistent = runner.finetune(original, runner.METHODS["paired_jsd_cf"], train, 1e-3, config, seed=0)
    assert not torch.equal(paired.head.weight, consistent.head.weight)


def test_method_settings_are_checked():
    with pytest.raises(ValueError, match="selection"):
        runner.Method("bad", selection="best")
    with pytest.raises(ValueError, match="background_swap"):
        runner.Method("bad", paired=True)
    with pytest.raises(ValueError, match="paired"):
        dataclasses.replace(runner.METHODS["swap_cf"], jsd=1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        dataclasses.replace(runner.METHODS["paired_jsd_cf"], jsd=-1.0)


def test_noisy_masks_are_patch_level_grown_or_shrunk_and_sometimes_another_image_s():
    data = make_split(40, "biased", config=runner.BenchConfig(image_size=48).spurious(), seed=0)
    patch = runner.patch_masks(data, 8).tensors[1]
    noisy = runner.noisy_masks(data, 8, seed=0).tensors[1]
    assert torch.equal(noisy, runner.noisy_masks(data, 8, seed=0).tensors[1])
    blocks = noisy.unfold(1, 8, 8).unfold(2, 8, 8)  # constant over every 8 x 8 patch
    assert torch.equal(blocks.amin(dim=(-1, -2)), blocks.amax(dim=(-1, -2)))
    from scipy import ndimage

    square = np.ones((5, 5), bool)  # 2 patches each way, on the patch grid
    coarse = patch[:, ::8, ::8].numpy().astype(bool)
    own = [(ndimage.binary_dilation(m, square, border_value=0), ndimage.binary_erosion(m, square, border_value=1))
           for m in coarse]
    got = noisy[:, ::8, ::8].numpy().astype(bool)
    every = [variant for pair in own for variant in pair]
    assert all(any((g == variant).all() for variant in every) for g in got)
    replaced = runner.noisy_masks(data, 8, seed=0, grow=0).tensors[1]  # about a fifth are another image's
    assert 2 <= (replaced != patch).any(dim=(1, 2)).sum() <= 16
    assert 5 < sum((g == d).all() and not (d == e).all() for g, (d, e) in zip(got, own))  # some grown
    assert 5 < sum((g == e).all() and not (d == e).all() for g, (d, e) in zip(got, own))  # some shrunk
    config = runner.BenchConfig(**{**TINY, "image_size": 48, "finetune_masks": "noisy"})
    assert torch.equal(runner.make_data(config, 0)["train"].tensors[1],
                       runner.noisy_masks(make_split(config.finetune_per_class * 5, "biased", config.p, config.spurious(),
                                                     seed=3, classes=config.set_a), 8, seed=3).tensors[1])


def test_demo_set_overrides_a_setting_and_refuses_bad_ones(capsys):
    from conftest import cli_error
    from relevance_finetune.bench.demo import _overrides

    assert _overrides(["finetune_per_class=5", "lr_grid=1e-4,3e-4", "oracle=false"]) == \
        {"finetune_per_class": 5, "lr_grid": (1e-4, 3e-4), "oracle": False}
    assert "not of type int" in cli_error(capsys, ["demo", "--quick", "--set", "finetune_per_class=x"])
    assert "BenchConfig field" in cli_error(capsys, ["demo", "--quick", "--set", "nope=1"])


def test_a_seed_s_cache_key_follows_what_each_method_is(tmp_path, monkeypatch):
    from relevance_finetune.bench import demo

    config = runner.BenchConfig(**TINY, methods=("swap",))
    before = demo._seed_paths(config, 0, tmp_path)
    monkeypatch.setitem(runner.METHODS, "swap", dataclasses.replace(runner.METHODS["swap"], background_swap=0.5))
    assert demo._seed_paths(config, 0, tmp_path) != before
