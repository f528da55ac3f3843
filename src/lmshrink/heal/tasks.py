"""Downstream tasks for fine-tuning: the task table (GLUE, SuperGLUE, the offline sentiment task,
local CSV/JSONL files), their readers and splits, their metrics, and the batch collator.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmshrink.data.assets import sentiment_path
from lmshrink.data.sources import DataError, json_objects, read_text_file

# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """A downstream task: where its data is, which columns form the input, how it is scored."""

    columns: tuple[str, ...]  # joined by newlines into the model's input
    num_labels: int  # 1 = regression
    metrics: tuple[str, ...]  # the first is the task's main metric
    hub: tuple[str, str] | None = None  # (dataset, config)
    label: str = "label"
    train_split: str = "train"
    eval_split: str = "validation"  # GLUE test labels are hidden: the dev set is the usual test


GLUE, SUPERGLUE = "nyu-mll/glue", "aps/super_glue"
TASKS: dict[str, Task] = {
    "cola": Task(("sentence",), 2, ("matthews", "accuracy"), (GLUE, "cola")),
    "sst2": Task(("sentence",), 2, ("accuracy",), (GLUE, "sst2")),
    "mrpc": Task(("sentence1", "sentence2"), 2, ("f1", "accuracy"), (GLUE, "mrpc")),
    "stsb": Task(("sentence1", "sentence2"), 1, ("pearson", "spearman"), (GLUE, "stsb")),
    "qqp": Task(("question1", "question2"), 2, ("f1", "accuracy"), (GLUE, "qqp")),
    "mnli": Task(("premise", "hypothesis"), 3, ("accuracy",), (GLUE, "mnli"), eval_split="validation_matched"),
    "qnli": Task(("question", "sentence"), 2, ("accuracy",), (GLUE, "qnli")),
    "rte": Task(("sentence1", "sentence2"), 2, ("accuracy",), (GLUE, "rte")),
    "wnli": Task(("sentence1", "sentence2"), 2, ("accuracy",), (GLUE, "wnli")),
    "boolq": Task(("question", "passage"), 2, ("accuracy",), (SUPERGLUE, "boolq")),
    "cb": Task(("premise", "hypothesis"), 3, ("accuracy", "macro_f1"), (SUPERGLUE, "cb")),
    "superglue-rte": Task(("premise", "hypothesis"), 2, ("accuracy",), (SUPERGLUE, "rte")),
    "wic": Task(("word", "sentence1", "sentence2"), 2, ("accuracy",), (SUPERGLUE, "wic")),
    # offline: Pang & Lee sentence polarity (the source of SST-2), split 80/20 with a fixed seed
    "sentiment": Task(("text",), 2, ("accuracy", "f1")),
    # offline: BoolQ's 3,270 validation questions from the benchmark cache, split 80/20 with seed 0
    "boolq-local": Task(("question", "passage"), 2, ("accuracy",)),
}
OFFLINE = {"sentiment", "boolq-local"}


def _metric(name: str, predictions, labels) -> float:
    """GLUE's metrics, from scikit-learn and SciPy."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    functions = {
        "accuracy": lambda p, y: accuracy_score(y, p),
        "f1": lambda p, y: f1_score(y, p),
        "macro_f1": lambda p, y: f1_score(y, p, average="macro"),
        "matthews": lambda p, y: matthews_corrcoef(y, p),
        "pearson": lambda p, y: pearsonr(p, y)[0],
        "spearman": lambda p, y: spearmanr(p, y)[0],
    }
    return float(functions[name](predictions, labels))


def _predictions(task: Task, logits):
    import numpy as np

    logits = np.asarray(logits)
    return logits.squeeze(-1) if task.num_labels == 1 else logits.argmax(-1)


def scores(task: Task, logits, labels) -> dict[str, float]:
    predictions = _predictions(task, logits)
    return {name: _metric(name, predictions, labels) for name in task.metrics}


def item_scores(task: Task, logits, labels) -> dict[str, list[float]]:
    """Each example's share of the metrics that are means over examples (accuracy: 1 right, 0 wrong),
    in the test set's order, so two models can be compared item by item."""
    if "accuracy" not in task.metrics:
        return {}
    return {"accuracy": [float(p == y) for p, y in zip(_predictions(task, logits).tolist(), labels, strict=True)]}


# ----------------------------------------------------------------------------- settings


def _read_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a task's CSV (header line) or JSONL file (one object per line)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path} does not exist")
    text = read_text_file(p).removeprefix("\ufeff")  # binary or non-UTF-8: one clear error
    if p.suffix not in (".jsonl", ".json"):
        try:
            return list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as err:
            raise DataError(f"{path} is not a readable CSV file: {err}") from None
    return [row for _, row in json_objects(p, text.splitlines(), "an object of columns")]


def _sentiment() -> tuple[list[dict], list[dict]]:
    with open(sentiment_path(), newline="", encoding="utf-8-sig") as f:
        rows = [{"text": text.strip(), "label": int(label == "1")} for label, text in csv.reader(f)]
    return _split(rows)


