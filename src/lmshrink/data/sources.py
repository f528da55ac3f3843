"""Text sources for calibration and evaluation, read into one token stream.

A source is one of:
  - a text file, or a folder of them (read recursively, in sorted order);
  - a `.jsonl` / `.jsonl.gz` file (the `text` field of each line);
  - `hf:NAME[:CONFIG][:SPLIT]`, a Hub dataset (streamed, `text` column);
  - a corpus name fetched by `lmshrink fetch` (see `lmshrink.data.assets.CORPORA`).

Every stream, row, window and training block is framed the way the model saw text in training
(`Framing`, read from the tokenizer, never from a per-family list): each document is encoded
with what the tokenizer adds around a text (Gemma's and Llama 3's `<bos>` before it, nothing for
GPT-2 and SmolLM2) and ends with EOS; each sequence the model is given starts with the
tokenizer's start tokens (llama.cpp's perplexity tool also puts `<bos>` before every chunk).
"""

from __future__ import annotations

import codecs
import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lmshrink.data.assets import CORPORA, corpus_path
from lmshrink.errors import LmshrinkError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".tex", ".jsonl"}


class DataError(LmshrinkError, ValueError):
    pass


PROBE = "Hello world"


@dataclass(frozen=True)
class Framing:
    """What a tokenizer adds around every text it encodes, and so what the model saw around
    every document in training: `start` tokens before it (`<bos>` for Gemma and Llama 3; none for
    GPT-2 and SmolLM2), `end` tokens after it, and the EOS that closes each packed document."""

    start: tuple[int, ...] = ()
    end: tuple[int, ...] = ()
    eos: int | None = None

    @classmethod
    def of(cls, tokenizer) -> Framing:
        """Read from the tokenizer itself: a probe text encoded with and without its special tokens."""
        plain = list(tokenizer(PROBE, add_special_tokens=False)["input_ids"])
        full = list(tokenizer(PROBE, add_special_tokens=True)["input_ids"])
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None)
        if at is None:  # the specials change the text's own tokens: keep what precedes and follows
            at = 0 if full[: len(plain)] == plain else max(0, len(full) - len(plain))
        return cls(tuple(full[:at]), tuple(full[at + len(plain):]), getattr(tokenizer, "eos_token_id", None))

    def document(self, ids: list[int]) -> list[int]:
        """One document as packed: the tokenizer's start and end tokens around its text, then EOS
        (unless the end tokens already close with it)."""
        tail = [self.eos] if self.eos is not None and self.end[-1:] != (self.eos,) else []
        return [*self.start, *ids, *self.end, *tail]

    def opens(self, ids) -> bool:
        """Whether a sequence already starts with the start tokens."""
        n = len(self.start)
        return n == 0 or (len(ids) >= n and [int(t) for t in ids[:n]] == list(self.start))

    def window(self, ids: torch.Tensor) -> torch.Tensor:
        """A 1-D window of a stream as the model is given it: the start tokens first (not doubled)."""
        if self.opens(ids):
            return ids
        return torch.cat([torch.tensor(self.start, dtype=ids.dtype), ids])

    def rows(self, stream: list[int], length: int) -> list[list[int]]:
        """Full rows of `length` tokens, each starting with the start tokens: a row that begins where
        a document begins takes its own, any other gets them in front of `length - len(start)`
        tokens of the stream. The ragged tail is dropped."""
        n = len(self.start)
        if n == 0:
            return [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]
        if length <= n:
            raise DataError(f"rows of {length} tokens leave no room for text after the tokenizer's "
                            f"{n} start token(s); use a longer length")
        rows, i = [], 0
        while True:
            own = self.opens(stream[i : i + n])  # a document starts here, with its own start tokens
            take = length if own else length - n
            row = stream[i : i + take] if own else [*self.start, *stream[i : i + take]]
            if len(row) < length:
                return rows
            rows.append(row)
            i += take

    def record(self, tokenizer) -> dict:
        """How text was framed, for `lmshrink.json`."""
        def names(ids):
            return tokenizer.convert_ids_to_tokens(list(ids)) if hasattr(tokenizer, "convert_ids_to_tokens") else list(ids)
        return {"start": names(self.start), "end": names(self.end),
                "eos": names([self.eos])[0] if self.eos is not None else None}


def _decode(path: Path, raw: bytes, final: bool = True) -> str:
    """UTF-8 text of a file's bytes, or a DataError naming the file and the fix."""
    if b"\x00" in raw[:8192]:
        raise DataError(f"{path} looks binary (NUL bytes); give a UTF-8 text file")
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(raw, final=final)
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); convert it (e.g. `iconv -t utf-8`)") from None


def read_text_file(path: Path) -> str:
    """A user's text file, decoded: a DataError naming the file and the fix if it is binary or not UTF-8."""
    return _decode(path, path.read_bytes())


def _check_text_file(path: Path, probe: int = 1 << 16) -> None:
    """Refuse a binary or non-UTF-8 file by its first 64 KiB, without reading all of a large corpus."""
    with path.open("rb") as f:
        head = f.read(probe)
    _decode(path, head, final=len(head) < probe)


