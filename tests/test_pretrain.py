from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmshrink.cli import main
from lmshrink.config import SettingsError, build
from lmshrink.heal.training import MAX_CHUNK_ROWS, loss_chunk_rows
from lmshrink.recipes.pretrain import PretrainSettings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# held-out text capped at 1,024 tokens: evaluating the whole 20% (~270 batches, twice a run) was most of a run's time
TINY_RUN = ["--data", "python-docs/tutorial", "--heldout", "0.2", "--eval-tokens", "1024", "--block-size", "64",
            "--batch-size", "2", "--logging-steps", "2", "--lr", "1e-3"]


def run_args(model, out, *extra):
    return ["pretrain", "--model", str(model), "--output", str(out), *TINY_RUN, *extra]


def test_pretrain_end_to_end(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "run"
    assert main(run_args(tiny_gpt2_dir, out, "--max-steps", "6", "--save-steps", "3", "--keep-checkpoints",
                         "--profile-steps", "2")) == 0
    record = json.loads((out / "model" / "lmshrink.json").read_text())
    metrics = record["metrics"]
    assert metrics["steps"] == 6 and metrics["tokens_seen"] == 6 * 2 * 64
    assert metrics["heldout_ppl_after"] < metrics["heldout_ppl_before"]  # lr 1e-3 on a random model: it learns
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if "loss" in line]
    assert [line["step"] for line in train_lines] == [2, 4, 6] and "tokens_per_s" in train_lines[-1]
    assert any(f.name.startswith("events.out.tfevents") for f in (out / "tensorboard").rglob("*"))
    checkpoint = json.loads((out / "checkpoints" / "checkpoint-6" / "lmshrink.json").read_text())
    assert checkpoint["step"] == 6 and checkpoint["settings"]["train"]["max_steps"] == 6  # each checkpoint describes itself
    assert not (out / "model" / "training_args.bin").exists()  # no pickles in the model folder
    saved, start = (json.loads((f / "config.json").read_text()) for f in (out / "model", tiny_gpt2_dir))
    assert saved["use_cache"] == start["use_cache"] is True  # training turns it off; the shipped model generates with it
    assert (out / "checkpoints" / "checkpoint-3").is_dir()  # --keep-checkpoints: both kept (save_total_limit 2)
    # --profile-steps 2: steps 4 and 5 traced (after 3 to warm up): the trace, and the costliest ops
    trace = json.loads((out / "profile" / "trace.json").read_text())
    assert any(e.get("name") == "aten::addmm" for e in trace["traceEvents"])
    assert "Self CPU" in (out / "profile" / "ops.txt").read_text()
    card = ModelCard.load(out / "model" / "README.md")  # a Hub model card made from the record
    assert "continued-pretraining" in card.data.tags and card.data.pipeline_tag == "text-generation"
    assert "# run" in card.text and "Held-out perplexity" in card.text
    # the trained weights differ from the start and reload
    start = load_file(tiny_gpt2_dir / "model.safetensors")
    end = load_file(out / "model" / "model.safetensors")
    assert not torch.equal(start["transformer.h.0.attn.c_attn.weight"], end["transformer.h.0.attn.c_attn.weight"])


def test_a_finished_run_drops_its_checkpoints(tiny_gpt2_dir, tmp_path):
    """By default the saved model replaces the Trainer's checkpoints (GBs of optimizer state)."""
    out = tmp_path / "run"
    assert main(run_args(tiny_gpt2_dir, out, "--max-steps", "4", "--save-steps", "2", "--report-to", "none")) == 0
    assert (out / "model" / "model.safetensors").is_file() and not (out / "checkpoints").exists()


