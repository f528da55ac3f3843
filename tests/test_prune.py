from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from lmshrink.cli import main
from lmshrink.compress.width import (
    WIDTH,
    check_target,
    count_parameters_of,
    plan,
    prune_width,
    pruned_config,
    shape,
    split_target,
    width_scores,
)

VOCAB = 128

# Tiny random models of each width-prunable family, with grouped-query attention (4 query heads
# over 2 key/value heads) where the architecture has it; Qwen2 has q/k/v biases, Qwen3 per-head norms.
WIDTH_CONFIGS = {
    "gpt2": lambda: T.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                                 bos_token_id=0, eos_token_id=0),
    "llama": lambda: T.LlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=VOCAB, tie_word_embeddings=True),
    "mistral": lambda: T.MistralConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB),
    "qwen2": lambda: T.Qwen2Config(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=VOCAB),
    "qwen3": lambda: T.Qwen3Config(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=VOCAB, head_dim=8),
}


def _model(kind: str):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(WIDTH_CONFIGS[kind]()).eval()
    with torch.no_grad():  # random biases, so that slicing them is tested too
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


def _full(model) -> dict[str, int]:
    return {k: v for k, v in shape(model.config).items() if k in ("hidden", "intermediate", "heads", "kv_heads")}


IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def test_every_family_is_in_the_table():
    assert set(WIDTH_CONFIGS) | {"smollm3"} == set(WIDTH)


@pytest.mark.parametrize("kind", WIDTH_CONFIGS)
def test_pruning_nothing_gives_the_teachers_logits_exactly(kind):
    model = _model(kind)
    kept = prune_width(model, plan(width_scores(model, IDS), _full(model)), _full(model))
    with torch.no_grad():
        assert torch.equal(kept(IDS).logits, model(IDS).logits)


def _silence(model, kind: str, layer: int, kv_group: int, channels: list[int]) -> None:
    """Zero the value rows of one key/value group (so its query heads output nothing) and the
    input weights of some MLP channels (so they output nothing)."""
    block = model.transformer.h[layer] if kind == "gpt2" else model.model.layers[layer]
    d = shape(model.config)["head_dim"]
    with torch.no_grad():
        if kind == "gpt2":
            width = model.config.n_embd
            v = slice(2 * width + kv_group * d, 2 * width + (kv_group + 1) * d)
            block.attn.c_attn.weight[:, v] = 0
            block.attn.c_attn.bias[v] = 0
            block.mlp.c_fc.weight[:, channels] = 0
            block.mlp.c_fc.bias[channels] = 0
        else:
            rows = slice(kv_group * d, (kv_group + 1) * d)
            block.self_attn.v_proj.weight[rows] = 0
            if block.self_attn.v_proj.bias is not None:
                block.self_attn.v_proj.bias[rows] = 0
            block.mlp.up_proj.weight[channels] = 0


@pytest.mark.parametrize("kind", [k for k in WIDTH_CONFIGS if k != "gpt2"])
def test_pruning_silenced_units_gives_the_silenced_models_logits(kind):
    """Units whose output was zeroed score lowest, are the ones dropped, and dropping them changes nothing."""
    model = _model(kind)
    channels = [3, 17, 40]
    for layer in range(3):
        _silence(model, kind, layer, kv_group=1, channels=channels)
    scores = width_scores(model, IDS)
    full = _full(model)
    # the silenced key/value group holds 2 of the 4 query heads
    target = dict(full, intermediate=full["intermediate"] - len(channels), heads=full["heads"] - 2,
                  kv_heads=full["kv_heads"] - 1)
    kept = plan(scores, target)
    assert all(1 not in groups for groups in kept.kv_heads)
    assert all(not set(channels) & set(layer) for layer in kept.mlp)
    pruned = prune_width(model, kept, target)
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


def test_gpt2_silenced_channels_are_dropped_exactly():
    """GPT-2's heads set its hidden size (heads x head_dim = hidden), and a narrower residual
    stream changes every LayerNorm's statistics, so only MLP channels can be dropped exactly."""
    model = _model("gpt2")
    for layer in range(3):
        _silence(model, "gpt2", layer, kv_group=1, channels=[3, 17, 40])
    full = _full(model)
    target = dict(full, intermediate=full["intermediate"] - 3)
    kept = plan(width_scores(model, IDS), target)
    assert all(not {3, 17, 40} & set(layer) for layer in kept.mlp)
    with torch.no_grad():
        torch.testing.assert_close(prune_width(model, kept, target)(IDS).logits, model(IDS).logits, rtol=0, atol=1e-5)


