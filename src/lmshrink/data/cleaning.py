"""The datatrove steps `lmshrink clean` adds to datatrove's own (filters, dedup, writers), and
the Ray worker it runs them with.

A document is datatrove's `(text, id, metadata)`. A filter returns keep or `(False, reason)`;
every drop is counted and written, with its reason, by the filter's exclusion writer. Nothing
here raises on bad input: a file or record that cannot be read becomes a document marked
`metadata["bad_input"] = reason`, which `BadInputFilter` (the first filter) writes out.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import regex
from datatrove.data import Document, DocumentsPipeline
from datatrove.executor.ray import RankWorker
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.utils.stats import PipelineStats
from datatrove.utils.word_tokenizers import WordTokenizer

from lmshrink.records import atomic_file

if TYPE_CHECKING:
    from lmshrink.models import LoadArgs

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
HTML_SUFFIXES = (".html", ".htm", ".xhtml")


def input_files(sources: list[str]) -> list[tuple[str, str]]:
    """(path, name) for every file under `sources`, sorted; `name` is the document id prefix.

    A folder's files are named relative to the folder, prefixed with the folder's own name,
    so that ids stay readable and distinct when several folders are cleaned together."""
    files: list[tuple[str, str]] = []
    for source in sources:
        path = Path(source)
        if path.is_file():
            files.append((str(path), path.name))
        elif path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    full = Path(root) / name
                    if full.is_file() and not full.is_symlink():
                        files.append((str(full), f"{path.name}/{full.relative_to(path)}"))
    return files


# ----------------------------------------------------------------------------- reading

def _suffix(name: str) -> str:
    lower = name.lower()
    for suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return Path(lower).suffix


class CorpusReader(PipelineStep):
    """Reads text files (one document each; `.gz` unpacked), jsonl(.gz) and parquet records,
    or a Hub dataset, spreading files over tasks; never raises on a bad file or record."""

    name = "📂 corpus reader"
    type = "📖 - READER"

    def __init__(self, files: list[tuple[str, str]], hub: str | None = None, text_key: str = "text",
                 max_doc_bytes: int = 64 << 20, max_line_chars: int = 1 << 16, max_invalid_utf8: float = 0.001):
        super().__init__()
        self.files, self.hub, self.text_key = files, hub, text_key
        self.max_doc_bytes, self.max_line_chars, self.max_invalid_utf8 = max_doc_bytes, max_line_chars, max_invalid_utf8

    # One function per kind of input; each yields Documents, bad ones marked.
    def _document(self, text: str, doc_id: str, source: str, n_bytes: int, reason: str | None = None,
                  record: dict | None = None) -> Document:
        metadata: dict = {"source": source, "input_bytes": n_bytes}
        if record is not None:
            metadata = self._with_record(record, doc_id, metadata)
            doc_id = str(record["id"]) if record.get("id") is not None else doc_id
        if reason is None and "\x00" in text:
            reason = "nul_bytes"
        if reason is None and not text.strip():
            reason = "empty"
        if reason is None and self.max_line_chars and max(map(len, text.split("\n"))) > self.max_line_chars:
            reason = "giant_line"
        if reason is not None:
            metadata["bad_input"] = reason
            self.stat_update(f"bad_{reason}")
            text = text.replace("\x00", "")[:4096]  # a readable preview, not the bulk
        self.stat_update("input_bytes", value=n_bytes, unit="doc")
        return Document(text=text, id=doc_id, metadata=metadata)

    def _with_record(self, record: dict, location: str, ours: dict) -> dict:
        """A record's own fields (FineWeb's url, dump, date, ...) kept in the metadata, nothing lost:
        the text becomes the document, its id the document id (its place in the input goes to
        `location`), and a field named like one of ours is kept as `original_<name>`."""
        reserved = {*ours, "location", "bad_input", "filter_reason", "perplexity", "language", "language_score"}
        kept = {}
        for key, value in record.items():
            if key in (self.text_key, "id"):
                continue
            kept[f"original_{key}" if key in reserved else key] = value
        if isinstance(record.get("metadata"), dict):  # a record written by lmshrink clean / datatrove
            kept.pop("metadata")
            kept = {**{k: v for k, v in record["metadata"].items() if k not in reserved}, **kept}
        return {**kept, **ours, "location": location}

    def _decode(self, raw: bytes) -> tuple[str, str | None]:
        """UTF-8 text, or the reason it is not text; a few invalid bytes are replaced and counted."""
        if b"\x00" in raw[:8192]:
            return "", "binary"
        try:
            return raw.decode("utf-8-sig"), None
        except UnicodeDecodeError:
            text = raw.decode("utf-8-sig", errors="replace")
            invalid = text.count("\ufffd") - raw.count("\ufffd".encode())
            self.stat_update("invalid_utf8_bytes", value=invalid)
            if invalid > self.max_invalid_utf8 * len(raw):
                return text, "invalid_utf8"
            return text, None

    def _read_bytes(self, path: str, gz: bool) -> tuple[bytes, str | None]:
        try:
            opener = gzip.open if gz else open
            with opener(path, "rb") as f:
                raw = f.read(self.max_doc_bytes + 1)
        except (OSError, EOFError, zlib.error):
            return b"", "corrupt_gzip" if gz else "unreadable"
        if len(raw) > self.max_doc_bytes:
            return raw[:8192], "too_large"
        return raw, None

    def _text_file(self, path: str, name: str) -> Iterator[Document]:
        gz = name.lower().endswith(".gz")
        raw, reason = self._read_bytes(path, gz)
        n_bytes = os.path.getsize(path)
        text, decode_reason = self._decode(raw) if reason is None else ("", None)
        yield self._document(text, name, name, n_bytes, reason or decode_reason)

    def _jsonl_file(self, path: str, name: str) -> Iterator[Document]:
        opener = gzip.open if name.lower().endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                for lineno, line in enumerate(self._lines(f), 1):
                    yield from self._record(line, f"{name}:{lineno}", name)
        except (OSError, EOFError, zlib.error):
            yield self._document("", f"{name}:unreadable", name, 0, "corrupt_gzip")

    def _lines(self, f) -> Iterator[bytes | None]:
        """Lines of a binary file; a line longer than `max_doc_bytes` is skipped over and yields None."""
        while True:
            line = f.readline(self.max_doc_bytes + 1)
            if not line:
                return
            if len(line) > self.max_doc_bytes and not line.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield None
            else:
                yield line

    def _record(self, line: bytes | None, doc_id: str, name: str) -> Iterator[Document]:
        if line is None:
            yield self._document("", doc_id, name, self.max_doc_bytes, "too_large")
            return
        if not line.strip():
            self.stat_update("blank_jsonl_lines")
            return
        text, reason = self._decode(line)
        record = None
        if reason is None:
            try:
                parsed = json.loads(text)
                record = parsed if isinstance(parsed, dict) else None
                value = record.get(self.text_key) if record is not None else None
                text, reason = (value, None) if isinstance(value, str) else (text, "missing_text")
            except json.JSONDecodeError:
                reason = "malformed_json"
        yield self._document(text, doc_id, name, len(line), reason, record)

    def _parquet_file(self, path: str, name: str) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
            if self.text_key not in table.schema_arrow.names:
                yield self._document("", f"{name}#all", name, os.path.getsize(path), "missing_text")
                return
            row = 0
            for batch in table.iter_batches(batch_size=1024):  # every column: nothing the user gave is lost
                for record in batch.to_pylist():
                    value = record.get(self.text_key)
                    text, reason = (value, None) if isinstance(value, str) else ("", "missing_text")
                    yield self._document(text, f"{name}#{row}", name, len((text or "").encode()), reason, record)
                    row += 1
        except (OSError, pa.ArrowException):
            yield self._document("", f"{name}#unreadable", name, os.path.getsize(path), "corrupt_parquet")

    def _hub(self, rank: int, world_size: int) -> Iterator[Document]:
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node

        from lmshrink.data.sources import parse_hub

        name, config, split = parse_hub(self.hub)
        dataset = split_dataset_by_node(load_dataset(name, config, split=split, streaming=True), rank, world_size)
        for i, record in enumerate(dataset):
            value = record.get(self.text_key)
            text, reason = (value, None) if isinstance(value, str) else ("", "missing_text")
            yield self._document(text, f"{self.hub}#{rank}-{i}", self.hub, len((text or "").encode()), reason,
                                 dict(record))

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if self.hub:
            yield from self._hub(rank, world_size)
            return
        for path, name in self.files[rank::world_size]:
            kind = _suffix(name)
            read = self._jsonl_file if kind in JSONL_SUFFIXES else (
                self._parquet_file if kind in PARQUET_SUFFIXES else self._text_file)
            for doc in read(path, name):
                self.stat_update("documents")
                yield doc


class ShardReader(JsonlReader):
    """Reads the jsonl.gz shards an earlier stage wrote; where that stage kept nothing (every
    document rejected) it reads nothing, where datatrove's reader would stop the run."""

    name = "🐿 shards of the previous stage"

    def __init__(self, folder: str):
        super().__init__(folder, glob_pattern="*.jsonl.gz", add_file_path=False)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if not self.data_folder.exists("") or not self.data_folder.list_files(glob_pattern=self.glob_pattern):
            return
        yield from super().run(data, rank, world_size)


