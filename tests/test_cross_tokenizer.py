"""Distillation from a teacher with another tokenizer: the alignment of the two tokenisations, ULD,
and `lmshrink distill --loss uld` end to end."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from lmshrink.cli import main
from lmshrink.data.assets import corpus_path
from lmshrink.data.sources import Framing
from lmshrink.heal.cross_tokenizer import NO_POSITION, pair_block

TEXT = (corpus_path("python-docs/tutorial") / "introduction.rst.txt").read_text()


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """A tokenizer unlike GPT-2's on every count: a 400-token BPE trained here on the tutorial, spaces
    as a `▁` that starts a word (SentencePiece's, as Gemma's and Llama 2's), a `<bos>` before every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<bos>", "<eos>", "<pad>"]))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                     unk_token="<unk>")


def blocks(tokenizer, length: int = 64) -> list[list[int]]:
    """Two documents packed as lmshrink packs them (EOS after each), cut into blocks."""
    ids = [t for doc in (TEXT[:2500], TEXT[2500:5000]) for t in [*tokenizer(doc)["input_ids"], tokenizer.eos_token_id]]
    return [ids[k : k + length] for k in range(0, len(ids) - length, length)]


@pytest.mark.parametrize("direction", ["gpt2 <- metaspace", "metaspace <- gpt2"])
def test_aligned_positions_have_read_exactly_the_same_text(direction, gpt2_tokenizer, metaspace_tokenizer):
    """Two tokenizers that split the same text differently (and one adds <bos>): at every aligned pair
    of positions, the text each model has read so far is the same, the teacher's block is the same text
    in its own framing, and most positions are aligned."""
    student, teacher = ((gpt2_tokenizer, metaspace_tokenizer) if direction.startswith("gpt2")
                        else (metaspace_tokenizer, gpt2_tokenizer))
    aligned = total = 0
    for block in blocks(student):
        row = pair_block(block, student, teacher, 3 * len(block))
        assert len(row["teacher_ids"]) == 3 * len(block) and len(row["align_student"]) == len(block)
        pairs = [(s, t) for s, t in zip(row["align_student"], row["align_teacher"], strict=True) if s != NO_POSITION]
        assert pairs == sorted(pairs) and len({s for s, _ in pairs}) == len(pairs)
        for s, t in pairs:
            assert (student.decode(block[: s + 1], skip_special_tokens=True)
                    == teacher.decode(row["teacher_ids"][: t + 1], skip_special_tokens=True))
        assert (student.decode(block, skip_special_tokens=True).replace(" ", "")
                == teacher.decode(row["teacher_ids"], skip_special_tokens=True).replace(" ", ""))
        aligned, total = aligned + len(pairs), total + len(block)
    assert aligned / total > 0.5  # the finer tokenizer ends a token wherever the coarser one does, most often
    # the teacher reads each block in its own framing: its start token first (none for GPT-2's), its EOS
    # where the student's was
    start = Framing.of(teacher).start
    for block in blocks(student):
        row = pair_block(block, student, teacher, 3 * len(block))["teacher_ids"]
        assert tuple(row[: len(start)]) == start
        if teacher.pad_token_id not in (None, teacher.eos_token_id):  # (GPT-2's pads with EOS, where set at all)
            assert row.count(teacher.eos_token_id) == block.count(student.eos_token_id)


def test_a_teacher_with_another_tokenizer_distils_with_uld_and_other_losses_are_refused(
        tiny_gpt2_dir, metaspace_tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    config = T.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                           intermediate_size=64, vocab_size=len(metaspace_tokenizer), max_position_embeddings=512)
    T.LlamaForCausalLM(config).save_pretrained(teacher)
    metaspace_tokenizer.save_pretrained(teacher)
    common = ["distill", "--model", str(tiny_gpt2_dir), "--teacher", str(teacher), "--data", "python-docs/tutorial",
              "--heldout", "0.2", "--eval-tokens", "512", "--block-size", "64", "--batch-size", "2", "--max-steps", "2",
              "--logging-steps", "1", "--alpha-cos", "0", "--report-to", "none"]
    assert main([*common, "--output", str(tmp_path / "kl")]) == 2
    err = capsys.readouterr().err
    assert "use --loss uld" in err and "Traceback" not in err
    out = tmp_path / "run"
    assert main([*common, "--output", str(out), "--loss", "uld", "--temperature", "1"]) == 0
    said = capsys.readouterr().out
    assert "the teacher reads each block in its own tokens" in said and "distilled there (ULD)" in said
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(x["kd"] > 0 and x["ce"] > 0 for x in logged if "loss" in x)
    record = json.loads((out / "lmshrink.json").read_text())
    assert record["cross_tokenizer"] is True and record["metrics"]["steps"] == 2
