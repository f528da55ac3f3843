"""`lmshrink truncate`: a student made of a subset of the teacher's blocks (`lmshrink.compress.truncation`),
chosen by a fixed strategy, by block scores or by measuring cuts (`lmshrink.compress.cut_search`), repaired
without training (`lmshrink.compress.repair`), and saved as a plain transformers folder with its tokenizer,
lmshrink.json and model card.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmshrink.architectures import architecture_of, blocks_of, context_limit
from lmshrink.compress.cut import CHOICES, CutArgs, cut, cut_sequential, kept_count
from lmshrink.compress.importance import METRICS, read_scores, score, score_blockwise
from lmshrink.compress.sequential import (
    SEQUENTIAL,
    Blockwise,
    lazy_model,
    one_block_at_a_time,
    write_student,
)
from lmshrink.config import Settings, group, setting, to_dict
from lmshrink.data.sources import calibration_rows
from lmshrink.errors import one_of
from lmshrink.export.model_card import save_model_record
from lmshrink.models import LoadArgs, load_tokenizer, no_tokenizer, pick_device, resolve_dtype
from lmshrink.records import provenance, save_atomically


@dataclass(kw_only=True)
class TruncateSettings(Settings):
    """Build a student from a subset of the teacher's blocks, repaired without training."""

    output: str = setting(help="folder to write the student to (save_pretrained format + lmshrink.json)", how_to_run=True)
    teacher: str = setting("smollm2-135m", "teacher: folder, Hub id, .gguf file or smollm2-135m")
    strategy: str = setting("alt", f"one of {', '.join(CHOICES)} (ignored when --keep is given)")
    keep: list[int] | None = setting(None, "explicit teacher blocks to keep, e.g. 0,2,5")
    num_layers: int | None = setting(None, "student depth (default: half the teacher's)")
    ratio: float | None = setting(None, "student depth as a fraction of the teacher's, e.g. 0.5")
    metric: str = setting("block_influence", f"importance score used by strategy importance: {', '.join(METRICS)}")
    scores: str | None = setting(None, "scores.json from score-layers; computed on --calib-data if not given")
    calib_data: str = setting("python-docs/library", "calibration text for computing scores")
    calib_tokens: int = setting(4096, "calibration tokens for computing scores")
    sequential: str = setting("auto", "read the teacher one block at a time from its safetensors and write the "
                                      "student shard by shard (at most one block's weights in memory, float32): "
                                      "on, off, or auto (on when the whole teacher would take more than half the "
                                      "machine's memory)")
    load: LoadArgs = group(LoadArgs, "how the models are loaded")
    overwrite: bool = setting(False, "replace the output folder if it exists", how_to_run=True)
    cut: CutArgs = group(CutArgs, "measured block choice and training-free repair")

    def problems(self) -> list[str]:
        problems = super().problems()
        if Path(self.output).exists() and not self.overwrite:
            problems.append(f"output: {self.output} already exists; pass --overwrite or choose another folder")
        if self.keep is None:
            problems += one_of("strategy", self.strategy, CHOICES)
        if self.num_layers is not None and self.ratio is not None:
            problems.append("num_layers and ratio: give one of them, not both")
        if self.num_layers is not None and self.num_layers < 1:
            problems.append("num_layers: must be at least 1")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            problems.append("ratio: must be in (0, 1]")
        problems += one_of("metric", self.metric, METRICS)
        if self.keep is not None and (self.num_layers is not None or self.ratio is not None):
            problems.append("keep: an explicit list already fixes the depth; drop num_layers/ratio")
        problems += one_of("sequential", self.sequential, SEQUENTIAL)
        return problems


def load_scores(path: str) -> dict[str, Any]:
    return read_scores(path, ("block_influence", "num_layers"),
                       f"{path} does not exist; run `lmshrink score-layers` first")


