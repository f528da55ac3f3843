"""`lmshrink generate`: teacher-written healing text, resumable, usable as --data alone or mixed by weight."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model
from transformers import GenerationConfig

from lmshrink.cli import main
from lmshrink.data.sources import text_dataset
from lmshrink.data.teacher_text import NUCLEUS_K, continue_rows, draw, teacher_rows
from lmshrink.models import load, native_dtype


def generate(teacher, out, *extra: str) -> int:
    return main(["generate", "--teacher", str(teacher), "--output", str(out), "--samples", "5", "--new-tokens", "12",
                 "--batch-size", "2", *extra])


def records(out) -> list[dict]:
    return [json.loads(line) for p in sorted(out.glob("part-*.jsonl")) for line in p.read_text().splitlines()]


def test_prompted_samples_carry_on_and_feed_training(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "teacher-text"
    assert generate(tiny_gpt2_dir, out, "--prompts", "python-docs/tutorial", "--prompt-tokens", "6") == 0
    written = records(out)
    assert [r["id"] for r in written] == [f"teacher-text-{i:06d}" for i in range(5)]
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    for r in written:
        assert r["prompt_source"].startswith("python-docs/tutorial#") and r["text"].startswith(r["prompt"])
        assert 0 <= r["new_tokens"] <= 12 and r["settings"]["temperature"] == 1.0
    record = json.loads((out / "lmshrink.json").read_text())
    assert record["documents"] == 5 and record["tokens"] == sum(r["new_tokens"] for r in written)
    assert record["tokens_per_s"] > 0

    (out / "part-00001.jsonl").unlink()  # as if stopped before writing it: the same command writes it alone
    assert generate(tiny_gpt2_dir, out, "--prompts", "python-docs/tutorial", "--prompt-tokens", "6") == 0
    assert records(out) == written  # part i is seeded by seed + i: the same text
    part = out / "part-00002.jsonl"  # cut short after it was written (issue #43): set aside, sampled again
    part.write_text(part.read_text()[:-9])
    assert generate(tiny_gpt2_dir, out, "--prompts", "python-docs/tutorial", "--prompt-tokens", "6") == 0
    assert "part-00002.jsonl is damaged (its last line breaks off" in capsys.readouterr().out
    assert records(out) == written and (out / "damaged-part-00002.jsonl").is_file()
    speed = json.loads((out / "lmshrink.json").read_text())["tokens_per_s"]
    assert generate(tiny_gpt2_dir, out, "--prompts", "python-docs/tutorial", "--prompt-tokens", "6") == 0
    assert json.loads((out / "lmshrink.json").read_text())["tokens_per_s"] == speed > 0  # nothing new: speed kept
    assert generate(tiny_gpt2_dir, out, "--prompts", "python-docs/tutorial", "--prompt-tokens", "6",
                    "--temperature", "0.7") == 2
    assert "other settings (temperature 1.0 -> 0.7)" in capsys.readouterr().err

    # the folder is a text source: alone, or mixed with a corpus by weight
    assert text_dataset([str(out)])["text"] == [r["text"] for r in written]
    assert main(["pretrain", "--model", str(tiny_gpt2_dir), "--data", f"{out},python-docs/tutorial",
                 "--data-weights", "1,1", "--heldout", "0", "--block-size", "32", "--batch-size", "2",
                 "--max-steps", "1", "--report-to", "none", "--output", str(tmp_path / "healed")]) == 0


def test_unconditional_samples_start_from_bos(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "free"
    assert generate(tiny_gpt2_dir, out, "--samples", "2") == 0
    assert [r["prompt_source"] for r in records(out)] == ["bos", "bos"]
    assert main(["pretrain", "--model", str(tiny_gpt2_dir), "--data", "python-docs/tutorial", "--data-weights", "1,2",
                 "--output", str(tmp_path / "x")]) == 2
    assert "data_weights: one weight >= 0 per --data source (1)" in capsys.readouterr().err


def test_draw_samples_the_softmax_at_its_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, float("-inf")]]).repeat(40_000, 1)
    torch.manual_seed(0)
    for temperature in (1.0, 0.5):
        seen = torch.bincount(draw(logits, temperature), minlength=4) / len(logits)
        assert seen[3] == 0  # a token of probability 0 is never drawn
        assert seen.tolist() == pytest.approx(torch.softmax(logits[0] / temperature, -1).tolist(), abs=0.01)


def test_top_p_draws_from_the_renormalised_nucleus():
    """Probabilities 0.5, 0.3, 0.15, 0.05 (shuffled): top-p 0.7 keeps the two most likely tokens
    (0.5 + 0.3 reach it) in proportion 5:3; top-p 0.5 keeps the first alone."""
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()[None].repeat(40_000, 1)
    torch.manual_seed(0)
    seen = torch.bincount(draw(logits, 1.0, top_p=0.7), minlength=4) / len(logits)
    assert seen.tolist() == pytest.approx([0, 0.625, 0, 0.375], abs=0.01)
    assert torch.bincount(draw(logits, 1.0, top_p=0.5), minlength=4).tolist() == [0, len(logits), 0, 0]


def test_top_p_reaches_past_the_likeliest_k_tokens_when_the_nucleus_does():
    """Probabilities falling linearly over 4,000 tokens: the nucleus at 0.9 holds the first n tokens
    (n past NUCLEUS_K, so those rows are sorted whole), at 0.1 far fewer; nothing outside is ever
    drawn. Rows in between put 0.95 on token 7: their nucleus at 0.9 is that token alone."""
    probs = torch.arange(4000, 0, -1, dtype=torch.float64)
    probs /= probs.sum()
    peaked = torch.full((4000,), 0.05 / 3999, dtype=torch.float64)
    peaked[7] = 0.95
    logits = torch.stack([probs, peaked]).log().float().repeat(5_000, 1)
    for top_p in (0.9, 0.1):
        n = int((probs.cumsum(0) - probs < top_p).sum())
        torch.manual_seed(0)
        seen = draw(logits, 1.0, top_p=top_p)
        assert seen[0::2].max() < n and seen[0::2].max() > 0.9 * n
        assert (seen[1::2] == 7).all()
    assert int((probs.cumsum(0) - probs < 0.9).sum()) > NUCLEUS_K > int((probs.cumsum(0) - probs < 0.1).sum())


def test_sampling_with_the_kv_cache_follows_the_model_in_every_architecture(arch, monkeypatch):
    """Near temperature 0 the sampler is greedy decoding, so it must pick exactly what transformers'
    own greedy `generate` picks: same positions, same cache (sliding windows included: 16 new
    tokens after a prompt of 4 pass the tiny models' window of 8), the head applied by slices of
    its table (`next_token.Head.few`; 24 rows here, so the 128-token vocabulary takes six)."""
    from lmshrink import next_token

    monkeypatch.setattr(next_token, "FEW_ROWS", 24)
    model = tiny_model(arch, n_layers=2)
    prompts = torch.randint(3, 100, (3, 4), generator=torch.Generator().manual_seed(0))
    model.generation_config.eos_token_id = None  # end-of-text is a token like any other here
    config = GenerationConfig(do_sample=False, max_new_tokens=16, pad_token_id=0)
    expected = model.generate(prompts, attention_mask=torch.ones_like(prompts), generation_config=config)
    got = continue_rows(model, SimpleNamespace(pad_token_id=0, eos_token_id=None), prompts, 16, temperature=1e-6)
    assert torch.equal(got, expected)


def test_teacher_calibration_text_is_written_once_and_read_back(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    """A repair's teacher-written rows are sampled once per teacher and settings, then read from the
    cache; other weights or other settings sample afresh."""
    monkeypatch.setenv("LMSHRINK_CACHE", str(tmp_path))
    loaded = load(str(tiny_gpt2_dir))
    first = teacher_rows(loaded.model, loaded.tokenizer, 3, 16, seed=1)
    assert "sampled 48 tokens" in capsys.readouterr().out
    again = teacher_rows(loaded.model, loaded.tokenizer, 3, 16, seed=1)
    assert "read from" in capsys.readouterr().out and torch.equal(first, again)
    (kept,) = (tmp_path / "teacher-text").glob("*.safetensors")
    kept.write_bytes(kept.read_bytes()[:-4])  # damaged (issue #43): set aside and written again
    assert torch.equal(teacher_rows(loaded.model, loaded.tokenizer, 3, 16, seed=1), first)
    assert "is damaged (its tensors need" in capsys.readouterr().out
    assert [p.name.startswith("damaged-") for p in (tmp_path / "teacher-text").iterdir()].count(True) == 1
    for aside in (tmp_path / "teacher-text").glob("damaged-*"):
        aside.unlink()
    assert len(list((tmp_path / "teacher-text").glob("*.safetensors"))) == 1
    teacher_rows(loaded.model, loaded.tokenizer, 3, 16, seed=2)
    with torch.no_grad():
        loaded.model.transformer.h[-1].mlp.c_proj.weight.add_(1.0)
    teacher_rows(loaded.model, loaded.tokenizer, 3, 16, seed=1)
    assert capsys.readouterr().out.count("sampled") == 2
    assert len(list((tmp_path / "teacher-text").glob("*.safetensors"))) == 3


def test_auto_dtype_is_the_devices_fastest_and_kept_on_resumption(tiny_gpt2_dir, tmp_path, capsys, monkeypatch):
    for avx512_bf16, amx, expected in ((False, False, "float32"), (True, False, "bfloat16"), (False, True, "bfloat16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert native_dtype(torch.device("cpu")) == expected
    monkeypatch.undo()
    out, resolved = tmp_path / "teacher-text", native_dtype(torch.device("cpu"))
    assert generate(tiny_gpt2_dir, out) == 0  # --dtype auto: written in the resolved dtype, and says so
    assert {r["settings"]["dtype"] for r in records(out)} == {resolved}
    assert json.loads((out / "lmshrink.json").read_text())["settings"]["load"]["dtype"] == resolved
    (out / "part-00002.jsonl").unlink()
    assert generate(tiny_gpt2_dir, out, "--dtype", resolved) == 0  # the same dtype named: carries on
    other = "float32" if resolved == "bfloat16" else "bfloat16"
    assert generate(tiny_gpt2_dir, out, "--dtype", other) == 2  # another: its text would differ
    assert f"dtype '{resolved}' -> '{other}'" in capsys.readouterr().err
