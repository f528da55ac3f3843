from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from lmshrink.cli import main
from lmshrink.models import ModelLoadError, load, resolve


def test_local_folder_round_trip(tmp_path, gpt2_tokenizer):
    model = tiny_model("gpt2", 2)
    model.save_pretrained(tmp_path)
    gpt2_tokenizer.save_pretrained(tmp_path)
    loaded = load(str(tmp_path))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    assert not loaded.model.training


def test_corrupt_checkpoint_is_named(tmp_path, gpt2_tokenizer):
    tiny_model("gpt2", 2).save_pretrained(tmp_path)
    gpt2_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(ModelLoadError, match="corrupt"):
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
