"""`lmshrink demo`: the embedded study, offline, in minutes on a laptop CPU.

The real SmolLM2-135M teacher; its blocks scored on calibration text (Python manual,
library reference); students of one depth chosen by `importance` and by the paper's
strategies, as cut; the best training-free student of the cut-quality bench (the contiguous
span 13-18, found here from the scores as the span of least angular distance, repaired by `refit`)
beside the same blocks as cut, and healed; perplexity on held-out text
from the same manual's tutorial and from another source (the Linux kernel's process
documentation); speed and size side by side.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmshrink.architectures import context_limit
from lmshrink.compress.cut import CutArgs
from lmshrink.compress.cut_search import SEARCHES
from lmshrink.compress.importance import plot, score
from lmshrink.compress.truncation import STRATEGIES
from lmshrink.config import Settings, group, setting, to_dict
from lmshrink.data.sources import calibration_rows
from lmshrink.errors import one_of
from lmshrink.evaluate.args import BenchmarkArgs, PerplexityArgs, two_sources
from lmshrink.evaluate.report import markdown_table, tasks_chart, tasks_note, tasks_table
from lmshrink.export.gguf import file_name
from lmshrink.heal.args import TrainArgs, cpu_budget
from lmshrink.heal.corpus import DataArgs, offline_corpus
from lmshrink.heal.distill import RECIPE_LOSSES, RECIPES, recipe_kd
from lmshrink.models import load, pick_device
from lmshrink.recipes.distill import DistillSettings
from lmshrink.recipes.distill import run as distill
from lmshrink.recipes.evaluate import EvalSettings
from lmshrink.recipes.evaluate import run as evaluate
from lmshrink.recipes.export import ExportSettings
from lmshrink.recipes.export import run as export
from lmshrink.recipes.pretrain import PretrainSettings
from lmshrink.recipes.pretrain import run as pretrain
from lmshrink.recipes.truncate import TruncateSettings
from lmshrink.recipes.truncate import run as truncate
from lmshrink.records import RECORD, count, md_table, provenance, read_record, save_figure, write_json, write_text

# how the repaired student's blocks are chosen: a strategy from the scores (no search), or a measured search;
# each maps to truncate's (strategy, metric)
REPAIR_STRATEGIES = {"importance": ("importance", "block_influence"), "angular": ("importance", "angular_distance"),
                     **{name: (name, "block_influence") for name in SEARCHES}}


@dataclass(kw_only=True)
class DemoSettings(Settings):
    """Score, truncate and compare students of the embedded SmolLM2-135M teacher; writes report.md."""

    teacher: str = setting("smollm2-135m", "teacher: folder, Hub id, .gguf file or smollm2-135m")
    output: str = setting("runs/demo", "folder for the students, report.md, report.json and charts")
    num_layers: int = setting(24, "depth of every student")
    strategies: list[str] = setting(["importance", "alt", "bottom"], f"students to build, from {', '.join(STRATEGIES)}")
    calib_data: str = setting("python-docs/library", "calibration text for the layer scores")
    calib_tokens: int = setting(2048, "calibration tokens")
    score_ppl: bool = setting(False, "also score each block by the exact perplexity without it (one pass per block: "
                                     "about 2 more minutes on 2 cores)")
    repair_strategy: str = setting("angular", f"how the repaired student's blocks are chosen: {', '.join(REPAIR_STRATEGIES)}; "
                                              "angular (the span of least angular distance, from the scores) drops "
                                              "the span the measured contiguous search picks on this teacher, "
                                              "13-18, in seconds; iterative and contiguous search with the repair in "
                                              "the loop (minutes)")
    heal: bool = setting(True, "heal the repaired student (the importance one with --repair none) with KD and with "
                               "the plain LM loss")
    recipe: str = setting("kl-ce", f"loss of the KD healing run (distill's recipes: {', '.join(RECIPES)}; kl-ce "
                                   "was the healing bench's best); the optimiser, frozen parts and budget are the "
                                   "demo's, the same for both runs")
    export: str = setting("q8_0", "GGUF type the best student (lowest perplexity) is exported as at the end, for "
                                  "llama.cpp; empty: no export")
    cut: CutArgs = group(lambda: CutArgs(repair_tokens=8192),
                         "block search and training-free repair of the repaired student (shown beside the same blocks "
                         "as cut; --repair none: no repaired student); half truncate's calibration text, to keep the "
                         "demo in minutes")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    corpus: DataArgs = group(lambda: offline_corpus(eval_data=[]), "healing text (the same for the KD and the LM run)")
    train: TrainArgs = group(lambda: cpu_budget(max_tokens=8192, save_steps=10**6, freeze=["embeddings"]),
                             "healing optimiser, frozen parts (the token embeddings: the healing bench's best for "
                             "both losses) and token budget (the same for the KD and the LM run)")
    perplexity: PerplexityArgs = group(lambda: two_sources(max_tokens=2048), "held-out perplexity of every model")
    benchmarks: BenchmarkArgs = group(lambda: BenchmarkArgs(tasks=["quick"], limit=10),
                                      "zero-shot benchmarks of every model (--tasks '' for none)")

    def problems(self) -> list[str]:
        problems = super().problems()
        problems += [p for s in self.strategies for p in one_of("strategies", s, STRATEGIES)]
        if self.num_layers < 1:
            problems.append("num_layers: must be at least 1")
        problems += one_of("recipe", self.recipe, RECIPES)
        problems += one_of("repair_strategy", self.repair_strategy, REPAIR_STRATEGIES)
        if self.heal and self.cut.repair == "none" and "importance" not in self.strategies:
            problems.append("heal: with --repair none healing starts from the importance student; add importance to "
                            "--strategies, or --no-heal")
        if self.heal and not self.corpus.data:
            problems.append("data: healing needs training text (--corpus.data)")
        return problems

    def __post_init__(self) -> None:
        super().__post_init__()
        self.benchmarks.check_data()  # a missing benchmark cache is reported now, not after the healing runs


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
    ax.set(ylabel="held-out perplexity (log)", title="teacher, students as cut, repaired without training, and healed")
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)


def run(settings: DemoSettings) -> dict[str, Any]:
    out = Path(settings.output)
    started = time.perf_counter()
    steps: dict[str, float] = {}  # step -> wall seconds, printed in the report
    total = 4 if settings.heal else 3
    scores = _score(settings, out, total)
    steps["scoring the blocks"] = time.perf_counter() - started
    mark = time.perf_counter()
    students = _plain_students(settings, out, scores["num_layers"], total)
    steps["cutting the students"] = time.perf_counter() - mark
    start = students.get("importance")
    if settings.cut.repair != "none":
        start = repaired(settings, students, steps, total)
    healed = heal(settings, start, steps) if settings.heal else {}
    table, ev = _evaluate(settings, students, healed, steps, total)
    elapsed = time.perf_counter() - started
    text = _report(settings, scores, table, elapsed, steps, ev)
    write_text(out / "report.md", text)
    record = provenance("demo", to_dict(settings), rows=table, scores=scores, wall_seconds=elapsed,
                        step_seconds=steps)
    write_json(out / "report.json", record)
    write_json(out / RECORD, record)
    print(text)
    print(f"wrote {out / 'report.md'}")
    if settings.export:
        export_best(settings, table, {**students, **{name: run["model"] for name, run in healed.items()}})
    return {"rows": table, "scores": scores}


def _score(settings: DemoSettings, out: Path, total: int) -> dict[str, Any]:
    """Step 1: the teacher's block scores, written as score-layers writes them."""
    teacher = load(settings.teacher)
    teacher.model.to(pick_device(settings.device))
    n = teacher.model.config.num_hidden_layers
    print(f"[1/{total}] scoring the {n} blocks of {settings.teacher} on {settings.calib_data}")
    length = min(512, context_limit(teacher.model.config) or 512, settings.calib_tokens)
    rows = calibration_rows(settings.calib_data, teacher.tokenizer, settings.calib_tokens, length)
    scores = score(teacher.model, rows, ppl=settings.score_ppl)
    write_json(out / "scores.json", provenance("score-layers", to_dict(settings), **scores))
    plot(scores, out / "scores.png", f"{settings.teacher}: block importance on {settings.calib_data}")
    return scores  # the teacher is let go: truncate loads it itself (the embedded one in a fraction of a second)