def test_uniform_config_rules():
    gpt2, llama = _model("gpt2"), _model("llama")
    assert any("hidden_size" in p for p in check_target(gpt2.config, dict(_full(gpt2), hidden=24)))
    assert not check_target(gpt2.config, dict(_full(gpt2), hidden=16, heads=2, kv_heads=2))
    assert any("split evenly" in p for p in check_target(llama.config, dict(_full(llama), heads=3)))
    assert any("at most 2 query heads" in p for p in check_target(llama.config, dict(_full(llama), heads=4, kv_heads=1)))
    assert not check_target(llama.config, dict(_full(llama), heads=2, kv_heads=1))  # one whole group
    assert not check_target(llama.config, dict(_full(llama), heads=2, kv_heads=2))  # one query head per group


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory, gpt2_tokenizer):
    """A Llama with GPT-2's tokenizer, tied embeddings and grouped-query attention, saved as a folder."""
    torch.manual_seed(0)
    config = T.LlamaConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=len(gpt2_tokenizer), tie_word_embeddings=True,
                           max_position_embeddings=256)
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    T.LlamaForCausalLM(config).eval().save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return folder


def test_prune_command_writes_a_plain_transformers_folder(tiny_llama_dir, tmp_path):
    out = tmp_path / "narrow"
    assert main(["prune", "--teacher", str(tiny_llama_dir), "--output", str(out), "--hidden-size", "48",
                 "--intermediate-size", "96", "--num-heads", "2", "--num-layers", "3", "--calib-data",
                 "python-docs/tutorial", "--calib-tokens", "512", "--repair-tokens", "1024"]) == 0
    model = T.AutoModelForCausalLM.from_pretrained(out).eval()  # no lmshrink code involved
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.num_hidden_layers) == (48, 96, 2, 2, 16, 3)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    record = json.loads((out / "lmshrink.json").read_text())
    assert len(record["kept_hidden"]) == 48 and len(record["kept_layers"]) == 3
    assert record["repair"]["method"] == "refit" and record["repair"]["spans"]  # the depth cut, repaired first
    assert [len(h) for h in record["kept_heads"]] == [2, 2, 2] and all(len(m) == 96 for m in record["kept_mlp"])
    assert record["parameters"] == sum(p.numel() for p in model.parameters())
    assert (out / "width_scores.png").read_bytes()[:4] == b"\x89PNG" and (out / "README.md").is_file()
    ids = torch.randint(0, 1000, (1, 10))
    model.save_pretrained(tmp_path / "again")
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)  # round trip


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("axes", ["width", "depth", "both"])
def test_a_parameter_budget_is_met_along_each_axis(kind, axes):
    config = WIDTH_CONFIGS[kind]()
    config.num_hidden_layers = 12  # enough blocks and width that 75% is reachable along each axis
    teacher = count_parameters_of(config)
    layers, width = split_target(config, int(0.75 * teacher), axes)
    new = pruned_config(config, width)
    new.num_hidden_layers = layers
    assert abs(count_parameters_of(new) / teacher - 0.75) < 0.05
    assert not check_target(config, width)
    have = shape(config)
    narrower = width["hidden"] < have["hidden"] or width["intermediate"] < have["intermediate"]
    shallower = layers < 12
    assert (narrower, shallower) == {"width": (True, False), "depth": (False, True), "both": (True, True)}[axes]


def test_prune_command_takes_a_budget(tiny_llama_dir, tmp_path):
    out = tmp_path / "both"
    assert main(["prune", "--teacher", str(tiny_llama_dir), "--output", str(out), "--ratio", "0.7", "--axes", "both",
                 "--calib-data", "python-docs/tutorial", "--calib-tokens", "256", "--repair", "none"]) == 0
    record = json.loads((out / "lmshrink.json").read_text())
    assert record["parameters"] < record["teacher_parameters"] and len(record["kept_layers"]) < 4
    assert record["width"]["hidden"] < 64