def test_a_heldout_set_smaller_than_one_batch_is_evaluated(tiny_gpt2_dir, real_text, tmp_path):
    """3 held-out blocks with batch 8: every block is scored (no KeyError: 'eval_loss')."""
    out = tmp_path / "run"
    assert main(["pretrain", "--model", str(tiny_gpt2_dir), "--output", str(out), "--data", "python-docs/tutorial",
                 "--eval-data", str(real_text), "--eval-tokens", "192", "--block-size", "64", "--batch-size", "8",
                 "--max-steps", "1", "--report-to", "none"]) == 0
    metrics = json.loads((out / "lmshrink.json").read_text())["metrics"]
    assert metrics["heldout_tokens"] == 192 and metrics["heldout_ppl_before"] > 1 and metrics["heldout_ppl_after"] > 1


def test_token_budget_sets_the_steps(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "run"
    assert main(run_args(tiny_gpt2_dir, out, "--max-tokens", "600", "--report-to", "none")) == 0
    assert json.loads((out / "lmshrink.json").read_text())["metrics"]["steps"] == 5  # ceil(600 / 128)


def test_two_process_cpu_run(tiny_gpt2_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo DDP) completes and writes one model; with the fused head
    the head's gradient is all-reduced like every other (the same losses, step for step)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    for fused in ("off", "on"):
        out = tmp_path / f"ddp-{fused}"
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
             "-m", "lmshrink", *run_args(tiny_gpt2_dir, out, "--max-steps", "3", "--logging-steps", "1",
                                         "--report-to", "none", "--fused-head", fused)],
            capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = json.loads((out / "lmshrink.json").read_text())["metrics"]
        assert metrics["tokens_seen"] == 2 * 3 * 2 * 64  # both processes' batches counted
        assert (out / "model" / "model.safetensors").is_file()
    losses = {fused: [x["loss"] for x in _train_lines(tmp_path / f"ddp-{fused}")] for fused in ("off", "on")}
    assert len(losses["on"]) == 3 and losses["on"] == pytest.approx(losses["off"], rel=1e-4)


def test_bad_training_settings(tmp_path):
    with pytest.raises(SettingsError) as err:
        build(PretrainSettings, {"model": "m", "output": "o", "precision": "fp8", "warmup": 2, "batch_size": 0})
    assert "precision" in str(err.value) and "warmup" in str(err.value) and "batch_size" in str(err.value)
    with pytest.raises(SettingsError, match="neither 'on' nor a JSON file"):  # the old string form
        build(PretrainSettings, {"model": "m", "output": "o", "data": ["d"], "fsdp": "full_shard auto_wrap"})
    with pytest.raises(SettingsError, match="data: give at least one"):
        build(PretrainSettings, {"model": "m", "output": "o"})


def test_fsdp_without_a_gpu_is_refused_not_run_as_ddp(tiny_gpt2_dir, tmp_path, capsys):
    assert main(run_args(tiny_gpt2_dir, tmp_path / "r", "--max-steps", "1", "--fsdp", str(CONFIGS / "fsdp.json"))) == 2
    assert "fsdp: FSDP shards a model over GPUs" in capsys.readouterr().err


def test_deepspeed_missing_or_misnamed_is_one_line(tiny_gpt2_dir, tmp_path, capsys, monkeypatch):
    assert main(run_args(tiny_gpt2_dir, tmp_path / "r", "--deepspeed", "nowhere/ds.json")) == 2
    assert "deepspeed: no such config file 'nowhere/ds.json'" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    assert main(run_args(tiny_gpt2_dir, tmp_path / "r", "--deepspeed", str(CONFIGS / "deepspeed-zero2.json"))) == 2
    assert "deepspeed: DeepSpeed is not installed; pip install deepspeed" in capsys.readouterr().err
    assert not {p.name for p in (tmp_path / "r").iterdir()} - {".lmshrink.lock"}  # refused before any work


def test_block_longer_than_the_context_is_refused(tiny_gpt2_dir, tmp_path, capsys):
    assert main(["pretrain", "--model", str(tiny_gpt2_dir), "--output", str(tmp_path / "r"), "--data",
                 "python-docs/tutorial", "--block-size", "512", "--max-steps", "1"]) == 2
    assert "context of 256" in capsys.readouterr().err


