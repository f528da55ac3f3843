"""`lmshrink export`: GGUF files that give the source model's logits back, by the gguf reader, by
transformers' GGUF loader (lmshrink's `.gguf` path) and, where llama-cpp-python is installed, by
llama.cpp itself."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import transformers as T
from conftest import TINY_CONFIGS

from lmshrink.cli import main as lmshrink
from lmshrink.export import llamacpp
from lmshrink.export.gguf import (
    FAMILIES,
    ExportError,
    export_problems,
    pre_tokenizer_name,
    read_metadata,
    read_tensors,
    sliding_window_note,
    tensors,
    write_gguf,
)
from lmshrink.models import load

SAMPLE = "Hello world! The export keeps 12 tokens, spaces  and\nnew lines; café costs 3.50."

# Relative RMS error of the logits a file gives back, by type: exact for f32, close for 16- and
# 8-bit types, bounded for 5- and 4-bit ones (tiny random models: every weight matters).
TOLERANCE = {"f32": 1e-6, "f16": 5e-3, "bf16": 3e-2, "q8_0": 3e-2, "q5_1": 0.1, "q5_0": 0.1, "q4_1": 0.2,
             "q4_0": 0.2}


def exportable(kind: str, vocab: int, n_layers: int = 2):
    """A tiny model of a family lmshrink exports, with GPT-2's vocabulary. The read-back checks go
    through transformers' GGUF loader, which takes GPT-2's context and Qwen3's head size from its
    own defaults, so those (and Gemma 3's attention scale) are set to the defaults here; no sliding window (see
    `sliding_window_note`)."""
    config = TINY_CONFIGS[kind](n_layers)
    config.vocab_size = vocab
    if kind == "gpt2":
        config.n_positions = 1024
    if kind == "qwen3":
        config.head_dim = 128
    if kind in ("mistral", "qwen2", "gemma2", "gemma3_text"):
        config.sliding_window = 4096
    if kind in ("gemma2", "gemma3_text"):  # llama.cpp's gemma graphs scale attention by 1/sqrt(head_dim), as the
        config.head_dim = config.query_pre_attn_scalar = 256  # real models do; transformers' reader assumes 256
        # transformers' GGUF reader knows only the every-sixth pattern (llama.cpp reads each block's
        # kind: `test_llamacpp_runs_gemma3_with_each_blocks_own_attention_kind`)
        config.layer_types = ["sliding_attention"] * n_layers
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def bpe(real_text):
    """A small byte-level BPE tokenizer (GPT-2's kind) trained on real English, so files and their
    read-backs stay small (a 50k-token vocabulary takes transformers' GGUF reader ~15 s a file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train([str(real_text)], trainer)
    return T.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def read_back_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a GGUF file as transformers' GGUF loader reads it back."""
    back = T.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return back(ids).logits


@pytest.fixture(scope="module")
def sample_ids(bpe) -> torch.Tensor:
    return torch.tensor([bpe(SAMPLE)["input_ids"]])


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_each_family_reads_back_with_its_logits(kind, tmp_path, bpe, sample_ids):
    model = exportable(kind, len(bpe))
    with torch.no_grad():
        want = model(sample_ids).logits
    for quant in ("f32", "q8_0", "q4_0"):
        path = tmp_path / f"m-{quant}.gguf"
        write_gguf(model, bpe, path, quant, "m")
        got = read_back_logits(path, sample_ids)
        assert relative_error(want, got) < bound(kind, quant), (kind, quant, relative_error(want, got))


def bound(kind: str, quant: str) -> float:
    """The tolerance of a file type; Gemma's random 32-wide models: each sub-layer's output is normed,
    so 4-bit noise in a small weight is scaled up to the size of a large one (f32 is exact, q8_0
    within its bound)."""
    return 0.3 if kind.startswith("gemma") and quant == "q4_0" else TOLERANCE[quant]


def test_every_type_is_within_its_tolerance_and_f32_is_exact_by_the_gguf_reader(tmp_path, bpe,
                                                                                  sample_ids):
    model = exportable("llama", len(bpe))
    with torch.no_grad():
        want = model(sample_ids).logits
    errors = {}
    for quant in TOLERANCE:
        path = tmp_path / f"m-{quant}.gguf"
        info = write_gguf(model, bpe, path, quant, "m")
        errors[quant] = relative_error(want, read_back_logits(path, sample_ids))
        assert errors[quant] < TOLERANCE[quant], (quant, errors[quant])
        if quant not in ("f32", "f16", "bf16", "q8_0"):  # the embedding is kept at q8_0 under 4/5-bit types
            assert info["tensor_types"]["Q8_0"] == 1 and info["tensor_types"][quant.upper()] > 0
    assert errors["f32"] < errors["q8_0"] < errors["q4_0"]
    # the gguf reader: every tensor of the f32 file is the source tensor, in llama.cpp's layout
    stored = read_tensors(tmp_path / "m-f32.gguf")
    expected = {gguf_name: array() for _, gguf_name, _, array in tensors(model, FAMILIES["llama"])}
    assert stored.keys() == expected.keys()
    for name, data in expected.items():
        np.testing.assert_array_equal(stored[name], data)


def test_lmshrink_loads_the_file_and_its_tokenizer_encodes_the_same(tmp_path, bpe, sample_ids,
                                                                   monkeypatch):
    model = exportable("gpt2", len(bpe))
    path = tmp_path / "m-F16.gguf"
    write_gguf(model, bpe, path, "f16", "m")
    monkeypatch.setenv("LMSHRINK_CACHE", str(tmp_path / "cache"))
    loaded = load(str(path))
    assert loaded.tokenizer(SAMPLE)["input_ids"] == bpe(SAMPLE)["input_ids"]
    with torch.no_grad():
        assert relative_error(model(sample_ids).logits, loaded.model(sample_ids).logits) < TOLERANCE["f16"]


def test_cli_writes_files_card_and_provenance_and_a_rerun_keeps_them(tiny_gpt2_dir, tmp_path):
    student = tmp_path / "student"
    assert lmshrink(["truncate", "--teacher", str(tiny_gpt2_dir), "--output", str(student), "--keep", "0,3",
                     "--repair", "none"]) == 0
    out = tmp_path / "gguf"
    assert lmshrink(["export", "--model", str(student), "--output", str(out), "--quant", "q8_0,q4_0"]) == 0
    files = sorted(p.name for p in out.glob("*.gguf"))
    assert files == ["student-Q4_0.gguf", "student-Q8_0.gguf"]
    meta = read_metadata(out / "student-Q8_0.gguf")
    assert meta["general.architecture"] == "gpt2" and meta["gpt2.block_count"] == 2
    assert list(meta["lmshrink.kept_layers"]) == [0, 3]
    assert json.loads(meta["lmshrink.record"])["command"] == "truncate"
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.model"] == "gpt2"
    record = json.loads((out / "export.json").read_text())
    assert set(record["files"]) == set(files)
    card = (out / "README.md").read_text()
    assert all(f"| {f} |" in card for f in files)
    mtime = (out / "student-Q8_0.gguf").stat().st_mtime_ns
    assert lmshrink(["export", "--model", str(student), "--output", str(out), "--quant", "q8_0,f16"]) == 0
    assert (out / "student-Q8_0.gguf").stat().st_mtime_ns == mtime  # kept, not rewritten
    assert set(json.loads((out / "export.json").read_text())["files"]) == {*files, "student-F16.gguf"}
    assert not list(out.glob(".*.tmp*"))  # atomic writes leave no temporary files


def test_cli_refuses_with_the_reason(tiny_gpt2_dir, tmp_path, capsys):
    assert lmshrink(["export", "--model", str(tiny_gpt2_dir), "--output", str(tmp_path / "o"),
                     "--quant", "q4_k_m"]) == 2
    assert "llama-quantize" in capsys.readouterr().err
    folder = tmp_path / "smollm3"
    tokenizer = T.AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    config = TINY_CONFIGS["smollm3"](2)  # its no-RoPE layer list: not written yet
    config.vocab_size = len(tokenizer)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert lmshrink(["export", "--model", str(folder), "--quant", "f16"]) == 2
    err = capsys.readouterr().err
    assert "smollm3 models cannot be exported to GGUF" in err and "Traceback" not in err
    assert not (folder / "gguf").exists()


def test_pre_tokenizer_names_come_from_the_tokenizer_structure():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert pre_tokenizer_name({"pre_tokenizer": smollm}) == "smollm"
    odd = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "x"}}, byte_level]}
    assert pre_tokenizer_name({"pre_tokenizer": odd}) is None


