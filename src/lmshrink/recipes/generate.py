"""`lmshrink generate`: a healing corpus the teacher writes itself (sequence-level KD data).

Sampling at temperature 1 with no top-p cut draws from the teacher's own distribution, so the
text covers what the teacher knows, not only the domain of whatever corpus is at hand, and
carries no licence of its own; `--top-p` (nucleus sampling) or a lower temperature trades that
for text a small teacher writes more fluently (its own tail at T 1 is often word salad).
A sample starts from the teacher's BOS token (no `--prompts`), or from the first
`--prompt-tokens` tokens of a corpus document, cycling through the documents when more samples
are asked for than there are; it ends at the teacher's EOS or after `--new-tokens`.

Written as part-NNNNN.jsonl files of `--batch-size` records each (one batched `generate` call with
the KV cache, seeded by its index): a part is written whole or not at all, so an interrupted run
carries on with the parts it had not written and ends with the same text as an uninterrupted one.
The folder is a text source: `lmshrink distill --data OUTPUT` (alone, or `--data
OUTPUT,python-docs/library` with `--data-weights`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmshrink.config import Settings, SettingsError, group, setting, to_dict
from lmshrink.data.sources import DataError, Framing, documents
from lmshrink.data.teacher_text import continue_rows, start_tokens
from lmshrink.heal.runs import changed_settings
from lmshrink.integrity import kept, problem, set_aside
from lmshrink.models import LoadArgs, pick_device
from lmshrink.records import RECORD, count, holding_output, provenance, read_record, write_json, write_text


@dataclass(kw_only=True)
class GenerateSettings(Settings):
    """Write a healing corpus sampled from a teacher: jsonl records with id, prompt source, settings and text."""

    output: str = setting(help="folder for the samples (part-NNNNN.jsonl) and lmshrink.json; a --data source", how_to_run=True)
    teacher: str = setting("smollm2-135m", "the model that writes: folder, Hub id, .gguf file or smollm2-135m")
    samples: int = setting(64, "documents to write")
    new_tokens: int = setting(512, "tokens sampled after each prompt at most (a sample ends earlier at EOS)")
    prompts: str = setting("", "text whose documents' first --prompt-tokens tokens start the samples (file, folder, "
                               ".jsonl, hf:..., corpus name); empty: every sample starts from the BOS token")
    prompt_tokens: int = setting(32, "tokens of each prompt document a sample continues")
    temperature: float = setting(1.0, "sampling temperature (1 with --top-p 1: the teacher's own distribution)")
    top_p: float = setting(1.0, "nucleus sampling: draw only from the most likely tokens whose probabilities reach "
                                "this together (1: every token)")
    batch_size: int = setting(128, "samples per generate call, and per part file (the unit of resumption)")
    seed: int = setting(0, "random seed (part i is sampled with seed + i)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N", how_to_run=True)
    load: LoadArgs = group(lambda: LoadArgs(dtype="auto"), "how the models are loaded")

    def problems(self) -> list[str]:
        problems = super().problems()
        for name in ("samples", "new_tokens", "prompt_tokens", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be positive")
        if not self.temperature > 0:
            problems.append(f"temperature: must be positive (got {self.temperature:g}); 1 samples the teacher's "
                            "own distribution")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p: a probability mass in (0, 1] (got {self.top_p:g}); 1 keeps every token")
        return problems


def prompt_rows(s: GenerateSettings, tokenizer) -> list[tuple[str, list[int]]]:
    """(source, token ids) to start each sample from: the start tokens alone (`start_tokens`), or
    the first prompt_tokens tokens of the prompt documents long enough to have them, after the
    tokenizer's own start tokens (`Framing`), cycled."""
    if not s.prompts:
        return [("bos", start_tokens(tokenizer))] * s.samples
    framing = Framing.of(tokenizer)
    found = []
    for i, text in enumerate(documents(s.prompts)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= s.prompt_tokens:
            found.append((f"{s.prompts}#{i}", [*framing.start, *ids[: s.prompt_tokens]]))
        if len(found) == s.samples:
            break
    if not found:
        raise DataError(f"prompts: no document of {s.prompts!r} has {s.prompt_tokens} tokens; give a smaller "
                        "--prompt-tokens or other text")
    return [found[i % len(found)] for i in range(s.samples)]


def part_file(out: Path, part: int) -> Path:
    """The jsonl file of one batch of samples: the unit a stopped run carries on from."""
    return out / f"part-{part:05d}.jsonl"


def whole_part(path: Path, rows: int) -> bool:
    """A part written before is kept when every line of it reads and it holds all its rows; a damaged
    one is set aside (`integrity.kept`) and sampled again, with the same seed."""
    if not kept(path, "it is sampled again"):
        return False
    if (lines := len(path.read_text().splitlines())) == rows:
        return True
    aside = set_aside(path)
    print(f"[lmshrink] {path} holds {lines} of its {rows} samples: set aside as {aside.name}; it is sampled again",
          flush=True)
    return False


@holding_output
def run(s: GenerateSettings) -> dict[str, Any]:
    out = Path(s.output)
    # resolved before the settings are compared: a part is only ever continued in its dtype
    s = replace(s, load=s.load.on(s.device))
    previous = out / ".settings.json"
    if previous.is_file() and (damage := problem(previous)):
        raise SettingsError(f"output: {previous} is damaged ({damage}), so what its parts were sampled with is "
                            "unknown; give another --output, or remove this folder")
    if previous.is_file():  # carry on only with the same settings: other ones would mix two corpora
        changed = changed_settings(json.loads(previous.read_text()).get("settings"), s)
        if changed:
            raise SettingsError(f"output: {out} holds samples written with other settings ({'; '.join(changed)}); "
                                "give another --output, or run it with those values to carry on")
    teacher = s.load.load(s.teacher)
    model, tokenizer = teacher.model.to(pick_device(s.device)).eval(), teacher.tokenizer
    prompts = prompt_rows(s, tokenizer)
    if not previous.is_file():  # what the parts are written with, once everything they need is there
        write_json(previous, provenance("generate", to_dict(s)))
    parts = math.ceil(s.samples / s.batch_size)
    batches = {part: prompts[part * s.batch_size : (part + 1) * s.batch_size] for part in range(parts)}
    batches = {part: rows for part, rows in batches.items()  # the others were written before an interruption
               if not whole_part(part_file(out, part), len(rows))}
    written, seconds = 0, 0.0
    # positions to sample (rows x new tokens; a part ends early once every row has met EOS)
    with tqdm(total=sum(map(len, batches.values())) * s.new_tokens, unit="tok", unit_scale=True,
              desc=f"sampling {len(batches)} of {parts} parts", file=sys.stderr) as bar:
        for part, rows in batches.items():
            torch.manual_seed(s.seed + part)
            started, bound = time.perf_counter(), bar.n + len(rows) * s.new_tokens
            ids = continue_rows(model, tokenizer, torch.tensor([p for _, p in rows]), s.new_tokens, s.temperature,
                                stop_at_eos=True, top_p=s.top_p, on_step=bar.update)
            seconds += time.perf_counter() - started
            lines = []
            for i, ((source, prompt), row) in enumerate(zip(rows, ids.tolist(), strict=True)):
                new = row[len(prompt):]
                if tokenizer.eos_token_id in new:
                    new = new[: new.index(tokenizer.eos_token_id)]
                written += len(new)
                prompt_text = "" if source == "bos" else tokenizer.decode(prompt, skip_special_tokens=True)
                lines.append(json.dumps({
                    "id": f"{out.name}-{part * s.batch_size + i:06d}", "prompt_source": source, "prompt": prompt_text,
                    "text": prompt_text + tokenizer.decode(new, skip_special_tokens=True), "new_tokens": len(new),
                    "settings": {"teacher": s.teacher, "temperature": s.temperature, "top_p": s.top_p,
                                 "seed": s.seed + part, "dtype": s.load.dtype}}))
            write_text(part_file(out, part), "\n".join(lines) + "\n")
            bar.update(bound - bar.n)
            bar.set_postfix_str(f"{written / seconds:,.0f} new tokens/s")
    records = [json.loads(line) for p in sorted(out.glob("part-*.jsonl")) for line in p.read_text().splitlines()]
    before = read_record(out) or {}  # a run with nothing left to sample keeps the speed measured before
    record = provenance("generate", to_dict(s), documents=len(records),
                        tokens=sum(r["new_tokens"] for r in records),
                        tokens_per_s=written / seconds if seconds else before.get("tokens_per_s"),
                        device=str(model.device))
    write_json(out / RECORD, record)
    print(f"generate: {count(len(records), 'document')}, {count(record['tokens'], 'token')} sampled from "
          f"{s.teacher} at T {s.temperature:g}{f', top-p {s.top_p:g}' if s.top_p < 1 else ''} in {out}"
          + (f" ({record['tokens_per_s']:,.0f} tokens/s)" if seconds else ""))
    return record
