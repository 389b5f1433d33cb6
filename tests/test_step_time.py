"""benchmarks/step_time.py: the script runs on a tiny model, its output has the documented
schema, and its independent re-implementation of the reference algorithm agrees with ours."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from relevance_finetune import attach_gae

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"
TINY = dict(model="vit_tiny_patch16_224", batch=2, img_size=32, steps=1, warmup=0,
            model_kwargs=dict(patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5))


@pytest.fixture(scope="module")
def step_time():
    spec = importlib.util.spec_from_file_location("step_time", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_run_config_schema(step_time):
    config = step_time.Config(**TINY)
    run = step_time.run_config(config, tuple(step_time.CASES), memory_repeats=0)
    assert set(run) == {"config", "steps", "explain", "targets"}
    assert set(run["steps"]) == set(step_time.STEP_CASES)
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
    configs = step_time.fused_configs(step_time.Config())
    assert [(c.batch, c.img_size) for c in configs[:4]] == [(2, 224), (2, 384), (2, 448), (2, 518)]
    assert {c.model for c in configs} == {"vit_base_patch16_224"} and len(configs) == 8
    run = step_time.run_config(step_time.Config(**TINY), step_time.FUSED_CASES, memory_repeats=0)
    run["config"]["img_size"] = 518  # the tiny run stands in for a 518 px one: 1025 tokens
    for entry in run["steps"].values():
        entry["peak_mib"] = 100.0
    run["steps"]["relevance_fused"]["peak_mib_vs_plain"] = 1.0
    assert "| 2 | 518 | 1025 |" in step_time.fused_table([run])
    targets = step_time.fused_targets([run])
    assert [t["name"] for t in targets] == [step_time.FUSED_TARGETS[0][0], step_time.FUSED_TARGETS[2][0]]
    assert targets[0]["met"]
    step_time.plot_fused([run], str(tmp_path / "memory.png"))
    assert (tmp_path / "memory.png").stat().st_size > 0
