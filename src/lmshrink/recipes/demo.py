"""`lmshrink demo`: the embedded study, offline, in minutes on a laptop CPU.

The real SmolLM2-135M teacher; its blocks scored on calibration text (Python manual,
library reference); students of one depth chosen by `importance` and by the paper's
strategies; perplexity on held-out text from the same manual's tutorial and from another
source (the Linux kernel's process documentation); speed and size side by side.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmshrink.architectures import context_limit
from lmshrink.benchmarks import benchmark_root, task_problems
from lmshrink.config import check, setting, to_dict
from lmshrink.data import calibration_rows
from lmshrink.importance import plot, score
from lmshrink.models import load, pick_device
from lmshrink.recipes.distill import DistillSettings
from lmshrink.recipes.distill import run as distill
from lmshrink.recipes.evaluate import EvalSettings, evaluate_model, markdown_table, tasks_chart, tasks_note, tasks_table
from lmshrink.recipes.pretrain import PretrainSettings
from lmshrink.recipes.pretrain import run as pretrain
from lmshrink.recipes.truncate import TruncateSettings
from lmshrink.recipes.truncate import run as truncate
from lmshrink.records import RECORD, provenance, save_figure, write_json, write_text
from lmshrink.truncation import STRATEGIES


@dataclass
class DemoSettings:
    """Score, truncate and compare students of the embedded SmolLM2-135M teacher; writes report.md."""

    teacher: str = setting("smollm2-135m", "teacher: folder, Hub id, .gguf file or smollm2-135m")
    output: str = setting("runs/demo", "folder for the students, report.md, report.json and charts")
    num_layers: int = setting(24, "depth of every student")
    strategies: list[str] = setting(["importance", "alt", "bottom"], f"students to build, from {', '.join(STRATEGIES)}")
    calib_data: str = setting("python-docs/library", "calibration text for the layer scores")
    calib_tokens: int = setting(2048, "calibration tokens")
    score_ppl: bool = setting(False, "also score each block by the exact perplexity without it (one pass per block: "
                                     "about 2 more minutes on 2 cores)")
    heldout: list[str] = setting(["python-docs/tutorial", "kernel-docs/process"], "held-out text sources")
    eval_tokens: int = setting(4096, "tokens of each held-out source")
    heal: bool = setting(True, "heal the importance-chosen student with KD and with the plain LM loss")
    heal_data: str = setting("python-docs/library", "training text for healing")
    heal_tokens: int = setting(8192, "token budget of each healing run (the same for KD and LM)")
    heal_lr: float = setting(3e-4, "peak learning rate of the healing runs")
    heal_block: int = setting(256, "tokens per healing sequence")
    heal_batch: int = setting(4, "sequences per healing step")
    tasks: list[str] = setting(["quick"], "zero-shot benchmarks for every model (lm-eval names or a suite: quick, "
                                          "core); empty for none")
    task_limit: int = setting(30, "items of each benchmark task (the first N)")
    window: int = setting(512, "perplexity window")
    stride: int = setting(512, "perplexity stride (= window: each token scored once, in plain chunks)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        problems = [f"strategies: {s!r} is unknown; choose from {', '.join(STRATEGIES)}"
                    for s in self.strategies if s not in STRATEGIES]
        problems += task_problems(self.tasks)
        if self.task_limit < 1:
            problems.append("task_limit: must be positive")
        if self.num_layers < 1:
            problems.append("num_layers: must be at least 1")
        if self.heal and "importance" not in self.strategies:
            problems.append("heal: healing starts from the importance student; add importance to --strategies or --no-heal")
        check(problems)
        if self.tasks:
            benchmark_root()  # a missing benchmark cache is reported now, not after the healing runs


def _ppl_chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(rows[0]["perplexity"])
    fig, ax = plt.subplots(figsize=(max(8, 1.5 * len(rows)), 4))
    width = 0.8 / len(sources)
    for j, source in enumerate(sources):
        values = [row["perplexity"][source] for row in rows]
        bars = ax.bar([i + j * width for i in range(len(rows))], values, width, label=source)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    labels = [r["model"].replace(" + ", "\n+ ") for r in rows]
    ax.set_xticks([i + width * (len(sources) - 1) / 2 for i in range(len(rows))], labels)
    ax.set_yscale("log")
    ax.set(ylabel="held-out perplexity (log)", title="teacher, truncated students, and the importance student healed")
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)


def run(settings: DemoSettings) -> dict[str, Any]:
    out = Path(settings.output)
    started = time.perf_counter()
    steps: dict[str, float] = {}  # step -> wall seconds, printed in the report
    total = 4 if settings.heal else 3
    teacher = load(settings.teacher)
    teacher.model.to(pick_device(settings.device))
    n = teacher.model.config.num_hidden_layers
    print(f"[1/{total}] scoring the {n} blocks of {settings.teacher} on {settings.calib_data}")
    length = min(512, context_limit(teacher.model.config) or 512, settings.calib_tokens)
    rows = calibration_rows(settings.calib_data, teacher.tokenizer, settings.calib_tokens, length)
    scores = score(teacher.model, rows, ppl=settings.score_ppl)
    write_json(out / "scores.json", provenance("score-layers", to_dict(settings), **scores))
    plot(scores, out / "scores.png", f"{settings.teacher}: block importance on {settings.calib_data}")
    teacher.model.cpu()
    steps["scoring the blocks"] = time.perf_counter() - started

    print(f"[2/{total}] building {n} -> {settings.num_layers} block students: {', '.join(settings.strategies)}")
    mark = time.perf_counter()
    students = {}
    for strategy in settings.strategies:
        students[strategy] = truncate(TruncateSettings(
            output=str(out / f"student-{strategy}"), teacher=settings.teacher, strategy=strategy,
            num_layers=settings.num_layers, scores=str(out / "scores.json"), overwrite=True), teacher=teacher)
    steps["cutting the students"] = time.perf_counter() - mark

    healed = heal(settings, students["importance"], steps) if settings.heal else {}

    print(f"[{total}/{total}] evaluating on {', '.join(settings.heldout)}"
          + (f" and {', '.join(settings.tasks)} ({settings.task_limit} items per task)" if settings.tasks else ""))
    mark = time.perf_counter()
    ev = EvalSettings(models=[settings.teacher], data=settings.heldout, output=str(out),
                      max_tokens=settings.eval_tokens, window=settings.window, stride=settings.stride,
                      device=settings.device, tasks=settings.tasks, limit=settings.task_limit)
    streams: dict = {}
    table = [evaluate_model(settings.teacher, ev, label="teacher", streams=streams)]
    table += [evaluate_model(str(path), ev, label=name, streams=streams) for name, path in students.items()]
    for name, run in healed.items():
        row = evaluate_model(str(run["model"]), ev, label=name, streams=streams)
        row["heal"] = {k: v for k, v in run.items() if k != "model"}
        table.append(row)
    zero_shot = sum(row.get("task_seconds", 0.0) for row in table)
    steps["perplexity, speed and size"] = time.perf_counter() - mark - zero_shot
    if settings.tasks:
        steps["zero-shot benchmarks"] = zero_shot
    _ppl_chart(table, out / "perplexity.png")
    if settings.tasks:
        tasks_chart(table, out / "tasks.png", f"zero-shot scores, first {settings.task_limit} items per task")
    elapsed = time.perf_counter() - started
    text = _report(settings, scores, table, elapsed, steps, ev)
    write_text(out / "report.md", text)
    record = provenance("demo", to_dict(settings), rows=table, scores=scores, wall_seconds=elapsed,
                        step_seconds=steps)
    write_json(out / "report.json", record)
    write_json(out / RECORD, record)
    print(text)
    print(f"wrote {out / 'report.md'}")
    return {"rows": table, "scores": scores}


def heal(settings: DemoSettings, student: Path, steps: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Heal the student with KD and with the plain LM loss at the same token budget; time each
    (the whole run, loading and evaluation included, goes into `steps`)."""

    out = Path(settings.output)
    common = dict(model=str(student), data=[settings.heal_data], heldout=0.0, block_size=settings.heal_block,
                  batch_size=settings.heal_batch, max_tokens=settings.heal_tokens, lr=settings.heal_lr,
                  warmup=0.1, logging_steps=4, save_steps=10**6, report_to=["none"])
    runs = {
        "importance + KD": (DistillSettings, distill, {"teacher": settings.teacher}),
        "importance + LM": (PretrainSettings, pretrain, {}),
    }
    healed = {}
    for i, (name, (cls, function, extra)) in enumerate(runs.items()):
        folder = out / ("healed-kd" if "KD" in name else "healed-lm")
        print(f"[3/4] healing ({i + 1}/2) {name}: {settings.heal_tokens:,} tokens of {settings.heal_data}")
        if folder.exists():
            shutil.rmtree(folder)  # the demo starts its runs afresh
        mark = time.perf_counter()
        metrics = function(cls(output=str(folder), **common, **extra))
        steps[f"healing: {name}"] = time.perf_counter() - mark
        healed[name] = {"model": folder / "model", "train_seconds": metrics["train_seconds"],
                        "tokens": metrics["tokens_seen"], "steps": metrics["steps"]}
    return healed