def test_a_space_before_the_text_is_written_only_where_the_tokenizer_puts_one():
    from lmshrink.export.gguf import adds_space_prefix

    gemma = {"normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
             "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious"}}
    llama2 = {"normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                                 {"type": "Replace"}]}}
    metaspace = {"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"}}
    never = {"pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "never"}}
    assert not adds_space_prefix(gemma) and adds_space_prefix(llama2) and adds_space_prefix(metaspace)
    assert not adds_space_prefix(never)


def test_sentencepiece_scores_make_llama_cpp_merge_in_the_tokenizers_order():
    """llama.cpp merges the pair whose result scores highest: minus the merge's rank, the first
    merge making a token (string and pair forms of tokenizer.json's merges)."""
    from lmshrink.export.gguf import merge_scores

    vocab = {"a": 0, "b": 1, "ab": 2, "abb": 3, "bb": 4}
    assert merge_scores({"model": {"vocab": vocab, "merges": ["a b", "ab b", "b b", "a bb"]}}) == {2: 0.0, 3: -1.0, 4: -2.0}
    assert merge_scores({"model": {"vocab": vocab, "merges": [["b", "b"], ["a", "b"]]}}) == {4: 0.0, 2: -1.0}


def test_unknown_pre_tokenizer_asks_for_the_name(tmp_path, bpe):
    from tokenizers import Regex, pre_tokenizers

    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(bpe.backend_tokenizer))
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\d+|\D+"), behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=False)])
    model = exportable("llama", len(bpe), 1)
    with pytest.raises(ExportError, match="--pre-tokenizer"):
        write_gguf(model, tokenizer, tmp_path / "m.gguf", "f16", "m")
    assert not (tmp_path / "m.gguf").exists()
    write_gguf(model, tokenizer, tmp_path / "m.gguf", "f16", "m", pre="gpt-2")
    assert read_metadata(tmp_path / "m.gguf")["tokenizer.ggml.pre"] == "gpt-2"