def json_objects(path: Path, lines: Iterable[str], what: str = "an object") -> Iterator[tuple[str, dict]]:
    """(`file:line`, object) for each non-blank JSON line; a DataError names a line that is not
    JSON or not an object (`what` says what the object should be)."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{n} is not valid JSON") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n} is a JSON {type(record).__name__}, not {what}")
        yield f"{path}:{n}", record


def _jsonl(path: Path, field: str) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for where, record in json_objects(path, f, f"an object with a {field!r} field"):
            yield record_text(record, field, where)


def record_text(record: dict, field: str, where: str) -> str:
    """The text field of one JSON record, or a DataError naming the record and what is wrong."""
    if field not in record:
        raise DataError(f"{where} has no {field!r} field (fields: {', '.join(record)})")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: {field!r} is {json.dumps(value)[:40]}, not text; fix or drop that record")
    return value


def parse_hub(spec: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG][:SPLIT]` -> (name, config or None, split, default train)."""
    name, config, split = (spec.split(":", 3)[1:] + [None, None])[:3]
    return name, config or None, split or "train"


def resolve_path(source: str) -> Path:
    """A local source: a path, or a fetched corpus name (e.g. `python-docs/tutorial`) when no such path exists."""
    if source.split("/")[0] in CORPORA and not Path(source).exists():
        return corpus_path(source)
    return Path(source)


def _hub(spec: str, field: str) -> Iterator[str]:
    from datasets import load_dataset

    name, config, split = parse_hub(spec)
    dataset = load_dataset(name, config, split=split, streaming=True)
    for record in dataset:
        yield str(record[field])


def folder_files(path: Path) -> list[Path]:
    """The files of a folder given as text, sorted: not hidden ones, not what a run set aside as
    damaged (`lmshrink.integrity.set_aside`), not the `lmshrink.json` of a folder lmshrink wrote
    (`generate`'s)."""
    from lmshrink.integrity import ASIDE

    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != "lmshrink.json"
                  and not any(part.startswith((".", ASIDE)) for part in p.relative_to(path).parts))


