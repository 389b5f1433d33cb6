"""benchmarks/step_time.py and its modules: the script runs on a tiny model, its output has the
documented schema, and its independent re-implementation of the reference algorithm agrees with ours."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from relevance_finetune import attach_gae

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MODULES = ("step_workload", "step_reference", "step_cases", "step_measure", "step_table", "step_scaling",
           "step_fused", "step_time")
TINY = dict(model="vit_tiny_patch16_224", batch=2, img_size=32, steps=1, warmup=0,
            model_kwargs=dict(patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5))


@pytest.fixture(scope="module")
def step_time():
    """The benchmark's modules as one namespace, imported as the script imports them."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        modules = [importlib.import_module(name) for name in MODULES]
        yield SimpleNamespace(**{k: v for m in modules for k, v in vars(m).items() if not k.startswith("__")})
    finally:
        sys.path.remove(str(BENCHMARKS))
        for name in MODULES:
            sys.modules.pop(name, None)


def test_run_config_schema(step_time):
    config = step_time.Config(**TINY)
    run = step_time.run_config(config, tuple(step_time.CASES), memory_repeats=0)
    assert set(run) == {"config", "steps", "explain", "targets"}
    assert set(run["steps"]) == set(step_time.CASES) - set(step_time.EXPLAIN_CASES)
    assert set(step_time.STEP_CASES) < set(run["steps"])
    assert set(run["explain"]) == set(step_time.EXPLAIN_CASES)
    for entry in run["steps"].values():
        assert len(entry["times_s"]) == len(entry["cpu_times_s"]) == 1
        assert entry["median_s"] > 0 and entry["median_s_vs_plain"] > 0 and entry["median_cpu_s_vs_plain"] > 0
    for entry in run["explain"].values():
        assert entry["images_per_s"] > 0 and entry["median_s_speedup_vs_reference"] > 0
    time_targets = [t for t in step_time.TARGETS if t[3] == "time"]
    assert len(run["targets"]) == 2 * len(time_targets)  # wall and CPU; memory was skipped
    assert all(set(t) == {"name", "measure", "value", "bound", "limit", "met"} for t in run["targets"])
    assert "| relevance |" in step_time.markdown_run(run)
    json.dumps(run)


def test_phases_and_profile(step_time):
    work = step_time.make_workload(step_time.Config(**TINY))
    phases = step_time.phase_medians(work, ("relevance", "reference"), rounds=1)
    assert set(phases["relevance"]) == {"forward", "relevance + loss", "backward", "optimizer"}
    assert {"relevance", "second forward"} <= set(phases["reference"])
    assert "| reference | second forward |" in step_time.markdown_phases(phases)
    assert "aten::" in step_time.profile_table(work, "explain", rows=3)


def test_measure_memory_schema(step_time):
    memory = step_time.measure_memory(step_time.Config(**TINY), "relevance")
    assert set(memory) == {"delta_mib", "peak_mib", "source"}
    assert memory["peak_mib"] > 0 and memory["delta_mib"] >= 0


def test_median_memory_of_fresh_processes(step_time):
    memory = step_time.median_memory(step_time.Config(**TINY), "plain_fused", repeats=2)
    samples = memory["peak_mib_samples"]
    assert len(samples) == 2 and min(samples) <= memory["peak_mib"] <= max(samples)


def test_scaling_configs_cover_sizes_and_depths(step_time):
    configs = step_time.scaling_configs(step_time.Config())
    assert [c.img_size for c in configs[:3]] == [224, 288, 384]
    assert [c.depth for c in configs[3:]] == [4, 8]
    assert all(c.depth is None for c in configs[:3])


def test_reference_relevance_equals_ours(step_time):
    work = step_time.make_workload(step_time.Config(**TINY))
    model, images, labels = work.model, work.images, work.labels
    with step_time.ReferenceGAE(model) as ref:
        expected = ref.relevance(ref.forward(images), labels).detach()
        reference_heat = step_time.reference_explain(ref, images)
    assert model.blocks[0].attn.fused_attn  # restored on exit
    with attach_gae(model) as gae:
        relevance = gae.relevance(model(images), labels).detach()
        heat = gae.explain(images)
    torch.testing.assert_close(relevance, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(heat, reference_heat, rtol=1e-4, atol=1e-5)


def test_fused_sweep_table_targets_and_plot(step_time, tmp_path):
    configs = step_time.fused_configs(step_time.Config(model=step_time.FUSED_MODEL))
    assert [(c.batch, c.img_size) for c in configs[:4]] == [(2, 224), (2, 384), (2, 448), (2, 518)]
    assert {c.model for c in configs} == {"vit_base_patch16_224"} and len(configs) == 8
    assert [c.img_size for c in step_time.fused_configs(step_time.Config(), (224, 512), (2,))] == [224, 512]
    run = step_time.run_config(step_time.Config(**TINY), step_time.FUSED_CASES, memory_repeats=0)
    run["config"]["img_size"] = 518  # the tiny run stands in for a 518 px one: 1025 tokens
    for entry in run["steps"].values():
        entry["peak_mib"] = entry["delta_mib"] = 100.0
    run["steps"]["relevance_fused"]["peak_mib"] = 150.0
    table = step_time.fused_table([run])
    assert "| 2 | 518 | 1025 | relevance_fused |" in table and "| 2 | 518 | 1025 | relevance_fused_autograd |" in table
    targets = {t["name"]: t for t in step_time.fused_targets([run])}
    names = [t[0] for t in step_time.FUSED_TARGETS]
    assert set(targets) == set(names) - {names[3]}  # no 224 px run
    assert targets[names[1]]["met"] and not targets[names[2]]["met"]  # 1.0 and 1.5 against 1.3
    step_time.plot_fused([run], str(tmp_path / "memory.png"))
    assert (tmp_path / "memory.png").stat().st_size > 0


def test_bfloat16_mode_runs_on_cpu(step_time):
    """``--dtype bfloat16``: autocast steps, the fused kernel among them; CUDA refused without a GPU."""
    config = step_time.Config(**{**TINY, "dtype": step_time.parse_args(["--dtype", "bfloat16"]).dtype})
    assert config.dtype == "bf16"
    run = step_time.run_config(config, ("plain_fused", "relevance", "relevance_fused"), memory_repeats=0)
    assert all(entry["median_s"] > 0 for entry in run["steps"].values())
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            step_time.parse_args(["--device", "cuda", "--dtype", "bfloat16"])


def test_command_line_fused_sweep_writes_json(step_time, tmp_path, capsys):
    """The command, end to end, on a tiny model: the JSON holds the runs and the targets."""
    path = tmp_path / "fused.json"
    argv = ["--fused-scaling", "--model", "vit_tiny_patch16_224", "--sizes", "32", "--batches", "2", "--steps", "1",
            "--warmup", "0", "--no-memory", "--cases", "plain_fused", "relevance_fused", "--json", str(path)]
    step_time.main(argv)
    report = json.loads(path.read_text())
    assert [r["config"]["img_size"] for r in report["fused"]["runs"]] == [32]
    assert "| 2 | 32 | 5 | relevance_fused |" in capsys.readouterr().out