def test_eval_runtime_llamacpp_refuses_what_it_cannot_run(tiny_gpt2_dir, capsys):
    assert lmshrink(["eval", "--models", str(tiny_gpt2_dir), "--runtime", "llamacpp"]) == 2
    assert ".gguf" in capsys.readouterr().err


needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed "
                                                                     "(make llamacpp)")


@needs_llamacpp
@pytest.mark.parametrize("kind", ["llama", "qwen3", "gpt2", "gemma2"])
def test_llamacpp_runs_the_file_with_the_source_logits_and_tokens(kind, tmp_path, bpe, sample_ids):
    model = exportable(kind, len(bpe))
    with torch.no_grad():
        want = model(sample_ids).logits
    for quant in ("f32", "q8_0", "q4_0"):
        path = tmp_path / f"m-{quant}.gguf"
        write_gguf(model, bpe, path, quant, "m")
        llm = llamacpp.open_gguf(path, n_ctx=64, threads=1)
        assert llamacpp.Tokenizer(llm)(SAMPLE)["input_ids"] == sample_ids[0].tolist()
        got = llamacpp.logits(llm)(sample_ids)
        # llama.cpp keeps its KV cache in f16: an f32 file agrees to 1e-3, not exactly
        assert relative_error(want, got) < max(bound(kind, quant), 1e-3), (kind, quant, relative_error(want, got))


@needs_llamacpp
def test_llamacpp_runs_gemma3_with_each_blocks_own_attention_kind(tmp_path, bpe, sample_ids):
    """A cut Gemma 3 keeps each block's own kind (here full, then sliding over 4 tokens: not the
    teacher's every-sixth pattern): llama.cpp reads them from the file and gives the same logits."""
    config = TINY_CONFIGS["gemma3_text"](2)
    config.vocab_size, config.sliding_window, config.layer_types = len(bpe), 4, ["full_attention", "sliding_attention"]
    config.query_pre_attn_scalar = config.head_dim
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        want = model(sample_ids).logits
    path = tmp_path / "g.gguf"
    write_gguf(model, bpe, path, "f32", "g")
    assert read_metadata(path)["gemma3.attention.sliding_window_pattern"] == [False, True]
    got = llamacpp.logits(llamacpp.open_gguf(path, n_ctx=64, threads=1))(sample_ids)
    assert sample_ids.shape[1] > 4 and relative_error(want, got) < 1e-3, relative_error(want, got)


