"""Runs that survive: a checkpoint half-written when the run died is passed over for the previous
whole one; kill -9 while a checkpoint or the final model is written, Ctrl-C, SIGTERM and a full disk
lose nothing; the same command carries on and ends where an uninterrupted run does, every step
logged once; a changed setting is refused by name; what bounds a run is the setting given last."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import stopped_during_step_three
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer

from lmshrink.cli import main
from lmshrink.config import from_args
from lmshrink.heal.training import LMTrainer


def pretrain_args(model, out, *extra: str) -> list[str]:
    return ["pretrain", "--model", str(model), "--data", "python-docs/tutorial", "--block-size", "64",
            "--batch-size", "2", "--max-steps", "6", "--logging-steps", "1", "--save-steps", "2", "--lr", "1e-3",
            "--report-to", "none", "--eval-tokens", "128", "--seed", "3", "--output", str(out), *extra]


def pretrain(model, out, *extra: str) -> int:
    return main(pretrain_args(model, out, *extra))


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def logged_steps(out) -> list[int]:
    return [r["step"] for r in records(out) if "loss" in r]


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


def assert_same_run(out, whole) -> None:
    """`out` ended as the uninterrupted run `whole` did: every step logged once, the same weights."""
    assert logged_steps(out) == logged_steps(whole) == [1, 2, 3, 4, 5, 6]
    resumed, straight = weights(out), weights(whole)
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)


def stop_at_step_three(monkeypatch, model, out, signum=signal.SIGINT) -> int:
    return stopped_during_step_three(monkeypatch, lambda: pretrain(model, out), signum)


@pytest.fixture(scope="module")
def uninterrupted(tiny_gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "whole-run"
    assert pretrain(tiny_gpt2_dir, out) == 0
    return out


def test_a_half_written_checkpoint_is_passed_over(tiny_gpt2_dir, tmp_path, capsys, monkeypatch, uninterrupted):
    out = tmp_path / "run"
    assert stop_at_step_three(monkeypatch, tiny_gpt2_dir, out) == 130
    # as if the run had died while writing checkpoint-3: the Trainer writes trainer_state.json last
    (out / "checkpoints" / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3, "log_hist')
    capsys.readouterr()
    assert pretrain(tiny_gpt2_dir, out) == 0
    said = capsys.readouterr().out
    assert "checkpoint-3 is incomplete" in said and "resuming from checkpoint-2 (step 2 of 6)" in said
    assert_same_run(out, uninterrupted)  # none missing, none twice


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_keeps_a_whole_checkpoint_and_the_same_command_ends_as_an_uninterrupted_run(
        tiny_gpt2_dir, tmp_path, capsys, monkeypatch, uninterrupted, signum, code):
    out = tmp_path / "run"
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]  # SIG_IGN in a background job
    assert stop_at_step_three(monkeypatch, tiny_gpt2_dir, out, signum) == code
    err = capsys.readouterr().err
    assert f"stopped at step 3 of 6 ({signal.Signals(signum).name})" in err and "run the same command" in err
    assert "Traceback" not in err
    assert (out / "checkpoints" / "checkpoint-3" / "trainer_state.json").is_file()
    assert not (out / "model").exists()  # no final model that looks whole
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers  # given back
    assert pretrain(tiny_gpt2_dir, out) == 0
    assert "resuming from checkpoint-3 (step 3 of 6)" in capsys.readouterr().out
    assert_same_run(out, uninterrupted)
    assert sum("train_loss" in r for r in records(out)) == 1  # the stopped part's summary is not kept


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt", "scheduler.pt"])
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_whole_one_used(tiny_gpt2_dir, tmp_path, capsys,
                                                                           monkeypatch, uninterrupted, damaged):
    """Issue #43: a checkpoint the Trainer finished whose file was cut short afterwards (a full disk, a
    lost node) is named, kept under another name, and the run carries on from the one before."""
    out = tmp_path / "run"
    assert stop_at_step_three(monkeypatch, tiny_gpt2_dir, out) == 130
    path = out / "checkpoints" / "checkpoint-3" / damaged
    kept = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(kept)
    capsys.readouterr()
    assert pretrain(tiny_gpt2_dir, out) == 0
    said = capsys.readouterr().out
    assert f"checkpoint-3 is damaged ({damaged}: " in said and "set aside as damaged-checkpoint-3" in said
    assert "resuming from checkpoint-2 (step 2 of 6)" in said
    assert (out / "checkpoints" / "damaged-checkpoint-3" / damaged).read_bytes() == kept  # nothing of it lost
    assert_same_run(out, uninterrupted)


def test_a_resumed_tied_model_keeps_its_head_its_clock_and_its_first_evaluation(gpt2_tokenizer, tmp_path, capsys,
                                                                               monkeypatch):
    """SmolLM2 and GPT-2 save a tied output layer once, as the embeddings: a resume says nothing of a
    missing `lm_head.weight` and the head stays the embeddings; the wall clock and the held-out
    perplexity before training carry over from the interrupted part."""
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, vocab_size=len(gpt2_tokenizer), tie_word_embeddings=True)
    model = tmp_path / "tied-llama"
    LlamaForCausalLM(config).save_pretrained(model)
    gpt2_tokenizer.save_pretrained(model)
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert pretrain(model, whole) == 0
    assert stop_at_step_three(monkeypatch, model, out) == 130
    clock_at_stop = max(r["elapsed_s"] for r in records(out) if "elapsed_s" in r)
    warned = []
    monkeypatch.setattr(transformers.trainer.logger, "warning", lambda message, *a, **k: warned.append(message))
    assert pretrain(model, out) == 0
    assert not [w for w in warned if "missing keys" in w]
    assert_same_run(out, whole)
    healed = AutoModelForCausalLM.from_pretrained(out / "model")
    assert healed.lm_head.weight.data_ptr() == healed.model.embed_tokens.weight.data_ptr()
    resumed, straight = (json.loads((o / "lmshrink.json").read_text())["metrics"] for o in (out, whole))
    assert resumed["heldout_ppl_before"] == pytest.approx(straight["heldout_ppl_before"])
    clock = [r["elapsed_s"] for r in records(out) if "elapsed_s" in r]
    assert clock == sorted(clock) and clock[-1] > clock_at_stop  # carried on, not restarted
    assert resumed["train_seconds"] > clock_at_stop


def test_the_same_command_carries_on_and_another_one_is_refused_by_name(tiny_gpt2_dir, tmp_path, capsys,
                                                                        monkeypatch, uninterrupted):
    out = tmp_path / "run"
    assert stop_at_step_three(monkeypatch, tiny_gpt2_dir, out) == 130
    capsys.readouterr()
    assert pretrain(tiny_gpt2_dir, out, "--lr", "2e-3", "--block-size", "32") == 2
    err = capsys.readouterr().err
    assert "holds an unfinished run (checkpoint-3) made with other settings" in err
    assert "train.lr 0.001 -> 0.002" in err and "corpus.block_size 64 -> 32" in err and "--overwrite" in err
    assert pretrain(tiny_gpt2_dir, out, "--no-resume") == 2
    assert "leave out --no-resume" in capsys.readouterr().err
    assert pretrain(tiny_gpt2_dir, out, "--logging-steps", "2") == 0  # how to run, not what: carries on
    assert "resuming from checkpoint-3" in capsys.readouterr().out
    assert pretrain(tiny_gpt2_dir, out) == 0  # finished: nothing to do, nothing touched
    assert "nothing to do" in capsys.readouterr().out
    assert pretrain(tiny_gpt2_dir, out, "--lr", "2e-3") == 2
    assert "holds a finished pretrain run made with other settings (train.lr 0.001 -> 0.002)" in capsys.readouterr().err
    assert pretrain(tiny_gpt2_dir, out, "--overwrite") == 0  # starts over: a fresh run, a fresh metrics file
    assert_same_run(out, uninterrupted)


KILL_AT = {  # where the run is killed: (the owner of the function, its name, when)
    "step": ("from lmshrink.heal.training import LMTrainer as owner", "training_step", "args[0].state.global_step == 4"),
    "checkpoint": ("from transformers import Trainer as owner", "_save_optimizer_and_scheduler",
                   "args[1].endswith('checkpoint-4')"),
    "final save": ("import lmshrink.heal.training as owner", "save_model_record", "True"),
}


@pytest.mark.parametrize("moment", KILL_AT)
def test_kill_9_while_writing_loses_nothing(tiny_gpt2_dir, tmp_path, capsys, uninterrupted, moment):
    """SIGKILL in a real process during step 5, while a checkpoint's optimizer state is being
    written (its weights are already on disk), or while the final model is being written: the same
    command carries on."""
    owner, name, when = KILL_AT[moment]
    out = tmp_path / "run"
    script = (f"import os, signal, sys\nfrom lmshrink.cli import main\n{owner}\nreal = owner.{name}\n"
              f"def die(*args, **kwargs):\n    if {when}:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
              f"    return real(*args, **kwargs)\n"
              f"owner.{name} = die\nsys.exit(main({pretrain_args(tiny_gpt2_dir, out)!r}))\n")
    died = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert not (out / "model").exists()
    assert pretrain(tiny_gpt2_dir, out) == 0
    said = capsys.readouterr().out
    assert ("checkpoint-4 is incomplete" in said) == (moment == "checkpoint")
    assert_same_run(out, uninterrupted)


def test_a_full_disk_says_so_and_keeps_every_whole_checkpoint(tiny_gpt2_dir, tmp_path, capsys, monkeypatch,
                                                              uninterrupted):
    def full_disk(self, output_dir):
        if output_dir.endswith("checkpoint-4"):
            raise OSError(errno.ENOSPC, "No space left on device", output_dir)
        return real(self, output_dir)

    real = Trainer._save_optimizer_and_scheduler
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_optimizer_and_scheduler", full_disk)
        assert pretrain(tiny_gpt2_dir, out) == 1
    err = capsys.readouterr().err
    assert "no space left on device" in err and "checkpoint-4" in err and "Traceback" not in err
    assert (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()

    def full_disk_at_the_end(self, output_dir=None, *args, **kwargs):
        if str(output_dir).endswith(".partial"):  # the final model, not a checkpoint's
            raise OSError(errno.ENOSPC, "No space left on device", output_dir)
        return save_model(self, output_dir, *args, **kwargs)

    save_model = LMTrainer.save_model
    with monkeypatch.context() as patch:  # then again while the final model is written
        patch.setattr(LMTrainer, "save_model", full_disk_at_the_end)
        assert pretrain(tiny_gpt2_dir, out) == 1
    assert "no space left on device" in capsys.readouterr().err and not (out / "model").exists()
    assert (out / "checkpoints" / "checkpoint-6" / "trainer_state.json").is_file()
    assert pretrain(tiny_gpt2_dir, out) == 0
    assert_same_run(out, uninterrupted)


def test_the_bound_given_last_wins(tmp_path, capsys):
    from lmshrink.recipes.pretrain import PretrainSettings
    from lmshrink.recipes.search import SearchSettings

    config = tmp_path / "heal.yaml"
    config.write_text("max_tokens: 40960\nlr: 1e-4\n")
    base = ["--model", "m", "--data", "d", "--output", "o", "--config", str(config)]
    flag = from_args(PretrainSettings, [*base, "--max-steps", "2"], "p", "")
    assert (flag.train.max_steps, flag.train.max_tokens, flag.train.lr) == (2, None, 1e-4)  # the flag wins
    filed = from_args(PretrainSettings, base, "p", "")
    assert (filed.train.max_steps, filed.train.max_tokens) == (-1, 40960)
    search = from_args(SearchSettings, ["--output", "o", "--ratio", "0.5", "--max-steps", "3"], "s", "")
    assert (search.train.max_steps, search.train.max_tokens) == (3, None)  # over the command's own default
    assert main(["pretrain", *base, "--max-steps", "2", "--max-tokens", "100"]) == 2
    assert "max_steps, max_tokens: both bound the run's length (2 steps, 100 tokens); give one" in capsys.readouterr().err


def test_a_one_step_run_learns_and_records_its_speed(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(tiny_gpt2_dir, out, "--max-steps", "1", "--warmup", "0.5", "--logging-steps", "10") == 0
    assert "runs to 1 step (max_steps)" in capsys.readouterr().out
    record = json.loads((out / "lmshrink.json").read_text())["metrics"]
    assert record["heldout_ppl_after"] < record["heldout_ppl_before"]  # not warm-up at learning rate 0
    assert record["speed"]["tokens_per_s"] > 0 and record["speed"]["tokens_per_s_over"].startswith("the whole run")


def test_bad_training_numbers_are_refused_before_any_work(tiny_gpt2_dir, tmp_path, capsys):
    assert pretrain(tiny_gpt2_dir, tmp_path / "run", "--lr", "-1", "--warmup", "1.5", "--max-grad-norm", "-2") == 2
    err = capsys.readouterr().err
    assert "lr: the learning rate must be positive" in err and "warmup" in err and "max_grad_norm" in err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def student_and_cache(tiny_gpt2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-faults")
    assert main(["truncate", "--teacher", str(tiny_gpt2_dir), "--output", str(root / "student"), "--keep", "0,2",
                 "--repair", "none"]) == 0
    assert main(["cache-teacher", "--teacher", str(tiny_gpt2_dir), "--output", str(root / "cache"), "--data",
                 "python-docs/tutorial", "--heldout", "0.2", "--block-size", "64", "--max-tokens", "1024",
                 "--top-k", "8"]) == 0
    return root / "student", root / "cache"


@pytest.mark.parametrize("teacher", ["online", "cached"])
def test_distill_carried_on_ends_as_an_uninterrupted_run(tiny_gpt2_dir, student_and_cache, tmp_path, monkeypatch,
                                                         teacher):
    student, cache = student_and_cache
    source = ["--teacher", str(tiny_gpt2_dir)] if teacher == "online" else ["--teacher-cache", str(cache)]

    def distill(out) -> int:
        return main(["distill", "--model", str(student), *source, "--data", "python-docs/tutorial", "--heldout", "0.2",
                     "--block-size", "64", "--batch-size", "2", "--max-steps", "6", "--logging-steps", "1",
                     "--save-steps", "2", "--lr", "1e-3", "--alpha-cos", "0", "--report-to", "none",
                     "--eval-tokens", "128", "--seed", "3", "--output", str(out)])

    assert distill(tmp_path / "whole") == 0
    assert stopped_during_step_three(monkeypatch, lambda: distill(tmp_path / "run"), signal.SIGTERM) == 143
    assert distill(tmp_path / "run") == 0
    assert_same_run(tmp_path / "run", tmp_path / "whole")
    # the held-out cap holds for the cache's held-out blocks too (2 blocks of 64 tokens)
    assert json.loads((tmp_path / "run" / "lmshrink.json").read_text())["metrics"]["heldout_tokens"] == 128


def test_a_capped_cache_holds_out_its_share_of_what_it_caches(student_and_cache):
    from lmshrink.heal.teacher_cache import open_cache

    cache = open_cache(str(student_and_cache[1]), 2.0)
    assert len(cache.dataset) == 16 and cache.heldout.num_rows == 4  # 20% held out of 16 + 4 blocks, not of the corpus


def test_cache_teacher_stopped_keeps_its_whole_shards_and_finishes(tiny_gpt2_dir, student_and_cache, tmp_path,
                                                                  capsys, monkeypatch):
    import lmshrink.recipes.cache_teacher as cache_teacher

    out = tmp_path / "cache"
    command = ["cache-teacher", "--teacher", str(tiny_gpt2_dir), "--output", str(out), "--data", "python-docs/tutorial",
               "--heldout", "0.2", "--block-size", "64", "--max-tokens", "1024", "--top-k", "8", "--shard-blocks", "4"]
    calls, real = [], cache_teacher.teacher_top_k

    def terminated_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(cache_teacher, "teacher_top_k", terminated_at_the_third)
        assert main(command) == 143
    assert "stopped (SIGTERM)" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert main(command) == 0
    assert json.loads((out / "lmshrink.json").read_text())["complete"]
    whole = load_file(student_and_cache[1] / "shard-00000.safetensors")  # the same blocks cached in one go
    pieces = [load_file(out / f"shard-{i:05d}.safetensors") for i in range(4)]
    for name in ("input_ids", "top_idx", "top_logp"):
        torch.testing.assert_close(torch.cat([p[name] for p in pieces]), whole[name])