@pytest.mark.parametrize("flags, message", [
    (["--hidden-size", "24"], "hidden_size: gpt2 keeps heads x head_dim"),
    (["--num-heads", "3", "--hidden-size", "48"], "hidden"),
    (["--hidden-size", "999"], "hidden: 999 is not in 1..32"),
    ([], "sizes: give what to keep"),
    (["--ratio", "0.5", "--num-heads", "1"], "give explicit sizes, or one of"),
])
def test_requests_that_cannot_stay_uniform_are_refused(tiny_gpt2_dir, tmp_path, capsys, flags, message):
    assert main(["prune", "--teacher", str(tiny_gpt2_dir), "--output", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3
    assert not (tmp_path / "x").exists()


def test_architectures_without_a_width_layout_are_refused(tmp_path, capsys):
    folder = tmp_path / "phi3"
    T.AutoModelForCausalLM.from_config(T.Phi3Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                                    num_key_value_heads=1, intermediate_size=64, vocab_size=VOCAB,
                                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)).save_pretrained(folder)
    assert main(["prune", "--teacher", str(folder), "--output", str(tmp_path / "x"), "--num-heads", "1"]) == 2
    assert "width pruning supports gpt2, llama" in capsys.readouterr().err


def test_search_ranks_depth_width_and_both_and_resumes(tiny_llama_dir, tmp_path, capsys):
    """The whole search on a tiny Llama: three candidates of one size, each healed with the same
    budget, ranked by held-out perplexity; a second run reuses every finished stage."""
    out = tmp_path / "search"
    flags = ["search", "--teacher", str(tiny_llama_dir), "--output", str(out), "--ratio", "0.98",
             "--calib-data", "python-docs/tutorial", "--calib-tokens", "256", "--data", "python-docs/tutorial",
             "--eval-data", "kernel-docs/process", "--eval-tokens", "256", "--block-size", "64",
             "--max-tokens", "512", "--batch-size", "2"]
    assert main(flags) == 0
    record = json.loads((out / "report.json").read_text())
    rows = record["rows"]
    assert {r["axis"] for r in rows} == {"depth", "width", "both"}
    assert [r["ppl_after"] for r in rows] == sorted(r["ppl_after"] for r in rows)
    assert record["winner"]["axis"] == rows[0]["axis"]
    assert all(r["tokens"] == 512 for r in rows)  # the same budget for every candidate
    sizes = [r["parameters"] for r in rows]
    assert max(sizes) / min(sizes) < 1.02  # one target size (the tiny model is mostly embeddings: 98% is reachable)
    report = (out / "report.md").read_text()
    assert "Winner: **" in report and (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(flags) == 0
    assert capsys.readouterr().out.count("finished before, with the same settings") == 7  # scores + 3 x (prune, heal)
    assert main([*flags, "--lr", "1e-3"]) == 0  # a changed healing setting re-runs the healing only
    printed = capsys.readouterr().out
    assert printed.count("finished before") == 4 and printed.count("running it again") == 3
    weights = sorted(out.rglob("model.safetensors"))[0]  # a finished stage's model, cut short (issue #43)
    weights.write_bytes(weights.read_bytes()[:100])
    assert main([*flags, "--lr", "1e-3"]) == 0  # that stage is set aside and made again; the rest are kept
    printed = capsys.readouterr().out
    assert printed.count("finished before") == 6 and printed.count("is damaged (") == 1
    assert printed.count("running it again") == 1


ITERATIVE = ["--num-layers", "2", "--strategy", "iterative", "--search-tokens", "256"]


@pytest.mark.parametrize("kind, depths", [("llama", [[], ["--num-layers", "3"]]), ("qwen2", [[]]), ("gpt2", [[], ITERATIVE])])
def test_one_block_at_a_time_prunes_the_same_student(kind, depths, tmp_path, gpt2_tokenizer, capsys):
    """prune --sequential on: the teacher read block by block from a sharded checkpoint, its width (and
    block) scores in one pass, the depth cut refitted block by block, every tensor sliced and written
    shard by shard: the same student, weight for weight, as the whole-model path; width alone and
    width with depth (by block scores, and by the iterative search, each removal's candidates walked
    block by block)."""
    config = WIDTH_CONFIGS[kind]()
    fields = {k: v for k, v in config.to_dict().items() if k != "layer_types"}  # (rebuilt for 4 blocks)
    config = type(config)(**{**fields, "vocab_size": len(gpt2_tokenizer), "num_hidden_layers": 4})
    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    T.AutoModelForCausalLM.from_config(config).save_pretrained(teacher, max_shard_size="2MB")
    gpt2_tokenizer.save_pretrained(teacher)
    sizes = ["--hidden-size", "16", "--num-heads", "2"] if kind == "gpt2" else \
        ["--hidden-size", "24", "--intermediate-size", "40", "--num-heads", "2", "--num-kv-heads", "1"]
    common = ["prune", "--teacher", str(teacher), "--calib-data", "python-docs/tutorial", "--calib-tokens", "256",
              "--repair-data", "python-docs/tutorial", "--repair-tokens", "1024", *sizes]
    for depth in depths:
        students, records = {}, {}
        for mode in ("off", "on"):
            out = tmp_path / f"{mode}{len(depth)}"
            assert main([*common, *depth, "--sequential", mode, "--output", str(out)]) == 0
            students[mode] = T.AutoModelForCausalLM.from_pretrained(out).state_dict()
            records[mode] = json.loads((out / "lmshrink.json").read_text())
        assert records["on"]["path"] == "sequential" and "path" not in records["off"]
        for key in ("kept_layers", "kept_hidden", "kept_heads", "kept_kv_heads", "kept_mlp", "parameters"):
            assert records["on"][key] == records["off"][key], key
        assert ("repair" in records["on"]) == bool(depth)
        assert students["on"].keys() == students["off"].keys()
        for name, tensor in students["off"].items():
            torch.testing.assert_close(students["on"][name], tensor, rtol=1e-5, atol=1e-6)
    if kind == "llama":  # the bias repair's new tensors are not sliced block by block: refused before any work
        out = tmp_path / "bias"
        assert main([*common, "--num-layers", "3", "--repair", "bias", "--sequential", "on", "--output", str(out)]) == 2
        assert "the bias repair adds tensors" in capsys.readouterr().err and not (out / "model.safetensors").exists()