def _plain_students(settings: DemoSettings, out: Path, n: int, total: int) -> dict[str, Path]:
    """Step 2: the paper's students, plain cuts by each strategy."""
    print(f"[2/{total}] building {n} -> {settings.num_layers} block students: {', '.join(settings.strategies)}")
    return {strategy: truncate(TruncateSettings(
        output=str(out / f"student-{strategy}"), teacher=settings.teacher, strategy=strategy,
        num_layers=settings.num_layers, scores=str(out / "scores.json"), overwrite=True,
        cut=dataclasses.replace(settings.cut, repair="none"))) for strategy in settings.strategies}


def _evaluate(settings: DemoSettings, students: dict[str, Path], healed: dict[str, dict], steps: dict[str, float],
              total: int) -> tuple[list[dict[str, Any]], EvalSettings]:
    """The last step: every model side by side (the teacher first), and the charts."""
    out, bench = Path(settings.output), settings.benchmarks
    print(f"[{total}/{total}] evaluating on {', '.join(settings.perplexity.data)}"
          + (f" and {', '.join(bench.tasks)} ({bench.limit} items per task)" if bench.tasks else ""))
    mark = time.perf_counter()
    models = {"teacher": settings.teacher, **{name: str(path) for name, path in students.items()},
              **{name: str(run["model"]) for name, run in healed.items()}}
    ev = EvalSettings(models=list(models.values()), labels=list(models), output=str(out / "eval"),
                      device=settings.device, perplexity=settings.perplexity, benchmarks=bench)
    table = evaluate(ev)  # eval's own report of these models is in eval/
    for row in table:
        if row["model"] in healed:
            row["heal"] = {k: v for k, v in healed[row["model"]].items() if k != "model"}
    zero_shot = sum(row.get("task_seconds", 0.0) for row in table)
    steps["perplexity, speed and size"] = time.perf_counter() - mark - zero_shot
    if bench.tasks:
        steps["zero-shot benchmarks"] = zero_shot
    _ppl_chart(table, out / "perplexity.png")
    if bench.tasks:
        tasks_chart(table, out / "tasks.png", "zero-shot scores" + (f", first {count(bench.limit, 'item')} per task"
                                                                   if bench.limit else ""))
    return table, ev


