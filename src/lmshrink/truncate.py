"""`lmshrink truncate`: a student made of a subset of the teacher's blocks.

Embeddings, position embeddings, final norm and LM head are copied from the teacher (tied
weights stay tied); block i of the student is the teacher's block keep[i]. The student is
built from the teacher's config with the depth and per-layer fields re-indexed (see
`lmshrink.architectures`), so its blocks carry their new indices.

Strategies (n teacher blocks, k kept), as in the paper's code and generalised to any depth:
  alt        every (n/k)-th block from the bottom: 12 -> 6 keeps 0,2,4,6,8,10
  distil     evenly spread, first and last kept (DistilGPT-2's init): 0,2,4,7,9,11
  bottom     the first k blocks            top   the last k blocks
  importance drop the least important blocks by a score of `lmshrink score-layers`
  keep       the explicit list given with --keep
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmshrink.architectures import architecture_of, blocks_of, context_limit, get_path
from lmshrink.config import SettingsError, check, setting, to_dict
from lmshrink.errors import LmshrinkError
from lmshrink.model_card import save_model_record
from lmshrink.records import provenance, save_atomically
from lmshrink.score_layers import METRICS


class LayerSelectionError(LmshrinkError, ValueError):
    pass


def _alt(n: int, k: int, scores: dict | None) -> list[int]:
    return [i * n // k for i in range(k)]


def _distil(n: int, k: int, scores: dict | None) -> list[int]:
    if k == 1:
        return [0]
    return [int(i * (n - 1) / (k - 1) + 0.5) for i in range(k)]


def _bottom(n: int, k: int, scores: dict | None) -> list[int]:
    return list(range(k))


def _top(n: int, k: int, scores: dict | None) -> list[int]:
    return list(range(n - k, n))


def importance_keep(scores: dict[str, Any], k: int, metric: str = "block_influence") -> list[int]:
    """Blocks to keep by importance: drop the n-k lowest-scoring blocks, or for
    `angular_distance` the run of n-k consecutive blocks whose input and output differ least."""
    n = scores["num_layers"]
    if metric == "angular_distance":
        if k == n:
            return list(range(n))
        runs = scores["angular_distance"][str(n - k)]
        start = min(range(len(runs)), key=runs.__getitem__)
        return [i for i in range(n) if not start <= i < start + n - k]
    if metric not in scores:
        raise LayerSelectionError(
            f"the scores hold no {metric!r}; known metrics: {', '.join(m for m in METRICS if m in scores)} "
            "(ppl_increase needs score-layers run with --ppl)")
    ranked = sorted(range(n), key=lambda i: scores[metric][i], reverse=True)
    return sorted(ranked[:k])


STRATEGIES: dict[str, Callable[[int, int, dict | None], list[int]]] = {
    "alt": _alt,
    "distil": _distil,
    "bottom": _bottom,
    "top": _top,
    "importance": lambda n, k, scores: importance_keep(scores, k),  # metric chosen in select_layers
}


def select_layers(n: int, strategy: str, num_layers: int | None = None, keep: list[int] | None = None,
                  scores: dict | None = None, metric: str = "block_influence") -> list[int]:
    """The sorted teacher block indices a student keeps."""
    if keep is not None:
        validate_keep(keep, n)
        return list(keep)
    if strategy not in STRATEGIES:
        raise LayerSelectionError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}, or give --keep")
    k = num_layers if num_layers is not None else max(1, n // 2)
    if not 1 <= k <= n:
        raise LayerSelectionError(f"cannot keep {k} blocks of a {n}-block teacher; choose 1..{n}")
    if strategy == "importance":
        if scores is None:
            raise LayerSelectionError("strategy 'importance' needs scores (from `lmshrink score-layers`)")
        if scores["num_layers"] != n:
            raise LayerSelectionError(f"the scores are for a {scores['num_layers']}-block model, the teacher has {n}")
        chosen = importance_keep(scores, k, metric)
    else:
        chosen = STRATEGIES[strategy](n, k, scores)
    validate_keep(chosen, n)
    return chosen


def validate_keep(keep: list[int], n: int) -> None:
    if not keep:
        raise LayerSelectionError("keep at least one block")
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise LayerSelectionError(f"block index {bad[0]} is out of range: the teacher has blocks 0..{n - 1}")
    dup = sorted({i for i in keep if keep.count(i) > 1})
    if dup:
        raise LayerSelectionError(f"block {dup[0]} is listed twice; list each block once")
    if keep != sorted(keep):
        raise LayerSelectionError(f"list the blocks in increasing order (got {keep}); reordering blocks is not supported")


def truncate_model(teacher, keep: list[int]):
    """A new model holding copies of the teacher's blocks `keep` and all its non-block weights."""
    arch = architecture_of(teacher.config)
    n = len(blocks_of(teacher))
    validate_keep(keep, n)
    config = copy.deepcopy(teacher.config)
    setattr(config, arch.layer_count, len(keep))
    for name in arch.per_layer:
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) == n:
            setattr(config, name, [values[i] for i in keep])
    if arch.fix_config:
        arch.fix_config(config)
    student = type(teacher)(config).to(teacher.dtype)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    # Rename teacher block keep[j] -> student block j; everything else keeps its name.
    prefix = arch.blocks + "."
    new_index = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) in new_index:
                state[f"{prefix}{new_index[int(index)]}.{rest}"] = value
        else:
            state[key] = value
    student.load_state_dict(state, strict=True)
    student.eval()
    for j, block in enumerate(blocks_of(student)):
        for attr in arch.layer_index:
            if get_path(block, attr) != j:
                raise RuntimeError(f"block {j} of the student has {attr} = {get_path(block, attr)}")
    return student


