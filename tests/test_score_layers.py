from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from lmshrink.architectures import blocks_of, residual_stream
from lmshrink.cli import main
from lmshrink.compress.importance import score
from lmshrink.compress.truncation import truncate_model
from lmshrink.data.sources import Framing
from lmshrink.evaluate.perplexity import perplexity
from lmshrink.models import native_dtype


@pytest.fixture
def rows():
    return torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(2))


def test_residual_stream_matches_hidden_states(rows):
    model = tiny_model("llama", 4)
    states = residual_stream(model, rows)
    hidden = model(input_ids=rows, output_hidden_states=True).hidden_states
    assert len(states) == 5
    for i in range(4):  # hidden_states[i] is block i's input; the last one is after the final norm
        torch.testing.assert_close(states[i], hidden[i])


def test_block_influence_and_angular_distance_definitions(rows):
    model = tiny_model("gpt2", 4)
    scores = score(model, rows, batch_size=2, ppl=False)
    states = [s.flatten(0, 1) for s in residual_stream(model, rows)]
    for i in range(4):
        cos = F.cosine_similarity(states[i], states[i + 1], dim=-1)
        assert scores["block_influence"][i] == pytest.approx(1 - cos.mean().item(), abs=1e-5)
    cos = F.cosine_similarity(states[1], states[3], dim=-1).clamp(-1, 1)
    assert scores["angular_distance"]["2"][1] == pytest.approx((torch.arccos(cos) / torch.pi).mean().item(), abs=1e-5)
    assert len(scores["angular_distance"]["4"]) == 1 and scores["num_layers"] == 4


def test_perplexity_increase_is_the_truncated_models_perplexity(rows):
    model = tiny_model("qwen2", 4)
    scores = score(model, rows, batch_size=2)
    stream = rows.flatten()
    assert scores["perplexity"] == pytest.approx(perplexity(model, stream, 16, 16, framing=Framing()))
    for i in range(4):
        student = truncate_model(model, [j for j in range(4) if j != i])
        assert scores["ppl_without_block"][i] == pytest.approx(perplexity(student, stream, 16, 16, framing=Framing()), rel=1e-5)
        assert scores["ppl_increase"][i] == pytest.approx(scores["ppl_without_block"][i] - scores["perplexity"])


def test_score_layers_command_writes_json_and_chart(tiny_gpt2_dir, real_text, tmp_path):
    out = tmp_path / "scores"
    assert main(["score-layers", "--model", str(tiny_gpt2_dir), "--data", str(real_text), "--output", str(out),
                 "--tokens", "512", "--seq-len", "128"]) == 0
    scores = json.loads((out / "scores.json").read_text())
    record = json.loads((out / "lmshrink.json").read_text())
    assert record["command"] == "score-layers"  # the folder describes itself
    # --dtype auto is recorded as what it ran in: bfloat16 on a CPU with bf16 instructions, else float32
    assert record["settings"]["load"]["dtype"] == native_dtype(torch.device("cpu"))
    assert scores["num_layers"] == 4 and scores["tokens"] == 512
    assert len(scores["block_influence"]) == 4 and len(scores["ppl_increase"]) == 4
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    # the scores drive truncation by importance
    student = tmp_path / "student"
    assert main(["truncate", "--teacher", str(tiny_gpt2_dir), "--output", str(student), "--strategy", "importance",
                 "--num-layers", "3", "--scores", str(out / "scores.json"), "--metric", "ppl_increase",
                 "--repair", "none"]) == 0
    kept = json.loads((student / "lmshrink.json").read_text())["kept_layers"]
    dropped = min(range(4), key=lambda i: scores["ppl_increase"][i])
    assert kept == [i for i in range(4) if i != dropped]


def test_score_layers_reports_the_measured_cuts(tiny_gpt2_dir, real_text, tmp_path, capsys):
    out = tmp_path / "scores"
    assert main(["score-layers", "--model", str(tiny_gpt2_dir), "--data", str(real_text), "--output", str(out),
                 "--tokens", "512", "--seq-len", "128", "--no-ppl", "--no-width", "--search-to", "2"]) == 0
    search = json.loads((out / "search.json").read_text())
    path = search["iterative"]["path"]
    assert [step["removed"] for step in path] != [] and len(path) == 2 and search["repair"] == "refit"
    assert sorted(step["removed"] for step in path) == search["iterative"]["removed"]
    # each step removed the candidate that scored best among those left
    assert all(step["kl"] == min(step["candidates"].values()) for step in path)
    assert len(search["contiguous"]["path"]) == 3
    assert "iterative path (removed in order)" in capsys.readouterr().out
    assert main(["score-layers", "--model", str(tiny_gpt2_dir), "--data", str(real_text), "--output", str(out),
                 "--tokens", "512", "--seq-len", "128", "--no-ppl", "--no-width", "--search-to", "4"]) == 2
    assert "search_to: the model has 4 blocks" in capsys.readouterr().err


