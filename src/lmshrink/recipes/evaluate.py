"""`lmshrink eval`: perplexity, zero-shot benchmarks, speed and size, teacher and students side
by side (perplexity: `lmshrink.evaluate.perplexity`; benchmarks: `lmshrink.evaluate.benchmarks`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmshrink.architectures import check_length
from lmshrink.compress.sequential import SEQUENTIAL, SequentialError, lazy_model, one_block_at_a_time, sliding_nll_blockwise
from lmshrink.config import Settings, group, setting, to_dict
from lmshrink.data.sources import Framing, token_stream
from lmshrink.errors import one_of
from lmshrink.evaluate.args import BenchmarkArgs, PerplexityArgs, TimingArgs
from lmshrink.evaluate.benchmarks import TaskScore, expand, run_tasks
from lmshrink.evaluate.measure import count_parameters, disk_bytes, fresh_peak_memory, speed
from lmshrink.evaluate.perplexity import sliding_nll
from lmshrink.evaluate.report import markdown_table, tasks_chart, tasks_note, tasks_table
from lmshrink.evaluate.shared_blocks import SharedBlocks, chain_of
from lmshrink.export import llamacpp
from lmshrink.export.model_card import add_results
from lmshrink.models import LoadArgs, load_tokenizer, no_tokenizer, pick_device
from lmshrink.records import RECORD, provenance, read_record, write_json, write_text

RUNTIMES = ("transformers", "llamacpp")


@dataclass(kw_only=True)
class EvalSettings(Settings):
    """Perplexity, zero-shot benchmarks and speed of one or more models, side by side (the first is the reference)."""

    models: list[str] = setting(
        help="models to compare: folders, Hub ids, .gguf files or smollm2-135m; first is the reference")
    labels: list[str] = setting([], "the models' names in the report, in the order of --models (default: the "
                                     "shortest path suffix that tells them apart)")
    output: str = setting("runs/eval", "folder for report.md and report.json")
    batch_size: int = setting(8, "sequences per forward pass (perplexity windows, benchmark requests)")
    runtime: str = setting("transformers", f"what runs the models: {', '.join(RUNTIMES)} (llamacpp: .gguf files "
                                           "scored by llama.cpp itself, through llama-cpp-python)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    sequential: str = setting("auto", "score perplexity reading each model one block at a time from its safetensors "
                                      "(at most one block's weights in memory, float32; no speed or benchmarks): "
                                      "on, off, or auto (on when the whole model would take more than half the "
                                      "device's memory)")
    load: LoadArgs = group(LoadArgs, "how the models are loaded")
    perplexity: PerplexityArgs = group(PerplexityArgs, "held-out perplexity")
    benchmarks: BenchmarkArgs = group(BenchmarkArgs, "zero-shot benchmarks (lm-evaluation-harness)")
    timing: TimingArgs = group(TimingArgs, "speed and memory")

    def problems(self) -> list[str]:
        problems = super().problems()
        if not self.models:
            problems.append("models: give at least one model")
        if self.labels and len(self.labels) != len(self.models):
            problems.append(f"labels: give one per model ({len(self.models)}), or none")
        if self.batch_size < 1:
            problems.append("batch_size: must be positive")
        if not self.perplexity.data and not self.timing.speed and not self.benchmarks.tasks:
            problems.append("data: give text to evaluate on or --tasks, or leave --speed on")
        problems += one_of("sequential", self.sequential, SEQUENTIAL)
        if self.sequential == "on" and self.benchmarks.tasks:
            problems.append("tasks: the benchmarks run the whole model; drop --sequential on (or evaluate the "
                            "exported GGUF through llama.cpp)")
        if self.runtime not in RUNTIMES:
            problems.append(f"runtime: {self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if self.runtime == "llamacpp":
            if not_gguf := [m for m in self.models if not m.endswith(".gguf")]:
                problems.append(f"models: --runtime llamacpp runs .gguf files (`lmshrink export` writes them), "
                                f"not {', '.join(not_gguf)}")
            if self.benchmarks.tasks:
                problems.append("tasks: zero-shot benchmarks run through transformers; drop --runtime llamacpp "
                                "(a .gguf file is then dequantised and run by transformers)")
            if not llamacpp.available():
                problems.append(f"runtime: llamacpp needs llama-cpp-python: {llamacpp.INSTALL}")
        return problems

    def __post_init__(self) -> None:
        super().__post_init__()
        self.benchmarks.check_data()


def model_labels(names: list[str]) -> list[str]:
    """Short names that tell the models apart: the last path part, with as many parent folders as
    it takes (`runs/a/model`, `runs/b/model` -> `a/model`, `b/model`)."""
    parts = [Path(n).parts or (n,) for n in names]
    depth = 1
    while depth < max(len(p) for p in parts):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
        depth += 1
    return ["/".join(p[-depth:]) for p in parts]


def vocabulary_key(tokenizer) -> int:
    """Equal for tokenizers with the same vocabulary (a teacher and its students), whatever their folders."""
    return hash(frozenset(tokenizer.get_vocab().items()))


def score_sources(row: dict[str, Any], tokenizer, ppl: PerplexityArgs, streams: dict[str, Any] | None,
                  nll_of: Callable[[Any, Framing, str], tuple[float, int]]) -> None:
    """Perplexity on each source, into `row`: `nll_of(tokens, framing, progress)` is the summed NLL and
    scored-token count of a stream over `ppl`'s windows (a transformers model's, llama.cpp's, or a model
    read one block at a time). Models with the same vocabulary (`row["vocab_id"]`: a teacher and its
    students) share one tokenised stream through `streams`."""
    cache = streams if streams is not None else {}
    framing = Framing.of(tokenizer)
    if ppl.data:
        row["framing"] = framing.record(tokenizer)
    for source in ppl.data:
        key = (source, row["vocab_id"])
        if key not in cache:
            cache[key] = token_stream(source, tokenizer, ppl.max_tokens)
        total, count = nll_of(cache[key], framing, f"{row['model']} on {source}")
        row["perplexity"][source] = math.exp(total / count)
        row.setdefault("tokens", {})[source] = cache[key].numel()


def windows_nll(model, ppl: PerplexityArgs, batch_size: int, runtime: str = ""):
    """`score_sources`'s NLL function of a transformers model or a logits function."""
    return lambda tokens, framing, progress: sliding_nll(model, tokens, ppl.window, ppl.stride, batch_size,
                                                         progress + runtime, framing=framing)