@dataclass
class TruncateSettings:
    """Build a student from a subset of the teacher's blocks."""

    output: str = setting(help="folder to write the student to (save_pretrained format + lmshrink.json)")
    teacher: str = setting("smollm2-135m", "teacher: folder, Hub id, .gguf file or smollm2-135m")
    strategy: str = setting("alt", f"one of {', '.join(STRATEGIES)} (ignored when --keep is given)")
    keep: list[int] | None = setting(None, "explicit teacher blocks to keep, e.g. 0,2,5")
    num_layers: int | None = setting(None, "student depth (default: half the teacher's)")
    ratio: float | None = setting(None, "student depth as a fraction of the teacher's, e.g. 0.5")
    metric: str = setting("block_influence", f"importance score used by strategy importance: {', '.join(METRICS)}")
    scores: str | None = setting(None, "scores.json from score-layers; computed on --calib-data if not given")
    calib_data: str = setting("python-docs/library", "calibration text for computing scores")
    calib_tokens: int = setting(4096, "calibration tokens for computing scores")
    dtype: str = setting("float32", "float32, bfloat16 or float16")
    trust_remote_code: bool = setting(False, "allow models with custom code from the Hub")
    overwrite: bool = setting(False, "replace the output folder if it exists")

    def __post_init__(self) -> None:
        problems = []
        if Path(self.output).exists() and not self.overwrite:
            problems.append(f"output: {self.output} already exists; pass --overwrite or choose another folder")
        if self.keep is None and self.strategy not in STRATEGIES:
            problems.append(f"strategy: {self.strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
        if self.num_layers is not None and self.ratio is not None:
            problems.append("num_layers and ratio: give one of them, not both")
        if self.num_layers is not None and self.num_layers < 1:
            problems.append("num_layers: must be at least 1")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            problems.append("ratio: must be in (0, 1]")
        if self.metric not in METRICS:
            problems.append(f"metric: {self.metric!r} is unknown; choose one of {', '.join(METRICS)}")
        if self.keep is not None and (self.num_layers is not None or self.ratio is not None):
            problems.append("keep: an explicit list already fixes the depth; drop num_layers/ratio")
        check(problems)


def load_scores(path: str) -> dict[str, Any]:
    try:
        scores = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SettingsError(f"scores: {path} does not exist; run `lmshrink score-layers` first") from None
    except json.JSONDecodeError as err:
        raise SettingsError(f"scores: {path} is not valid JSON ({err})") from None
    if "block_influence" not in scores or "num_layers" not in scores:
        raise SettingsError(f"scores: {path} is not a score-layers output (no block_influence)")
    return scores


def run(settings: TruncateSettings, teacher=None) -> Path:
    """Truncate and save; `teacher` may be a pre-loaded `models.Loaded` (the demo reuses one)."""
    from lmshrink.models import load, no_tokenizer

    teacher = teacher or load(settings.teacher, settings.dtype, settings.trust_remote_code, need_tokenizer=False)
    n = len(blocks_of(teacher.model))
    k = settings.num_layers
    if settings.ratio is not None:
        k = max(1, round(n * settings.ratio))
    scores = None
    if settings.keep is None and settings.strategy == "importance":
        if settings.scores:
            scores = load_scores(settings.scores)
        else:
            from lmshrink.data import calibration_rows
            from lmshrink.score_layers import score

            if teacher.tokenizer is None:  # scoring reads calibration text
                raise no_tokenizer(teacher.source)
            length = min(512, context_limit(teacher.model.config) or 512)
            rows = calibration_rows(settings.calib_data, teacher.tokenizer, settings.calib_tokens, length)
            scores = score(teacher.model, rows, ppl=settings.metric == "ppl_increase")
    keep = select_layers(n, settings.strategy, k, settings.keep, scores, settings.metric)
    student = truncate_model(teacher.model, keep)
    record = provenance(
        "truncate", to_dict(settings), teacher=settings.teacher, teacher_source=teacher.source,
        teacher_layers=n, kept_layers=keep, strategy="keep" if settings.keep is not None else settings.strategy,
        scores=({m: scores[m] for m in METRICS if m in scores} if scores else None),
    )

    def save(tmp: Path) -> None:
        student.save_pretrained(tmp)
        if teacher.tokenizer is not None:
            teacher.tokenizer.save_pretrained(tmp)
        save_model_record(tmp, record, Path(settings.output).name)

    out = save_atomically(settings.output, save)
    print(f"student with {len(keep)}/{n} blocks {keep} ({record['strategy']}) written to {out}")
    if teacher.tokenizer is None:
        print(f"[lmshrink] {teacher.source} has no tokenizer, so the student has none either: truncation needs "
              f"none, but training and evaluation will; copy the teacher's tokenizer into {out}")
    return out
