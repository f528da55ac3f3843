"""A Hub model card (`README.md`) in every model folder lmshrink writes, beside `lmshrink.json`.

The card follows the Hub's convention: YAML front matter (`base_model`, `license` inherited from
the teacher, `tags`, `datasets`, `pipeline_tag`, and `model-index` once scores exist), then how
the model was made (from the folder's `lmshrink.json`) and a results table. `lmshrink eval
--tasks` adds the scores it measured for the folder, so the folder can be pushed as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lmshrink.config import recorded
from lmshrink.evaluate.benchmarks import benchmark
from lmshrink.models import EMBEDDED_ORIGIN, looks_like_path
from lmshrink.records import RECORD, count, md_table, read_record, write_json, write_text

CARD = "README.md"
TAGS = {"truncate": "layer-pruning", "prune": "width-pruning", "pretrain": "continued-pretraining",
        "distill": "knowledge-distillation", "finetune": "fine-tuned"}


def front_matter(folder: str | Path) -> dict[str, Any]:
    """The YAML front matter of a folder's model card ({} if it has none)."""
    path = Path(folder) / CARD
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        return {}
    try:
        meta = yaml.safe_load(text[4:text.index("\n---\n", 4)])
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def origin(name: str | None) -> tuple[str | None, str | None]:
    """(Hub id, licence) of the model a name refers to: an embedded model's source on the Hub, a
    local folder's own card, or the name itself when it is a Hub id (licence unknown offline)."""
    if not name:
        return None, None
    if name in EMBEDDED_ORIGIN:
        return EMBEDDED_ORIGIN[name]
    path = Path(name)
    if path.exists():
        meta = front_matter(path if path.is_dir() else path.parent)
        return meta.get("base_model"), meta.get("license")
    if name.endswith(".gguf") or looks_like_path(name):
        return None, None
    return name, None


def _parent(record: dict[str, Any]) -> str | None:
    """The model this one was made from, as given on its command line."""
    return record.get("teacher") if record.get("command") in ("truncate", "prune") else (
        record.get("student") or record.get("model_source") or recorded(record.get("settings") or {}, "model"))


def _datasets(record: dict[str, Any]) -> list[str]:
    data = recorded(record.get("settings") or {}, "data") or []
    return sorted({d.removeprefix("hf:").split(":")[0] for d in data if isinstance(d, str) and d.startswith("hf:")})


def _how(record: dict[str, Any]) -> list[str]:
    """Bullet points: how the model was made, from its record."""
    command, settings = record.get("command"), record.get("settings") or {}
    lines = []
    if command == "truncate":
        kept = record.get("kept_layers") or []
        dropped = [i for i in range(record.get("teacher_layers") or 0) if i not in kept]
        lines.append(f"Truncated from `{record.get('teacher')}`: kept {len(kept)} of {record.get('teacher_layers')} "
                     f"blocks ({record.get('strategy')}): {kept}; dropped {dropped}.")
    elif command == "prune":
        w, t = record.get("width") or {}, record.get("teacher_width") or {}
        lines.append(f"Pruned from `{record.get('teacher')}` by activation importance (Minitron): "
                     + ", ".join(f"{axis} {t.get(axis)} -> {w.get(axis)}" for axis in w)
                     + f", blocks {record.get('teacher_layers')} -> {len(record.get('kept_layers') or [])}; "
                     f"{(record.get('parameters') or 0) / 1e6:.1f}M parameters. Every kept index is in `{RECORD}`.")
    elif command in ("pretrain", "distill"):
        metrics = record.get("metrics") or {}
        teacher = record.get("distill_teacher") or recorded(settings, "teacher") or record.get("teacher")
        how = "plain causal-LM loss" if command == "pretrain" else f"distillation from `{teacher}`"
        data = ", ".join(map(str, recorded(settings, "data") or []))
        lines.append(f"Healed `{record.get('student')}` with the {how} on {data}: "
                     f"{metrics.get('steps', 'n/a')} steps, {metrics.get('tokens_seen') or 0:,} tokens.")
        if metrics.get("heldout_ppl_after") is not None:
            before = metrics.get("heldout_ppl_before")
            lines.append(f"Held-out perplexity {before:.2f} -> {metrics['heldout_ppl_after']:.2f}." if before
                         else f"Held-out perplexity {metrics['heldout_ppl_after']:.2f}.")
        if record.get("kept_layers"):
            lines.append(f"Teacher blocks kept at truncation: {record['kept_layers']}.")
    elif command == "finetune":
        metrics = record.get("metrics") or {}
        lines.append(f"Fine-tuned `{record.get('model_source')}` on task `{settings.get('task')}` with method "
                     f"`{record.get('method')}`, seed {record.get('seed')}: "
                     + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float))) + ".")
    lines.append(f"Every setting is in `{RECORD}` (lmshrink {record.get('lmshrink_version')}, git {record.get('git')}).")
    return lines