def evaluate_gguf(name: str, settings: EvalSettings, label: str | None = None,
                  streams: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row of the report for a GGUF file run by llama.cpp: size, perplexity, speed."""
    ppl, timing = settings.perplexity, settings.timing
    about = llamacpp.describe(name)
    # room for a window and the start tokens put before it (`lmshrink.data.sources.Framing`)
    llm = llamacpp.open_gguf(name, n_ctx=max(ppl.window + 16, timing.speed_length + 16 + timing.gen_tokens))
    row: dict[str, Any] = {"model": label or Path(name).name, "source": name, "runtime": "llamacpp",
                           "layers": about["layers"], "kept_layers": None, "parameters": about["parameters"],
                           "disk_mb": Path(name).stat().st_size / 2**20, "vocab_id": about["vocab_id"],
                           "perplexity": {}}
    score_sources(row, llamacpp.Tokenizer(llm), ppl, streams, windows_nll(llamacpp.logits(llm), ppl, 1, " (llama.cpp)"))
    if timing.speed:
        row.update(llamacpp.speed(llm, timing.speed_length, timing.gen_tokens, timing.repeats))
    llm.close()  # now, not at interpreter exit (where llama-cpp-python's finaliser can fail)
    return row


class KeptScores:
    """Each task's score is kept as it finishes (in FOLDER/TASK.json, with what it was scored on), so
    an interrupted `eval --tasks` carries on with the tasks it had not finished."""

    def __init__(self, folder: Path, key: dict[str, Any]):
        self.folder, self.key = folder, key

    def get(self, task: str) -> TaskScore | None:
        path = self.folder / f"{task}.json"
        kept = json.loads(path.read_text()) if path.is_file() else None
        if kept is None or kept.get("key") != self.key:
            return None
        print(f"    {task}: scored before ({path})", file=sys.stderr)
        return TaskScore(**kept["score"])

    def put(self, task: str, score: TaskScore) -> TaskScore:
        write_json(self.folder / f"{task}.json", {"key": self.key, "score": dataclasses.asdict(score)})
        return score


def fingerprint(source: str) -> str:
    """Names, sizes and modification times of a model's files (a Hub id as it is): a model written
    again is scored again."""
    path = Path(source)
    files = sorted(path.iterdir()) if path.is_dir() else [path] if path.is_file() else []
    listing = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()] or source
    return hashlib.sha1(json.dumps(listing).encode()).hexdigest()


def safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "model"


def _timed(model, source: str, label: str, settings: EvalSettings, device, timed: dict[str, Any] | None) -> dict:
    """Speed and peak memory, measured once per architecture: a model whose config and dtype match one
    already timed in this run (`timed`) is the same computation, so it shares that model's figures
    (`speed_of` names it) rather than adding a measurement that only differs by noise."""
    timing = settings.timing
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    key = json.dumps([config, str(model.dtype), str(device)], sort_keys=True, default=str)
    if timed is not None and key in timed:
        return timed[key]
    measured = speed(model, timing.speed_batch, timing.speed_length, timing.gen_tokens, timing.repeats)
    if device.type == "cpu":
        measured["peak_memory_mb"] = fresh_peak_memory(source, timing.speed_batch, timing.speed_length,
                                                       settings.load.dtype, settings.load.trust_remote_code)
    if timed is not None:
        timed[key] = {**measured, "speed_of": label}
    return measured


def model_row(name: str, label: str | None, source: str, model, tokenizer) -> dict[str, Any]:
    """A report row's size and identity: its layers (and the teacher's it kept), parameters, bytes on
    disk, and which vocabulary it reads (equal for models that share one, in this run only)."""
    record = read_record(source) or {}
    return {
        "model": label or Path(name).name or name,
        "source": name,
        "layers": getattr(model.config, "num_hidden_layers", None),
        "kept_layers": record.get("kept_layers"),
        "parameters": count_parameters(model),
        "disk_mb": (b / 2**20) if (b := disk_bytes(source)) else None,
        "vocab_id": vocabulary_key(tokenizer) if tokenizer is not None else None,
        "perplexity": {},
    }


def evaluate_blockwise(name: str, checked: tuple[str, Any], settings: EvalSettings, label: str | None,
                       streams: dict[str, Any] | None) -> dict[str, Any]:
    """One row of the report for a model read one block at a time (`--sequential`,
    `compress.sequential.sliding_nll_blockwise`): its size and perplexity, every block computed in
    float32 whatever the stored dtype. Speed and memory would time the whole model, so they are left
    out, said."""
    source, config = checked
    ppl, device = settings.perplexity, pick_device(settings.device)
    tokenizer = load_tokenizer(source, settings.load.trust_remote_code) if ppl.data else None
    if ppl.data and tokenizer is None:
        raise no_tokenizer(source)
    model, weights = lazy_model(source, config, device)
    if ppl.data:
        check_length(config, ppl.window, "window", len(Framing.of(tokenizer).start))
    row = {**model_row(name, label, source, model, tokenizer), "sequential": True}
    print(f"  {row['model']}: read one block at a time (float32); perplexity only, no speed or memory figures "
          "(--sequential off times the whole model where it fits)", file=sys.stderr)
    score_sources(row, tokenizer, ppl, streams, lambda tokens, framing, progress: sliding_nll_blockwise(
        model, weights, tokens, ppl.window, ppl.stride, settings.batch_size, framing=framing, progress=progress))
    return row


def evaluate_model(name: str, settings: EvalSettings, label: str | None = None,
                   streams: dict[str, Any] | None = None, checked: tuple[str, Any] | None = None,
                   timed: dict[str, Any] | None = None, shared: tuple[SharedBlocks, int] | None = None) -> dict[str, Any]:
    """One row of the report: size, perplexity per source, speed, benchmark scores (`checked`: the
    model's `models.check`, when the caller made it; `streams` and `timed`: what earlier rows of the
    same run tokenised and timed, shared; `shared`: the run's `SharedBlocks` and this model's place in it,
    for its perplexity and benchmark passes)."""
    if settings.runtime == "llamacpp":
        return evaluate_gguf(name, settings, label, streams)
    device = pick_device(settings.device)
    ppl, bench, timing = settings.perplexity, settings.benchmarks, settings.timing
    checked = checked or settings.load.check(name)
    if one_block_at_a_time(settings.sequential, checked[0], settings.load.dtype, device):
        return evaluate_blockwise(name, checked, settings, label, streams)
    # speed and size need no tokenizer; perplexity and benchmarks do
    loaded = settings.load.load(name, need_tokenizer=bool(ppl.data or bench.tasks), checked=checked)
    model = loaded.model.to(device)
    if ppl.data:
        check_length(model.config, ppl.window, "window", len(Framing.of(loaded.tokenizer).start))
    if timing.speed:
        check_length(model.config, timing.speed_length, "speed_length")
    row = model_row(name, label, loaded.source, model, loaded.tokenizer)
    blocks, index = shared or (SharedBlocks([None]), 0)
    if blocks.start[index]:
        print(f"  {row['model']}: its first {blocks.start[index]} blocks are those of a model scored before it: "
              "started from that model's stream", file=sys.stderr)
    with blocks.scoring(model, index):
        score_sources(row, loaded.tokenizer, ppl, streams, windows_nll(model, ppl, settings.batch_size))
    if timing.speed:
        row.update(_timed(model, loaded.source, row["model"], settings, device, timed))
    if bench.tasks:
        print(f"  {row['model']}: lm-eval on {', '.join(bench.tasks)}", file=sys.stderr)
        started = time.perf_counter()
        kept = KeptScores(Path(settings.output) / "tasks" / safe_name(row["model"]),
                          {"model": name, "weights": fingerprint(loaded.source), "dtype": settings.load.dtype,
                           "limit": bench.limit, "num_fewshot": bench.num_fewshot, "source": bench.benchmark_source})
        with blocks.scoring(model, index):
            scores = [kept.get(task) or kept.put(task, run_tasks(model, loaded.tokenizer, [task], bench.limit,
                                                                 bench.num_fewshot, settings.batch_size,
                                                                 bench.benchmark_source)[0])
                      for task in expand(bench.tasks)]
        row["task_seconds"] = time.perf_counter() - started
        row["tasks"] = {s.task: dataclasses.asdict(s) for s in scores}
        row["task_average"] = statistics.fmean(s.value for s in scores)
        if read_record(loaded.source) and Path(loaded.source).is_dir():  # a folder lmshrink wrote: its model card gets the scores
            add_results(loaded.source, row["tasks"], bench.limit)
    blocks.done(index)
    return row


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def report(rows: list[dict[str, Any]], settings: EvalSettings, out: Path) -> str:
    """report.md's text (writing the benchmark chart beside it)."""
    text = ["# lmshrink eval", ""]
    if settings.perplexity.data or settings.timing.speed:
        shape = f"({settings.timing.speed_batch}x{settings.timing.speed_length})"
        text += [markdown_table(rows, shape), ""]
        if settings.perplexity.data:
            text.append(f"Perplexity: sliding window {settings.perplexity.window}, stride {settings.perplexity.stride}, "
                        f"up to {settings.perplexity.max_tokens:,} tokens per source.")
        if settings.timing.speed and settings.runtime == "llamacpp":
            text.append(f"Run by llama.cpp (llama-cpp-python, {torch_threads()} threads): latency is the median of "
                        f"{settings.timing.repeats} prompt evaluations of 1x{settings.timing.speed_length} tokens "
                        "(tokens/s: prompt processing); gen tok/s: greedy decoding with the KV cache. "
                        "Perplexity from llama.cpp's logits and tokenizer.")
        elif settings.timing.speed:
            text.append(f"Latency: median of {settings.timing.repeats} forward passes at batch x length "
                        f"{settings.timing.speed_batch}x{settings.timing.speed_length} on {pick_device(settings.device)}; "
                        f"generation speed after one warm-up call.")
    if settings.benchmarks.tasks:
        tasks_chart(rows, out / "tasks.png")
        text += ["", "## Benchmarks", "", tasks_table(rows), "", tasks_note(rows, settings.benchmarks), "",
                 "![benchmark scores](tasks.png)"]
    if settings.perplexity.data and len({row["vocab_id"] for row in rows}) > 1:
        text.append("\nNote: the models use different tokenizers, so their perplexities are per token of "
                    "different vocabularies and not directly comparable.")
    return "\n".join(text) + "\n"