def test_parquet_and_streamed_sources(tiny_gpt2_dir, tmp_path):
    """Parquet files train like text; a streamed dataset (hf: code path, local folder) needs a step budget."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmshrink.data.assets import corpus_path

    texts = [p.read_text() for p in sorted(corpus_path("python-docs/tutorial").glob("*.txt"))]
    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet")
    out = tmp_path / "parquet"
    assert main(["pretrain", "--model", str(tiny_gpt2_dir), "--output", str(out), "--data",
                 str(tmp_path / "docs.parquet"), "--heldout", "0.2", "--block-size", "64", "--batch-size", "2",
                 "--max-steps", "2", "--report-to", "none"]) == 0
    assert json.loads((out / "lmshrink.json").read_text())["metrics"]["steps"] == 2

    hub_like = tmp_path / "hub_like"
    hub_like.mkdir()
    pq.write_table(pa.table({"text": texts}), hub_like / "train.parquet")
    with pytest.raises(SettingsError, match="max-steps or --max-tokens"):
        build(PretrainSettings, {"model": "m", "output": "o", "data": [f"hf:{hub_like}"], "streaming": True,
                                 "eval_data": ["x"]})
    out = tmp_path / "streamed"
    assert main(["pretrain", "--model", str(tiny_gpt2_dir), "--output", str(out), "--data", f"hf:{hub_like}",
                 "--streaming", "--eval-data", "kernel-docs/process/howto.rst.txt", "--block-size", "64",
                 "--batch-size", "2", "--max-steps", "3", "--report-to", "none"]) == 0
    assert json.loads((out / "lmshrink.json").read_text())["metrics"]["tokens_seen"] == 3 * 2 * 64


def test_a_single_document_cannot_be_split(tiny_gpt2_dir, real_text, tmp_path, capsys):
    assert main(["pretrain", "--model", str(tiny_gpt2_dir), "--output", str(tmp_path / "r"), "--data",
                 str(real_text), "--block-size", "64", "--max-steps", "1"]) == 2
    assert "--eval-data" in capsys.readouterr().err


def _train_lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_fused_head_trains_like_full_logits_and_reports_mfu(tiny_gpt2_dir, tmp_path, capsys):
    """The fused head (auto on GPUs; forced on here) gives the same losses as full logits, step for step,
    and the run reports its model TFLOP/s and MFU against a measured peak."""
    runs = {}
    for choice in ("off", "on"):
        out = runs[choice] = tmp_path / choice
        assert main(run_args(tiny_gpt2_dir, out, "--max-steps", "3", "--logging-steps", "1", "--fused-head", choice,
                             "--report-to", "none")) == 0
        assert f"fused head {choice}" in capsys.readouterr().out  # the path taken is logged
    off, on = (json.loads((runs[c] / "lmshrink.json").read_text())["metrics"] for c in ("off", "on"))
    assert [x["loss"] for x in _train_lines(runs["on"])] == pytest.approx([x["loss"] for x in _train_lines(runs["off"])],
                                                                          rel=1e-4)
    assert on["heldout_ppl_before"] == pytest.approx(off["heldout_ppl_before"], rel=1e-5)
    assert on["heldout_ppl_after"] == pytest.approx(off["heldout_ppl_after"], rel=1e-4)
    speed = on["speed"]
    assert speed["fused_head"] and not off["speed"]["fused_head"] and speed["precision"] == "fp32"
    # (no upper bound on MFU here: on a shared CPU the peak, measured once at start-up, can come out low)
    assert speed["mfu"] > 0 and speed["peak_tflops"] > 0 and speed["device"].startswith("CPU")
    assert speed["model_tflops"] == pytest.approx(speed["tokens_per_s"] * speed["model_flops_per_token"] / 1e12)
    assert speed["mfu"] == pytest.approx(speed["model_tflops"] / speed["peak_tflops"])
    assert all(x["mfu"] > 0 and x["tflops"] > 0 for x in _train_lines(runs["on"])[1:])
    # the saved model's head is a head again (the fused run swaps it for the identity while training)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(runs["on"] / "model")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size


def test_fused_head_falls_back_where_it_cannot_run(tiny_gpt2_dir):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from lmshrink.heal.training import fused_head_problem
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    plain = SimpleNamespace(fsdp="", deepspeed=None)
    assert fused_head_problem(model, plain) is None
    assert "FSDP" in fused_head_problem(model, SimpleNamespace(fsdp="full_shard", deepspeed=None))
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
    assert "bias-free" in fused_head_problem(model, plain)


def test_flops_per_token_counts_the_head_once():
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmshrink.heal.speed import flops_per_token, matmul_parameters
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=100)
    model = GPT2LMHeadModel(config)
    blocks = sum(p.numel() for part in (model.transformer.h, model.transformer.ln_f) for p in part.parameters())
    assert matmul_parameters(model) == blocks + 100 * 32  # tied head counted, embeddings not
    assert flops_per_token(model, 64) == 6 * (blocks + 3200) + 12 * 2 * 32 * 64
    assert flops_per_token(model, 64, training=False) == flops_per_token(model, 64) / 3
    from lmshrink.heal.training import freeze

    freeze(model, ["embeddings"])  # the tied head's weight gradient is no longer computed
    assert matmul_parameters(model, trainable=True) == blocks
    assert flops_per_token(model, 64) == 6 * (blocks + 3200) + 12 * 2 * 32 * 64 - 2 * 3200
    freeze(model, ["blocks:0-1"])
    assert flops_per_token(model, 64) == 4 * (blocks + 3200) + 12 * 2 * 32 * 64 + 2 * sum(
        p.numel() for p in model.transformer.ln_f.parameters())


def test_the_loss_chunk_follows_the_flag_free_memory_and_its_cap():
    """Even chunks of at most: --kd-chunk positions per sequence; a quarter of free GPU memory at 32
    bytes per logit, capped; on a CPU 128 positions per sequence within 1 GiB at 32 bytes per logit."""
    rows, vocab, batch = 16 * 1024, 50257, 16
    assert loss_chunk_rows(rows, vocab, batch, kd_chunk=256, free_bytes=None) == 256 * batch
    assert loss_chunk_rows(rows, 49_152, 4, kd_chunk=None, free_bytes=None) == 128 * 4  # SmolLM2 at batch 4
    cpu = loss_chunk_rows(rows, vocab, batch, kd_chunk=None, free_bytes=None)
    assert cpu * 32 * vocab <= 2**30 and -(-rows // cpu) == -(-rows // (2**30 // (32 * vocab)))
    assert loss_chunk_rows(4 * 256, 262_144, 4, kd_chunk=None, free_bytes=None) == 128  # Gemma 3: 1 GiB
    assert loss_chunk_rows(rows, vocab, batch, kd_chunk=None, free_bytes=140 * 2**30) == MAX_CHUNK_ROWS  # an H200
    small = loss_chunk_rows(rows, vocab, batch, kd_chunk=None, free_bytes=2 * 2**30)  # 2 GiB free
    fits = 2 * 2**30 // 4 // (32 * vocab)
    assert small <= fits and -(-rows // small) == -(-rows // fits)  # as few chunks as fit, of even size
    assert loss_chunk_rows(1000, vocab, 1, kd_chunk=None, free_bytes=10**15) == 1000  # a small step: one chunk
    assert loss_chunk_rows(rows, vocab, batch, kd_chunk=None, free_bytes=0) == 1  # no room: a row at a time


def test_the_peak_is_the_highest_measured_on_this_device(tmp_path, monkeypatch):
    """A peak measured while the machine is busy comes out low; the highest one kept is used."""
    import lmshrink.models
    from lmshrink.heal import speed

    monkeypatch.setattr(lmshrink.models, "cache_dir", lambda: tmp_path)
    for measured, expected in ((2e11, 2e11), (1e11, 2e11), (3e11, 3e11)):  # first, busy, quieter
        monkeypatch.setattr(speed, "measure_peak_flops", lambda *_, m=measured: m)
        assert speed.peak_flops.__wrapped__("cpu", torch.float32) == expected
    assert list(json.loads((tmp_path / "peak-flops.json").read_text()).values()) == [3e11]
    assert speed.peak_flops.__wrapped__("cpu", torch.bfloat16) == 3e11  # another dtype: its own entry
    assert len(json.loads((tmp_path / "peak-flops.json").read_text())) == 2


def test_frozen_parts_do_not_change_and_the_rest_trains(tiny_gpt2_dir, tmp_path, capsys):
    """--freeze embeddings,blocks:1-2: GPT-2's token and position tables (the head is tied to the
    first) and blocks 1-2 end as they started; blocks 0 and 3 train; the run's line says so."""
    out = tmp_path / "run"
    assert main(run_args(tiny_gpt2_dir, out, "--max-steps", "3", "--report-to", "none",
                         "--freeze", "embeddings,blocks:1-2")) == 0
    assert "frozen: embeddings (and the head tied to them), blocks:1-2" in capsys.readouterr().out
    start, end = (load_file(d / "model.safetensors") for d in (tiny_gpt2_dir, out / "model"))
    frozen = ("transformer.wte.", "transformer.wpe.", "transformer.h.1.", "transformer.h.2.")
    assert {name for name in start if not torch.equal(start[name], end[name])} == {
        name for name in start if not name.startswith(frozen) and not name.endswith(".attn.bias")}
    assert json.loads((out / "lmshrink.json").read_text())["settings"]["train"]["freeze"] == ["embeddings", "blocks:1-2"]