class BadInputFilter(BaseFilter):
    """Drops what the reader could not read, with the reader's reason (binary, invalid_utf8, ...)."""

    name = "🚫 bad input"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        reason = doc.metadata.get("bad_input")
        return (False, reason) if reason else True


# ----------------------------------------------------------------------------- formatting

_HTML_START = re.compile(r"\s*(<!doctype html|<html|<\?xml[^>]*>\s*<!doctype html)", re.IGNORECASE)


class HtmlToText(BaseFormatter):
    """HTML documents (by suffix or a leading doctype/<html>) to plain text with resiliparse;
    script, style and other non-content elements are dropped."""

    name = "🌐 html to text"

    def format(self, text: str) -> str:  # BaseFormatter's hook; run() below decides which docs are HTML
        from resiliparse.extract.html2text import extract_plain_text

        return extract_plain_text(text, main_content=False, alt_texts=False, links=False, list_bullets=True)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            source = str(doc.metadata.get("source", "")).lower()
            if source.endswith(HTML_SUFFIXES) or _HTML_START.match(doc.text[:512]):
                with self.track_time():
                    doc.text = self.format(doc.text)
                self.stat_update("html_documents")
            yield doc


_SPACES = re.compile(r"[^\S\n]+")
_BLANK_RUNS = re.compile(r"\n{3,}")