def depth(settings: TruncateSettings, n: int) -> int:
    """The student's depth: --keep's length, --num-layers, --ratio (said how it rounds) or half the
    teacher's."""
    if settings.keep is not None:
        return len(settings.keep)
    if settings.ratio is not None:
        k = kept_count(n, settings.ratio)
        print(f"ratio {settings.ratio:g} of {n} blocks: keeping {k} ({n * settings.ratio:g}, rounded half up)")
        return k
    return settings.num_layers if settings.num_layers is not None else max(1, n // 2)


def run(settings: TruncateSettings) -> Path:
    """Truncate the teacher and save the student."""
    source, config = settings.load.check(settings.teacher)
    if one_block_at_a_time(settings.sequential, source, resolve_dtype(settings.load.dtype, "cpu"), pick_device("auto")):
        return run_sequential(settings, source, config)
    teacher = settings.load.load(settings.teacher, need_tokenizer=False, checked=(source, config))
    n = len(blocks_of(teacher.model))
    k = depth(settings, n)
    scores = None
    if settings.keep is None and settings.strategy == "importance":
        if settings.scores:
            scores = load_scores(settings.scores)
        else:
            if teacher.tokenizer is None:  # scoring reads calibration text
                raise no_tokenizer(teacher.source)
            length = min(512, context_limit(teacher.model.config) or 512)
            rows = calibration_rows(settings.calib_data, teacher.tokenizer, settings.calib_tokens, length)
            scores = score(teacher.model, rows, ppl=settings.metric == "ppl_increase")
    student, keep, cut_record = cut(teacher.model, teacher.tokenizer, n, k, settings.strategy, settings.keep,
                                    scores, settings.metric, settings.cut, settings.calib_data, settings.calib_tokens)
    record = provenance(
        "truncate", to_dict(settings), teacher=settings.teacher, teacher_source=teacher.source,
        teacher_layers=n, kept_layers=keep, strategy="keep" if settings.keep is not None else settings.strategy,
        scores=({m: scores[m] for m in METRICS if m in scores} if scores else None), **cut_record,
    )

    def save(tmp: Path) -> None:
        student.save_pretrained(tmp)
        if teacher.tokenizer is not None:
            teacher.tokenizer.save_pretrained(tmp)
        save_model_record(tmp, record, Path(settings.output).name)

    out = save_atomically(settings.output, save)
    repaired = f", repaired by {settings.cut.repair}" if settings.cut.repair != "none" else ""
    print(f"student with {len(keep)}/{n} blocks {keep} ({record['strategy']}{repaired}) written to {out}")
    if teacher.tokenizer is None:
        print(f"[lmshrink] {teacher.source} has no tokenizer, so the student has none either: truncation needs "
              f"none, but training and evaluation will; copy the teacher's tokenizer into {out}")
    return out


def run_sequential(settings: TruncateSettings, source: str, config) -> Path:
    """The cut with the teacher read one block at a time and the student written shard by shard
    (`compress.sequential`): block scores, the repair and the student all from one lazy teacher."""
    device = pick_device("auto")
    tokenizer = load_tokenizer(source, settings.load.trust_remote_code)
    n = getattr(config, architecture_of(config).layer_count)
    k = depth(settings, n)
    model, weights = lazy_model(source, config, device)
    length = min(512, context_limit(config) or 512)
    scores = None
    needs_text = settings.cut.repair != "none" or (settings.keep is None and settings.strategy == "contiguous") or (
        settings.keep is None and settings.strategy == "importance" and not settings.scores)
    if needs_text and tokenizer is None:
        raise no_tokenizer(source)
    if settings.keep is None and settings.strategy == "importance":
        if settings.scores:
            scores = load_scores(settings.scores)
        else:
            rows = calibration_rows(settings.calib_data, tokenizer, settings.calib_tokens, length)
            scores = score_blockwise(Blockwise(model, weights, rows, 4), ppl=settings.metric == "ppl_increase")
    runner, keep, record = cut_sequential(model, weights, tokenizer, n, k, settings.strategy, settings.keep, scores,
                                          settings.metric, settings.cut, settings.calib_data)
    record = provenance(
        "truncate", to_dict(settings), teacher=settings.teacher, teacher_source=source, teacher_layers=n,
        kept_layers=keep, strategy="keep" if settings.keep is not None else settings.strategy, path="sequential",
        scores=({m: scores[m] for m in METRICS if m in scores} if scores else None), **record)

    def save(tmp: Path) -> None:
        write_student(runner, keep, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_model_record(tmp, record, Path(settings.output).name)

    out = save_atomically(settings.output, save)
    print(f"student with {len(keep)}/{n} blocks {keep} ({record['strategy']}, one block at a time) written to {out}")
    return out
