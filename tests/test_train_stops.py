"""Runs that stop early: SIGINT/SIGTERM (a resumable checkpoint mid-epoch) and non-finite losses."""
from __future__ import annotations

import functools
import itertools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from conftest import cli_error, tiny_model
from relevance_finetune import cli
from relevance_finetune.checkpoint import load_checkpoint
from relevance_finetune.losses import RegularizerOutput
from relevance_finetune.train import finetune, loop
from relevance_finetune.train.stopping import NonFiniteLossError, TrainingInterrupted
from test_train import (SyntheticMasked, assert_states_close, config, free_port, state_of, tiny_hub, without_time,
                        write_masked_folder)

ROOT = Path(__file__).resolve().parents[1]
FORWARD = loop._forward  # the loop's own forward, which signal_at wraps


pytestmark = pytest.mark.usefixtures("one_thread")


def signal_at(forward_call: int, signum: int) -> None:
    """Make ``loop._forward`` send ``signum`` to this process after its ``forward_call``-th call."""
    calls = itertools.count(1)
    forward = loop._forward

    def forward_then_signal(*args, **kwargs):
        result = forward(*args, **kwargs)
        if next(calls) == forward_call:
            os.kill(os.getpid(), signum)
        return result

    loop._forward = forward_then_signal


@pytest.fixture
def restore_forward():
    yield
    loop._forward = FORWARD


# -- stop signals: one process ----------------------------------------------------------------------
# 10 images, global batch 4 in micro-batches of 2: 5 forwards and 3 steps an epoch; validation: 2 forwards
@pytest.mark.parametrize("forward_call, signum, where, workers", [
    (3, signal.SIGTERM, "at epoch 1, step 2 of 3", 0),      # inside an accumulated step: it ends first
    (9, signal.SIGINT, "at epoch 2, step 1 of 3", 0),
    (6, signal.SIGTERM, "after epoch 1", 0),                # during validation: the epoch's checkpoint
    (4, signal.SIGTERM, "at epoch 1, step 2 of 3", 1),      # a worker process draws the augmentation
])
def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, restore_forward, forward_call,
                                                                      signum, where, workers):
    train_set, val_set = SyntheticMasked(10, flip=True), SyntheticMasked(4, seed=1)
    settings = dict(epochs=2, grad_accum=2, background_swap=0.5, workers=workers)
    straight = tiny_model(num_classes=4)
    straight_history = finetune(straight, train_set, val_set, config(out=str(tmp_path / "a"), **settings))

    signal_at(forward_call, signum)
    with pytest.raises(TrainingInterrupted, match=f"stopped by {signal.Signals(signum).name} {where}; ") as stopped:
        finetune(tiny_model(num_classes=4), train_set, val_set, config(out=str(tmp_path / "b"), **settings))
    assert stopped.value.exit_code == 128 + signum
    assert f"relevance-finetune train --config {tmp_path / 'b' / 'config.yaml'} --resume" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are restored

    loop._forward = FORWARD
    resumed = tiny_model(num_classes=4, seed=7)  # a new process: other weights, RNG elsewhere
    torch.manual_seed(1234)
    history = finetune(resumed, train_set, val_set, config(out=str(tmp_path / "b"), resume=True, **settings))
    assert_states_close(state_of(resumed), state_of(straight))
    assert without_time(history) == without_time(straight_history)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_the_command_stops_on_sigint_with_one_line_and_resumes(tmp_path, capsys, restore_forward):
    write_masked_folder(tmp_path / "data", per_class=4)
    args = ["train", "--model", tiny_hub(tmp_path / "hub", num_classes=2), "--data", str(tmp_path / "data"),
            "--epochs", "2", "--batch-size", "2", "--workers", "0", "--no-progress", "--lr", "1e-3"]
    assert cli.main([*args, "--out", str(tmp_path / "a")]) == 0

    signal_at(3, signal.SIGINT)
    capsys.readouterr()
    assert cli.main([*args, "--out", str(tmp_path / "b")]) == 130
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error
    assert error.startswith("relevance-finetune train: stopped by SIGINT at epoch 1, step 3 of 4;")
    assert f"--config {tmp_path / 'b' / 'config.yaml'} --resume" in error
    loop._forward = FORWARD
    assert cli.main(["train", "--config", str(tmp_path / "b" / "config.yaml"), "--resume"]) == 0
    assert_states_close(load_file(tmp_path / "b" / "last.safetensors"), load_file(tmp_path / "a" / "last.safetensors"))


