"""`lmshrink clean`: a pre-training corpus cleaned by a datatrove pipeline, with a report.

The paper shows that cleaning OpenWebText changes the compressed model's results. Its
authors' cleaning (PAPER.md): line de-duplication, lines with HTML tags, short lines and
lines with >10% non-letters removed; HTML turned into text; documents scored by the
teacher's perplexity. Here those steps sit beside language identification, Gopher's
repetition and quality rules, exact and MinHash near-duplicate removal, each one switchable.

The work runs as datatrove stages (local processes, or Slurm / Ray for corpora that outgrow
one machine: `executor: slurm` plus `executor_options`). Stage 1 filters documents one by
one; de-duplication then needs whole-corpus passes (signatures -> matches -> filter), and
dropping the worst q% by perplexity needs every score before the first drop.

    out/kept/            the clean corpus (jsonl.gz or parquet shards; `text`, `id`, `metadata`)
    out/rejected/STEP/   every dropped document with `metadata.filter_reason`
    out/work/, out/logs/ intermediate shards, datatrove's per-task logs, completions and stats
    out/report.{md,json,png}, out/lmshrink.json

Every input document ends up in kept/ or rejected/ (the report checks the count). A re-run
with the same settings skips every finished task of every stage (datatrove completions).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from lmshrink.config import Settings, SettingsError, group, how_to_run_paths, setting, to_dict
from lmshrink.data.assets import CORPORA
from lmshrink.data.cleaning import (
    BadInputFilter,
    CorpusReader,
    HtmlToText,
    LangIdFilter,
    NormalizeWhitespace,
    PaperLineFilter,
    PerplexityFilter,
    PerplexityScorer,
    ShardReader,
    WhitespaceWordTokenizer,
    exact_content,
    input_files,
)
from lmshrink.data.sources import DataError, resolve_path
from lmshrink.errors import Stopped
from lmshrink.integrity import problem
from lmshrink.models import LoadArgs
from lmshrink.records import exclusive, md_table, provenance, save_figure, write_json, write_text

EXECUTORS = ("local", "slurm", "ray")
FORMATS = ("jsonl", "parquet")


@dataclass(kw_only=True)
class CleanSettings(Settings):
    """Clean a pre-training corpus (the paper's line filters, language, Gopher, dedup, perplexity)."""

    # every cleaning step off: the corpus as read, with only what cannot be text at all set aside
    # (the "raw" arm of a cleaning ablation: read through the same readers as the cleaned arm)
    PASS_THROUGH: ClassVar[dict[str, Any]] = dict(
        html_to_text=False, fix_unicode=False, normalize_whitespace=False, line_dedup=False, drop_html_tag_lines=False,
        min_line_chars=None, max_non_alpha=None, languages=[], gopher_repetition=False, gopher_quality=False,
        exact_dedup=False, minhash_dedup=False)

    data: list[str] = setting(
        help="input files or folders (text, jsonl(.gz), parquet; every file is read) or one hf:NAME[:CONFIG][:SPLIT]")
    output: str = setting("runs/clean", "output folder (kept/, rejected/, report.md); re-running resumes it", how_to_run=True)
    text_key: str = setting("text", "field holding the text in jsonl/parquet/Hub records")
    workers: int = setting(2, "local worker processes", how_to_run=True)
    tasks: int | None = setting(None, "shards of work per stage (default 4 x workers; more = finer resumption)")
    executor: str = setting("local", f"where the stages run: {', '.join(EXECUTORS)}")
    executor_options: dict[str, Any] = setting(
        {}, "extra arguments of datatrove's Slurm/Ray executor (partition, time, cpus_per_task, ...)", how_to_run=True)
    output_format: str = setting("jsonl", f"kept shards as: {', '.join(FORMATS)}")
    max_shard_mb: int = setting(256, "start a new output shard past this size")
    restart: bool = setting(False, "delete an existing output folder and start again instead of resuming", how_to_run=True)
    report_only: bool = setting(False, "only (re)write the report of a finished run (after Slurm/Ray jobs end)", how_to_run=True)
    # bad input
    max_doc_mb: int = setting(64, "documents (files, records) above this size are rejected as too_large")
    max_line_chars: int = setting(65536, "a line longer than this rejects its document as giant_line")
    max_invalid_utf8: float = setting(0.001, "share of invalid UTF-8 bytes above which a document is rejected")
    # formatting
    html_to_text: bool = setting(True, "HTML documents (by suffix or doctype) to text; script/style dropped")
    fix_unicode: bool = setting(True, "repair mojibake and control characters with ftfy")
    normalize_whitespace: bool = setting(True, "one space between words, no trailing spaces, at most one blank line")
    # the paper's line filters
    line_dedup: bool = setting(True, "drop repeated lines within a document (key: length + first/last 4 words)")
    drop_html_tag_lines: bool = setting(True, "drop lines that hold HTML tags")
    min_line_chars: int | None = setting(5, "drop lines shorter than this (none: off)")
    max_non_alpha: float | None = setting(0.10, "drop lines whose share of non-letter characters is above this (none: off)")
    # document filters
    languages: list[str] = setting(["en"], "ISO 639-1 codes to keep, by py3langid (empty: off)")
    min_language_score: float = setting(0.5, "minimum share of the text (by ~1,000-character pieces) in the kept language")
    gopher_repetition: bool = setting(True, "Gopher repetition rules (duplicate lines/paragraphs/n-grams)")
    gopher_quality: bool = setting(True, "Gopher quality rules (word count and length, symbols, stop words)")
    min_doc_words: int = setting(50, "Gopher quality: fewest words a kept document has")
    exact_dedup: bool = setting(True, "drop documents whose text exactly repeats an earlier one")
    minhash_dedup: bool = setting(True, "drop near-duplicate documents (MinHash LSH over word 5-grams)")
    minhash_buckets: int = setting(14, "MinHash LSH bands (14 x 8 hashes: pairs above ~0.75 Jaccard are caught)")
    minhash_hashes_per_bucket: int = setting(8, "MinHash hashes per band")
    # model-based scoring
    perplexity_model: str | None = setting(None, "score documents by this causal LM's perplexity (the paper's teacher scoring)")
    perplexity_tokens: int = setting(256, "tokens of each document that are scored")
    perplexity_batch_size: int = setting(8, "documents per scoring batch")
    drop_worst_perplexity: float | None = setting(None, "drop this share (0-1) of documents with the highest perplexity")
    max_perplexity: float | None = setting(None, "drop documents whose perplexity is above this")
    load: LoadArgs = group(LoadArgs, "how the perplexity filter's scoring model is loaded")

    def problems(self) -> list[str]:
        problems = super().problems()
        if not self.data:
            problems.append("data: give at least one input file, folder or hf:NAME")
        hub = [d for d in self.data if d.startswith("hf:")]
        if hub and len(self.data) > 1:
            problems.append("data: a Hub dataset (hf:NAME) is cleaned on its own; give it alone")
        for d in self.data:
            if not d.startswith("hf:") and not Path(d).exists() and d.split("/")[0] not in CORPORA:
                problems.append(f"data: {d} does not exist (nor is it a corpus name: {', '.join(CORPORA)})")
        if self.workers < 1:
            problems.append("workers: must be >= 1")
        if self.tasks is not None and self.tasks < 1:
            problems.append("tasks: must be >= 1")
        if self.executor not in EXECUTORS:
            problems.append(f"executor: {self.executor!r} is not one of {', '.join(EXECUTORS)}")
        if self.output_format not in FORMATS:
            problems.append(f"output_format: {self.output_format!r} is not one of {', '.join(FORMATS)}")
        if self.max_non_alpha is not None and not 0 <= self.max_non_alpha <= 1:
            problems.append("max_non_alpha: a share between 0 and 1")
        if not 0 <= self.max_invalid_utf8 <= 1:
            problems.append("max_invalid_utf8: a share between 0 and 1")
        if self.drop_worst_perplexity is not None and not 0 < self.drop_worst_perplexity < 1:
            problems.append("drop_worst_perplexity: a share strictly between 0 and 1 (0.1 drops the worst 10%)")
        if (self.drop_worst_perplexity or self.max_perplexity) and not self.perplexity_model:
            problems.append("perplexity_model: name the scoring model (e.g. smollm2-135m) to drop by perplexity")
        if self.minhash_buckets < 1 or self.minhash_hashes_per_bucket < 1:
            problems.append("minhash_buckets, minhash_hashes_per_bucket: must be >= 1")
        return problems

    @property
    def num_tasks(self) -> int:
        return self.tasks or 4 * self.workers


# ----------------------------------------------------------------------------- the stages

@dataclass
class Stage:
    name: str
    pipeline: list
    tasks: int


def _writer(folder: Path, fmt: str = "jsonl", max_mb: int = 0, name: str = "${rank}"):
    from datatrove.pipeline.writers import JsonlWriter, ParquetWriter

    size = max_mb << 20 if max_mb else -1
    if fmt == "parquet":
        return ParquetWriter(str(folder), output_filename=f"{name}.parquet", max_file_size=size)
    return JsonlWriter(str(folder), output_filename=f"{name}.jsonl.gz", max_file_size=size)


def _rejects(out: Path, step: str):
    """The exclusion writer of one filtering step: out/rejected/STEP/RANK.jsonl.gz."""
    return _writer(out / "rejected" / step)


def _reader(folder: Path):
    return ShardReader(str(folder))


def document_steps(s: CleanSettings, out: Path, files: list[tuple[str, str]]) -> list:
    """Stage 1: read, repair, and filter each document on its own."""
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.formatters import FTFYFormatter

    words = WhitespaceWordTokenizer()
    hub = s.data[0] if s.data[0].startswith("hf:") else None
    steps: list = [
        CorpusReader(files, hub=hub, text_key=s.text_key, max_doc_bytes=s.max_doc_mb << 20,
                     max_line_chars=s.max_line_chars, max_invalid_utf8=s.max_invalid_utf8),
        BadInputFilter(exclusion_writer=_rejects(out, "bad_input")),
    ]
    if s.html_to_text:
        steps.append(HtmlToText())
    if s.fix_unicode:
        steps.append(FTFYFormatter())
    if s.normalize_whitespace:
        steps.append(NormalizeWhitespace())
    if s.line_dedup or s.drop_html_tag_lines or s.min_line_chars or s.max_non_alpha is not None:
        steps.append(PaperLineFilter(s.line_dedup, s.drop_html_tag_lines, s.min_line_chars, s.max_non_alpha,
                                     exclusion_writer=_rejects(out, "line_filters")))
    if s.languages:
        steps.append(LangIdFilter(s.languages, s.min_language_score, exclusion_writer=_rejects(out, "language")))
    if s.gopher_quality:  # first: a too-short document is named as such, not by its n-gram shares
        steps.append(GopherQualityFilter(min_doc_words=s.min_doc_words, language=words,
                                         exclusion_writer=_rejects(out, "gopher_quality")))
    if s.gopher_repetition:
        steps.append(GopherRepetitionFilter(language=words, exclusion_writer=_rejects(out, "gopher_repetition")))
    return steps


def stages(s: CleanSettings, out: Path, files: list[tuple[str, str]]) -> list[Stage]:
    """The whole cleaning as datatrove stages over `files` (empty for a Hub dataset); each pass
    over documents reads the previous pass's shards."""
    passes, configs = _passes(s, out, files)
    result: list[Stage] = []
    previous: Path | None = None
    for i, (name, steps) in enumerate(passes):
        last = i == len(passes) - 1
        folder = out / "kept" if last else out / "work" / name
        source = [] if previous is None else [_reader(previous)]
        result += _whole_corpus_stages(name, previous, out / "work", configs, s.num_tasks)
        writer = _writer(folder, s.output_format if last else "jsonl", s.max_shard_mb)
        result.append(Stage(name, source + steps + [writer], s.num_tasks))
        previous = folder
    return result


def _passes(s: CleanSettings, out: Path, files: list[tuple[str, str]]) -> tuple[list[tuple[str, list]], dict[str, Any]]:
    """Each pass over the documents: (its name, the steps that take documents in; the last pass writes
    kept/), and the dedup configs the passes share with their whole-corpus stages."""
    from datatrove.pipeline.dedup import MinhashConfig, MinhashDedupFilter
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupFilter

    work, quantile, configs = out / "work", bool(s.drop_worst_perplexity), {}
    passes: list[tuple[str, list]] = [("filter", document_steps(s, out, files))]
    if s.exact_dedup:
        configs["exact"] = ExactDedupConfig(content_getter=exact_content)
        passes.append(("exact-dedup", [ExactDedupFilter(str(work / "exact-dups"), configs["exact"],
                                                        exclusion_writer=_rejects(out, "exact_duplicate"))]))
    if s.minhash_dedup:
        configs["minhash"] = MinhashConfig(num_buckets=s.minhash_buckets, hashes_per_bucket=s.minhash_hashes_per_bucket)
        passes.append(("near-dedup", [MinhashDedupFilter(str(work / "minhash-remove"),
                                                         exclusion_writer=_rejects(out, "near_duplicate"))]))
    if s.perplexity_model is not None:
        scorer = PerplexityScorer(s.perplexity_model, s.perplexity_tokens, s.perplexity_batch_size,
                                  threads=max(1, (os.cpu_count() or 1) // s.workers),
                                  values_folder=str(work / "perplexities"), how=s.load)
        passes[-1][1].append(scorer)  # score the fewest documents: after every other filter
        if s.max_perplexity is not None and not quantile:
            passes[-1][1].append(PerplexityFilter(threshold=s.max_perplexity, exclusion_writer=_rejects(out, "perplexity")))
        if quantile:
            passes.append(("perplexity", [PerplexityFilter(s.max_perplexity, s.drop_worst_perplexity, str(work / "perplexities"),
                                                           exclusion_writer=_rejects(out, "perplexity"))]))
    return passes, configs


def _whole_corpus_stages(name: str, previous: Path | None, work: Path, configs: dict[str, Any], n: int) -> list[Stage]:
    """The whole-corpus passes a dedup pass's filter reads, which must run before it."""
    from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupSignature
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupSignature, ExactFindDedups

    if name == "exact-dedup":
        exact = configs["exact"]
        return [Stage("exact-signatures", [_reader(previous), ExactDedupSignature(str(work / "exact-sigs"), exact)], n),
                Stage("exact-matches", [ExactFindDedups(str(work / "exact-sigs"), str(work / "exact-dups"), config=exact)], 1)]
    if name == "near-dedup":
        minhash = configs["minhash"]
        return [Stage("minhash-signatures", [_reader(previous), MinhashDedupSignature(
                    str(work / "minhash-sigs"), minhash, language=WhitespaceWordTokenizer())], n),
                Stage("minhash-buckets", [MinhashDedupBuckets(
                    str(work / "minhash-sigs"), str(work / "minhash-buckets"), config=minhash)], minhash.num_buckets),
                Stage("minhash-clusters", [MinhashDedupCluster(
                    str(work / "minhash-buckets"), str(work / "minhash-remove"), config=minhash)], 1)]
    return []


WORKER_START = "spawn" if sys.platform == "win32" else "forkserver"


def executor_for(s: CleanSettings, stage: Stage, logs: Path, depends):
    """A datatrove executor for one stage, chained after `depends`."""
    if s.executor == "local":
        import multiprocess
        from datatrove.executor import LocalPipelineExecutor

        if WORKER_START == "forkserver":
            multiprocess.get_context(WORKER_START).set_forkserver_preload(["lmshrink.data.cleaning"])

        # forkserver: workers fork from a fresh server process that imported the cleaning steps once
        # (milliseconds a worker, not seconds of imports), never from this process, whose threads
        # (torch's, a test runner's) a plain fork would copy half-held and deadlock on.
        return LocalPipelineExecutor(stage.pipeline, tasks=stage.tasks, workers=min(s.workers, stage.tasks),
                                     logging_dir=str(logs / stage.name), depends=depends,
                                     start_method=WORKER_START)
    options = dict(s.executor_options)
    if s.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        for key in ("time", "partition"):
            if key not in options:
                raise SettingsError(f"executor_options: the Slurm executor needs {key!r} (e.g. time=04:00:00,partition=cpu)")
        return SlurmPipelineExecutor(stage.pipeline, tasks=stage.tasks, logging_dir=str(logs / stage.name),
                                     depends=depends, job_name=f"lmshrink-clean-{stage.name}", **options)
    import datatrove.executor.ray as datatrove_ray

    from lmshrink.data.cleaning import RankProcessWorker

    datatrove_ray.RankWorker = RankProcessWorker  # the actor datatrove's task manager starts: one that sees a rank killed
    return datatrove_ray.RayPipelineExecutor(stage.pipeline, tasks=stage.tasks, logging_dir=str(logs / stage.name),
                                             depends=depends, **options)


# ----------------------------------------------------------------------------- the report

def _records(folder: Path):
    """(id, metadata, text bytes) of every document in a folder of jsonl.gz or parquet shards."""
    for path in sorted(folder.rglob("*")):
        if path.name.endswith(".jsonl.gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    r = json.loads(line)  # datatrove's writer leaves an empty text out
                    yield r["id"], r.get("metadata") or {}, len((r.get("text") or "").encode())
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            for r in pq.read_table(path).to_pylist():
                yield r["id"], r.get("metadata") or {}, len((r.get("text") or "").encode())


def _stage_stats(logs: Path) -> dict[str, dict[str, float]]:
    """Totals of datatrove's per-task stats over every task of every stage: {step name: {stat: total}}.
    (Per task, not the stage's stats.json: a resumed stage's stats.json covers only the re-run tasks.)"""
    stats: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for path in sorted(logs.glob("*/stats/*.json")):
        for step in json.loads(path.read_text()):
            for key, value in step.get("stats", {}).items():
                stats[step["name"]][key] += value.get("total", 0) if isinstance(value, dict) else value
    return stats


def summarize(out: Path) -> dict[str, Any]:
    """Counts of kept and rejected documents (per step and reason), bytes, line statistics."""
    kept_docs = kept_bytes = kept_input_bytes = 0
    for _, meta, n_bytes in _records(out / "kept"):
        kept_docs += 1
        kept_bytes += n_bytes
        kept_input_bytes += meta.get("input_bytes", 0)
    reasons: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for step_dir in sorted(p for p in (out / "rejected").glob("*") if p.is_dir()):
        for _, meta, _ in _records(step_dir):
            c = reasons[(step_dir.name, meta.get("filter_reason") or step_dir.name)]
            c["documents"] += 1
            c["input_bytes"] += meta.get("input_bytes", 0)
    stats = _stage_stats(out / "logs")
    reader = next((v for k, v in stats.items() if "corpus reader" in k), {})
    lines = next((v for k, v in stats.items() if "paper line filters" in k), {})
    rejected_docs = sum(c["documents"] for c in reasons.values())
    input_docs = int(reader.get("documents", 0))
    return {
        "input": {"documents": input_docs, "bytes": int(reader.get("input_bytes", 0))},
        "kept": {"documents": kept_docs, "bytes": kept_bytes, "input_bytes": kept_input_bytes},
        "rejected": [{"step": step, "reason": reason, **counts} for (step, reason), counts in reasons.items()],
        "rejected_documents": rejected_docs,
        "conserved": input_docs == kept_docs + rejected_docs,
        "lines_removed": {k.removeprefix("lines_"): int(v) for k, v in lines.items() if k.startswith("lines_")},
        "line_bytes_removed": {k.removeprefix("bytes_"): int(v) for k, v in lines.items() if k.startswith("bytes_")},
        "html_documents": int(next((v.get("html_documents", 0) for k, v in stats.items() if "html to text" in k), 0)),
    }


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f}"


def markdown(summary: dict[str, Any], seconds: float | None) -> str:
    inp, kept = summary["input"], summary["kept"]
    pct = lambda n, d: f"{100 * n / d:.1f}%" if d else "-"  # noqa: E731
    out = ["# Corpus cleaning report", "",
           f"Input: {inp['documents']:,} documents, {_mb(inp['bytes'])} MB. "
           f"Kept: {kept['documents']:,} documents ({pct(kept['documents'], inp['documents'])}), "
           f"{_mb(kept['bytes'])} MB of clean text from {_mb(kept['input_bytes'])} MB of input. "
           f"Every document accounted for: {'yes' if summary['conserved'] else 'NO'} "
           f"({kept['documents']:,} kept + {summary['rejected_documents']:,} rejected)."
           + (f" Took {seconds:,.1f} s." if seconds else ""), "",
           "## Documents rejected, by step and reason", ""]
    out += md_table(("step", "reason", "documents", "% of input", "input MB"),
                    [(r["step"], r["reason"], f"{r['documents']:,}", pct(r["documents"], inp["documents"]),
                      _mb(r["input_bytes"])) for r in sorted(summary["rejected"], key=lambda r: -r["documents"])], "llrrr")
    if summary["lines_removed"]:
        out += ["", "## Lines removed inside kept and rejected documents (the paper's line filters)", ""]
        out += md_table(("reason", "lines", "MB"),
                        [(reason, f"{count:,}", _mb(summary["line_bytes_removed"].get(reason, 0)))
                         for reason, count in sorted(summary["lines_removed"].items(), key=lambda kv: -kv[1])], "lrr")
    if summary["html_documents"]:
        out += ["", f"{summary['html_documents']:,} HTML documents were turned into text."]
    return "\n".join(out) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Where the documents went: kept vs each (step: reason), by count and by input bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(summary["rejected"], key=lambda r: r["documents"])
    labels = [f"{r['step']}: {r['reason']}" for r in rows] + ["kept"]
    docs = [r["documents"] for r in rows] + [summary["kept"]["documents"]]
    mbs = [r["input_bytes"] / 1e6 for r in rows] + [summary["kept"]["input_bytes"] / 1e6]
    colors = ["tab:red"] * len(rows) + ["tab:green"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.35 * len(labels) + 1.5), sharey=True)
    axes[0].barh(labels, docs, color=colors)
    axes[0].set(xlabel="documents", title="documents kept and rejected")
    axes[1].barh(labels, mbs, color=colors)
    axes[1].set(xlabel="input MB", title="input bytes kept and rejected")
    for ax, values in zip(axes, (docs, mbs), strict=True):
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:,.0f}" if ax is axes[0] else f" {v:,.2f}", va="center", fontsize=8)
    fig.suptitle(f"lmshrink clean: {summary['kept']['documents']:,} of {summary['input']['documents']:,} documents kept")
    save_figure(fig, path)
    plt.close(fig)


