"""Runs that survive: a checkpoint half-written when the run died is passed over for the previous
whole one; Ctrl-C and SIGTERM finish the step, write a whole checkpoint and exit 130 / 143 with one
line; the run carried on with --resume ends where an uninterrupted one does, every step logged once."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from lmshrink.cli import main
from lmshrink.training import StopOnSignal


def pretrain(model, out, *extra: str) -> int:
    return main(["pretrain", "--model", str(model), "--data", "python-docs/tutorial", "--block-size", "64",
                 "--batch-size", "2", "--max-steps", "6", "--logging-steps", "1", "--save-steps", "2", "--lr", "1e-3",
                 "--report-to", "none", "--eval-tokens", "128", "--seed", "3", "--output", str(out), *extra])


def logged_steps(out) -> list[int]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tiny_gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "whole-run"
    assert pretrain(tiny_gpt2_dir, out) == 0
    return out


def test_a_half_written_checkpoint_is_passed_over(tiny_gpt2_dir, tmp_path, capsys, uninterrupted):
    out = tmp_path / "run"
    assert pretrain(tiny_gpt2_dir, out, "--max-steps", "4", "--keep-checkpoints") == 0
    # the run died while writing checkpoint-4: the Trainer writes trainer_state.json last
    (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hist')
    capsys.readouterr()
    assert pretrain(tiny_gpt2_dir, out, "--resume") == 0
    said = capsys.readouterr().out
    assert "checkpoint-4 is incomplete" in said and "resuming from checkpoint-2 (step 2 of 6)" in said
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]  # none missing, none twice


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_keeps_a_whole_checkpoint_and_the_resumed_run_ends_as_an_uninterrupted_one(
        tiny_gpt2_dir, tmp_path, capsys, monkeypatch, uninterrupted, signum, code):
    def send_at_step_three(self, args, state, control, **kwargs):
        if state.global_step == 2:  # during step 3
            os.kill(os.getpid(), signum)

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(StopOnSignal, "on_step_begin", send_at_step_three, raising=False)
        assert pretrain(tiny_gpt2_dir, out) == code
    err = capsys.readouterr().err
    assert f"stopped at step 3 of 6 ({signal.Signals(signum).name})" in err and "--resume" in err
    assert "Traceback" not in err
    assert (out / "checkpoints" / "checkpoint-3" / "trainer_state.json").is_file()
    assert not (out / "model").exists()  # no final model that looks whole
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    assert pretrain(tiny_gpt2_dir, out, "--resume") == 0
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]
    assert logged_steps(out) == logged_steps(uninterrupted)
    resumed, whole = weights(out), weights(uninterrupted)
    for name, tensor in whole.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)


def test_bad_training_numbers_are_refused_before_any_work(tiny_gpt2_dir, tmp_path, capsys):
    assert pretrain(tiny_gpt2_dir, tmp_path / "run", "--lr", "-1", "--warmup", "1.5", "--max-grad-norm", "-2") == 2
    err = capsys.readouterr().err
    assert "lr: the learning rate must be positive" in err and "warmup" in err and "max_grad_norm" in err
    assert not (tmp_path / "run").exists()