def shared_blocks(settings: EvalSettings, checked: dict[str, Any]) -> SharedBlocks:
    """Which models start from an earlier one's stream (`evaluate.shared_blocks`): on a CPU, among the
    models run whole by transformers."""
    device = pick_device(settings.device)
    if settings.runtime == "llamacpp" or device.type != "cpu" or len(settings.models) < 2:
        return SharedBlocks([None] * len(settings.models))
    return SharedBlocks([None if one_block_at_a_time(settings.sequential, checked[n][0], settings.load.dtype, device)
                         else chain_of(*checked[n], settings.load.dtype) for n in settings.models])


def run(settings: EvalSettings) -> list[dict[str, Any]]:
    settings = dataclasses.replace(settings, load=settings.load.on(settings.device))  # recorded as run
    streams: dict[str, Any] = {}
    checked: dict[str, Any] = {}
    for name in settings.models:  # every model named, checked before the first loads
        if settings.runtime == "llamacpp":
            llamacpp.check_file(name)
        else:
            checked[name] = settings.load.check(name)
    if settings.benchmarks.tasks and settings.runtime != "llamacpp":  # before any model is scored
        device = pick_device(settings.device)
        if big := [n for n in settings.models
                   if one_block_at_a_time(settings.sequential, checked[n][0], settings.load.dtype, device)]:
            raise SequentialError(f"{big[0]}: its weights take more than half the device's memory, so it would be "
                                  "read one block at a time, and the benchmarks run the whole model; evaluate its "
                                  "GGUF (`lmshrink export`) through llama.cpp, or pass --sequential off to try")
    labels = settings.labels or model_labels(settings.models)
    timed: dict[str, Any] = {}
    shared = shared_blocks(settings, checked)
    rows = [evaluate_model(name, settings, label=label, streams=streams, checked=checked.get(name), timed=timed,
                           shared=(shared, i))
            for i, (name, label) in enumerate(zip(settings.models, labels, strict=True))]
    out = Path(settings.output)
    text = report(rows, settings, out)
    write_text(out / "report.md", text)
    record = provenance("eval", to_dict(settings), rows=rows)
    write_json(out / "report.json", record)
    write_json(out / RECORD, record)
    print(text)
    print(f"wrote {out / 'report.md'} and {out / 'report.json'}")
    return rows
