"""`lmshrink finetune`: teacher and students end to end for every method on the real sentiment
data (tiny models, a few dozen sentences), local CSV/JSONL tasks, the LM task, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from lmshrink.config import SettingsError, build
from lmshrink.heal.tasks import TASKS, item_scores, load_task, scores
from lmshrink.recipes.finetune import FinetuneSettings, run

SMALL = {"max_train_examples": 32, "max_eval_examples": 24, "epochs": 1, "batch_size": 8, "max_length": 48,
         "logging_steps": 2}


@pytest.fixture(scope="module")
def models(tmp_path_factory, gpt2_tokenizer):
    """A 4-block teacher, a 2-block student (GPT-2 vocabulary) and a 1-block masked-LM generator."""
    root = tmp_path_factory.mktemp("ft")
    for name, layers in (("teacher", 4), ("student", 2)):
        torch.manual_seed(0)
        model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=layers, n_embd=32, n_head=2, n_positions=128))
        model.save_pretrained(root / name)
        gpt2_tokenizer.save_pretrained(root / name)
    tok = T.AutoTokenizer.from_pretrained(gpt2_tokenizer.name_or_path)
    tok.add_special_tokens({"mask_token": "<mask>", "pad_token": "<pad>"})
    gen = T.BertForMaskedLM(T.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id))
    gen.save_pretrained(root / "generator")
    tok.save_pretrained(root / "generator")
    return root


@pytest.fixture(scope="module")
def teacher(models):
    out = models / "run-teacher"
    run(build(FinetuneSettings, {"model": str(models / "teacher"), "output": str(out), "seeds": [0], **SMALL}))
    return out / "none" / "seed-0" / "model"


def test_sentiment_task_is_real_balanced_and_split_once():
    s = build(FinetuneSettings, {"model": "x", "output": "o"})
    task, train, test = load_task(s)
    assert task is TASKS["sentiment"] and len(train) == 3200 and len(test) == 800
    assert {e["label"] for e in train} == {0, 1} and 0.4 < sum(e["label"] for e in train) / len(train) < 0.6
    assert not {e["text"] for e in train} & {e["text"] for e in test}


def test_teacher_then_every_method_over_two_seeds(models, teacher, capsys):
    out = models / "run-student"
    settings = build(FinetuneSettings, {"model": str(models / "student"), "output": str(out), "teacher": str(teacher),
                                        "generator": str(models / "generator"), "seeds": [1, 2], **SMALL,
                                        "methods": ["none", "kd", "annealing", "rail", "mate", "combined"]})
    summary = run(settings)
    rows = {r["method"]: r for r in summary["rows"]}
    assert list(rows) == ["none", "kd", "annealing", "rail", "mate", "combined"]
    for row in rows.values():
        assert row["seeds"] == [1, 2] and 0 <= row["accuracy"]["mean"] <= 1 and row["accuracy"]["std"] >= 0
        assert len(row["accuracy"]["values"]) == 2 and row["train_seconds"] > 0
        per_item = row["accuracy"]["per_item"]  # each test example right (1) or wrong (0), per seed
        assert [sum(x) / len(x) for x in per_item] == pytest.approx(row["accuracy"]["values"])
        assert all(len(x) == SMALL["max_eval_examples"] for x in per_item)
    assert set(summary["teacher"]) == {"accuracy", "f1"}
    record = json.loads((out / "mate" / "seed-2" / "model" / "lmshrink.json").read_text())
    assert record["method"] == "mate" and record["seed"] == 2 and record["train_examples"] == 32
    card = (out / "mate" / "seed-2" / "model" / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "# run-student-mate-seed-2" in card
    lines = [json.loads(x) for x in (out / "mate" / "seed-2" / "metrics.jsonl").read_text().splitlines()]
    assert any("kd_perturbed" in x and "generator_reward" in x for x in lines)  # the method's parts are logged
    report = (out / "report.md").read_text()
    assert json.loads((out / "lmshrink.json").read_text())["command"] == "finetune"
    assert "| teacher |" in report and "| combined |" in report and "Against `none`" in report
    assert (out / "report.png").stat().st_size > 5000
    # a second run finds every (method, seed) done and does not retrain
    stamp = (out / "kd" / "seed-1" / "model" / "lmshrink.json").stat().st_mtime
    capsys.readouterr()
    run(settings)
    assert "holds this run already, finished; nothing to do" in capsys.readouterr().out
    assert (out / "kd" / "seed-1" / "model" / "lmshrink.json").stat().st_mtime == stamp


def test_local_csv_pairs_with_class_names_and_jsonl_regression(models, tmp_path):
    rows = [("a fine day", "the sun shines", "entail"), ("a fine day", "it rains hard", "contradict"),
            ("the cat sleeps", "an animal rests", "entail"), ("the cat sleeps", "the cat runs", "contradict")] * 4
    csv = tmp_path / "pairs.csv"
    csv.write_text("premise,hypothesis,verdict\n" + "\n".join(",".join(r) for r in rows) + "\n")
    summary = run(build(FinetuneSettings, {"model": str(models / "student"), "output": str(tmp_path / "cls"), "task": "file",
                                           "train_file": str(csv), "text_columns": ["premise", "hypothesis"],
                                           "label_column": "verdict", "seeds": [0], **SMALL}))
    assert set(summary["rows"][0]) >= {"accuracy", "f1"}
    jsonl = tmp_path / "scores.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"sentence number {i}", "score": i / 7}) for i in range(24)) + "\n")
    summary = run(build(FinetuneSettings, {"model": str(models / "student"), "output": str(tmp_path / "reg"), "task": "file",
                                           "train_file": str(jsonl), "label_column": "score", "seeds": [0], **SMALL}))
    assert set(summary["rows"][0]) >= {"pearson", "spearman"}


def test_scores_only_runs_keep_no_weights_and_are_reused(models, tmp_path, capsys):
    """--no-save-models: each (method, seed) keeps its record and scores, no weights; a re-run reuses it."""
    csv = tmp_path / "s.csv"
    csv.write_text("text,label\n" + "\n".join(f"sentence {i} is {'good' if i % 2 else 'bad'},{i % 2}"
                                                for i in range(20)) + "\n")
    settings = {"model": str(models / "student"), "output": str(tmp_path / "f"), "task": "file", "train_file": str(csv),
                "seeds": [0], "save_models": False, **SMALL}
    first = run(build(FinetuneSettings, settings))
    folder = tmp_path / "f" / "none" / "seed-0"
    assert not (folder / "model").exists() and json.loads((folder / "lmshrink.json").read_text())["metrics"]
    capsys.readouterr()
    assert run(build(FinetuneSettings, settings))["rows"] == first["rows"]
    assert f"{folder} holds this run already, finished" in capsys.readouterr().out


def test_lm_task_reports_test_perplexity(models, real_text, tmp_path):
    summary = run(build(FinetuneSettings, {"model": str(models / "student"), "output": str(tmp_path / "lm"), "task": "lm",
                                           "teacher": str(models / "teacher"), "methods": ["none", "kd"], "seeds": [0],
                                           "data": [str(real_text)], "eval_data": [str(real_text)], "block_size": 64,
                                           "batch_size": 2, "epochs": 1, "logging_steps": 2}))
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"none", "kd"} and all(r["perplexity"]["mean"] > 1 for r in rows.values())


def test_glue_metrics_follow_the_conventions():
    logits = [[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]]
    assert scores(TASKS["cola"], logits, [0, 1, 0, 0]) == pytest.approx({"matthews": 0.5773502, "accuracy": 0.75})
    assert scores(TASKS["mrpc"], logits, [0, 1, 1, 0]) == {"f1": 1.0, "accuracy": 1.0}
    assert item_scores(TASKS["cola"], logits, [0, 1, 0, 0]) == {"accuracy": [1.0, 1.0, 0.0, 1.0]}
    assert item_scores(TASKS["stsb"], [[0.1], [0.4]], [0.0, 1.0]) == {}  # correlations are not means over items
    got = scores(TASKS["stsb"], [[0.1], [0.4], [0.35], [0.9]], [0.0, 1.0, 2.0, 3.0])
    assert got["spearman"] == pytest.approx(0.8) and 0.8 < got["pearson"] < 1


def test_clear_errors(models, teacher, tmp_path, monkeypatch):
    with pytest.raises(SettingsError, match="teacher: KD methods need"):
        build(FinetuneSettings, {"model": "m", "output": "o", "methods": ["kd"]})
    with pytest.raises(SettingsError, match="methods: bogus unknown"):
        build(FinetuneSettings, {"model": "m", "output": "o", "methods": ["bogus"]})
    with pytest.raises(SettingsError, match="task lm runs none"):
        build(FinetuneSettings, {"model": "m", "output": "o", "task": "lm", "data": ["x"], "teacher": "t",
                                 "methods": ["mate"]})
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without network
    with pytest.raises(SettingsError, match="MATE-KD needs a masked-LM generator"):
        run(build(FinetuneSettings, {"model": str(models / "student"), "output": str(tmp_path / "m"),
                                     "teacher": str(teacher), "methods": ["none", "mate"],
                                     "generator": "distilroberta-base", **SMALL}))
    assert not (tmp_path / "m" / "none").exists()  # failed before training anything


def test_file_task_without_eval_file_holds_out_rows(models, tmp_path, capsys):
    """The training rows are never scored as the evaluation: a fixed share is held out, and said so."""
    csv = tmp_path / "s.csv"
    csv.write_text("text,label\n" + "\n".join(f"sentence {i} is {'good' if i % 2 else 'bad'},{i % 2}"
                                                for i in range(20)) + "\n")
    run(build(FinetuneSettings, {"model": str(models / "student"), "output": str(tmp_path / "f"), "task": "file",
                                 "train_file": str(csv), "seeds": [0], **SMALL}))
    record = json.loads((tmp_path / "f" / "none" / "seed-0" / "model" / "lmshrink.json").read_text())
    assert record["train_examples"] == 16 and record["eval_examples"] == 4
    assert "4 of the 20 rows" in capsys.readouterr().out


def test_a_rerun_with_changed_settings_is_refused(models, teacher):
    """run-teacher holds a finished run; the same output with another lr must not re-use it silently."""
    with pytest.raises(SettingsError, match=r"lr 5e-05 -> 0.001"):
        run(build(FinetuneSettings, {"model": str(models / "teacher"), "output": str(teacher.parent.parent.parent),
                                     "seeds": [0], **SMALL, "lr": 1e-3}))


def test_a_killed_run_resumes_from_its_last_checkpoint(models, tmp_path, monkeypatch):
    """Killed at step 3 of 4 (checkpoints every 2 steps), the re-run continues from checkpoint-2 and
    ends with the weights of an uninterrupted run."""
    from safetensors.torch import load_file
    from transformers import Trainer

    common = {"model": str(models / "student"), "seeds": [0], **SMALL, "save_steps": 2}
    run(build(FinetuneSettings, {**common, "output": str(tmp_path / "straight")}))
    original = Trainer.training_step

    def dies_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise KeyboardInterrupt("simulated kill")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(build(FinetuneSettings, {**common, "output": str(tmp_path / "resumed")}))
    monkeypatch.setattr(Trainer, "training_step", original)
    folder = tmp_path / "resumed" / "none" / "seed-0"
    assert (folder / "checkpoints" / "checkpoint-2").is_dir() and not (folder / "model").exists()
    run(build(FinetuneSettings, {**common, "output": str(tmp_path / "resumed")}))
    # heal's clock: the run's seconds count the part before the checkpoint, as its last logged
    # elapsed_s does (the trainer's clock, started at the time the first part had run; logged
    # rounded to 0.01 s)
    logged = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    whole = max(x["elapsed_s"] for x in logged if "elapsed_s" in x)
    assert json.loads((folder / "lmshrink.json").read_text())["train_seconds"] >= whole - 0.005
    straight = load_file(tmp_path / "straight" / "none" / "seed-0" / "model" / "model.safetensors")
    resumed = load_file(folder / "model" / "model.safetensors")
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6)
    assert not (folder / "checkpoints").exists()
