"""`eval` runs a student's first blocks only where they differ from a model scored before it."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from conftest import VOCAB, tiny_model

from lmshrink.architectures import blocks_of
from lmshrink.cli import main
from lmshrink.compress.truncation import truncate_model
from lmshrink.data.sources import Framing
from lmshrink.evaluate.perplexity import sliding_nll
from lmshrink.evaluate.shared_blocks import SharedBlocks, chain_of

# each student: the blocks it keeps, and the blocks it shares with the teacher from the first on
STUDENTS = {"cut after 3": ([0, 1, 2, 4], 3), "bottom": ([0, 1, 2, 3], 4), "no first block": ([1, 2, 3, 4], 0)}


@pytest.mark.parametrize("kind", ["gpt2", "gemma3_text"])
def test_students_start_where_they_leave_the_teacher_and_score_the_same(kind, tmp_path):
    teacher = tiny_model(kind, 6)
    folders = [tmp_path / "teacher"]
    teacher.save_pretrained(folders[0])
    for name, (keep, _) in STUDENTS.items():
        truncate_model(teacher, keep).save_pretrained(tmp_path / name)
        folders.append(tmp_path / name)
    trained = truncate_model(teacher, [0, 1, 2, 4])  # its second block trained: it shares the first alone
    with torch.no_grad():
        next(blocks_of(trained)[1].parameters()).add_(1e-3)
    trained.save_pretrained(tmp_path / "trained")
    folders.append(tmp_path / "trained")

    models = [T.AutoModelForCausalLM.from_pretrained(f).eval() for f in folders]
    shared = SharedBlocks([chain_of(str(f), m.config, "float32") for f, m in zip(folders, models, strict=True)])
    assert shared.start == [0, *(k for _, k in STUDENTS.values()), 1]

    tokens = torch.randint(3, VOCAB, (150,), generator=torch.Generator().manual_seed(0))
    framing = Framing(start=(1,)) if kind == "gemma3_text" else Framing()  # Gemma's tokenizer adds <bos>
    alone = [sliding_nll(m, tokens, 32, 16, batch_size=3, framing=framing) for m in models]
    runs = [0] * len(models)  # passes through each model's first block
    for i, model in enumerate(models):
        blocks_of(model)[0].register_forward_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
        with shared.scoring(model, i):
            assert sliding_nll(model, tokens, 32, 16, batch_size=3, framing=framing) == alone[i]
        shared.done(i)
    assert runs[1] == runs[2] == runs[4] == 0 and runs[0] > 0 and runs[3] > 0  # none where a student starts later
    assert not shared.streams and shared.kept_bytes == 0  # dropped once no later model needs them


def test_eval_shares_the_teachers_blocks_and_reports_what_separate_runs_do(tiny_gpt2_dir, real_text, tmp_path, capsys):
    teacher = T.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    student = tmp_path / "student"
    truncate_model(teacher, [0, 1, 3]).save_pretrained(student)
    T.AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(student)
    common = ["eval", "--data", str(real_text), "--window", "64", "--stride", "32", "--max-tokens", "300",
              "--no-speed", "--tasks", "arc_easy", "--limit", "3"]
    assert main([*common, "--models", f"{tiny_gpt2_dir},{student}", "--output", str(tmp_path / "both")]) == 0
    assert "student: its first 2 blocks are those of a model scored before it" in capsys.readouterr().err
    assert main([*common, "--models", str(student), "--output", str(tmp_path / "alone")]) == 0
    both, alone = (json.loads((tmp_path / o / "report.json").read_text())["rows"] for o in ("both", "alone"))
    assert both[1]["perplexity"] == alone[0]["perplexity"]
    assert both[1]["tasks"]["arc_easy"]["per_item"] == alone[0]["tasks"]["arc_easy"]["per_item"]
