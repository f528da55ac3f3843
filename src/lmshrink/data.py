"""Text sources for calibration and evaluation, read into one token stream.

A source is one of:
  - a text file, or a folder of them (read recursively, in sorted order);
  - a `.jsonl` / `.jsonl.gz` file (the `text` field of each line);
  - `hf:NAME[:CONFIG][:SPLIT]`, a Hub dataset (streamed, `text` column);
  - a corpus name fetched by `lmshrink fetch` (see `lmshrink.assets.CORPORA`).
Documents are joined with the tokenizer's EOS token, the usual packing for LM evaluation.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import torch

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".tex", ".jsonl"}


class DataError(ValueError):
    pass


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise DataError(f"{path} looks binary (NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err}); convert it (e.g. `iconv -t utf-8`)") from None


def _jsonl(path: Path, field: str) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path}:{n} is not valid JSON") from None
            if field not in record:
                raise DataError(f"{path}:{n} has no {field!r} field (fields: {', '.join(record)})")
            yield str(record[field])


def _hub(spec: str, field: str) -> Iterator[str]:
    from datasets import load_dataset

    name, config, split = (spec.split(":", 3)[1:] + [None, None])[:3]
    dataset = load_dataset(name, config or None, split=split or "train", streaming=True)
    for record in dataset:
        yield str(record[field])


def documents(source: str, field: str = "text") -> Iterator[str]:
    """Yield the documents of a source (see the module docstring for the forms)."""
    from lmshrink.assets import CORPORA, corpus_path

    if source.startswith("hf:"):
        yield from _hub(source, field)
        return
    path = corpus_path(source) if source.split("/")[0] in CORPORA and not Path(source).exists() else Path(source)
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
        yield _read_text(path)


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


def blocks(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Cut a token stream into full (N, length) rows, dropping the ragged tail."""
    n = tokens.numel() // length
    if n == 0:
        raise DataError(f"only {tokens.numel()} tokens, fewer than one block of {length}")
    return tokens[: n * length].view(n, length)
