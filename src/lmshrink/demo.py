"""`lmshrink demo`: the embedded study, offline, in minutes on a laptop CPU.

The real SmolLM2-135M teacher; its blocks scored on calibration text (Python manual,
library reference); students of one depth chosen by `importance` and by the paper's
strategies; perplexity on held-out text from the same manual's tutorial and from another
source (the Linux kernel's process documentation); speed and size side by side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmshrink.config import check, setting, to_dict
from lmshrink.evaluate import EvalSettings, evaluate_model, markdown_table, pick_device
from lmshrink.records import provenance, save_figure, write_json, write_text
from lmshrink.score_layers import calibration_rows, plot, score
from lmshrink.truncate import STRATEGIES, TruncateSettings
from lmshrink.truncate import run as truncate


@dataclass
class DemoSettings:
    """Score, truncate and compare students of the embedded SmolLM2-135M teacher; writes report.md."""

    teacher: str = setting("smollm2-135m", "teacher: folder, Hub id, .gguf file or smollm2-135m")
    output: str = setting("runs/demo", "folder for the students, report.md, report.json and charts")
    num_layers: int = setting(24, "depth of every student")
    strategies: list[str] = setting(["importance", "alt", "bottom"], f"students to build, from {', '.join(STRATEGIES)}")
    calib_data: str = setting("python-docs/library", "calibration text for the layer scores")
    calib_tokens: int = setting(4096, "calibration tokens")
    heldout: list[str] = setting(["python-docs/tutorial", "kernel-docs/process"], "held-out text sources")
    eval_tokens: int = setting(8192, "tokens of each held-out source")
    window: int = setting(512, "perplexity window")
    stride: int = setting(256, "perplexity stride")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        problems = [f"strategies: {s!r} is unknown; choose from {', '.join(STRATEGIES)}"
                    for s in self.strategies if s not in STRATEGIES]
        if self.num_layers < 1:
            problems.append("num_layers: must be at least 1")
        check(problems)


def _ppl_chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(rows[0]["perplexity"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(sources)
    for j, source in enumerate(sources):
        values = [row["perplexity"][source] for row in rows]
        bars = ax.bar([i + j * width for i in range(len(rows))], values, width, label=source)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([i + width * (len(sources) - 1) / 2 for i in range(len(rows))], [r["model"] for r in rows])
    ax.set_yscale("log")
    ax.set(ylabel="held-out perplexity (log)", title="teacher vs truncated students, before any training")
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)


def run(settings: DemoSettings) -> dict[str, Any]:
    from lmshrink.models import load

    out = Path(settings.output)
    started = time.perf_counter()
    teacher = load(settings.teacher)
    teacher.model.to(pick_device(settings.device))
    n = teacher.model.config.num_hidden_layers
    print(f"[1/3] scoring the {n} blocks of {settings.teacher} on {settings.calib_data}")
    rows = calibration_rows(settings.calib_data, teacher.tokenizer, settings.calib_tokens, 512)
    scores = score(teacher.model, rows)
    write_json(out / "scores.json", provenance("score-layers", to_dict(settings), **scores))
    plot(scores, out / "scores.png", f"{settings.teacher}: block importance on {settings.calib_data}")
    teacher.model.cpu()

    print(f"[2/3] building {n} -> {settings.num_layers} block students: {', '.join(settings.strategies)}")
    students = {}
    for strategy in settings.strategies:
        students[strategy] = truncate(TruncateSettings(
            output=str(out / f"student-{strategy}"), teacher=settings.teacher, strategy=strategy,
            num_layers=settings.num_layers, scores=str(out / "scores.json"), overwrite=True), teacher=teacher)

    print(f"[3/3] evaluating on {', '.join(settings.heldout)}")
    ev = EvalSettings(models=[settings.teacher, *map(str, students.values())], data=settings.heldout,
                      output=str(out), max_tokens=settings.eval_tokens, window=settings.window,
                      stride=settings.stride, device=settings.device)
    streams: dict = {}
    table = [evaluate_model(settings.teacher, ev, label="teacher", streams=streams)]
    table += [evaluate_model(str(path), ev, label=name, streams=streams) for name, path in students.items()]
    _ppl_chart(table, out / "perplexity.png")
    elapsed = time.perf_counter() - started
    report = _report(settings, scores, table, elapsed)
    write_text(out / "report.md", report)
    write_json(out / "report.json", provenance("demo", to_dict(settings), rows=table, scores=scores,
                                               wall_seconds=elapsed))
    print(report)
    print(f"wrote {out / 'report.md'}")
    return {"rows": table, "scores": scores}


def _report(settings: DemoSettings, scores: dict, table: list[dict], seconds: float) -> str:
    n = scores["num_layers"]
    by_name = {row["model"]: row for row in table}
    lines = [
        f"# lmshrink demo: {settings.teacher}, {n} -> {settings.num_layers} blocks",
        "",
        f"Layer scores on {scores['tokens']:,} tokens of `{settings.calib_data}`; perplexity on "
        f"{settings.eval_tokens:,} held-out tokens of each of {', '.join(f'`{h}`' for h in settings.heldout)} "
        f"(window {settings.window}, stride {settings.stride}). No training: these are the students as cut.",
        "",
        markdown_table(table, "(1x256)"),
        "",
        "| student | kept blocks | dropped blocks |",
        "|---|---|---|",
    ]
    for row in table[1:]:
        kept = row["kept_layers"] or []
        lines.append(f"| {row['model']} | {kept} | {[i for i in range(n) if i not in kept]} |")
    if "importance" in by_name and len(by_name) > 2:
        imp = by_name["importance"]["perplexity"]
        lines += ["", "## Does the choice of blocks matter?", ""]
        for source in settings.heldout:
            others = ", ".join(f"{name} {row['perplexity'][source]:,.1f}" for name, row in by_name.items()
                               if name not in ("importance", "teacher"))
            ratio = min(row["perplexity"][source] for name, row in by_name.items()
                        if name not in ("importance", "teacher")) / imp[source]
            lines.append(f"- `{source}`: importance-chosen student {imp[source]:,.1f} vs {others} "
                         f"(teacher {by_name['teacher']['perplexity'][source]:,.1f}); the best other "
                         f"strategy is {ratio:,.1f}x worse.")
    order = sorted(range(n), key=lambda i: scores["block_influence"][i])
    lines += [
        "",
        "## Block importance",
        "",
        f"Lowest Block Influence: {order[:n - settings.num_layers]}. Largest single-block perplexity increase: "
        f"block {max(range(n), key=lambda i: scores['ppl_increase'][i])} "
        f"({max(scores['ppl_increase']):,.1f}); full-model calibration perplexity {scores['perplexity']:.2f}.",
        "",
        "![block scores](scores.png)",
        "",
        "![perplexity](perplexity.png)",
        "",
        f"Total wall time {seconds / 60:.1f} min. Reproduce with `lmshrink demo` (settings in report.json).",
        "",
    ]
    return "\n".join(lines)
