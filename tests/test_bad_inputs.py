"""Every command, fed what a new user feeds it by mistake: exit code 2, one clear message naming
the problem (no traceback), and no output that looks complete but is not."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from lmshrink.cli import main


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_gpt2_dir, gpt2_tokenizer):
    """Bad files and model folders, by name."""
    root = tmp_path_factory.mktemp("bad")
    (root / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (root / "latin1.txt").write_bytes("Café crème, déjà vu: naïve façade à la française.".encode("latin-1"))
    (root / "empty.txt").write_text("")
    (root / "null.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": None}) + "\n")
    (root / "list.jsonl").write_text(json.dumps(["not", "an", "object"]) + "\n")
    (root / "malformed.yaml").write_text("output: [unclosed\n  keep: 0\n")
    (root / "unknown.yaml").write_text("output: x\nnum_layer: 4\n")
    (root / "types.yaml").write_text("output: x\nnum_layers: six\nratio: half\n")
    # a model folder whose weights are cut short, one without config.json, one without a tokenizer
    corrupt = root / "corrupt"
    T.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).save_pretrained(corrupt)
    weights = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    (root / "noconfig").mkdir()
    (root / "noconfig" / "model.safetensors").write_bytes(b"")
    T.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).save_pretrained(root / "notokenizer")
    # a 6-block student of a 4-block teacher: RAIL-KD cannot draw a distinct teacher layer for each
    torch.manual_seed(0)
    T.GPT2LMHeadModel(T.GPT2Config(n_layer=6, n_embd=32, n_head=2, n_positions=256)).save_pretrained(root / "deep")
    gpt2_tokenizer.save_pretrained(root / "deep")
    # issue #43: models that are not decoder-only causal LMs, GGUF files that are not whole, a
    # tokenizer whose ids run past the model's vocabulary, a file where a folder is written, labels
    # that only the held-out rows have
    small = dict(vocab_size=len(gpt2_tokenizer), hidden_size=32, num_attention_heads=2, intermediate_size=64)
    for name, model in (("bert", T.BertForMaskedLM(T.BertConfig(num_hidden_layers=1, **small))),
                        ("t5", T.T5ForConditionalGeneration(T.T5Config(vocab_size=len(gpt2_tokenizer), d_model=32,
                                                                      d_kv=16, d_ff=64, num_layers=1, num_heads=2))),
                        ("swapped", T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=1000)))):
        model.save_pretrained(root / name)
        gpt2_tokenizer.save_pretrained(root / name)
    (root / "random.gguf").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    import gguf

    writer = gguf.GGUFWriter(root / "half.gguf", "gpt2")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", torch.zeros(len(gpt2_tokenizer), 32).numpy())
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    whole = (root / "half.gguf").read_bytes()
    (root / "half.gguf").write_bytes(whole[: len(whole) // 2])
    (root / "afile").write_text("a file, not a folder\n")
    (root / "labels.csv").write_text("text,label\n" + "".join(f"row {i},class{i}\n" for i in range(20)))
    return root


# (command and arguments, what the message must say); {bad}, {model}, {out} are filled in
CASES = [
    (["truncate", "--teacher", "{bad}/missing", "--keep", "0"], "does not exist"),
    (["truncate", "--teacher", "{bad}/corrupt", "--keep", "0"], "are damaged (model.safetensors: its tensors need"),
    (["truncate", "--teacher", "{bad}/t5", "--keep", "0"], "is an encoder-decoder model (t5)"),
    (["eval", "--models", "{bad}/t5", "--data", "python-docs/tutorial"], "is an encoder-decoder model (t5)"),
    (["eval", "--models", "{bad}/bert", "--data", "python-docs/tutorial"], "is an encoder-only model (bert)"),
    (["pretrain", "--model", "{bad}/bert", "--data", "python-docs/tutorial"], "is an encoder-only model (bert)"),
    (["distill", "--model", "{model}", "--teacher", "{bad}/bert", "--data", "python-docs/tutorial"],
     "is an encoder-only model (bert)"),
    (["eval", "--models", "{model},{bad}/random.gguf", "--data", "python-docs/tutorial"],
     "random.gguf: not a GGUF file (it does not start with the GGUF magic bytes)"),
    (["truncate", "--teacher", "{bad}/half.gguf", "--keep", "0"], "half.gguf: not a whole GGUF file"),
    (["truncate", "--teacher", "{bad}/swapped", "--keep", "0"], "ids 1,000-50,256 would index past the embedding"),
    (["eval", "--models", "{bad}/swapped", "--data", "python-docs/tutorial"], "would index past the embedding"),
    (["export", "--model", "{model}", "--output", "{bad}/afile"], "afile is a file, and this is the folder"),
    (["generate", "--teacher", "{model}", "--output", "{bad}/afile"], "afile is a file, and this is the folder"),
    (["truncate", "--teacher", "{model}", "--keep", "0", "--output", "{bad}/afile/student"],
     "afile is a file, so"),
    (["finetune", "--model", "{model}", "--task", "file", "--train-file", "{bad}/labels.csv"],
     "labels.csv: labels ['class"),
    (["truncate", "--teacher", "{bad}/noconfig", "--keep", "0"], "no config.json"),
    (["truncate", "--teacher", "{model}", "--keep", "0,9"], "out of range"),
    (["truncate", "--teacher", "{model}", "--num-layers", "0"], "num_layers"),
    (["truncate", "--teacher", "{bad}/notokenizer", "--strategy", "importance", "--num-layers", "2"],
     "no usable tokenizer"),
    (["truncate", "--teacher", "{bad}/notokenizer", "--keep", "0,3"], "or cut without a repair: --repair none"),
    (["truncate", "--teacher", "{model}", "--keep", "0,3", "--repair", "bias", "--repair-fit", "both"],
     "repair_fit: 'both' is unknown"),
    (["truncate", "--teacher", "{model}", "--keep", "0,3", "--repair-data", "{bad}/binary.txt"], "binary"),
    (["truncate", "--teacher", "{model}", "--keep", "0,3", "--repair", "none", "--repair-epochs", "2"],
     "--repair none fits none"),
    (["truncate", "--teacher", "{model}", "--keep", "0,3", "--repair-downstream", "--repair-fit", "teacher"],
     "on the student's own stream"),
    (["truncate", "--teacher", "{model}", "--strategy", "importance", "--num-layers", "2", "--scores",
      "{bad}/missing.json"], "run `lmshrink score-layers` first"),
    (["truncate", "--teacher", "{model}", "--strategy", "importance", "--num-layers", "2", "--scores",
      "{bad}/malformed.yaml"], "is not valid JSON"),
    (["truncate", "--teacher", "{model}", "--strategy", "importance", "--num-layers", "2", "--scores",
      "{bad}/list.jsonl"], "is not a score-layers output (no block_influence, num_layers)"),
    (["truncate", "--config", "{bad}/malformed.yaml"], "not valid YAML"),
    (["truncate", "--config", "{bad}/unknown.yaml"], "unknown setting(s) 'num_layer'"),
    (["truncate", "--config", "{bad}/types.yaml"], "ratio: 'half'"),
    (["truncate", "--config", "{bad}/missing.yaml"], "does not exist"),
    (["score-layers", "--model", "{model}", "--data", "{bad}/binary.txt", "--seq-len", "64"], "binary"),
    (["score-layers", "--model", "{model}", "--data", "{bad}/latin1.txt", "--seq-len", "64"], "not UTF-8"),
    (["score-layers", "--model", "{model}", "--seq-len", "512"], "exceed the model's context of 256"),
    (["eval", "--models", "{model}", "--data", "{bad}/empty.txt", "--no-speed", "--window", "64", "--stride", "32"], "no text"),
    (["eval", "--models", "{model}", "--data", "{bad}/null.jsonl", "--no-speed", "--window", "64", "--stride", "32"],
     "null.jsonl:2: 'text' is null"),
    (["eval", "--models", "{model}", "--data", "{bad}/list.jsonl", "--no-speed", "--window", "64", "--stride", "32"],
     "a JSON list"),
    (["eval", "--models", "{bad}/notokenizer", "--data", "{bad}/null.jsonl", "--no-speed", "--window", "64", "--stride", "32"],
     "no usable tokenizer"),
    (["eval", "--models", "{model}", "--tasks", "arc_easy,nope"], "'nope' unknown"),
    (["eval", "--models", "{model}", "--window", "1", "--stride", "0"], "stride"),
    (["pretrain", "--model", "{model}", "--data", "{bad}/missing.txt", "--block-size", "64"], "is not a file or folder"),
    (["pretrain", "--model", "{model}", "--data", "{bad}/binary.txt", "--block-size", "64"], "binary"),
    (["pretrain", "--model", "{model}", "--data", "python-docs/tutorial", "--block-size", "4096"], "block_size"),
    (["pretrain", "--model", "{model}", "--data", "{bad}/empty.txt", "--block-size", "64"], "empty.txt' is empty"),
    (["pretrain", "--model", "{model}", "--data", "python-docs/tutorial", "--lr", "-1"],
     "lr: the learning rate must be positive"),
    (["pretrain", "--model", "{model}", "--data", "python-docs/tutorial", "--adam-beta2", "1"],
     "adam_beta2: must be in [0, 1) (got 1)"),
    (["pretrain", "--model", "{model}", "--data", "python-docs/tutorial", "--max-steps", "2", "--max-tokens", "100"],
     "both bound the run's length"),
    (["pretrain", "--model", "{model}", "--data", "python-docs/tutorial", "--block-size", "64", "--freeze", "blocks:0-9"],
     "freeze: blocks:0-9 asks for block 9"),
    (["generate", "--teacher", "{model}", "--temperature", "0"], "temperature: must be positive"),
    (["generate", "--teacher", "{model}", "--top-p", "1.5"], "top_p: a probability mass in (0, 1]"),
    (["distill", "--model", "{model}", "--data", "python-docs/tutorial", "--recipe", "best"], "recipe: 'best' is unknown"),
    (["distill", "--model", "{model}", "--data", "python-docs/tutorial", "--clm-keep", "0"],
     "clm_keep: 0.0 is not a share of the tokens; give one in (0, 1]"),
    (["distill", "--model", "{model}", "--teacher-cache", "{bad}", "--clm-keep", "0.6"],
     "clm_keep: the selective CE ranks tokens by the teacher's own loss"),
    (["distill", "--model", "{model}", "--teacher-cache", "{bad}", "--local-steps", "5"],
     "the local stage needs the teacher's hidden states"),
    (["distill", "--model", "{model}", "--data", "python-docs/tutorial", "--local-blocks", "inside"],
     "local_blocks: 'inside' is not one of before, after, both"),
    (["generate", "--teacher", "{model}", "--prompts", "python-docs/tutorial", "--prompt-tokens", "100000"],
     "no document of 'python-docs/tutorial' has 100000 tokens"),
    (["distill", "--model", "{bad}/deep", "--teacher", "{model}", "--data", "python-docs/tutorial",
      "--layer-map", "rail", "--alpha-inter", "1", "--block-size", "64"], "RAIL-KD draws a distinct teacher layer"),
    (["distill", "--model", "{model}", "--teacher", "{model}", "--data", "python-docs/tutorial",
      "--layer-map", "kept", "--alpha-inter", "1", "--block-size", "64"], "'kept' needs a student made by lmshrink truncate"),
    (["distill", "--model", "{model}", "--teacher-cache", "{bad}", "--alpha-cos", "0", "--block-size", "64"],
     "not a teacher cache"),
    (["cache-teacher", "--teacher", "{bad}/missing", "--data", "python-docs/tutorial"], "does not exist"),
    (["cache-teacher", "--teacher", "{model}", "--data", "python-docs/tutorial", "--data-tokens", "512"],
     "give --max-tokens 512"),
    (["pretrain", "--model", "{model}", "--data", "python-docs/tutorial", "--block-size", "64", "--data-tokens", "10"],
     "data_tokens: at least one block (64 tokens); got 10"),
    (["finetune", "--model", "{model}", "--task", "file", "--train-file", "{bad}/missing.csv"], "does not exist"),
    (["finetune", "--model", "{model}", "--task", "file", "--train-file", "{bad}/latin1.txt"], "not UTF-8"),
    (["finetune", "--model", "{model}", "--task", "file", "--train-file", "{bad}/list.jsonl"], "not an object of columns"),
    (["finetune", "--model", "{model}", "--methods", "kd"], "need a fine-tuned teacher"),
    (["clean", "--data", "{bad}/missing-folder"], "missing-folder does not exist"),
    (["clean", "--data", "{bad}/empty.txt", "--workers", "0"], "workers"),
    (["clean", "--data", "{bad}/labels.csv", "--perplexity-model", "{bad}/bert"], "is an encoder-only model (bert)"),
    (["fetch", "--corpora", "nope", "--no-teacher", "--no-benchmarks"], "unknown corpus 'nope'"),
    (["demo", "--strategies", "nope"], "'nope' is unknown"),
    (["demo", "--repair-strategy", "alt"], "'alt' is unknown"),
    (["demo", "--max-tokens", "10"], "--max-tokens: this command has several; say which: --train.max-tokens"),
    (["prune", "--teacher", "{bad}/missing", "--num-heads", "1"], "does not exist"),
    (["prune", "--teacher", "{model}", "--num-heads", "3"], "hidden"),
    (["prune", "--teacher", "{model}", "--num-heads", "1", "--scores", "{bad}"], "holds no width_scores.json"),
    (["prune", "--teacher", "{model}", "--ratio", "1.5", "--axes", "diagonal"], "axes: 'diagonal'"),
    (["search", "--teacher", "{model}"], "target_params, ratio: give one of them"),
    (["search", "--teacher", "{model}", "--ratio", "0.5", "--alpha-cos", "1"], "alpha_cos, alpha_inter"),
    (["study", "--teacher", "{model}", "--questions", "everything"], "questions: everything unknown"),
    (["study", "--teacher", "{model}", "--seeds", "one"], "seeds: ['one'] is not a valid comma-separated list of int"),
    (["study", "--teacher", "{model}", "--lr", "1e-4"], "say which: --heal.lr, --finetune.lr"),
]


@pytest.mark.parametrize("args,message", CASES, ids=[" ".join(c[0][:1] + [a for a in c[0] if "{" in a][:1])
                                                      + f" #{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_clear_error(bad, tiny_gpt2_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    filled = [a.format(bad=bad, model=tiny_gpt2_dir, out=out) for a in args]
    if args[0] not in ("fetch",) and "--config" not in args and "--output" not in args:
        filled += ["--output", str(out)]
    assert main(filled) == 2
    err = capsys.readouterr().err
    assert f"lmshrink {args[0]}: error:" in err and "Traceback" not in err
    assert message in err, err
    assert not (out / "model").exists() and not (out / "report.md").exists() and not (out / "lmshrink.json").exists()


def test_two_runs_cannot_write_one_output_folder_at_once(tiny_gpt2_dir, tmp_path, capsys):
    """While a run holds its folder, a second run into it stops at once and touches nothing."""
    from lmshrink.records import exclusive

    out = tmp_path / "run"
    args = ["pretrain", "--model", str(tiny_gpt2_dir), "--data", "python-docs/tutorial", "--block-size", "64",
            "--max-steps", "1", "--report-to", "none", "--output", str(out)]
    with exclusive(out):  # the first run, still going
        assert main(args) == 2
        assert "being written by another lmshrink run (pid" in capsys.readouterr().err
        assert not (out / "model").exists() and not (out / "checkpoints").exists()
    assert main(args) == 0  # once it is done, the folder is free
    assert (out / "model" / "lmshrink.json").is_file()


def test_atomic_writes_leave_no_partial_file_and_ordinary_permissions(tmp_path):
    """A write that fails leaves the old file; a finished one is readable like any file the user makes."""
    import os

    from lmshrink.records import atomic_dir, atomic_file, write_text

    path = tmp_path / "report.md"
    write_text(path, "first")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["report.md"]
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    with atomic_dir(tmp_path / "model") as folder:
        (folder / "config.json").write_text("{}")
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~mask
