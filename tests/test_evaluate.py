from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from lmshrink.cli import main
from lmshrink.data.sources import Framing
from lmshrink.evaluate.measure import count_parameters, fresh_peak_memory, speed, weight_bytes
from lmshrink.evaluate.perplexity import perplexity, sliding_nll, windows
from lmshrink.evaluate.report import markdown_table
from lmshrink.models import embedded_gguf, load, unpacked_folder


def brute_force_nll(model, tokens, window, stride, start=()):
    """Score every token alone, with exactly the context its sliding window gives it (after the
    `start` tokens, unless the window already begins with them)."""
    total, count = 0.0, 0
    for begin, end, first in windows(tokens.numel(), window, stride):
        head = [] if tokens[begin : begin + len(start)].tolist() == list(start) else list(start)
        for pos in range(first, end):
            context = torch.cat([torch.tensor(head, dtype=torch.long), tokens[begin:pos]]).unsqueeze(0)
            with torch.no_grad():
                logit = model(input_ids=context, use_cache=False).logits[0, -1]
            total += F.cross_entropy(logit.unsqueeze(0), tokens[pos : pos + 1]).item()
            count += 1
    return total, count


@pytest.mark.parametrize("window,stride", [(8, 8), (8, 3), (16, 5), (64, 64)])
def test_sliding_window_nll_equals_brute_force(window, stride):
    model = tiny_model("gpt2", 2)
    tokens = torch.randint(0, 128, (37,), generator=torch.Generator().manual_seed(0))
    total, count = sliding_nll(model, tokens, window, stride, batch_size=3, framing=Framing())
    expected_total, expected_count = brute_force_nll(model, tokens, window, stride)
    assert count == expected_count
    assert total == pytest.approx(expected_total, rel=1e-5)


@pytest.mark.parametrize("window,stride", [(8, 8), (8, 3)])
def test_every_window_starts_with_the_start_tokens(window, stride):
    """A tokenizer that adds a start token: each window is scored after it (not doubled where the
    window already begins with it), the same tokens are scored as without it."""
    model = tiny_model("llama", 2)
    tokens = torch.randint(3, 128, (37,), generator=torch.Generator().manual_seed(0))
    tokens[8] = 1  # a document starting where a window starts
    for start in ((1,), (1, 2)):
        total, count = sliding_nll(model, tokens, window, stride, batch_size=3, framing=Framing(start=start))
        expected_total, expected_count = brute_force_nll(model, tokens, window, stride, start)
        assert count == expected_count == sliding_nll(model, tokens, window, stride, framing=Framing())[1]
        assert total == pytest.approx(expected_total, rel=1e-5)


def test_windows_score_each_token_once():
    for n, window, stride in [(37, 8, 3), (100, 10, 7), (5, 64, 16)]:
        scored = [p for _, end, first in windows(n, window, stride) for p in range(first, end)]
        assert scored == list(range(1, n))
    # stride == window: plain chunks, the first token of each chunk unscored
    assert windows(20, 8, 8) == [(0, 8, 1), (8, 16, 9), (16, 20, 17)]


def test_perplexity_limits():
    model = tiny_model("gpt2", 2)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform predictions over 128 tokens (tied: embeddings zero too)
    tokens = torch.randint(0, 128, (50,), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, tokens, 16, 8, framing=Framing()) == pytest.approx(128, rel=1e-4)


def test_parameters_count_tied_weights_once():
    for kind in ("gpt2", "llama"):  # both tie the LM head to the token embeddings here
        model = tiny_model(kind, 2)
        every_name = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
        head = model.get_output_embeddings().weight
        assert head is model.get_input_embeddings().weight
        assert count_parameters(model) == every_name - head.numel()  # the shared matrix counted once
        # untied, the head is a parameter of its own and counts
        model.get_output_embeddings().weight = torch.nn.Parameter(head.detach().clone())
        assert count_parameters(model) == every_name


def test_speed_report_measures():
    model = tiny_model("llama", 2)
    result = speed(model, batch=2, length=16, gen_tokens=4, repeats=2)
    assert result["latency_ms"] > 0 and result["tokens_per_s"] > 0 and result["generate_tokens_per_s"] > 0
    assert math.isclose(result["tokens_per_s"], 2 * 16 / (result["latency_ms"] / 1000))


@pytest.mark.skipif(sys.platform != "linux", reason="CPU peak memory is read from /proc")
def test_peak_memory_is_weights_plus_a_growing_activation_peak(tiny_gpt2_dir):
    weights = weight_bytes(load(str(tiny_gpt2_dir)).model) / 2**20
    small = fresh_peak_memory(str(tiny_gpt2_dir), 1, 16)
    large = fresh_peak_memory(str(tiny_gpt2_dir), 16, 256)  # (16, 256, 50257) fp32 logits alone are 785 MB
    assert weights <= small < large
    assert large - weights > 700


