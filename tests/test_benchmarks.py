"""Zero-shot benchmarks through lm-evaluation-harness on the offline benchmark cache; model cards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from huggingface_hub import ModelCard

from lmshrink.cli import main
from lmshrink.evaluate.benchmarks import BENCHMARKS, SUITES, expand, local_dataset, run_tasks
from lmshrink.models import load
from lmshrink.recipes.evaluate import model_labels


@pytest.fixture(scope="module")
def tiny(tiny_gpt2_dir):
    loaded = load(str(tiny_gpt2_dir))
    return loaded.model, loaded.tokenizer


def test_every_core_task_loads_from_the_local_data_and_runs(tiny, monkeypatch):
    import multiprocessing

    def no_fork(*args, **kwargs):
        raise AssertionError("lm-eval forked a pool (its bootstrap): a child can hang on a lock a thread held")

    model, tokenizer = tiny
    monkeypatch.setattr(multiprocessing, "Pool", no_fork)
    scores = run_tasks(model, tokenizer, ["core"], limit=3, batch_size=4)
    assert tokenizer.pad_token is None  # lm-eval set a pad token on its own copy, not on the shared tokenizer
    assert [s.task for s in scores] == SUITES["core"]
    for s in scores:
        assert s.items == 3
        assert 0.0 <= s.value <= 1.0 and s.metric in s.all_metrics
        assert len(s.per_item) == 3 and sum(s.per_item) / 3 == pytest.approx(s.value)  # the score, item by item
        assert s.split == BENCHMARKS[s.task].scored
    assert {s.task: s.split for s in scores}["arc_easy"] == "validation"  # the local copy has no test split


def test_mmlu_is_five_shot_and_pooled_over_subjects(tiny):
    model, tokenizer = tiny
    (score,) = run_tasks(model, tokenizer, ["mmlu"], limit=1, batch_size=8)
    assert score.num_fewshot == 5 and score.items == 57  # one question from each of the 57 subjects
    assert len(score.per_item) == 57 and sum(score.per_item) / 57 == pytest.approx(score.value)
    assert 0.0 <= score.value <= 1.0 and score.stderr is not None


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenised as the whole string minus the context's tokens."""
    whole = tokenizer(context + continuation)["input_ids"]
    n_context = len(tokenizer(context)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)  # (T-1, V) predicts ids[1:]
    targets = ids[0, n_context:]
    return logprobs[n_context - 1 :].gather(-1, targets[:, None]).sum().item()


def test_arc_easy_accuracy_equals_an_independent_loglikelihood_comparison(tiny):
    """lm-eval's acc and acc_norm on ARC-Easy items equal picking the choice of highest
    log-likelihood (per character for acc_norm), computed here without lm-eval."""
    model, tokenizer = tiny
    n = 24
    docs = local_dataset(BENCHMARKS["arc_easy"].folder, ("validation",))["validation"].select(range(n))
    hits, hits_norm, right = 0, 0, []
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        choices = doc["choices"]["text"]
        gold = doc["choices"]["label"].index(doc["answerKey"])
        lls = [_loglikelihood(model, tokenizer, context, " " + c) for c in choices]
        hits += max(range(len(lls)), key=lls.__getitem__) == gold
        right.append(float(max(range(len(lls)), key=lambda i: lls[i] / len(" " + choices[i])) == gold))
        hits_norm += right[-1]
    (score,) = run_tasks(model, tokenizer, ["arc_easy"], limit=n, batch_size=4)
    assert score.all_metrics["acc"] == pytest.approx(hits / n)
    assert score.all_metrics["acc_norm"] == pytest.approx(hits_norm / n)
    assert score.metric == "acc_norm" and score.per_item == right  # item by item, in the set's order