def documents(source: str, field: str = "text") -> Iterator[str]:
    """Yield the documents of a source (see the module docstring for the forms)."""
    if source.startswith("hf:"):
        yield from _hub(source, field)
        return
    path = resolve_path(source)
    if path.is_dir():
        files = [p for p in folder_files(path) if p.suffix in TEXT_SUFFIXES or p.name.endswith(".jsonl.gz")]
        if not files:
            raise DataError(f"folder {path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
        for file in files:
            yield from _file_documents(file, field)
    elif path.is_file():
        yield from _file_documents(path, field)
    else:
        raise DataError(
            f"{source!r} is not a file or folder. Give a path, a corpus name ({', '.join(CORPORA)}), "
            "or a Hub dataset as hf:NAME[:CONFIG][:SPLIT]")


def _file_documents(path: Path, field: str) -> Iterator[str]:
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl(path, field)
    else:
        yield read_text_file(path)


def token_stream(source: str, tokenizer, max_tokens: int | None = None, field: str = "text") -> torch.Tensor:
    """Tokenise documents until `max_tokens` (all if None), each framed as the model saw documents
    in training (`Framing.document`); 1-D LongTensor."""
    framing = Framing.of(tokenizer)
    ids: list[int] = []
    for doc in documents(source, field):
        if not doc.strip():
            continue
        ids.extend(framing.document(tokenizer(doc, add_special_tokens=False)["input_ids"]))
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if len(ids) < 2:
        raise DataError(f"{source!r} holds no text to evaluate on (got {len(ids)} tokens)")
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def calibration_rows(source: str, tokenizer, tokens: int, seq_len: int) -> torch.Tensor:
    """(N, seq_len) rows of the first `tokens` tokens of a source, each starting as the model's
    sequences start (`Framing.rows`): calibration text for layer scores, searches and repairs."""
    return blocks(token_stream(source, tokenizer, tokens), seq_len, Framing.of(tokenizer))


def blocks(tokens: torch.Tensor, length: int, framing: Framing = Framing()) -> torch.Tensor:
    """Cut a token stream into full (N, length) rows framed by `framing`, dropping the ragged tail."""
    rows = framing.rows(tokens.tolist(), length)
    if not rows:
        raise DataError(f"only {tokens.numel()} tokens, fewer than one block of {length}")
    return torch.tensor(rows, dtype=torch.long)


# --- training data: `datasets` tables, tokenised and packed into fixed-length blocks --------

def text_dataset(sources: list[str], field: str = "text", streaming: bool = False):
    """One `datasets` table (or a streamed one) with a `text` column, from any mix of sources.

    Text files become one row per file; .jsonl(.gz) and .parquet files one row per record;
    `hf:NAME[:CONFIG][:SPLIT]` is loaded (streamed with `streaming`) from the Hub. Every document of
    every source once, in order (weighted mixes: `mix_blocks`, after packing).
    """
    from datasets import concatenate_datasets, interleave_datasets

    by_source = [_source_table(source, field, streaming) for source in sources]
    if len(by_source) == 1:
        return by_source[0]
    return interleave_datasets(by_source) if streaming else concatenate_datasets(by_source)


def mix_blocks(packed: list, weights: list[float], seed: int):
    """Packed blocks drawn from several sources with the odds `weights` (seeded) until the first
    source runs out. Every block has the same length, so the weights are shares of training
    tokens, however long each source's documents are (drawing documents instead gives a source of
    short documents a far smaller share than its weight says)."""
    from datasets import interleave_datasets

    total = sum(weights)
    return interleave_datasets(packed, probabilities=[w / total for w in weights], seed=seed,
                               stopping_strategy="first_exhausted")


def _source_table(source: str, field: str, streaming: bool):
    """One source's documents as a table with a `text` column."""
    from datasets import concatenate_datasets, interleave_datasets, load_dataset

    if source.startswith("hf:"):
        name, config, split = parse_hub(source)
        ds = load_dataset(name, config, split=split, streaming=streaming)
        if field not in (ds.column_names or [field]):
            raise DataError(f"{source!r} has no {field!r} column (columns: {', '.join(ds.column_names)})")
        return ds.select_columns([field]).rename_column(field, "text") if field != "text" else ds.select_columns([field])
    path = resolve_path(source)
    if not path.exists():
        raise DataError(f"{source!r} is not a file or folder (or hf:NAME[:CONFIG][:SPLIT], or a corpus name)")
    files = folder_files(path) if path.is_dir() else [path]
    kinds = {
        "json": [f for f in files if f.name.endswith((".jsonl", ".jsonl.gz", ".json"))],
        "parquet": [f for f in files if f.suffix == ".parquet"],
        "text": [f for f in files if f.suffix in TEXT_SUFFIXES - {".jsonl"}],
    }
    if not any(kinds.values()):
        raise DataError(f"{source!r} holds no .txt/.md/.rst/.tex, .jsonl(.gz) or .parquet files")
    parts = []
    for kind, group in kinds.items():
        if not group:
            continue
        if kind == "text":
            for file in group:  # refuse binary / non-UTF-8 files with their name
                _check_text_file(file)
            group = [f for f in group if f.stat().st_size > 0]  # an empty file is no document
            if not group:
                if not any(kinds[k] for k in ("json", "parquet")):
                    raise DataError(f"{source!r} is empty: it holds no text")
                continue
        extra = {"sample_by": "document"} if kind == "text" else {}
        ds = load_dataset(kind, data_files=[str(f) for f in group], split="train", streaming=streaming, **extra)
        column = field if kind != "text" else "text"
        ds = ds.select_columns([column])
        parts.append(ds.rename_column(column, "text") if column != "text" else ds)
    if len(parts) == 1:
        return parts[0]
    return interleave_datasets(parts) if streaming else concatenate_datasets(parts)


def pack(dataset, tokenizer, block_size: int, num_proc: int | None = None):
    """Tokenise documents (each framed as in training: `Framing.document`) and cut the stream
    into `block_size` blocks, each starting with the tokenizer's start tokens (`Framing.rows`).

    Blocks are formed within batches of 1000 documents (the transformers `run_clm` recipe),
    so at most one partial block per batch is dropped. Returns a table with `input_ids`.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to separate documents; set tokenizer.eos_token")
    framing = Framing.of(tokenizer)

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [framing.document(doc) for doc, text in zip(ids, batch["text"], strict=True) if text.strip()]}

    def group(batch):
        return {"input_ids": framing.rows([t for doc in batch["ids"] for t in doc], block_size)}

    kwargs = {"num_proc": num_proc} if num_proc and num_proc > 1 and hasattr(dataset, "num_rows") else {}
    extra = {"desc": f"tokenising ({block_size}-token blocks)"} if kwargs or hasattr(dataset, "num_rows") else {}
    steps = _fingerprints(dataset, tokenizer, block_size)
    tokenized = dataset.map(tokenize, batched=True, remove_columns=["text"], **kwargs, **extra, **steps[0])
    if hasattr(dataset, "num_rows"):
        extra["desc"] = "packing"
    return tokenized.map(group, batched=True, batch_size=1000, remove_columns=["ids"], **kwargs, **extra, **steps[1])


def _fingerprints(dataset, tokenizer, block_size: int) -> tuple[dict[str, str], dict[str, str]]:
    """Cache keys for the two `map` steps, from the source table, the tokenizer's full definition
    (its JSON) and the block size. Without them `datasets` pickles the tokenizer to hash it, which
    costs seconds per run; a slow tokenizer (no JSON) is left to that."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(dataset, "_fingerprint"):
        return {}, {}
    from datasets.fingerprint import Hasher

    key = Hasher.hash([dataset._fingerprint, backend.to_str(), tokenizer.eos_token_id, block_size,
                       Framing.of(tokenizer), "lmshrink.pack/2"])
    return {"new_fingerprint": key + "-tokenized"}, {"new_fingerprint": key + "-packed"}