def tiny_gemma2(vocab: int, kinds: list[str]):
    """A Gemma 2 whose soft caps bite: attention scores capped at 1, logits at 2 (the real model's are
    50 and 30); its sliding window covers 4 tokens."""
    config = TINY_CONFIGS["gemma2"](len(kinds))
    config.vocab_size, config.sliding_window, config.layer_types = vocab, 4, kinds
    config.query_pre_attn_scalar = config.head_dim
    config.attn_logit_softcapping, config.final_logit_softcapping = 1.0, 2.0
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config).eval()


@needs_llamacpp
def test_llamacpp_runs_gemma2_with_its_soft_caps_and_windows(tmp_path, bpe, sample_ids):
    model = tiny_gemma2(len(bpe), ["sliding_attention", "full_attention"])
    with torch.no_grad():
        want = model(sample_ids).logits
    assert want.abs().max() < 2 and want.std() > 0.1  # the final cap shapes these logits
    path = tmp_path / "g.gguf"
    write_gguf(model, bpe, path, "f32", "g")
    meta = read_metadata(path)
    assert (meta["gemma2.attn_logit_softcapping"], meta["gemma2.final_logit_softcapping"]) == (1.0, 2.0)
    got = llamacpp.logits(llamacpp.open_gguf(path, n_ctx=64, threads=1))(sample_ids)
    assert sample_ids.shape[1] > 4 and relative_error(want, got) < 1e-3, relative_error(want, got)


def test_a_cut_gemma2_whose_blocks_do_not_alternate_is_exported_with_a_note(tmp_path, bpe):
    """llama.cpp's gemma2 slides blocks 0, 2, ...: a cut that kept two full-attention blocks in a row
    runs there as the source model only up to the window; the export says so. A model llama.cpp
    would scale or cap differently is refused."""
    assert sliding_window_note(tiny_gemma2(len(bpe), ["sliding_attention", "full_attention"]).config) is None
    config = tiny_gemma2(len(bpe), ["full_attention", "full_attention"]).config
    note = sliding_window_note(config)
    assert "blocks 0 are of the other kind" in note and "up to 4 tokens" in note
    assert export_problems(config) == []
    config.query_pre_attn_scalar = 144
    assert "query_pre_attn_scalar" in export_problems(config)[0]
    config.query_pre_attn_scalar, config.final_logit_softcapping = config.head_dim, None
    assert "soft-caps" in export_problems(config)[0]


@needs_llamacpp
def test_eval_runtime_llamacpp_end_to_end(tiny_gpt2_dir, tmp_path, real_text):
    out = tmp_path / "gguf"
    assert lmshrink(["export", "--model", str(tiny_gpt2_dir), "--output", str(out), "--quant", "f32"]) == 0
    file = str(out / "tiny-gpt2-F32.gguf")
    report = tmp_path / "eval"
    assert lmshrink(["eval", "--models", file, "--runtime", "llamacpp", "--data", str(real_text), "--max-tokens",
                     "300", "--window", "64", "--stride", "32", "--speed-length", "32", "--gen-tokens", "4",
                     "--repeats", "1", "--output", str(report)]) == 0
    row = json.loads((report / "report.json").read_text())["rows"][0]
    assert assert_close_ppl(row, tiny_gpt2_dir, real_text)
    assert row["tokens_per_s"] > 0 and row["generate_tokens_per_s"] > 0


def assert_close_ppl(row, folder, text) -> bool:
    """llama.cpp's perplexity of the f32 file is transformers' of the folder (same windows, same tokens)."""
    from lmshrink.data.sources import Framing, token_stream
    from lmshrink.evaluate.perplexity import perplexity

    loaded = load(str(folder))
    reference = perplexity(loaded.model, token_stream(str(text), loaded.tokenizer, 300), 64, 32,
                           framing=Framing.of(loaded.tokenizer))
    return abs(row["perplexity"][str(text)] / reference - 1) < 1e-3