def test_a_checkpoint_inside_an_epoch_resumes_only_with_as_many_processes(tmp_path, restore_forward):
    signal_at(1, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        finetune(tiny_model(num_classes=4), SyntheticMasked(8), None, config(out=str(tmp_path)))
    _, info, state = load_checkpoint(tmp_path / "last.safetensors")
    assert info["epoch"] == 0 and state["progress"]["step"] == 1
    state["progress"]["processes"] *= 2
    run = loop.RunState(torch.optim.SGD([torch.zeros(1)], lr=1), None, None, torch.Generator(), [])
    with pytest.raises(ValueError, match="inside an epoch with 2 process.*this run has 1"):
        run.restore(state, [], loop.Processes.current("cpu"))


# -- stop signals: several processes ----------------------------------------------------------------------
def _cli_process(rank: int, world_size: int, port: int, argv: list[str], forward_call: int | None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if forward_call is not None:
        signal_at(forward_call, signal.SIGTERM)
    sys.exit(cli.main(argv))


def cli_in_processes(argv: list[str], world_size: int = 2, signal_rank0_at: int | None = None) -> list[int]:
    """Exit codes of ``cli.main(argv)`` in ``world_size`` forked processes of one gloo group."""
    context = multiprocessing.get_context("fork")  # the children skip re-importing torch and timm
    port = free_port()
    processes = [context.Process(target=_cli_process, args=(rank, world_size, port, argv,
                                                            signal_rank0_at if rank == 0 else None))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    return [process.exitcode for process in processes]


def ddp_args(tmp_path: Path) -> list[str]:
    if not (tmp_path / "data").exists():
        write_masked_folder(tmp_path / "data", per_class=5)
    return ["train", "--model", tiny_hub(tmp_path / "hub", num_classes=2), "--data", str(tmp_path / "data"),
            "--epochs", "2", "--batch-size", "4", "--workers", "0", "--no-progress", "--lr", "1e-3",
            "--val-fraction", "0.2"]


@pytest.mark.skipif(not dist.is_available() or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs torch.distributed and fork")
def test_processes_agree_to_stop_when_one_gets_the_signal(tmp_path):
    """Only rank 0 receives SIGTERM; both stop at the same step and resume to the uninterrupted weights."""
    args = ddp_args(tmp_path)
    assert cli_in_processes([*args, "--out", str(tmp_path / "a")]) == [0, 0]
    assert cli_in_processes([*args, "--out", str(tmp_path / "b")], signal_rank0_at=2) == [143, 143]
    _, info, state = load_checkpoint(tmp_path / "b" / "last.safetensors")
    assert info["epoch"] == 0 and state["progress"]["step"] == 2 and len(state["progress"]["processes"]) == 2
    assert cli_in_processes([*args, "--out", str(tmp_path / "b"), "--resume"]) == [0, 0]
    assert_states_close(load_file(tmp_path / "b" / "last.safetensors"), load_file(tmp_path / "a" / "last.safetensors"))


@pytest.mark.skipif(not dist.is_available() or "fork" not in multiprocessing.get_all_start_methods(),
                    reason="needs torch.distributed and fork")
def test_torchrun_stopped_by_sigterm_resumes_to_the_uninterrupted_weights(tmp_path):
    """A load test: SIGTERM to torchrun, which forwards it to both processes, mid-epoch."""
    args = ddp_args(tmp_path)
    assert cli_in_processes([*args, "--out", str(tmp_path / "a")]) == [0, 0]
    count = tmp_path / "forwards"
    env = {**os.environ, "TRAIN_COUNT_FILE": str(count), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "_torchrun_train.py"), *args, "--out", str(tmp_path / "b")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (count.is_file() and count.read_text().strip() not in ("", "0", "1")):
        assert torchrun.poll() is None and time.monotonic() < deadline, torchrun.communicate()
        time.sleep(0.05)
    torchrun.send_signal(signal.SIGTERM)
    _, stderr = torchrun.communicate(timeout=120)
    assert "relevance-finetune train: stopped by SIGTERM" in stderr, stderr
    _, info, state = load_checkpoint(tmp_path / "b" / "last.safetensors")
    assert info["epoch"] == 0 and "progress" in state  # mid-epoch: 4 forwards of 0.3 s an epoch
    assert cli_in_processes([*args, "--out", str(tmp_path / "b"), "--resume"]) == [0, 0]
    assert_states_close(load_file(tmp_path / "b" / "last.safetensors"), load_file(tmp_path / "a" / "last.safetensors"))


# -- non-finite losses ------------------------------------------------------------------------------------
def test_a_non_finite_loss_stops_before_its_step_and_keeps_the_last_checkpoint(tmp_path):
    model = tiny_model(num_classes=4)
    finetune(model, SyntheticMasked(8), None, config(out=str(tmp_path)))
    kept = load_file(tmp_path / "last.safetensors")
    bad = SyntheticMasked(8)
    bad.images[3] = float("nan")
    expected = r"the logits are NaN or infinite at epoch 2, step [12]: training stopped before that step \(.* still " \
               r"holds epoch 1\)\. Lower --lr .* --checkpoint"
    with pytest.raises(NonFiniteLossError, match=expected):
        finetune(model, bad, None, config(out=str(tmp_path), resume=True, epochs=2))
    assert_states_close(load_file(tmp_path / "last.safetensors"), kept)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_the_message_names_the_non_finite_parts():
    out = RegularizerOutput(loss=torch.tensor(float("inf")), background=torch.tensor(0.5),
                            foreground=torch.tensor(0.1), classification=torch.tensor(float("nan")))
    message = loop._non_finite_message(loop._non_finite_flags(out), config(grad_accum=2), 2, 7, [])
    assert message.startswith("the loss (loss, classification) is NaN or infinite at epoch 3, step 4: ")
    assert loop._non_finite_message(None, config(), 0, 0, []).startswith("the gradients are NaN")
    assert not loop._non_finite_flags(RegularizerOutput(loss=torch.tensor(1.0))).any()


def test_the_command_refuses_a_learning_rate_that_diverges(tmp_path, capsys):
    write_masked_folder(tmp_path / "data")
    out = tmp_path / "run"
    error = cli_error(capsys, ["train", "--model", tiny_hub(tmp_path / "hub", num_classes=2), "--data",
                               str(tmp_path / "data"), "--out", str(out), "--epochs", "3", "--batch-size", "2",
                               "--workers", "0", "--no-progress", "--lr", "1e6", "--val-fraction", "0.34"])
    assert "the logits are NaN or infinite at epoch 1, step 2: training stopped before that step. " in error
    assert "Lower --lr (now 1e+06) and run again (--overwrite)" in error
    assert not (out / "last.safetensors").exists() and not (out / "best.safetensors").exists()


def test_gradients_count_as_non_finite_unless_the_fp16_scaler_skips_them():
    model = torch.nn.Linear(2, 1)
    model.weight.grad = torch.tensor([[1.0, float("inf")]])
    assert loop._non_finite_gradients(model, torch.amp.GradScaler("cpu", enabled=False))
    assert not loop._non_finite_gradients(model, torch.amp.GradScaler("cpu", init_scale=2.0 ** 16))
    assert loop._non_finite_gradients(model, torch.amp.GradScaler("cpu", init_scale=1.0))
    model.weight.grad = torch.ones(1, 2)
    assert not loop._non_finite_gradients(model, torch.amp.GradScaler("cpu", enabled=False))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_fp16_steps_that_the_scaler_skips_do_not_stop_the_run(monkeypatch):
    """A huge initial scale overflows every gradient: the scaler skips the steps and the run goes on."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 100))
    model = tiny_model(num_classes=4)
    before = state_of(model)
    history = finetune(model, SyntheticMasked(8), None, config(amp="fp16", epochs=2))
    assert len(history) == 2
    assert_states_close(state_of(model), before)  # every step was skipped