def repaired(settings: DemoSettings, students: dict[str, Path], steps: dict[str, float], total: int) -> Path:
    """The repaired student (blocks by `repair_strategy`: from the scores, or a search with the repair in
    the loop) and, unless
    a plain student already has them, the same blocks as cut, both added to `students`."""
    out, strategy, cut = Path(settings.output), settings.repair_strategy, settings.cut
    name = repaired_name(settings)
    mark = time.perf_counter()
    print(f"[2/{total}] the repaired student: blocks by {strategy}, repaired by {cut.repair} on "
          f"{', '.join(cut.repair_data)}")
    chosen_by, metric = REPAIR_STRATEGIES[strategy]
    students[name] = truncate(TruncateSettings(
        output=str(out / "student-repaired"), teacher=settings.teacher, strategy=chosen_by, metric=metric,
        num_layers=settings.num_layers, scores=str(out / "scores.json"), calib_data=settings.calib_data,
        overwrite=True, cut=cut))
    steps[f"building {name}"] = time.perf_counter() - mark
    if strategy not in students:  # the same blocks as cut, to show the repair alone
        keep = read_record(students[name])["kept_layers"]
        students[strategy] = truncate(TruncateSettings(
            output=str(out / f"student-{strategy}"), teacher=settings.teacher, keep=keep, overwrite=True,
            cut=dataclasses.replace(cut, repair="none")))
        students[name] = students.pop(name)  # as cut, then repaired
    return students[name]


def repaired_name(settings: DemoSettings) -> str:
    """The report's name of the repaired student, e.g. 'contiguous + refit'; its as-cut twin is the strategy."""
    return f"{settings.repair_strategy} + {settings.cut.repair}"