def write_report(s: CleanSettings, out: Path, seconds: float | None = None) -> dict[str, Any]:
    summary = summarize(out)
    write_json(out / "report.json", summary)
    write_text(out / "report.md", markdown(summary, seconds))
    plot(summary, out / "report.png")
    write_json(out / "lmshrink.json", provenance("clean", to_dict(s), summary=summary, seconds=seconds))
    return summary


# ----------------------------------------------------------------------------- the command

def _check_resumable(s: CleanSettings, out: Path) -> None:
    """A re-run resumes only the same cleaning: other settings would mix two corpora in one folder."""
    path = out / "clean-settings.json"
    free = how_to_run_paths(CleanSettings)  # may change between a run and its resumption
    mine = {k: v for k, v in to_dict(s).items() if k not in free}
    mine["tasks"] = s.num_tasks  # the split of the input into tasks is fixed for a run
    if path.exists():
        theirs = {k: v for k, v in json.loads(path.read_text()).items() if k not in free}
        if s.tasks is None and theirs.get("tasks"):
            # resumed with other --workers: keep the run's task split, or files would be read twice or never
            s.tasks = mine["tasks"] = theirs["tasks"]
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if changed:
            raise SettingsError(f"{out} holds a cleaning run with other settings ({', '.join(changed)}); "
                                "give a new --output, or --restart to delete it and start again")
    elif out.exists() and any(out.iterdir()):
        raise SettingsError(f"{out} exists and is not a `lmshrink clean` output; give a new --output")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, mine)


