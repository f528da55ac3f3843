"""`lmshrink export`: a model folder as GGUF files for llama.cpp, one per quantization type
(`lmshrink.export.gguf`), with a model card and a record of what each file holds."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmshrink.compress.sequential import SEQUENTIAL, lazy_model, one_block_at_a_time
from lmshrink.config import Settings, SettingsError, group, setting, to_dict
from lmshrink.errors import one_of
from lmshrink.export.gguf import (
    LLAMA_QUANTIZE_ONLY,
    QUANTS,
    export_problems,
    file_name,
    sliding_window_note,
    write_gguf,
)
from lmshrink.export.model_card import card_name, origin
from lmshrink.models import LoadArgs, load_tokenizer, no_tokenizer, resolve_dtype
from lmshrink.records import md_table, provenance, read_record, write_json, write_text

FORMATS = ("gguf",)
EXPORT_RECORD = "export.json"


@dataclass(kw_only=True)
class ExportSettings(Settings):
    """Write a model as GGUF files that llama.cpp, Ollama and LM Studio run, one per quantization type."""

    model: str = setting(help="model to export: a folder lmshrink wrote, any transformers folder, a Hub id, "
                              "or smollm2-135m")
    output: str | None = setting(None, "folder for the files (default: MODEL/gguf)")
    format: str = setting("gguf", f"file format: {', '.join(FORMATS)}")
    quant: list[str] = setting(["f16", "q8_0", "q4_0"], f"quantization types, one file each: {', '.join(QUANTS)}")
    name: str | None = setting(None, "the files' base name and general.name (default: the model folder's name)")
    pre_tokenizer: str | None = setting(None, "llama.cpp's pre-tokenizer name, where lmshrink cannot tell it "
                                              "from the tokenizer (e.g. llama-bpe, qwen2)")
    overwrite: bool = setting(False, "rewrite files that already exist (default: keep them, so a re-run "
                                     "only writes what is missing)", how_to_run=True)
    sequential: str = setting("auto", "read the model one tensor at a time from its safetensors (never the whole "
                                      "model in memory): on, off, or auto (on when the whole model would take more "
                                      "than half the machine's memory)")
    load: LoadArgs = group(LoadArgs, "how the models are loaded")

    def problems(self) -> list[str]:
        problems = super().problems()
        problems += one_of("sequential", self.sequential, SEQUENTIAL)
        if self.format not in FORMATS:
            problems.append(f"format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if not self.quant:
            problems.append(f"quant: give at least one of {', '.join(QUANTS)}")
        for q in self.quant:
            if q.lower() in LLAMA_QUANTIZE_ONLY:
                problems.append(f"quant: {q} needs llama.cpp's own quantizer: export f16, then run "
                                f"`llama-quantize NAME-F16.gguf NAME-{q.upper()}.gguf {q.upper()}`")
            else:
                problems += one_of("quant", q.lower(), QUANTS)
        if self.output is None and not Path(self.model).is_dir():
            problems.append(f"output: {self.model} is not a local folder; give --output")
        return problems


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def card(name: str, base_model: str | None, license: str | None, files: dict[str, dict[str, Any]]) -> str:
    """The folder's model card: Hub front matter and one line per file."""
    meta = ["---", "library_name: gguf", "tags:", "- gguf", "- llama.cpp", "- lmshrink"]
    if base_model:
        meta.append(f"base_model: {base_model}")
    if license:
        meta.append(f"license: {license}")
    lines = [*meta, "---", "", f"# {name} (GGUF)", "",
             "Written by `lmshrink export`; run with llama.cpp, e.g. "
             f"`llama-cli -m {next(iter(files))} -p \"Hello\"`, or load in Ollama, LM Studio or llama-cpp-python.",
             ""]
    lines += md_table(("file", "type", "MB", "tensors by type", "sha256"), [
        (file, info["quant"], f"{info['bytes'] / 2**20:,.1f}",
         ", ".join(f"{k} {v}" for k, v in sorted(info["tensor_types"].items())), info["sha256"][:16])
        for file, info in files.items()], "llrll")
    lines += ["", f"Provenance (teacher, kept blocks, every setting) is in each file's `lmshrink.record` metadata "
                  f"and in `{EXPORT_RECORD}`."]
    return "\n".join(lines) + "\n"


def run(settings: ExportSettings) -> Path:
    source, config = settings.load.check(settings.model)
    problems = export_problems(config)
    if problems:
        raise SettingsError(problems[0])
    weights = None
    if one_block_at_a_time(settings.sequential, source, resolve_dtype(settings.load.dtype, "cpu"), torch.device("cpu")):
        tokenizer = load_tokenizer(source, settings.load.trust_remote_code)
        if tokenizer is None:
            raise no_tokenizer(source)
        print(f"[lmshrink] export: {settings.model} read one tensor at a time from its safetensors", flush=True)
        model, weights = lazy_model(source, config, torch.device("cpu"))
    else:
        loaded = settings.load.load(settings.model, need_tokenizer=False, checked=(source, config))
        if loaded.tokenizer is None:
            raise no_tokenizer(loaded.source)
        model, tokenizer, source = loaded.model, loaded.tokenizer, loaded.source
    out = Path(settings.output or Path(settings.model) / "gguf")
    name = settings.name or card_name(source if Path(source).is_dir() else settings.model)
    record = read_record(source) or {}
    parent = record.get("teacher") or record.get("student")
    base_model, license = origin(settings.model if not record else parent)
    if note := sliding_window_note(config):
        print(f"[lmshrink] {note}")
    previous = json.loads((out / EXPORT_RECORD).read_text()).get("files", {}) if (out / EXPORT_RECORD).is_file() else {}
    files: dict[str, dict[str, Any]] = {}
    for quant in (q.lower() for q in settings.quant):
        path = out / file_name(name, quant)
        if path.is_file() and not settings.overwrite and path.name in previous:
            print(f"{path} exists; kept (--overwrite rewrites it)")
            files[path.name] = previous[path.name]
            continue
        info = write_gguf(model, tokenizer, path, quant, name, record=record or None,
                          base_model=base_model or parent, license=license, pre=settings.pre_tokenizer, weights=weights)
        files[path.name] = {"quant": quant, "bytes": path.stat().st_size, "sha256": sha256(path), **info}
        print(f"wrote {path} ({files[path.name]['bytes'] / 2**20:,.1f} MB, {quant})")
    files = {**{k: v for k, v in previous.items() if k not in files}, **files}
    export = provenance("export", to_dict(settings), source=source, model_record=record or None, files=files,
                        path="sequential" if weights is not None else "whole")
    write_json(out / EXPORT_RECORD, export)
    write_text(out / "README.md", card(name, base_model or parent, license, files))
    return out