@pytest.mark.skipif(sys.platform != "linux", reason="CPU peak memory is read from /proc")
def test_peak_memory_is_measured_where_the_caller_stands_and_quietly(tiny_gpt2_dir, tmp_path, monkeypatch, capfd):
    """Each measurement forks from a server started once: it must still read a relative path from the
    caller's folder and its environment of the moment, and keep the loader's progress bars off the
    terminal."""
    first = fresh_peak_memory(str(tiny_gpt2_dir), 1, 16)  # the server starts here, in this folder
    monkeypatch.chdir(tiny_gpt2_dir.parent)
    assert fresh_peak_memory(tiny_gpt2_dir.name, 1, 16) == pytest.approx(first, rel=0.2)
    assert "Loading" not in capfd.readouterr().err
    # a cache whose unpacked embedded teacher is the tiny model: measured as the tiny one only if the
    # measuring process reads the cache the caller names now
    monkeypatch.setenv("LMSHRINK_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tiny_gpt2_dir, unpacked_folder(embedded_gguf("smollm2-135m")))
    assert fresh_peak_memory("smollm2-135m", 1, 16) == pytest.approx(first, rel=0.2)


def test_a_peak_measurement_that_fails_says_why_and_carries_on(tmp_path, capfd):
    assert fresh_peak_memory(str(tmp_path / "missing"), 1, 16) is None
    said = capfd.readouterr().err
    assert "peak memory of" in said and "does not exist" in said and "Traceback" not in said


def test_one_architecture_is_timed_once(tiny_gpt2_dir, real_text, tmp_path, monkeypatch):
    """Two models of the same config and dtype are the same computation: the second shares the first's
    speed and memory (named in its row and under the table) instead of a second, noisier measurement;
    a model of another shape is timed on its own."""
    import lmshrink.recipes.evaluate as evaluate

    twin, shallow = tmp_path / "twin", tmp_path / "shallow"
    shutil.copytree(tiny_gpt2_dir, twin)
    assert main(["truncate", "--teacher", str(tiny_gpt2_dir), "--output", str(shallow), "--keep", "0,3",
                 "--repair", "none"]) == 0
    calls = []
    monkeypatch.setattr(evaluate, "speed", lambda model, *a: calls.append(model) or {
        "latency_ms": 10.0 * len(calls), "tokens_per_s": 1.0, "generate_tokens_per_s": 1.0, "peak_memory_mb": 1.0})
    monkeypatch.setattr(evaluate, "fresh_peak_memory", lambda *a, **k: 5.0)
    out = tmp_path / "eval"
    assert main(["eval", "--models", f"{tiny_gpt2_dir},{twin},{shallow}", "--data", str(real_text),
                 "--output", str(out), "--max-tokens", "128", "--window", "64", "--stride", "64"]) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert len(calls) == 2  # the original and the shallow cut; the twin shares the original's
    assert rows[1]["speed_of"] == rows[0]["model"] and rows[1]["latency_ms"] == rows[0]["latency_ms"] == 10.0
    assert "speed_of" not in rows[2] and rows[2]["latency_ms"] == 20.0
    assert f"`{rows[1]['model']}` share `{rows[0]['model']}`'s" in (out / "report.md").read_text()


def test_eval_command_side_by_side(tiny_gpt2_dir, real_text, tmp_path, monkeypatch):
    import lmshrink.models

    student = tmp_path / "student"
    assert main(["truncate", "--teacher", str(tiny_gpt2_dir), "--output", str(student), "--keep", "0,3", "--repair", "none"]) == 0
    checks, real_check = [], lmshrink.models.check

    def counted(name, *args):
        checks.append(name)
        return real_check(name, *args)

    monkeypatch.setattr(lmshrink.models, "check", counted)  # LoadArgs.check and load both call it
    out = tmp_path / "eval"
    assert main(["eval", "--models", f"{tiny_gpt2_dir},{student}", "--data", str(real_text),
                 "--output", str(out), "--window", "64", "--stride", "32", "--max-tokens", "600",
                 "--speed-length", "16", "--gen-tokens", "4", "--repeats", "2"]) == 0
    assert checks == [str(tiny_gpt2_dir), str(student)]  # both checked before the first loads, each once
    report = json.loads((out / "report.json").read_text())
    teacher_row, student_row = report["rows"]
    assert student_row["layers"] == 2 and student_row["kept_layers"] == [0, 3]
    assert student_row["parameters"] < teacher_row["parameters"]
    assert student_row["disk_mb"] < teacher_row["disk_mb"]
    for row in report["rows"]:
        assert row["tokens"][str(real_text)] == 600
        assert 1 < row["perplexity"][str(real_text)] < 1e6
    markdown = (out / "report.md").read_text()
    assert "| student | 2 |" in markdown and "speed-up" in markdown


def test_eval_rejects_bad_settings(tmp_path, capsys):
    assert main(["eval", "--models", "x", "--stride", "0", "--window", "1"]) == 2
    err = capsys.readouterr().err
    assert "stride" in err and "window" in err  # all problems at once


@pytest.mark.parametrize("kind", ["gemma3_text", "llama", "gpt2"])
def test_a_model_read_one_block_at_a_time_scores_the_same_windows_alike(kind, tmp_path):
    """Windows of two lengths (the stream's end), each after a start token: the block-by-block NLL is
    the whole model's, over more than one pass over the weights (a stream budget of two windows)."""
    from lmshrink.compress import sequential

    model = tiny_model(kind, 4)
    model.save_pretrained(tmp_path)
    tokens = torch.randint(3, 128, (150,), generator=torch.Generator().manual_seed(1))
    framing = Framing(start=(1,))
    whole = sliding_nll(model, tokens, 32, 20, batch_size=3, framing=framing)
    lazy, weights = sequential.lazy_model(str(tmp_path), model.config, torch.device("cpu"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sequential, "STREAM_BYTES", 2 * 33 * model.config.get_text_config().hidden_size * 4)
        blockwise = sequential.sliding_nll_blockwise(lazy, weights, tokens, 32, 20, 2, framing=framing)
    assert blockwise[1] == whole[1] == 149
    assert blockwise[0] == pytest.approx(whole[0], rel=1e-5)
    assert all(p.device.type == "meta" for p in sequential.blocks_of(lazy).parameters())


def test_eval_reads_a_model_one_block_at_a_time_when_asked_or_when_it_would_not_fit(tiny_gpt2_dir, real_text,
                                                                                    tmp_path, monkeypatch, capsys):
    common = ["eval", "--data", str(real_text), "--window", "64", "--stride", "32", "--max-tokens", "300"]
    timed = ["--speed-length", "16", "--gen-tokens", "2", "--repeats", "1"]
    assert main([*common, "--models", str(tiny_gpt2_dir), "--output", str(tmp_path / "off"), *timed]) == 0
    assert main([*common, "--models", f"{tiny_gpt2_dir},{tiny_gpt2_dir}", "--labels", "whole,blocks",
                 "--output", str(tmp_path / "on"), "--sequential", "on", *timed]) == 0
    off, on = (json.loads((tmp_path / o / "report.json").read_text())["rows"] for o in ("off", "on"))
    assert on[0]["perplexity"] == pytest.approx(off[0]["perplexity"], rel=1e-5)
    assert on[0]["sequential"] and "latency_ms" not in on[0] and on[0]["parameters"] == off[0]["parameters"]
    assert "perplexity only, no speed" in capsys.readouterr().err
    monkeypatch.setattr("lmshrink.compress.sequential.device_memory", lambda device: 1000)  # a tiny machine
    assert main([*common, "--models", str(tiny_gpt2_dir), "--output", str(tmp_path / "auto"), "--no-speed"]) == 0
    assert json.loads((tmp_path / "auto" / "report.json").read_text())["rows"][0]["sequential"]
    assert main([*common, "--models", str(tiny_gpt2_dir), "--output", str(tmp_path / "t"), "--tasks", "arc_easy",
                 "--no-speed"]) == 2
    assert "benchmarks run the whole model" in capsys.readouterr().err


def test_a_report_holds_rows_with_and_without_speed():
    timed = {"model": "a", "layers": 2, "parameters": 1e6, "disk_mb": 1.0, "perplexity": {"t": 3.0},
             "latency_ms": 2.0, "tokens_per_s": 10.0, "generate_tokens_per_s": 5.0, "peak_memory_mb": 9.0}
    blockwise = {"model": "b", "layers": 2, "parameters": 1e6, "disk_mb": 1.0, "perplexity": {"t": 3.5}}
    for rows in ([timed, blockwise], [blockwise, timed]):
        table = markdown_table(rows, "(1x16)")
        assert "speed-up" in table and "| b | 2 | 1.0 | 1.0 | 3.50 | n/a | n/a | n/a | n/a | n/a |" in table