def _report(settings: DemoSettings, scores: dict, table: list[dict], seconds: float, steps: dict[str, float],
            ev: EvalSettings) -> str:
    n = scores["num_layers"]
    by_name = {row["model"]: row for row in table}
    lines = [
        f"# lmshrink demo: {settings.teacher}, {n} -> {settings.num_layers} blocks",
        "",
        "Rows without '+' are the students as cut, before any training; '+ KD' and '+ LM' are the "
        "importance student after healing (below).",
        "",
        f"Layer scores on {scores['tokens']:,} tokens of `{settings.calib_data}`; perplexity on "
        f"{settings.eval_tokens:,} held-out tokens of each of {', '.join(f'`{h}`' for h in settings.heldout)} "
        f"(window {settings.window}, stride {settings.stride}).",
        "",
        markdown_table(table, "(1x256)"),
        "",
        "| student | kept blocks | dropped blocks |",
        "|---|---|---|",
    ]
    for row in table[1:]:
        if "heal" in row:
            continue
        kept = row["kept_layers"] or []
        lines.append(f"| {row['model']} | {kept} | {[i for i in range(n) if i not in kept]} |")
    if "importance" in by_name and len(by_name) > 2:
        imp = by_name["importance"]["perplexity"]
        lines += ["", "## Does the choice of blocks matter?", ""]
        for source in settings.heldout:
            cut = {name: row for name, row in by_name.items()
                   if name not in ("importance", "teacher") and "heal" not in row}
            others = ", ".join(f"{name} {row['perplexity'][source]:,.1f}" for name, row in cut.items())
            ratio = min(row["perplexity"][source] for row in cut.values()) / imp[source]
            lines.append(f"- `{source}`: importance-chosen student {imp[source]:,.1f} vs {others} "
                         f"(teacher {by_name['teacher']['perplexity'][source]:,.1f}); the best other "
                         f"strategy is {ratio:,.1f}x worse.")
    healed = [row for row in table if "heal" in row]
    if healed and "importance" in by_name:
        before = by_name["importance"]["perplexity"]
        lines += ["", "## Healing the importance-chosen student", "",
                  f"Same student, same {healed[0]['heal']['tokens']:,} training tokens of `{settings.heal_data}` "
                  f"(block {settings.heal_block}, batch {settings.heal_batch}, lr {settings.heal_lr:g}):", "",
                  "| method | train wall time | " + " | ".join(f"ppl {h} before -> after" for h in settings.heldout) + " |",
                  "|---|---|" + "---|" * len(settings.heldout)]
        for row in healed:
            cells = [f"{before[h]:,.1f} -> **{row['perplexity'][h]:,.1f}** ({row['perplexity'][h] / before[h] - 1:+.0%})"
                     for h in settings.heldout]
            lines.append(f"| {row['model']} | {row['heal']['train_seconds']:.0f} s | " + " | ".join(cells) + " |")
    if settings.tasks:
        lines += ["", "## Zero-shot benchmarks", "", tasks_table(table), "", tasks_note(table, ev), "",
                  "![zero-shot scores](tasks.png)"]
    order = sorted(range(n), key=lambda i: scores["block_influence"][i])
    lines += [
        "",
        "## Block importance",
        "",
        f"Lowest Block Influence: {order[:n - settings.num_layers]}."
        + (f" Largest single-block perplexity increase: block {max(range(n), key=lambda i: scores['ppl_increase'][i])} "
           f"({max(scores['ppl_increase']):,.1f}); full-model calibration perplexity {scores['perplexity']:.2f}."
           if "ppl_increase" in scores else " (`--score-ppl` adds each block's exact perplexity increase.)"),
        "",
        "![block scores](scores.png)",
        "",
        "![perplexity](perplexity.png)",
        "",
        "## Time",
        "",
        "| step | wall time |",
        "|---|---:|",
        *(f"| {step} | {sec:,.0f} s |" for step, sec in steps.items()),
        f"| **total** | **{seconds / 60:.1f} min** |",
        "",
        "Reproduce with `lmshrink demo` (settings in report.json).",
        "",
    ]
    return "\n".join(lines)