def export_best(settings: DemoSettings, table: list[dict], paths: dict[str, Path]) -> Path:
    """The student with the lowest geometric-mean perplexity, as a GGUF file of settings.export, and
    how to run it in llama.cpp."""
    def geo_mean(row: dict) -> float:
        values = list(row["perplexity"].values())
        return math.exp(sum(math.log(v) for v in values) / len(values))

    best = min((row for row in table if row["model"] in paths), key=geo_mean)
    folder = Path(settings.output) / "gguf"
    name = "demo-" + best["model"].replace(" + ", "-").replace(" ", "-")
    export(ExportSettings(model=str(paths[best["model"]]), output=str(folder), quant=[settings.export], name=name,
                          overwrite=True))
    path = folder / file_name(name, settings.export)
    print(f"the best student ({best['model']}, perplexity {geo_mean(best):,.2f}) as {settings.export}: {path}\n"
          f"run it in llama.cpp: llama-cli -m {path} -p 'The Python tutorial'")
    return path


def heal(settings: DemoSettings, student: Path, steps: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Heal the student with KD (the loss of `settings.recipe`) and with the plain LM loss, handing both
    the demo's same `corpus` and `train` groups; time each (the whole run, loading and evaluation
    included, goes into `steps`)."""
    out = Path(settings.output)
    common = dict(model=str(student), corpus=settings.corpus, train=settings.train)
    base = "importance" if settings.cut.repair == "none" else repaired_name(settings)
    runs = {
        f"{base} + KD": lambda folder: distill(DistillSettings(output=folder, **common, recipe=settings.recipe,
                                                               kd=recipe_kd(settings.recipe, teacher=settings.teacher))),
        f"{base} + LM": lambda folder: pretrain(PretrainSettings(output=folder, **common)),
    }
    healed = {}
    for i, (name, run) in enumerate(runs.items()):
        folder = out / ("healed-kd" if name.endswith("KD") else "healed-lm")
        print(f"[3/4] healing ({i + 1}/2) {name}: {settings.train.max_tokens:,} tokens of "
              f"{', '.join(settings.corpus.data)}")
        if folder.exists():
            shutil.rmtree(folder)  # the demo starts its runs afresh
        mark = time.perf_counter()
        metrics = run(str(folder))
        steps[f"healing: {name}"] = time.perf_counter() - mark
        healed[name] = {"model": folder / "model", "train_seconds": metrics["train_seconds"],
                        "tokens": metrics["tokens_seen"], "steps": metrics["steps"]}
    return healed


def dropped(row: dict[str, Any], n: int) -> list[int]:
    """The teacher blocks a student's row lacks."""
    return [i for i in range(n) if i not in (row["kept_layers"] or [])]


def _report(settings: DemoSettings, scores: dict, table: list[dict], seconds: float, steps: dict[str, float],
            ev: EvalSettings) -> str:
    n, ppl = scores["num_layers"], settings.perplexity
    by_name = {row["model"]: row for row in table}
    repaired, twin = repaired_name(settings), settings.repair_strategy
    lines = [
        f"# lmshrink demo: {settings.teacher}, {n} -> {settings.num_layers} blocks",
        "",
        "Rows without '+' are the students as cut, before any training"
        + (f"; '{repaired}' is the {twin} student repaired without training" if repaired in by_name else "")
        + "; '+ KD' and '+ LM' are the student after healing (below).",
        "",
        f"Layer scores on {scores['tokens']:,} tokens of `{settings.calib_data}`; perplexity on "
        f"{ppl.max_tokens:,} held-out tokens of each of {', '.join(f'`{h}`' for h in ppl.data)} "
        f"(window {ppl.window}, stride {ppl.stride}).",
        "",
        markdown_table(table, "(1x256)"),
        "",
        *md_table(("student", "kept blocks", "dropped blocks"),
                  [(row["model"], row["kept_layers"], dropped(row, n)) for row in table[1:] if "heal" not in row]),
    ]
    lines += _choice_section(settings, by_name)
    if repaired in by_name:
        lines += _repair_section(settings, by_name, n)
    if healed := [row for row in table if "heal" in row]:
        lines += _healing_section(settings, by_name, healed)
    if settings.benchmarks.tasks:
        lines += ["", "## Zero-shot benchmarks", "", tasks_table(table), "", tasks_note(table, ev.benchmarks), "",
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
        *md_table(("step", "wall time"), [*((step, f"{sec:,.0f} s") for step, sec in steps.items()),
                                          ("**total**", f"**{seconds / 60:.1f} min**")], "lr"),
        "",
        "Reproduce with `lmshrink demo` (settings in report.json).",
        "",
    ]
    return "\n".join(lines)