@needs_llamacpp
def test_eval_perplexity_of_a_file_whose_tokenizer_adds_a_start_token_is_llama_cpps(tmp_path, bpe, real_text):
    """A tokenizer that puts <bos> before every text: eval frames every window with it through
    either runtime, and llama.cpp's perplexity of the f32 file is transformers' of the folder."""
    from conftest import framed_tokenizer

    from lmshrink.data.sources import Framing, token_stream
    from lmshrink.evaluate.perplexity import perplexity

    tokenizer = framed_tokenizer(bpe, ["<bos>"])
    tokenizer.bos_token = "<bos>"
    model = exportable("llama", len(tokenizer))
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = tmp_path / "m-f32.gguf"
    write_gguf(model, tokenizer, path, "f32", "m")
    llm = llamacpp.open_gguf(path, n_ctx=128, threads=1)
    framing = Framing.of(llamacpp.Tokenizer(llm))
    assert framing.start == Framing.of(tokenizer).start == (tokenizer.convert_tokens_to_ids("<bos>"),)
    stream = token_stream(str(real_text), tokenizer, 300)
    want = perplexity(model, stream, 64, 64, framing=Framing.of(tokenizer))
    got = perplexity(llamacpp.logits(llm), stream, 64, 64, batch_size=1, framing=framing)
    assert abs(got / want - 1) < 0.02 and want != perplexity(model, stream, 64, 64, framing=Framing())


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3_text"])
def test_a_model_read_one_tensor_at_a_time_exports_the_same_file(kind, tmp_path, bpe):
    """--sequential on (the model on the meta device, each tensor read from its safetensors as it is
    written): every tensor of the file is the whole-model export's, for every quantization."""
    model = exportable(kind, len(bpe))
    folder = tmp_path / "m"
    model.save_pretrained(folder, max_shard_size="50KB")
    bpe.save_pretrained(folder)
    for mode in ("off", "on"):
        assert lmshrink(["export", "--model", str(folder), "--output", str(tmp_path / mode), "--quant", "f32,q8_0",
                         "--sequential", mode, "--name", "m"]) == 0
    assert json.loads((tmp_path / "on" / "export.json").read_text())["path"] == "sequential"
    for quant in ("F32", "Q8_0"):
        whole, lazy = (read_tensors(tmp_path / mode / f"m-{quant}.gguf") for mode in ("off", "on"))
        assert whole.keys() == lazy.keys()
        for name, data in whole.items():
            np.testing.assert_array_equal(lazy[name], data)


@needs_llamacpp
def test_llama3_rope_scaling_is_written_as_llama_cpps_frequency_factors(tmp_path, bpe, sample_ids):
    """Llama 3.x scale RoPE (`rope_type: llama3`): the file carries the factors as llama.cpp's
    `rope_freqs` tensor, and llama.cpp gives the source's logits (which the unscaled RoPE does not)."""
    config = TINY_CONFIGS["llama"](2)
    config.vocab_size, config.max_position_embeddings, config.initializer_range = len(bpe), 256, 0.3  # sharp attention
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    plain = copy.deepcopy(config)
    plain.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    unscaled = T.AutoModelForCausalLM.from_config(plain).eval()
    unscaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        want, other = model(sample_ids).logits, unscaled(sample_ids).logits
    assert (apart := relative_error(want, other)) > 1e-2  # the scaling matters at these positions
    assert export_problems(config) == []
    path = tmp_path / "l3.gguf"
    write_gguf(model, bpe, path, "f32", "l3")
    assert read_tensors(path)["rope_freqs.weight"].shape == (config.head_dim // 2,)
    got = llamacpp.logits(llamacpp.open_gguf(path, n_ctx=64, threads=1))(sample_ids)
    # llama.cpp's f16 KV cache costs these sharp logits ~2e-3; a missing or wrong scaling costs `apart`
    assert relative_error(want, got) < min(5e-3, apart / 5), (relative_error(want, got), apart)