def test_adam_betas_reach_the_optimizer(tiny_gpt2_dir, tmp_path):
    """--adam-beta1/--adam-beta2 are the optimizer's: read back from the checkpoint's optimizer state."""
    out = tmp_path / "run"
    assert main(run_args(tiny_gpt2_dir, out, "--max-steps", "1", "--save-steps", "1", "--keep-checkpoints",
                         "--adam-beta1", "0.8", "--adam-beta2", "0.95", "--report-to", "none")) == 0
    state = torch.load(out / "checkpoints" / "checkpoint-1" / "optimizer.pt", weights_only=True)
    assert {tuple(group["betas"]) for group in state["param_groups"]} == {(0.8, 0.95)}


def test_the_trainers_arguments_carry_checkpointing_and_copy_batches_without_waiting(tmp_path):
    """--gradient-checkpointing reaches the Trainer under the name its transformers version reads
    (activation_checkpointing since 5.2x, gradient_checkpointing before); batches are copied to a
    GPU without blocking (from pinned memory), so the host never waits for the previous step."""
    from transformers import TrainingArguments

    from lmshrink.heal.args import CHECKPOINTING, TrainArgs, training_arguments

    assert CHECKPOINTING in TrainingArguments.__dataclass_fields__
    for on in (True, False):
        args = training_arguments(TrainArgs(gradient_checkpointing=on), tmp_path, 0, 64)
        assert getattr(args, CHECKPOINTING) is on
    assert args.accelerator_config.non_blocking is torch.cuda.is_available() is args.dataloader_pin_memory