def _split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """80% to train, 20% to test, after a shuffle with seed 0 (the same split every run)."""
    random.Random(0).shuffle(rows)
    cut = int(0.8 * len(rows))
    return rows[:cut], rows[cut:]


def _boolq_local() -> tuple[list[dict], list[dict]]:
    from lmshrink.evaluate.benchmarks import BENCHMARKS, local_dataset

    rows = list(local_dataset(BENCHMARKS["boolq"].folder, ("validation",))["validation"])
    return _split(_as_examples(rows, TASKS["boolq-local"].columns, "label", "the BoolQ copy"))


def _as_examples(rows: list[dict], columns: tuple[str, ...], label: str, where: str) -> list[dict]:
    missing = [c for c in (*columns, label) if rows and c not in rows[0]]
    if missing:
        raise DataError(f"{where}: no column(s) {', '.join(missing)}; it has {', '.join(rows[0])} "
                        "(set --text-columns / --label-column)")
    return [{"text": "\n".join(str(r[c]) for c in columns), "label": r[label]} for r in rows]


def load_task(s: Any) -> tuple[Task, list[dict], list[dict]]:
    """The task and its (train, eval) examples as {"text", "label"} with numeric labels."""
    if s.task in OFFLINE:
        task = TASKS[s.task]
        train, test = _sentiment() if s.task == "sentiment" else _boolq_local()
    elif s.task == "file":
        columns = tuple(s.text_columns)
        train = _as_examples(_read_rows(s.train_file), columns, s.label_column, s.train_file)
        if s.eval_file:
            test = _as_examples(_read_rows(s.eval_file), columns, s.label_column, s.eval_file)
        else:  # never score the training rows: hold some out, the same ones every run
            random.Random(0).shuffle(train)
            cut = len(train) - max(1, round(s.heldout * len(train)))
            train, test = train[:cut], train[cut:]
            print(f"[lmshrink] finetune: no --eval-file, so {len(test)} of the {len(train) + len(test)} rows of "
                  f"{s.train_file} ({s.heldout:.0%}, shuffled with seed 0) are held out for evaluation")
        values = [e["label"] for e in train]
        if all(_is_number(v) for v in values) and any(float(v) != int(float(v)) for v in values):
            task = Task(columns, 1, ("pearson", "spearman"))
            for e in train + test:
                e["label"] = float(e["label"])
        else:
            names = sorted({str(v) for v in values}, key=lambda v: (not _is_number(v), float(v) if _is_number(v) else 0, v))
            index = {name: i for i, name in enumerate(names)}
            unseen = sorted({str(e["label"]) for e in test} - set(index))
            if unseen and s.eval_file:
                raise DataError(f"{s.eval_file}: labels {unseen} do not occur in the training file {s.train_file}")
            if unseen:  # held out of the training file: too few rows of those labels to leave some for training
                raise DataError(f"{s.train_file}: labels {unseen} occur only in the {len(test)} rows held out for "
                                "evaluation, so no training row has them; add rows of those labels, or give the "
                                "held-out rows in --eval-file")
            for e in train + test:
                e["label"] = index[str(e["label"])]
            task = Task(columns, len(names), ("accuracy", "f1") if len(names) == 2 else ("accuracy", "macro_f1"))
    else:
        task = TASKS[s.task]
        from datasets import load_dataset

        name, config = task.hub
        try:
            data = load_dataset(name, config)
        except Exception as err:
            raise DataError(f"could not load {name}/{config} from the Hub ({err}); offline, use --task sentiment "
                            "or --task file with local CSV/JSONL") from None
        train = _as_examples(list(data[task.train_split]), task.columns, task.label, f"{name}/{config}")
        test = _as_examples(list(data[task.eval_split]), task.columns, task.label, f"{name}/{config}")
    if s.max_train_examples:
        train = train[: s.max_train_examples]
    if s.max_eval_examples:
        test = test[: s.max_eval_examples]
    if not train or not test:
        raise DataError("the task has no training or no evaluation examples")
    return task, train, test


def _is_number(value: Any) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


@dataclass
class Collator:
    """Pads a batch for the student and, with its own tokenizer, for the teacher; keeps the texts."""

    tokenizer: Any
    teacher_tokenizer: Any = None
    max_length: int = 128
    regression: bool = False

    def encode(self, tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        texts = [f["text"] for f in features]
        batch: dict[str, Any] = self.encode(self.tokenizer, texts)
        batch["labels"] = torch.tensor([f["label"] for f in features],
                                       dtype=torch.float if self.regression else torch.long)
        batch["texts"] = texts
        if self.teacher_tokenizer is not None:
            t = self.encode(self.teacher_tokenizer, texts)
            batch["teacher_input_ids"], batch["teacher_attention_mask"] = t["input_ids"], t["attention_mask"]
        return batch


# ----------------------------------------------------------------------------- models