def test_one_block_at_a_time_scores_as_the_whole_model_does(arch, tmp_path):
    """Every family, read block by block from its safetensors (sharded, with an index, for one of
    them; the last batch smaller than the others): the same Block Influence, angular distances and
    perplexities without each block as the whole model in memory."""
    from lmshrink.compress.importance import score_blockwise
    from lmshrink.compress.sequential import Blockwise, lazy_model

    model = tiny_model(arch, 4)
    model.save_pretrained(tmp_path, max_shard_size="40KB" if arch == "llama" else "1GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == (arch == "llama")
    rows = torch.randint(3, 128, (5, 16), generator=torch.Generator().manual_seed(3))
    whole = score(model, rows, batch_size=2)
    lazy, weights = lazy_model(str(tmp_path), model.config, torch.device("cpu"))
    blocks = blocks_of(lazy)
    assert all(p.device.type == "meta" for p in blocks.parameters())  # the blocks stay in the files
    blockwise = score_blockwise(Blockwise(lazy, weights, rows, 2))
    assert all(p.device.type == "meta" for p in blocks.parameters())  # and each went back after its pass
    for key in ("block_influence", "ppl_without_block"):
        assert blockwise[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key
    assert blockwise["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-5)
    for k, values in whole["angular_distance"].items():
        assert blockwise["angular_distance"][k] == pytest.approx(values, rel=1e-5, abs=1e-6)


def test_score_layers_reads_one_block_at_a_time_when_asked_or_when_the_model_would_not_fit(tmp_path, monkeypatch,
                                                                                           capsys, tiny_gpt2_dir):
    common = ["score-layers", "--model", str(tiny_gpt2_dir), "--data", "python-docs/tutorial", "--tokens", "256",
              "--seq-len", "64", "--dtype", "float32"]
    assert main([*common, "--output", str(tmp_path / "whole"), "--sequential", "off"]) == 0
    assert main([*common, "--output", str(tmp_path / "on"), "--sequential", "on"]) == 0
    whole, on = (json.loads((tmp_path / o / "scores.json").read_text()) for o in ("whole", "on"))
    assert (whole["path"], on["path"]) == ("whole", "sequential")
    assert on["ppl_without_block"] == pytest.approx(whole["ppl_without_block"], rel=1e-5)
    assert on["block_influence"] == pytest.approx(whole["block_influence"], rel=1e-5, abs=1e-6)
    widths = [json.loads((tmp_path / o / "width_scores.json").read_text()) for o in ("whole", "on")]
    for key in ("heads", "mlp"):  # the width scores from the same one pass over the blocks
        for got, want in zip(widths[1][key], widths[0][key], strict=True):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-7), key
    assert widths[1]["hidden"] == pytest.approx(widths[0]["hidden"], rel=1e-5, abs=1e-7)
    common = [*common, "--no-width"]
    monkeypatch.setattr("lmshrink.compress.sequential.device_memory", lambda device: 1000)  # a tiny machine
    assert main([*common, "--output", str(tmp_path / "auto")]) == 0
    assert json.loads((tmp_path / "auto" / "scores.json").read_text())["path"] == "sequential"
    searches = {}
    for mode in ("off", "on"):  # the measured cuts, walked block by block: the same paths and spans
        assert main([*common, "--output", str(tmp_path / f"search-{mode}"), "--sequential", mode, "--search-to",
                     "2"]) == 0
        searches[mode] = json.loads((tmp_path / f"search-{mode}" / "search.json").read_text())
    for name in ("iterative", "contiguous"):
        on, off = (searches[m][name] for m in ("on", "off"))
        assert on["removed"] == off["removed"], name
        got, want = ([step["kl"] for step in r["path"]] for r in (on, off))
        assert got == pytest.approx(want, rel=2e-2, abs=1e-4), name
    assert main([*common, "--output", str(tmp_path / "bias"), "--sequential", "on", "--search-to", "2",
                 "--search-repair", "bias"]) == 2
    assert "bias is not done block by block" in capsys.readouterr().err


def test_a_model_written_shard_by_shard_loads_as_save_pretrained_wrote_it(tmp_path):
    import transformers as T

    from lmshrink.compress.sequential import ShardWriter

    model = tiny_model("llama", 4)
    writer = ShardWriter(tmp_path, shard_bytes=20_000)  # several shards
    head = "lm_head.weight"  # tied: saved once, as the embeddings
    for name, tensor in model.state_dict().items():
        if name != head:
            writer.add(name, tensor)
    writer.close()
    model.config.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not list(tmp_path.glob(".shard-*"))
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_a_bfloat16_checkpoint_read_one_block_at_a_time_scores_as_its_float32_load(arch, tmp_path):
    """A bf16 checkpoint: its vocabulary tables stay bf16 in memory, every block and the head's
    products run in float32, so the scores are the whole model's loaded in float32 (Gemma's embedding
    scale is applied in the table's dtype: perplexities 1e-4 apart, block influence 1e-3)."""
    import transformers as T

    from lmshrink.compress.importance import score_blockwise
    from lmshrink.compress.sequential import Blockwise, lazy_model

    tiny_model(arch, 4).to(torch.bfloat16).save_pretrained(tmp_path)
    whole = T.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    rows = torch.randint(3, 128, (5, 16), generator=torch.Generator().manual_seed(4))
    lazy, weights = lazy_model(str(tmp_path), whole.config, torch.device("cpu"))
    assert lazy.get_input_embeddings().weight.dtype == torch.bfloat16
    got, want = score_blockwise(Blockwise(lazy, weights, rows, 2)), score(whole, rows, batch_size=2)
    assert got["ppl_without_block"] == pytest.approx(want["ppl_without_block"], rel=1e-4)
    assert got["block_influence"] == pytest.approx(want["block_influence"], rel=1e-3, abs=1e-5)