def test_freeze_names_what_is_wrong(tiny_gpt2_dir, tmp_path, capsys):
    with pytest.raises(SettingsError) as err:
        build(PretrainSettings, {"model": "m", "output": "o", "data": ["d"], "freeze": ["embedding", "blocks:3-1"]})
    assert "'embedding' is not one of embeddings, head, blocks:I-J" in str(err.value)
    assert "the first block comes first (blocks:1-3)" in str(err.value)
    assert main(run_args(tiny_gpt2_dir, tmp_path / "r", "--max-steps", "1", "--freeze", "blocks:2-9")) == 2
    assert "freeze: blocks:2-9 asks for block 9, and the model has blocks 0-3" in capsys.readouterr().err


def test_freeze_on_untied_heads_and_when_nothing_is_left():
    """Mistral's head is its own tensor: `embeddings` leaves it training, `head` freezes it alone.
    An OPT without a final norm, its embeddings and every block frozen, has nothing left to train."""
    from conftest import TINY_CONFIGS

    from lmshrink.heal.training import freeze

    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["mistral"](2))
    assert freeze(model, ["embeddings"]).startswith("frozen: embeddings: ")  # the head is not tied to them
    assert model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["mistral"](2))
    freeze(model, ["head"])
    assert not model.lm_head.weight.requires_grad and model.model.embed_tokens.weight.requires_grad
    from transformers import AutoModelForSequenceClassification  # `lmshrink finetune`'s classifiers

    classifier = AutoModelForSequenceClassification.from_config(TINY_CONFIGS["gpt2"](2))
    with pytest.raises(SettingsError, match="this GPT2ForSequenceClassification has no output head to freeze"):
        freeze(classifier, ["head"])
    config = TINY_CONFIGS["opt"](2)
    config.do_layer_norm_before = False  # OPT-350m's layout: no final layer norm
    with pytest.raises(SettingsError, match="embeddings, blocks:0-1 leaves nothing of the model to train"):
        freeze(AutoModelForCausalLM.from_config(config), ["embeddings", "blocks:0-1"])