def run(s: CleanSettings) -> dict[str, Any]:
    out = Path(s.output)
    if s.report_only:
        if not (out / "clean-settings.json").exists():
            raise SettingsError(f"{out} holds no cleaning run to report on")
        summary = write_report(s, out)
        print((out / "report.md").read_text())
        return summary
    if s.restart and out.exists():
        if not (out / "clean-settings.json").exists():
            raise SettingsError(f"--restart deletes {out}, which is not a `lmshrink clean` output; refusing")
        shutil.rmtree(out)
    files = [] if s.data[0].startswith("hf:") else input_files([str(resolve_path(d)) for d in s.data])
    if not s.data[0].startswith("hf:") and not files:
        raise DataError(f"no files found in {', '.join(s.data)}: nothing to clean")
    if s.perplexity_model:  # here, not in a worker that would fail each task with it
        s.load.check(s.perplexity_model)
    _check_resumable(s, out)
    with exclusive(out):  # one run at a time per output folder
        return _clean(s, out, files)


def writers(steps: list) -> list:
    """The datatrove writers of a stage's steps: its output writer and each filter's rejects."""
    found = []
    for step in steps:
        found += [w for w in (step, getattr(step, "exclusion_writer", None)) if hasattr(w, "output_folder")]
    return found


def recheck_finished(stage: Stage, out: Path) -> None:
    """A finished task whose files no longer read whole (a disk that filled, a copy cut short) is run
    again: its completion mark is removed and the damaged file moved to out/damaged/ (not deleted,
    and out of the folders a later stage reads). The task runs the same way again, so what later
    stages made from it stays true."""
    marks = out / "logs" / stage.name / "completions"
    if not marks.is_dir():
        return
    folders = {Path(w.output_folder.path) for w in writers(stage.pipeline)}
    for mark in sorted(marks.iterdir()):
        for path in sorted(p for folder in folders for p in folder.glob(f"{mark.name}*") if p.is_file()):
            if damage := problem(path):
                target = out / "damaged" / path.relative_to(out)
                target.parent.mkdir(parents=True, exist_ok=True)
                path.rename(target)
                mark.unlink(missing_ok=True)
                print(f"[lmshrink] {path.relative_to(out)} of finished task {mark.name} of stage {stage.name} is "
                      f"damaged ({damage}): moved to {target.relative_to(out)}; the task runs again", flush=True)


