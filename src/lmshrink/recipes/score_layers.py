"""`lmshrink score-layers`: score every block of a model on calibration text (`lmshrink.compress.importance`)
and write scores.json, scores.png and lmshrink.json; for architectures that `lmshrink prune`
can narrow, also every head, MLP channel and hidden channel (`lmshrink.compress.width`):
width_scores.json and width_scores.png; with `--search-to K`, also the cuts measured down to K
blocks (`lmshrink.compress.cut_search`): the iterative search's path and every contiguous span, search.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lmshrink.architectures import blocks_of, check_length
from lmshrink.compress.cut_search import (
    SEARCHES,
    CutSearch,
    contiguous_blockwise,
    files_fingerprint,
    iterative_blockwise,
    progress_file,
)
from lmshrink.compress.importance import plot, score, score_blockwise
from lmshrink.compress.model_gap import MEASURES
from lmshrink.compress.repair import REPAIRS, repair_problems
from lmshrink.compress.sequential import SEQUENTIAL, Blockwise, lazy_model, one_block_at_a_time
from lmshrink.compress.width import WIDTH, WidthSums, plot_scores, width_scores
from lmshrink.config import Settings, SettingsError, group, setting, to_dict
from lmshrink.data.sources import Framing, calibration_rows
from lmshrink.data.teacher_text import fingerprint
from lmshrink.errors import one_of
from lmshrink.models import LoadArgs, load_tokenizer, no_tokenizer, pick_device
from lmshrink.records import RECORD, provenance, write_json


@dataclass
class ScoreSettings(Settings):
    """Score every block of a model on calibration text; writes scores.json and scores.png."""

    model: str = setting("smollm2-135m", "model to score: folder, Hub id, .gguf file or smollm2-135m")
    data: str = setting("python-docs/library", "calibration text: file, folder, .jsonl, hf:NAME[:CONFIG][:SPLIT] or corpus name")
    output: str = setting("runs/scores", "folder for scores.json and scores.png")
    tokens: int = setting(4096, "calibration tokens")
    seq_len: int = setting(512, "tokens per calibration row")
    batch_size: int = setting(4, "rows per forward pass")
    ppl: bool = setting(True, "also measure the exact perplexity increase of removing each block (one pass per block)")
    width: bool = setting(True, "also score heads, MLP channels and hidden channels (for lmshrink prune --scores)")
    search_to: int | None = setting(None, "also measure cuts down to this many blocks: the iterative search's path "
                                          "and every contiguous span (search.json)")
    search_repair: str = setting("refit", f"repair applied to every measured cut: {', '.join(REPAIRS)}")
    search_measure: str = setting("kl", f"what the searches minimise: {', '.join(MEASURES)}")
    sequential: str = setting("auto", "read the model one block at a time from its safetensors (at most one block's "
                                      "weights in memory, float32): on, off, or auto (on when the whole model "
                                      "would take more than half the device's memory)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    load: LoadArgs = group(lambda: LoadArgs(dtype="auto"), "how the models are loaded")

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.seq_len < 2:
            problems.append("seq_len: must be at least 2")
        if self.tokens < self.seq_len:
            problems.append(f"tokens: must be at least seq_len ({self.seq_len})")
        if self.batch_size < 1:
            problems.append("batch_size: must be positive")
        if self.search_to is not None and self.search_to < 1:
            problems.append("search_to: must be at least 1")
        problems += one_of("search_repair", self.search_repair, REPAIRS)
        problems += one_of("search_measure", self.search_measure, MEASURES)
        problems += one_of("sequential", self.sequential, SEQUENTIAL)
        return problems


def run(settings: ScoreSettings) -> dict[str, Any]:
    settings = replace(settings, load=settings.load.on(settings.device))  # recorded as run
    source, config = settings.load.check(settings.model)
    if one_block_at_a_time(settings.sequential, source, settings.load.dtype, pick_device(settings.device)):
        return run_sequential(settings, source, config)
    loaded = settings.load.load(settings.model, checked=(source, config))
    model = loaded.model.to(pick_device(settings.device))
    check_length(model.config, settings.seq_len, "seq_len")
    if settings.search_to is not None:  # every setting checked before any scoring (minutes on a large model)
        search_problems(model, settings)
    rows = calibration_rows(settings.data, loaded.tokenizer, settings.tokens, settings.seq_len)
    print(f"scoring {len(blocks_of(model))} blocks of {settings.model} on {rows.numel():,} tokens of {settings.data}")
    scores = write_scores(settings, score(model, rows, settings.batch_size, settings.ppl), loaded.tokenizer, "whole")
    out = Path(settings.output)
    if settings.width and model.config.model_type in WIDTH:
        write_widths(settings, width_scores(model, rows, settings.batch_size))
    if settings.search_to is not None:
        search = CutSearch(model, rows, settings.search_repair, settings.search_measure, settings.batch_size)
        search.progress = progress_file(fingerprint(model), search.repair, search.measure, rows, None)
        scores["search"] = measured_cuts(len(blocks_of(model)), settings, out,
                                         {name: lambda k, method=method: method(search, k)
                                          for name, method in SEARCHES.items()})
    return scores


def run_sequential(settings: ScoreSettings, source: str, config) -> dict[str, Any]:
    """score-layers with the model read one block at a time (`compress.sequential`): the block scores
    and the width scores in one pass, then the searches walked block by block."""
    if settings.search_to is not None and settings.search_repair not in ("none", "refit", "replaceme"):
        raise SettingsError(f"search_repair: {settings.search_repair} is not done block by block; use refit, "
                            "replaceme or none, or --sequential off on a machine that holds the model")
    device = pick_device(settings.device)
    tokenizer = load_tokenizer(source, settings.load.trust_remote_code)
    if tokenizer is None:
        raise no_tokenizer(source)
    check_length(config, settings.seq_len, "seq_len")
    model, weights = lazy_model(source, config, device)
    if settings.search_to is not None:  # every setting checked before any scoring
        search_problems(model, settings)
    rows = calibration_rows(settings.data, tokenizer, settings.tokens, settings.seq_len)
    n = len(blocks_of(model))
    print(f"scoring {n} blocks of {settings.model} on {rows.numel():,} tokens of {settings.data}, one block at a "
          f"time (float32)")
    sums = WidthSums(config) if settings.width and config.model_type in WIDTH else None
    scores = score_blockwise(Blockwise(model, weights, rows, settings.batch_size), settings.ppl, sums)
    if sums is not None:
        write_widths(settings, sums.result(rows.numel()))
    scores = write_scores(settings, scores, tokenizer, "sequential")
    if settings.search_to is not None:
        repair, measure = settings.search_repair, settings.search_measure
        fit = Blockwise(model, weights, rows, settings.batch_size) if repair != "none" else None
        walked = Blockwise(model, weights, rows, settings.batch_size)
        progress = progress_file(files_fingerprint(weights.folder), repair, measure, rows, None)
        scores["search"] = measured_cuts(n, settings, Path(settings.output), {
            "iterative": lambda k: iterative_blockwise(fit, walked, k, repair, measure, progress)[:2],
            "contiguous": lambda k: contiguous_blockwise(fit, walked, k, repair, measure)[:2]})
    return scores


def write_widths(settings: ScoreSettings, widths: dict[str, Any]) -> None:
    """width_scores.json and width_scores.png (what `prune --scores` reads)."""
    out = Path(settings.output)
    write_json(out / "width_scores.json", provenance("width-scores", to_dict(settings), **widths))
    plot_scores(widths, out / "width_scores.png", f"{settings.model}: activation importance on {settings.data}")
    print(f"wrote {out / 'width_scores.json'} and {out / 'width_scores.png'}")


def write_scores(settings: ScoreSettings, scores: dict[str, Any], tokenizer, path: str) -> dict[str, Any]:
    """scores.json (and lmshrink.json, the same record) and scores.png; the least influential blocks said."""
    out = Path(settings.output)
    record = provenance("score-layers", to_dict(settings), framing=Framing.of(tokenizer).record(tokenizer),
                        path=path, **scores)
    write_json(out / "scores.json", record)
    write_json(out / RECORD, record)
    plot(scores, out / "scores.png", f"{settings.model}: block importance on {settings.data}")
    order = sorted(range(scores["num_layers"]), key=lambda i: scores["block_influence"][i])
    print(f"least influential blocks (BI): {order[: max(1, len(order) // 4)]}")
    print(f"wrote {out / 'scores.json'} and {out / 'scores.png'}")
    return scores


def search_problems(model, settings: ScoreSettings) -> None:
    """Refuse a search this model cannot run, with one line (before anything is scored)."""
    problems = repair_problems(model.config, settings.search_repair)
    if problems:
        raise SettingsError(problems[0].replace("repair:", "search_repair:").replace("--repair", "--search-repair"))
    n = len(blocks_of(model))
    if settings.search_to >= n:
        raise SettingsError(f"search_to: the model has {n} blocks; give fewer")


def measured_cuts(n: int, settings: ScoreSettings, out: Path, searches: dict[str, Callable]) -> dict[str, Any]:
    """The iterative search's path and every contiguous span, down to `search_to` blocks (search.json):
    `searches` runs each, on the whole model (`CutSearch`) or block by block."""
    k = settings.search_to
    print(f"measuring cuts to {k} blocks ({settings.search_measure}, each repaired by {settings.search_repair})")
    results = {}
    for name, run_search in searches.items():
        keep, path = run_search(k)
        results[name] = {"kept_layers": keep, "removed": [i for i in range(n) if i not in keep], "path": path}
    write_json(out / "search.json", provenance("score-layers", to_dict(settings), num_layers=n, target=k,
                                               measure=settings.search_measure, repair=settings.search_repair,
                                               **results))
    order = [step["removed"] for step in results["iterative"]["path"]]
    print(f"iterative path (removed in order): {order}; best contiguous span: {results['contiguous']['removed']}")
    print(f"wrote {out / 'search.json'}")
    return results