def test_a_task_run_skips_lm_evals_environment_report(tiny, monkeypatch):
    """lmshrink runs lm-eval once a task; its environment report (torch's, `pip list` and more in
    subprocesses, 0.7 s) would be paid each time and is never read."""
    import torch.utils.collect_env

    reports = []
    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", lambda: reports.append(1) or "")
    model, tokenizer = tiny
    (score,) = run_tasks(model, tokenizer, ["arc_easy"], limit=2, batch_size=4)
    assert score.task == "arc_easy" and len(score.per_item) == 2 and not reports


def test_the_task_index_reads_only_lmshrinks_tasks_and_finds_each_one():
    """lm-eval's full index reads ~14,000 YAMLs per process (11 s); lmshrink's holds only its tasks'
    folders, and each task (MMLU's 57 subjects too, as the Hub source lists them) resolves there."""
    import lm_eval.tasks

    from lmshrink.evaluate.benchmarks import MMLU, _hub_mmlu_subjects, _stock_config, _task_manager, mmlu_subjects

    manager = _task_manager()
    assert len(manager.all_tasks) < 500
    root = Path(lm_eval.tasks.__file__).parent
    for name, bench in BENCHMARKS.items():
        assert _stock_config(manager, name)["task"] == name
        assert manager._entry(name).yaml_path.parent.is_relative_to(root / bench.yaml_dir)
    assert _hub_mmlu_subjects(manager) == mmlu_subjects() and len(mmlu_subjects()) == 57
    assert _stock_config(manager, "mmlu_anatomy")["task"] == "mmlu_anatomy" and MMLU.yaml_dir == "mmlu/default"


def test_suites_expand_in_order_without_repeats():
    assert expand(["arc_easy", "core"]) == SUITES["core"]
    assert expand(["quick", "mmlu"]) == [*SUITES["quick"], "mmlu"]