def _choice_section(settings: DemoSettings, by_name: dict[str, dict]) -> list[str]:
    """The importance-chosen student against the paper's fixed strategies, text by text."""
    fixed = [name for name in settings.strategies if name in by_name]  # the paper's students, as cut
    if "importance" not in fixed or len(fixed) < 2:
        return []
    imp = by_name["importance"]["perplexity"]
    lines = ["", "## Does the choice of blocks matter?", ""]
    for source in settings.perplexity.data:
        cut = {name: by_name[name] for name in fixed if name != "importance"}
        others = ", ".join(f"{name} {row['perplexity'][source]:,.1f}" for name, row in cut.items())
        ratio = min(row["perplexity"][source] for row in cut.values()) / imp[source]
        lines.append(f"- `{source}`: importance-chosen student {imp[source]:,.1f} vs {others} "
                     f"(teacher {by_name['teacher']['perplexity'][source]:,.1f}); the best other "
                     f"strategy is {ratio:,.1f}x worse.")
    return lines


def _repair_section(settings: DemoSettings, by_name: dict[str, dict], n: int) -> list[str]:
    """The same blocks as cut and repaired without training, against the teacher."""
    repair, repaired, twin = settings.cut, repaired_name(settings), settings.repair_strategy
    chosen = {"importance": "by Block Influence",
              "angular": "as the consecutive blocks whose input and output differ least (angular distance, "
                         "Gromov et al.)"}.get(twin, f"by the {twin} search ({repair.search_measure} from the teacher "
                                                     f"on {repair.search_tokens:,} tokens of `{settings.calib_data}`, "
                                                     "every candidate repaired)")
    lines = ["", "## Repairing the cut, without training", "",
             f"The same blocks (chosen {chosen}: drops {dropped(by_name[repaired], n)}) as cut and repaired by "
             f"`{repair.repair}` ({repair.repair_tokens:,} calibration tokens of "
             f"{', '.join(f'`{d}`' for d in repair.repair_data)}; fits on the {repair.repair_fit}'s activations), "
             "perplexity and ratio to the teacher:", ""]
    rows = []
    for source in settings.perplexity.data:
        t, c, r = (by_name[m]["perplexity"][source] for m in ("teacher", twin, repaired))
        rows.append((f"`{source}`", f"{t:,.2f}", f"{c:,.2f} ({c / t:.2f}x)", f"**{r:,.2f}** ({r / t:.2f}x)",
                     f"{r / c - 1:+.0%}"))
    return lines + md_table(("source", "teacher", "as cut", "repaired", "change"), rows, "lrrrr")


def _healing_section(settings: DemoSettings, by_name: dict[str, dict], healed: list[dict]) -> list[str]:
    """The healed students against the one they started from."""
    train, data = settings.train, settings.perplexity.data
    start = repaired_name(settings) if repaired_name(settings) in by_name else "importance"
    before = by_name[start]["perplexity"]
    lines = ["", f"## Healing the {start} student", "",
             f"Same student, same {healed[0]['heal']['tokens']:,} training tokens of "
             f"{', '.join(f'`{d}`' for d in settings.corpus.data)} (block {settings.corpus.block_size}, "
             f"batch {train.batch_size}, lr {train.lr:g}, warm-up {train.warmup:.0%}"
             + (f", {', '.join(train.freeze)} frozen" if train.freeze else "") + "); KD is "
             f"{RECIPE_LOSSES[settings.recipe]}:", ""]
    return lines + md_table(("method", "train wall time", *(f"ppl {h} before -> after" for h in data)), [
        (row["model"], f"{row['heal']['train_seconds']:.0f} s",
         *(f"{before[h]:,.1f} -> **{row['perplexity'][h]:,.1f}** ({row['perplexity'][h] / before[h] - 1:+.0%})"
           for h in data)) for row in healed])
