"""`lmshrink prune`: a student narrower (heads, MLP channels, hidden size) and optionally shallower
than its teacher, the units kept chosen by activation importance (`lmshrink.compress.width`, Minitron),
saved as a plain transformers folder that loads with no lmshrink code.

Give the target width (`--hidden-size`, `--intermediate-size`, `--num-heads`, `--num-kv-heads`,
`--num-layers`), or a size (`--target-params 100e6` or `--ratio 0.75` of the teacher's
parameters) and the axes to reach it along (`--axes width|depth|both`).

    output/  config.json, model.safetensors, tokenizer, README.md, lmshrink.json (every kept
             index), width_scores.json + width_scores.png (the activation scores used)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmshrink.architectures import architecture_of, context_limit, student_config
from lmshrink.compress.cut import CHOICES, CutArgs, cut, cut_sequential
from lmshrink.compress.importance import METRICS, read_scores, score, score_blockwise
from lmshrink.compress.sequential import SEQUENTIAL, Blockwise, lazy_model, one_block_at_a_time, write_student
from lmshrink.compress.width import (
    AXES,
    SCORE_KEYS,
    Plan,
    WidthSums,
    check_target,
    count_parameters_of,
    layout_of,
    plan,
    plot_scores,
    prune_width,
    pruned_config,
    shape,
    split_target,
    width_scores,
    width_scores_blockwise,
)
from lmshrink.config import Settings, SettingsError, check, group, setting, to_dict
from lmshrink.data.sources import calibration_rows
from lmshrink.errors import one_of
from lmshrink.evaluate.measure import count_parameters
from lmshrink.export.model_card import save_model_record
from lmshrink.models import LoadArgs, load_tokenizer, no_tokenizer, pick_device, resolve_dtype
from lmshrink.records import provenance, save_atomically, write_json


@dataclass(kw_only=True)
class PruneSettings(Settings):
    """Prune a teacher's width (heads, MLP channels, hidden size) and depth by activation importance."""

    output: str = setting(help="folder to write the student to (save_pretrained format + lmshrink.json)", how_to_run=True)
    teacher: str = setting("smollm2-135m", "teacher: folder, Hub id, .gguf file or smollm2-135m")
    hidden_size: int | None = setting(None, "hidden (embedding) channels to keep")
    intermediate_size: int | None = setting(None, "MLP channels to keep in every layer")
    num_heads: int | None = setting(None, "query heads to keep in every layer")
    num_kv_heads: int | None = setting(None, "key/value heads (grouped-query attention) to keep in every layer "
                                             "(default: the teacher's where the heads still split evenly, else "
                                             "whole groups)")
    num_layers: int | None = setting(None, "blocks to keep (depth), chosen by --strategy")
    target_params: float | None = setting(None, "total parameters to reach, e.g. 100e6 (instead of explicit sizes)")
    ratio: float | None = setting(None, "parameters to reach as a fraction of the teacher's, e.g. 0.75")
    axes: str = setting("both", f"with --target-params / --ratio, which axes shrink: {', '.join(AXES)}")
    strategy: str = setting("importance", f"which blocks a shallower student keeps: {', '.join(CHOICES)}")
    metric: str = setting("block_influence", f"block score of strategy importance: {', '.join(METRICS)}")
    scores: str | None = setting(None, "folder of `lmshrink score-layers` (scores.json, width_scores.json); "
                                       "computed on --calib-data if not given")
    calib_data: str = setting("python-docs/library", "calibration text for the importance scores")
    calib_tokens: int = setting(4096, "calibration tokens")
    load: LoadArgs = group(LoadArgs, "how the models are loaded")
    sequential: str = setting("auto", "read the teacher one block at a time from its safetensors and write the "
                                      "student shard by shard (at most one block's weights in memory, float32): "
                                      "on, off, or auto (on when the whole teacher would take more than half the "
                                      "machine's memory)")
    overwrite: bool = setting(False, "replace the output folder if it exists", how_to_run=True)
    cut: CutArgs = group(CutArgs, "measured block choice and training-free repair of a shallower student")

    def sizes(self) -> dict[str, int | None]:
        return {"hidden": self.hidden_size, "intermediate": self.intermediate_size, "heads": self.num_heads,
                "kv_heads": self.num_kv_heads, "layers": self.num_layers}

    def problems(self) -> list[str]:
        problems = super().problems()
        if Path(self.output).exists() and not self.overwrite:
            problems.append(f"output: {self.output} already exists; pass --overwrite or choose another folder")
        explicit = [k for k, v in self.sizes().items() if v is not None]
        budget = [k for k in ("target_params", "ratio") if getattr(self, k) is not None]
        if len(budget) > 1 or (budget and explicit):
            problems.append("target_params, ratio, sizes: give explicit sizes, or one of --target-params / --ratio")
        if not budget and not explicit:
            problems.append("sizes: give what to keep (--hidden-size, --intermediate-size, --num-heads, "
                            "--num-kv-heads, --num-layers) or a size (--target-params / --ratio)")
        problems += [f"{k}: must be positive" for k, v in self.sizes().items() if v is not None and v < 1]
        if self.ratio is not None and not 0 < self.ratio < 1:
            problems.append("ratio: a fraction of the teacher's parameters, in (0, 1)")
        if self.target_params is not None and self.target_params < 1:
            problems.append("target_params: must be positive")
        if self.axes not in AXES:
            problems.append(f"axes: {self.axes!r} is not one of {', '.join(AXES)}")
        problems += one_of("strategy", self.strategy, CHOICES)
        problems += one_of("metric", self.metric, METRICS)
        problems += one_of("sequential", self.sequential, SEQUENTIAL)
        return problems