def test_warm_up_never_spends_a_step_at_learning_rate_zero(tmp_path):
    from conftest import tiny_model
    from transformers import TrainingArguments

    from lmshrink.heal.training import LMTrainer

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, warmup_steps=2, learning_rate=1e-3,
                             lr_scheduler_type="linear", report_to=[], use_cpu=True)
    trainer = LMTrainer(model=tiny_model("gpt2", 2), args=args)
    trainer.create_optimizer_and_scheduler(4)
    lrs = []
    for _ in range(4):  # the learning rate each optimizer step runs at
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 5e-4])  # then the linear decay as before


def test_the_fused_head_turns_on_where_the_logits_would_be_large():
    from lmshrink.heal.training import fused_head_on

    assert not fused_head_on("auto", 4, 256, 49_152) or torch.cuda.is_available()  # SmolLM2: 200 MB of logits
    assert fused_head_on("auto", 4, 256, 262_144)  # Gemma 3: 1 GiB
    assert not fused_head_on("off", 4, 256, 262_144) and fused_head_on("on", 1, 8, 100)


def test_a_run_that_cannot_fit_its_device_is_refused_before_the_model_loads(tiny_gpt2_dir, real_text, tmp_path,
                                                                            monkeypatch, capsys):
    import lmshrink.heal.memory as memory

    monkeypatch.setattr(memory, "device_memory", lambda device: 1000)
    # an unknown dtype is the settings' own one line, before anything is counted or loaded
    assert main(["pretrain", "--model", str(tiny_gpt2_dir), "--data", str(real_text), "--output", str(tmp_path / "d"),
                 "--dtype", "float64"]) == 2
    assert "dtype: 'float64' is unknown; choose one of auto" in capsys.readouterr().err
    monkeypatch.setattr("lmshrink.models.load", lambda *a, **k: pytest.fail("the model was loaded"))
    for dtype in ("float32", "auto"):  # auto is counted in the dtype it stands for
        assert main(["pretrain", "--model", str(tiny_gpt2_dir), "--data", str(real_text), "--output",
                     str(tmp_path / "r"), "--max-steps", "1", "--dtype", dtype]) == 2
        err = capsys.readouterr().err
        assert "memory: this run needs" in err and "the cpu device has 0.0 GB" in err and "Traceback" not in err
