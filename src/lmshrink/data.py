"""Text sources for calibration and evaluation, read into one token stream.

A source is one of:
  - a text file, or a folder of them (read recursively, in sorted order);
  - a `.jsonl` / `.jsonl.gz` file (the `text` field of each line);
  - `hf:NAME[:CONFIG][:SPLIT]`, a Hub dataset (streamed, `text` column);
  - a corpus name fetched by `lmshrink fetch` (see `lmshrink.assets.CORPORA`).
Documents are joined with the tokenizer's EOS token, the usual packing for LM evaluation.
"""

from __future__ import annotations

import codecs
import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from lmshrink.assets import CORPORA, corpus_path
from lmshrink.errors import LmshrinkError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".tex", ".jsonl"}


class DataError(LmshrinkError, ValueError):
    pass


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


def documents(source: str, field: str = "text") -> Iterator[str]:
    """Yield the documents of a source (see the module docstring for the forms)."""
    if source.startswith("hf:"):
        yield from _hub(source, field)
        return
    path = resolve_path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name.endswith(".jsonl.gz")))
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
    """Tokenise documents until `max_tokens` (all if None), EOS between documents; 1-D LongTensor."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in documents(source, field):
        if not doc.strip():
            continue
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if len(ids) < 2:
        raise DataError(f"{source!r} holds no text to evaluate on (got {len(ids)} tokens)")
    return torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)


def calibration_rows(source: str, tokenizer, tokens: int, seq_len: int) -> torch.Tensor:
    """(N, seq_len) rows of the first `tokens` tokens of a source: calibration text for layer scores."""
    return blocks(token_stream(source, tokenizer, tokens), seq_len)


def blocks(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Cut a token stream into full (N, length) rows, dropping the ragged tail."""
    n = tokens.numel() // length
    if n == 0:
        raise DataError(f"only {tokens.numel()} tokens, fewer than one block of {length}")
    return tokens[: n * length].view(n, length)


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
    # a folder's hidden files and lmshrink.json (a folder lmshrink wrote: `generate`'s) are not text
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.name != "lmshrink.json") if path.is_dir() else [path]
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
    """Tokenise documents (EOS after each) and cut the stream into `block_size` blocks.

    Blocks are formed within batches of 1000 documents (the transformers `run_clm` recipe),
    so at most one partial block per batch is dropped. Returns a table with `input_ids`.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents; set tokenizer.eos_token")

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [doc + [eos] for doc, text in zip(ids, batch["text"], strict=True) if text.strip()]}

    def group(batch):
        stream = [t for doc in batch["ids"] for t in doc]
        n = len(stream) // block_size * block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, n, block_size)]}

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

    key = Hasher.hash([dataset._fingerprint, backend.to_str(), tokenizer.eos_token_id, block_size, "lmshrink.pack/1"])
    return {"new_fingerprint": key + "-tokenized"}, {"new_fingerprint": key + "-packed"}
