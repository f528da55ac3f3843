from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from lmshrink.cli import main
from lmshrink.models import ModelLoadError, load, resolve


def test_local_folder_round_trip(tmp_path):
    model = tiny_model("gpt2", 2)
    model.save_pretrained(tmp_path)
    loaded = load(str(tmp_path), need_tokenizer=False)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    assert not loaded.model.training


def test_corrupt_checkpoint_is_named(tmp_path, gpt2_tokenizer):
    tiny_model("gpt2", 2).save_pretrained(tmp_path)
    gpt2_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(ModelLoadError, match="model.safetensors: its header claims"):
        load(str(tmp_path))


def test_folder_without_config_and_missing_gguf(tmp_path, capsys):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve(str(tmp_path / "model.gguf"))
    assert main(["eval", "--models", str(tmp_path), "--data", "x"]) == 2
    assert "not a model folder" in capsys.readouterr().err


def test_unknown_dtype():
    with pytest.raises(ModelLoadError, match="dtype"):
        load("smollm2-135m", dtype="int3")


@pytest.mark.parametrize("kind", ["gpt2", "gemma3_text", "qwen2"])
def test_the_causality_probe_passes_decoders_in_every_dtype(kind):
    from lmshrink.models import causal_problem

    for dtype in (torch.float32, torch.bfloat16):
        assert causal_problem(tiny_model(kind, 2).to(dtype)) is None


def test_the_causality_probe_and_the_config_refuse_a_model_that_reads_ahead():
    """transformers lends BERT a causal-LM head that reads the whole text unless `is_decoder` is set:
    its perplexity would be a number that measures nothing (issue #43)."""
    import transformers as T

    from lmshrink.models import causal_problem, kind_problem

    config = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64)
    torch.manual_seed(0)
    reads_ahead = T.BertLMHeadModel(config).eval()
    assert "is not causal" in causal_problem(reads_ahead)
    assert "encoder-only model (bert)" in kind_problem(config)
    config.is_decoder = True  # BERT as a decoder: causal, and allowed
    assert causal_problem(T.BertLMHeadModel(config).eval()) is None and kind_problem(config) is None
    assert "encoder-decoder model (t5)" in kind_problem(T.T5Config())
    assert "no causal language-model head" in kind_problem(T.CLIPVisionConfig())


def test_a_tokenizer_is_loaded_once_a_process_and_its_users_change_copies(tmp_path, gpt2_tokenizer, monkeypatch):
    import copy

    from lmshrink import models
    from lmshrink.heal.kd_methods import right_padded
    from lmshrink.models import load_tokenizer

    teacher, student, other = (tmp_path / name for name in ("teacher", "student", "other"))
    for folder, layers, tokenizer in ((teacher, 4, gpt2_tokenizer), (student, 2, gpt2_tokenizer),
                                      (other, 2, copy.deepcopy(gpt2_tokenizer))):
        tiny_model("gpt2", layers).save_pretrained(folder)  # the configs differ, not what the tokenizer reads
        tokenizer.save_pretrained(folder)
    settings = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 512}))
    monkeypatch.setattr(models, "_tokenizers", {})  # what earlier tests of this process loaded, out of sight
    shared = load_tokenizer(str(teacher))
    assert load_tokenizer(str(student)) is shared  # the same files: parsed once
    own = load_tokenizer(str(other))  # one setting differs: its own
    assert own is not shared and own.model_max_length == 512 != shared.model_max_length
    padded = right_padded(shared)  # a user that changes it changes a copy, made once a process
    assert (padded.pad_token, padded.padding_side) == (shared.eos_token, "right")
    assert shared.pad_token is None and shared.padding_side == gpt2_tokenizer.padding_side
    assert load_tokenizer(str(teacher)).pad_token is None
    assert right_padded(load_tokenizer(str(student))) is padded and right_padded(own) is not padded


def test_a_file_found_whole_is_checked_again_once_it_changes(tmp_path):
    from lmshrink.integrity import problem

    file = tmp_path / "tokenizer.json"
    file.write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    assert problem(file) is None and problem(file) is None
    file.write_text(file.read_text()[:-3])  # cut short in place
    assert problem(file) == "not valid JSON (cut short?)"
    file.unlink()
    assert problem(file) == "missing"