def _clean(s: CleanSettings, out: Path, files: list) -> dict[str, Any]:
    start = time.perf_counter()
    if s.executor == "slurm":  # submitted jobs, each stage's waiting on the one before: nothing runs here
        executor = None
        for stage in stages(s, out, files):
            executor = executor_for(s, stage, out / "logs", executor)
        executor.run()
        print(f"submitted; when the jobs finish, `lmshrink clean --report-only` with the same settings writes {out}/report.md")
        return {}
    # One stage after the other, each checked whole before the next starts. (Chained by `depends`, a
    # stage whose Ray task was given up would leave the next one polling for it every 2 minutes, forever.)
    for stage in stages(s, out, files):
        recheck_finished(stage, out)
        executor = executor_for(s, stage, out / "logs", None)
        executor.run()
        if unfinished := executor.get_incomplete_ranks(skip_completed=True):
            raise Stopped(f"stage {stage.name}: {len(unfinished)} of {executor.world_size} tasks did not finish (why: "
                          f"{out}/logs/{stage.name}); the finished ones are kept: run the same command to carry on", 1)
    summary = write_report(s, out, time.perf_counter() - start)
    if not summary["conserved"]:
        raise RuntimeError(f"cleaning lost documents: {summary['input']['documents']} read, "
                           f"{summary['kept']['documents']} kept + {summary['rejected_documents']} rejected")
    print((out / "report.md").read_text())
    return summary