def test_missing_benchmark_cache_names_the_fetch_command(tiny_gpt2_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMSHRINK_CACHE", str(tmp_path / "empty-cache"))
    assert main(["eval", "--models", str(tiny_gpt2_dir), "--tasks", "arc_easy", "--output", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "lmshrink fetch --benchmarks" in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()


def test_unknown_task_lists_the_known_ones(tiny_gpt2_dir, tmp_path, capsys):
    assert main(["eval", "--models", str(tiny_gpt2_dir), "--tasks", "arc_easy,hellaswagg",
                 "--output", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "'hellaswagg'" in err and "core" in err and "winogrande" in err


def test_labels_tell_models_apart():
    assert model_labels(["runs/a/model", "runs/b/model", "smollm2-135m"]) == ["a/model", "b/model", "smollm2-135m"]
    assert model_labels(["x/teacher", "y/student"]) == ["teacher", "student"]


def test_truncate_writes_a_hub_model_card_that_eval_updates(tiny_gpt2_dir, tmp_path, capsys):
    # a teacher whose own card states its licence and Hub origin: the student inherits both
    teacher = tmp_path / "teacher"
    T.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).save_pretrained(teacher)
    T.AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(teacher)
    (teacher / "README.md").write_text("---\nlicense: mit\nbase_model: openai-community/gpt2\n---\n# teacher\n")
    student = tmp_path / "student"
    assert main(["truncate", "--teacher", str(teacher), "--keep", "0,3", "--output", str(student), "--repair", "none"]) == 0
    card = ModelCard.load(student / "README.md")
    assert card.data.base_model == "openai-community/gpt2" and card.data.license == "mit"
    assert card.data.pipeline_tag == "text-generation" and "lmshrink" in card.data.tags
    assert "kept 2 of 4 blocks" in card.text and "# student" in card.text
    assert not card.data.eval_results

    out = tmp_path / "eval"
    assert main(["eval", "--models", f"{teacher},{student}", "--tasks", "copa,piqa", "--limit", "4", "--no-speed",
                 "--output", str(out)]) == 0
    rows = {row["model"]: row for row in json.loads((out / "report.json").read_text())["rows"]}
    assert json.loads((out / "lmshrink.json").read_text())["command"] == "eval"
    card = ModelCard.load(student / "README.md")
    measured = {r.dataset_name: r.metric_value for r in card.data.eval_results}
    assert measured == {t: pytest.approx(100 * rows["student"]["tasks"][t]["value"], abs=0.01) for t in ("copa", "piqa")}
    assert "| copa | acc |" in card.text and "base_model" in (student / "README.md").read_text()
    assert json.loads((student / "lmshrink.json").read_text())["benchmarks"]["piqa"]["limit"] == 4
    assert not (teacher / "lmshrink.json").exists()  # a folder lmshrink did not write is left alone
    report = (out / "report.md").read_text()
    assert "share of reference" in report and "(lm-eval's default: test)" not in report  # copa, piqa: default splits
    assert (out / "tasks.png").read_bytes()[:4] == b"\x89PNG"


def test_local_copies_have_the_fields_the_stock_tasks_read():
    """The saved BoolQ copy has google/boolq's `answer`; lm-eval's task reads super_glue's `label`
    (its doc_to_target): the loader must fill it from the answer, or every gold label is wrong."""
    from lmshrink.evaluate.benchmarks import _stock_config, _task_manager

    assert _stock_config(_task_manager(), "boolq")["doc_to_target"] == "label"
    docs = local_dataset(BENCHMARKS["boolq"].folder, ("validation",))["validation"]
    assert len(docs) == 3270 and docs["label"] == [int(a) for a in docs["answer"]]
    lambada = local_dataset(BENCHMARKS["lambada_openai"].folder, ("test",))["test"]
    assert len(lambada) == 5153 and all(" " in t for t in lambada["text"][:50])  # context + " " + last word


def test_an_interrupted_eval_keeps_its_finished_tasks(tiny_gpt2_dir, tmp_path, capsys, monkeypatch):
    import lmshrink.recipes.evaluate as evaluate

    command = ["eval", "--models", str(tiny_gpt2_dir), "--tasks", "copa,piqa", "--limit", "4", "--no-speed",
               "--output", str(tmp_path / "e")]
    scored, real = [], evaluate.run_tasks

    def stopped_on_the_second(model, tokenizer, tasks, *args, **kwargs):
        if scored:
            raise KeyboardInterrupt  # Ctrl-C
        scored.append(tasks)
        return real(model, tokenizer, tasks, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "run_tasks", stopped_on_the_second)
        assert main(command) == 130
    assert "stopped (SIGINT)" in capsys.readouterr().err
    with monkeypatch.context() as patch:
        patch.setattr(evaluate, "run_tasks", lambda model, tokenizer, tasks, *a, **k: scored.append(tasks)
                      or real(model, tokenizer, tasks, *a, **k))
        assert main(command) == 0
    assert scored == [["copa"], ["piqa"]]  # copa was not scored again
    assert "copa: scored before" in capsys.readouterr().err
    rows = json.loads((tmp_path / "e" / "report.json").read_text())["rows"]
    assert set(rows[0]["tasks"]) == {"copa", "piqa"}


@pytest.mark.parametrize("convention", ["none", "bos"])
def test_lm_eval_requests_start_as_the_tokenizers_text_does(tiny_gpt2_dir, tokenizers, convention):
    """Every request lm-eval runs starts with the tokenizer's start token where it adds one (Gemma,
    Llama 3) and with text where it adds none (GPT-2, SmolLM2): read from the tokenizer."""
    tokenizer = tokenizers[convention]
    model = load(str(tiny_gpt2_dir)).model
    model.resize_token_embeddings(len(tokenizer))
    start = tokenizer.convert_tokens_to_ids("<bos>") if convention == "bos" else None
    firsts = []
    model.register_forward_pre_hook(
        lambda _m, args, kwargs: firsts.extend((args[0] if args else kwargs["input_ids"])[:, 0].tolist()),
        with_kwargs=True)
    run_tasks(model, tokenizer, ["arc_easy"], limit=2, batch_size=4)
    assert firsts and (all(t == start for t in firsts) if start is not None else start not in firsts)