def _results_index(name: str, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": name, "results": [
        {"task": {"type": "text-generation"},
         "dataset": {"name": r["task"], "type": r.get("dataset") or r["task"], "split": r.get("split")},
         "metrics": [{"type": r["metric"], "value": round(100 * r["value"], 2),
                      "name": f"{r['metric']} ({r.get('num_fewshot', 0)}-shot"
                              + (f", first {count(r['limit'], 'item')}" if r.get("limit") else "") + ")"}]}
        for r in results]}]


def card_name(folder: str | Path) -> str:
    """The model's name on its card: the folder's name (a run's `model/` folder: the run's)."""
    folder = Path(folder).absolute()
    return folder.parent.name if folder.name == "model" else folder.name


def render(name: str, record: dict[str, Any], results: list[dict[str, Any]] | None = None) -> str:
    """The card's text for a model called `name` and its record; `results` are benchmark scores."""
    base, licence = origin(_parent(record))
    classifier = record.get("command") == "finetune" and (record.get("settings") or {}).get("task") != "lm"
    meta: dict[str, Any] = {"library_name": "transformers"}
    if base:
        meta["base_model"] = base
    if licence:
        meta["license"] = licence
    meta["tags"] = ["lmshrink", TAGS.get(record.get("command") or "", "compressed")]
    if datasets := _datasets(record):
        meta["datasets"] = datasets
    meta["pipeline_tag"] = "text-classification" if classifier else "text-generation"
    if results:
        meta["model-index"] = _results_index(name, results)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", "",
             f"Made with lmshrink `{record.get('command')}`"
             + (f" from [{base}](https://huggingface.co/{base})" if base else "") + ".", "",
             "## How it was made", ""]
    lines += [f"- {line}" for line in _how(record)]
    lines += ["", "## Results", ""]
    if results:
        def score(r: dict[str, Any]) -> str:
            return f"{100 * r['value']:.1f}" + (f" ± {100 * r['stderr']:.1f}" if r.get("stderr") is not None else "")

        lines += md_table(("benchmark", "metric", "score (%)", "items", "split", "shots"), [
            (r["task"], r["metric"], score(r), f"{r['items']:,}", r["split"], r.get("num_fewshot", 0)) for r in results],
            "llrrlr")
        lines += ["", "Measured with lm-evaluation-harness by `lmshrink eval --tasks ...` (mean ± standard error)."]
    else:
        lines.append("Not evaluated yet: `lmshrink eval --models THIS_FOLDER --tasks core` adds the scores here.")
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{name}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", ""]
    return "\n".join(lines)


def save_model_record(folder: str | Path, record: dict[str, Any], name: str | None = None) -> None:
    """Write a model folder's `lmshrink.json` and its model card (`name`: the model's name on the
    card, when the folder is written in a temporary place first)."""
    write_json(Path(folder) / RECORD, record)
    results = list(record.get("benchmarks", {}).values())
    write_text(Path(folder) / CARD, render(name or card_name(folder), record, results))


def add_results(folder: str | Path, tasks: dict[str, dict[str, Any]], limit: int | None) -> None:
    """Merge benchmark scores into a folder's record (key `benchmarks`) and re-render its card."""
    record = read_record(folder)
    if record is None:
        return
    stored = record.setdefault("benchmarks", {})
    for task, score in tasks.items():
        bench = benchmark(task)
        stored[task] = {**{k: score[k] for k in ("task", "metric", "value", "stderr", "items", "split", "num_fewshot")},
                        "limit": limit, "dataset": bench.hub}
    save_model_record(folder, record)