def resolve_target(settings: PruneSettings, config: Any) -> tuple[int, dict[str, int]]:
    """(depth, width) the student will have; refuses what would not keep the config uniform."""
    have = shape(config)
    if settings.target_params is not None or settings.ratio is not None:
        params = settings.target_params or settings.ratio * count_parameters_of(config)
        return split_target(config, int(params), settings.axes)
    layout, per_group = layout_of(config), have["heads"] // have["kv_heads"]
    hidden, heads = settings.hidden_size, settings.num_heads
    if layout.fused_qkv:  # GPT-2: heads x head_dim is the hidden size; one implies the other
        heads = heads or (hidden // have["head_dim"] if hidden else None)
        hidden = hidden or (heads * have["head_dim"] if heads else None)
    heads = heads or have["heads"]
    kv = settings.num_kv_heads
    if kv is None:  # keep every group where the heads still split over them, else drop whole groups
        kv = have["kv_heads"] if heads % have["kv_heads"] == 0 else max(1, heads // per_group)
    if layout.fused_qkv:
        kv = heads
    width = {"hidden": hidden or have["hidden"], "intermediate": settings.intermediate_size or have["intermediate"],
             "heads": heads, "kv_heads": kv}
    return settings.num_layers or have["layers"], width


def load_scores(folder: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(block scores or None, width scores) from a score-layers folder."""
    path = Path(folder)
    path = path.parent if path.suffix == ".json" else path
    width = read_scores(path / "width_scores.json", SCORE_KEYS, f"{path} holds no width_scores.json; run `lmshrink "
                        f"score-layers --output {path}` on the same teacher")
    blocks = json.loads((path / "scores.json").read_text()) if (path / "scores.json").is_file() else None
    return blocks, {k: width[k] for k in SCORE_KEYS}


def run(settings: PruneSettings) -> Path:
    source, config = settings.load.check(settings.teacher)
    layers, width = target_of(settings, config)  # every size checked before any model loads
    if one_block_at_a_time(settings.sequential, source, resolve_dtype(settings.load.dtype, "cpu"), pick_device("auto")):
        return run_sequential(settings, source, config, layers, width)
    teacher = settings.load.load(settings.teacher, need_tokenizer=False, checked=(source, config))
    n = config.num_hidden_layers
    need_blocks = layers < n and settings.strategy == "importance"
    given = given_scores(settings, config, need_blocks)
    if given is not None:
        blocks, widths = given
    else:
        if teacher.tokenizer is None:  # scoring reads calibration text
            raise no_tokenizer(teacher.source)
        rows = calibration_rows(settings.calib_data, teacher.tokenizer, settings.calib_tokens, calib_length(settings, config))
        widths = width_scores(teacher.model, rows)
        blocks = score(teacher.model, rows, ppl=settings.metric == "ppl_increase") if need_blocks else None
    keep, student, cut_record = list(range(n)), teacher.model, {}
    if layers < n:
        student, keep, cut_record = cut(teacher.model, teacher.tokenizer, n, layers, settings.strategy, None, blocks,
                                        settings.metric, settings.cut, settings.calib_data, settings.calib_tokens)
    kept = plan(widths, width, keep)
    if width != {k: v for k, v in shape(config).items() if k in width}:
        student = prune_width(student, kept, width)
    return save(settings, teacher.source, teacher.tokenizer, keep, width, kept, widths, cut_record,
                count_parameters(student), count_parameters(teacher.model), student.save_pretrained)


def target_of(settings: PruneSettings, config: Any) -> tuple[int, dict[str, int]]:
    """(depth, width) of the student, refused with every problem named where it cannot be built."""
    layout_of(config)  # an unsupported architecture is refused before any work
    layers, width = resolve_target(settings, config)
    problems = check_target(config, width)
    if layers > config.num_hidden_layers:
        problems.append(f"num_layers: the teacher has {config.num_hidden_layers} blocks")
    if problems:
        raise SettingsError("; ".join(problems))
    return layers, width


def given_scores(settings: PruneSettings, config: Any, need_blocks: bool) -> tuple[dict | None, dict] | None:
    """(block scores, width scores) from --scores, checked against the teacher (None: not given)."""
    if not settings.scores:
        return None
    blocks, widths = load_scores(settings.scores)
    if widths.get("shape") != shape(config):
        raise SettingsError(f"scores: {settings.scores} scores a model of another shape than {settings.teacher}")
    if need_blocks and blocks is None:
        raise SettingsError(f"scores: {settings.scores} holds no scores.json for strategy importance")
    return blocks, widths


def calib_length(settings: PruneSettings, config: Any) -> int:
    return min(512, context_limit(config) or 512, settings.calib_tokens)


def run_sequential(settings: PruneSettings, source: str, config: Any, layers: int, width: dict[str, int]) -> Path:
    """prune with the teacher read one block at a time (`compress.sequential`): the width scores (and
    block scores for a shallower student) in one pass, the cut repaired block by block, and every
    tensor sliced and written shard by shard."""
    n = config.num_hidden_layers
    flag = architecture_of(config).mlp_bias  # the bias repair turns it on: new tensors in every block
    biased = settings.cut.repair == "bias" and layers < n and flag is not None and not getattr(config, flag, False)
    if biased:
        check(["repair: the bias repair adds tensors a width-pruned student written block by block does not slice; "
               "use --repair refit, or --sequential off on a machine that holds the teacher"])
    need_blocks = layers < n and settings.strategy == "importance"
    tokenizer = load_tokenizer(source, settings.load.trust_remote_code)
    given = given_scores(settings, config, need_blocks)
    if tokenizer is None and (given is None or (layers < n and (settings.cut.repair != "none"
                                                                or settings.strategy == "contiguous"))):
        raise no_tokenizer(source)
    model, weights = lazy_model(source, config, pick_device("auto"))
    length = calib_length(settings, config)
    if given is not None:
        blocks, widths = given
    else:
        rows = calibration_rows(settings.calib_data, tokenizer, settings.calib_tokens, length)
        print(f"scoring the width of {settings.teacher} on {rows.numel():,} tokens of {settings.calib_data}, one block "
              "at a time (float32)", flush=True)
        runner, sums = Blockwise(model, weights, rows, 4), WidthSums(config)
        blocks = score_blockwise(runner, settings.metric == "ppl_increase", sums) if need_blocks else None
        widths = sums.result(rows.numel()) if need_blocks else width_scores_blockwise(runner)
    runner, keep, cut_record = cut_sequential(model, weights, tokenizer, n, layers, settings.strategy, None, blocks,
                                              settings.metric, settings.cut, settings.calib_data)
    kept = plan(widths, width, keep)
    narrowed = width != {k: v for k, v in shape(config).items() if k in width}
    student_config_ = pruned_config(student_config(config, keep), width)
    return save(settings, source, tokenizer, keep, width, kept, widths, {**cut_record, "path": "sequential"},
                count_parameters_of(student_config_), count_parameters_of(config),
                lambda tmp: write_student(runner, keep, tmp, (kept, width) if narrowed else None))


def save(settings: PruneSettings, source: str, tokenizer, keep: list[int], width: dict[str, int], kept: Plan,
         widths: dict[str, Any], cut_record: dict[str, Any], params: int, teacher_params: int,
         write_model: Callable[[Path], None]) -> Path:
    """The student's folder (its weights by `write_model`), its record and width scores, said in a line."""
    n = widths["num_layers"]
    record = provenance(
        "prune", to_dict(settings), teacher=settings.teacher, teacher_source=source,
        teacher_layers=n, kept_layers=keep, strategy=settings.strategy if len(keep) < n else None,
        width=width, teacher_width=dict(widths["shape"]),
        kept_hidden=kept.hidden, kept_heads=kept.heads, kept_kv_heads=kept.kv_heads, kept_mlp=kept.mlp,
        parameters=params, teacher_parameters=teacher_params, **cut_record)

    def save_folder(tmp: Path) -> None:
        write_model(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "width_scores.json", provenance("width-scores", {}, **widths))
        plot_scores(widths, tmp / "width_scores.png", f"{settings.teacher}: activation importance")
        save_model_record(tmp, record, Path(settings.output).name)

    out = save_atomically(settings.output, save_folder)
    print(f"student: {len(keep)}/{n} blocks, hidden {width['hidden']}, MLP {width['intermediate']}, heads "
          f"{width['heads']} (key/value {width['kv_heads']}); {params / 1e6:.1f}M of {teacher_params / 1e6:.1f}M "
          f"parameters ({params / teacher_params:.0%}); written to {out}")
    if tokenizer is None:
        print(f"[lmshrink] {source} has no tokenizer, so the student has none either; copy it into {out}")
    return out