class NormalizeWhitespace(BaseFormatter):
    """Unicode spaces and tabs to one space, no trailing spaces, at most one blank line in a row."""

    name = "␣ whitespace"

    def format(self, text: str) -> str:
        lines = (_SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
        return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


# ----------------------------------------------------------------------------- the paper's line filters

_HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9-]*(\s[^<>]*)?/?>|<!--|-->")


def line_key(line: str) -> tuple[int, int]:
    """The authors' line identity: stripped length + hash of the first and last four words."""
    words = line.split()
    return len(line), hash((tuple(words[:4]), tuple(words[-4:])))


def non_alpha_fraction(line: str) -> float:
    """Share of a line's non-space characters that are not letters (digits, punctuation, symbols)."""
    chars = [c for c in line if not c.isspace()]
    return sum(not c.isalpha() for c in chars) / len(chars) if chars else 1.0


class PaperLineFilter(BaseFilter):
    """The authors' line filters: drop repeated lines (within a document), lines holding HTML
    tags, lines shorter than `min_chars` and lines with more than `max_non_alpha` non-letters.
    Blank lines (paragraph breaks) are kept; a document left without text is dropped."""

    name = "✂️ paper line filters"

    def __init__(self, dedup: bool = True, html_tags: bool = True, min_chars: int | None = 5,
                 max_non_alpha: float | None = 0.10, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.dedup, self.html_tags, self.min_chars, self.max_non_alpha = dedup, html_tags, min_chars, max_non_alpha

    def line_verdict(self, line: str, seen: set) -> str | None:
        """Why a (stripped, non-blank) line goes, or None to keep it."""
        if self.dedup:
            key = line_key(line)
            if key in seen:
                return "duplicate_line"
            seen.add(key)
        if self.html_tags and _HTML_TAG.search(line):
            return "html_tag_line"
        if self.min_chars and len(line) < self.min_chars:
            return "short_line"
        if self.max_non_alpha is not None and non_alpha_fraction(line) > self.max_non_alpha:
            return "non_alpha_line"
        return None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        kept, seen = [], set()
        for line in doc.text.split("\n"):
            stripped = line.strip()
            if not stripped:
                if kept and kept[-1]:
                    kept.append("")
                continue
            reason = self.line_verdict(stripped, seen)
            if reason is None:
                kept.append(line)
            else:
                self.stat_update(f"lines_{reason}")
                self.stat_update(f"bytes_{reason}", value=len(line.encode()))
        doc.text = "\n".join(kept).strip()
        return True if doc.text else (False, "no_lines_left")


# ----------------------------------------------------------------------------- language

class LangIdFilter(BaseFilter):
    """Keeps documents whose main language (py3langid, offline) is in `languages`.

    The text (up to `max_chars`) is cut at paragraph breaks into ~`chunk_chars` pieces, each
    identified on its own; the document's language is the one holding the largest share of
    characters and `language_score` is that share. A French page full of English command
    tables is then French by its prose, which one call on the opening text can get wrong."""

    name = "🌍 language (py3langid)"

    def __init__(self, languages: list[str], min_score: float = 0.5, max_chars: int = 20_000, chunk_chars: int = 1000,
                 exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.languages, self.min_score = set(languages), min_score
        self.max_chars, self.chunk_chars = max_chars, chunk_chars
        self._identifier = None

    def shares(self, text: str) -> Counter:
        """Characters per identified language."""
        if self._identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        chunks, piece = [], ""
        for paragraph in text[: self.max_chars].split("\n\n"):
            piece += paragraph + "\n\n"
            if len(piece) >= self.chunk_chars:
                chunks.append(piece)
                piece = ""
        if piece.strip() or not chunks:
            chunks.append(piece)
        counts: Counter = Counter()
        for chunk in chunks:
            counts[self._identifier.classify(chunk)[0]] += len(chunk)
        return counts

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        counts = self.shares(doc.text)
        language, chars = counts.most_common(1)[0]
        score = chars / max(1, sum(counts.values()))
        doc.metadata["language"], doc.metadata["language_score"] = language, round(score, 4)
        if language not in self.languages:
            return False, f"language_{language}"
        return True if score >= self.min_score else (False, "language_unsure")


class WhitespaceWordTokenizer(WordTokenizer):
    """Whitespace-separated words, as the Gopher rules define them (MassiveText: "80% of words
    contain an alphabetic character"); lets datatrove's Gopher and MinHash steps run without
    spaCy, their English default, and for any space-separated script."""

    _SENTENCE = regex.compile(r"(?<=[.!?])\s+")

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in self._SENTENCE.split(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in regex.finditer(r"\S+", text)]


def exact_content(doc: Document) -> bytes:
    """What exact de-duplication compares: the cleaned text (bytes: datatrove picks its hash by
    this function's return annotation, which `from __future__ import annotations` makes a string)."""
    return doc.text.encode()


# ----------------------------------------------------------------------------- model-based scoring

class PerplexityScorer(PipelineStep):
    """Adds `metadata["perplexity"]`: a causal LM's perplexity of each document's first
    `max_tokens` tokens (the paper's teacher-perplexity scoring); `values_folder` receives each
    task's perplexities so that a later stage can drop the worst share of the whole corpus."""

    name = "🧮 perplexity"
    type = "🔢 - SCORER"

    def __init__(self, model: str, max_tokens: int = 256, batch_size: int = 8, threads: int = 1,
                 values_folder: str | None = None, how: LoadArgs | None = None):
        super().__init__()
        self.model_name, self.max_tokens, self.batch_size, self.threads = model, max_tokens, batch_size, threads
        self.values_folder, self.how = values_folder, how  # models.LoadArgs (None: its defaults)

    def _score(self, model, tokenizer, texts: list[str]) -> list[float]:
        import torch  # here, not at the top: the other cleaning workers never load torch

        from lmshrink.data.sources import Framing
        from lmshrink.losses import next_token_nll

        start = list(Framing.of(tokenizer).start)  # what the model saw before every document: <bos> or nothing
        ids = [start + tokenizer(t, add_special_tokens=False)["input_ids"][: self.max_tokens - len(start)]
               for t in texts]
        width = max(map(len, ids))
        batch = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for row, x in enumerate(ids):
            batch[row, : len(x)], mask[row, : len(x)] = torch.tensor(x), 1
        with torch.inference_mode():
            nll = next_token_nll(model(input_ids=batch, attention_mask=mask).logits, batch)  # (B, T-1)
        target_mask = mask[:, 1:].float()
        mean = (nll * target_mask).sum(1) / target_mask.sum(1).clamp(min=1)
        return [math.exp(v) if n > 0 else float("inf") for v, n in zip(mean.tolist(), target_mask.sum(1).tolist(), strict=True)]

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        import torch

        from lmshrink.models import LoadArgs

        torch.set_num_threads(self.threads)
        loaded = None
        values: list[float] = []
        batch: list[Document] = []

        def flush() -> Iterator[Document]:
            with self.track_time("batch"):
                scores = self._score(loaded.model, loaded.tokenizer, [d.text for d in batch])
                for doc, ppl in zip(batch, scores, strict=True):
                    doc.metadata["perplexity"] = ppl = round(ppl, 4)  # the filter compares these exact values
                    values.append(ppl)
                    self.stat_update("perplexity", value=ppl)
            yield from batch
            batch.clear()

        for doc in data:
            if loaded is None:
                loaded = (self.how or LoadArgs()).load(self.model_name)
                loaded.model.eval()
            batch.append(doc)
            if len(batch) == self.batch_size:
                yield from flush()
        if batch:
            yield from flush()
        if self.values_folder:
            with atomic_file(Path(self.values_folder) / f"{rank:05d}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, np.array(values, dtype=np.float64))


class PerplexityFilter(BaseFilter):
    """Drops documents whose perplexity is above `threshold`, or, with `drop_worst`, above the
    (1 - drop_worst) quantile of every task's perplexities (read from `values_folder`)."""

    name = "🧮 perplexity filter"

    def __init__(self, threshold: float | None = None, drop_worst: float | None = None,
                 values_folder: str | None = None, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.threshold, self.drop_worst, self.values_folder = threshold, drop_worst, values_folder

    def quantile_limit(self) -> float:
        """The best perplexity among the worst `drop_worst` share of the corpus (inf when not dropping)."""
        files = sorted(Path(self.values_folder).glob("*.npy")) if self.drop_worst else []
        values = np.concatenate([np.load(f) for f in files]) if files else np.array([])
        return float(np.quantile(values, 1.0 - self.drop_worst, method="higher")) if values.size else math.inf

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self._limit = self.quantile_limit()
        yield from super().run(data, rank, world_size)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        ppl = doc.metadata.get("perplexity", math.inf)
        if ppl >= self._limit:  # the `higher` quantile: the limit itself is the best of the dropped share
            return False, "perplexity_worst"
        if self.threshold is not None and ppl > self.threshold:
            return False, "perplexity_threshold"
        return True


# ----------------------------------------------------------------------------- running on Ray

class RankProcessWorker(RankWorker):
    """datatrove's Ray actor, with each rank run in a forked process whose death it notices.

    datatrove's own actor runs its ranks in a multiprocessing Pool, which waits forever for a rank
    whose process was killed (the OOM killer's usual pick: the process holding the documents), and
    the whole `clean --executor ray` waits with it. Here a rank killed by a signal ends the actor,
    which Ray reports as a crashed worker and datatrove runs again (3 times at most); a rank that
    raised fails the task, its log saying why."""

    def run_for_rank(self, executor_ref, ranks: list[int], node_ips: list[str], node_idx: int) -> PipelineStats:
        import multiprocess

        os.environ["RAY_NODELIST"], os.environ["RAY_NODEID"] = ",".join(node_ips), str(node_idx)
        node_rank = -1 if executor_ref.nodes_per_task == 1 else node_idx
        first_id = 0 if executor_ref.log_first else 1
        fork = multiprocess.get_context("fork")
        processes = [fork.Process(target=_run_rank, args=(executor_ref, rank, first_id + i, node_rank))
                     for i, rank in enumerate(ranks)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        if any(process.exitcode < 0 for process in processes):
            os._exit(1)  # killed: end as a crashed worker does, so that datatrove runs the ranks again
        if failed := [rank for rank, process in zip(ranks, processes, strict=True) if process.exitcode]:
            raise RuntimeError(f"ranks {failed} failed; their task logs say why")
        return PipelineStats()


def _run_rank(executor, rank: int, rank_id: int, node_rank: int) -> None:
    time.sleep(random.randint(0, executor.randomize_start_duration))
    executor._run_for_rank(rank, rank_id, node_rank=node_rank)
