"""How close to its teacher a cut student starts: block choice x training-free repair x calibration text.

The real SmolLM2-135M cut to 24/30 and 15/30 blocks, chosen by Block Influence (`importance`),
`iterative` and `contiguous` search, each as cut, + bias (the mean update) and + ReplaceMe (also
with each span's strength chosen on held-out rows by the output's KL from the teacher) and + refit
(also fitted further on the output: `--repair-epochs`; for BI's cut also applied at half strength,
with and without that fit: the repair's trade between LAMBADA and SciQ), the
repairs calibrated on the Python library reference (`docs`), on text the teacher writes itself
(`teacher`), or on both (`mix`). Every student is built by `lmshrink truncate` and scored on three
kinds of held-out text no calibration saw: the Python tutorial, the kernel's process documentation
and English quotations about people and life (`fortunes/people`, from Debian's `fortunes`), 8,192
tokens each, window 512, stride 512 (256 with --stride 256). Then the plain BI cut, the same blocks
with truncate's default repair (refit) and the best repaired 24-block student are healed the same
way (`lmshrink distill`, 25,600 tokens; a student deleted to save disk is built again) and scored
again; optionally the
zero-shot `core` suite (`--tasks core --limit 200`) for the teacher, the plain BI cut and the best
student of each depth. `--teacher` takes another model (the rows of docs/bench-cut-quality.md for
Gemma-3-270M: `--teacher gemma-3-270m --depths 14` with `--only` naming the rows).

Resumable: every finished row is a JSON file in OUTPUT/rows; a re-run skips it. Students are
deleted after scoring except those a later stage needs.

    python bench/cut_quality.py --output ~/lmshrink-runs/cut-quality
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from lmshrink.cli import main as lmshrink
from lmshrink.data.sources import Framing, token_stream
from lmshrink.evaluate.benchmarks import expand
from lmshrink.evaluate.perplexity import perplexity
from lmshrink.evaluate.verdicts import paired_bootstrap
from lmshrink.models import load
from lmshrink.records import save_figure, write_json, write_text

TEACHER = "smollm2-135m"
TEXTS = ["python-docs/tutorial", "kernel-docs/process", "fortunes/people"]
STRENGTHS = (0.25, 0.5, 0.75, 1.0)
REPAIRED = ("none", "replaceme", "refit", "bias")  # the repairs a searched cut is built with, in order
REFINE = 4  # passes fitting the repaired projections on the output (truncate's --repair-epochs), where a row asks
DEFAULT_REPAIR = "refit"  # truncate's
HALF = 0.5  # a fixed strength for BI's refit (rows marked strength-0.5): a weaker repair, for zero-shot accuracy
METHOD = {"replaceme": "ReplaceMe", "refit": "refit", "bias": "bias"}
CALIBRATION = {"docs": ["python-docs/library"], "teacher": ["teacher"], "mix": ["teacher", "python-docs/library"]}


def plan(depths: list[int]) -> list[dict[str, Any]]:
    """The rows, most informative first (a partial run still answers the main questions)."""
    rows: list[dict[str, Any]] = []
    for k in depths:
        first = k == depths[0]  # the calibration and fit comparisons at the first depth only
        rows += [dict(k=k, strategy="importance", repair="none"),
                 *(dict(k=k, strategy="importance", repair="replaceme", calib=c)
                   for c in (("mix", "docs", "teacher") if first else ("mix",))),
                 dict(k=k, strategy="importance", repair="refit", calib="mix"),
                 dict(k=k, strategy="importance", repair="bias", calib="mix")]
        if first:
            rows += [dict(k=k, strategy="importance", repair="replaceme", calib="mix", fit="teacher"),
                     dict(k=k, strategy="importance", repair="bias", calib="mix", strength="auto"),
                     dict(k=k, strategy="importance", repair="replaceme", calib="mix", strength="auto")]
        for strategy in ("contiguous", "iterative"):
            rows += [dict(k=k, strategy=strategy, repair=r, calib="mix") for r in REPAIRED]
        if first:  # the default repair, then fitted on the output, for BI's cut and the one span
            rows += [dict(k=k, strategy=s, repair=DEFAULT_REPAIR, calib="mix", refine=REFINE)
                     for s in ("importance", "contiguous")]
            rows += [dict(k=k, strategy="importance", repair=DEFAULT_REPAIR, calib="mix", strength=HALF, **more)
                     for more in ({}, {"refine": REFINE})]
            rows += [dict(k=k, strategy=s, repair=DEFAULT_REPAIR, calib="mix", downstream=True)  # every later block fitted
                     for s in ("importance", "contiguous")]
    return rows


def name_of(row: dict[str, Any]) -> str:
    parts = [f"{row['k']}", row["strategy"], row["repair"]]
    if row["repair"] != "none":
        parts.append(row["calib"])
    if row.get("fit", "student") != "student":
        parts.append(f"fit-{row['fit']}")
    if row.get("strength"):
        parts.append(f"strength-{row['strength']}")
    if row.get("refine"):
        parts.append(f"output-{row['refine']}")
    if row.get("downstream"):
        parts.append("downstream")
    return "-".join(parts)


def label_of(row: dict[str, Any]) -> str:
    strategy = {"importance": "BI"}.get(row["strategy"], row["strategy"])
    if row["repair"] == "none":
        return f"{strategy}, as cut"
    fit = f", fit on {row['fit']}" if row.get("fit", "student") != "student" else ""
    strength = row.get("strength")
    fit += "" if not strength else ", strength chosen" if strength == "auto" else f", strength {strength:g}"
    fit += f", + {row['refine']} passes on the output" if row.get("refine") else ""
    fit += ", + the blocks after the cut" if row.get("downstream") else ""
    return f"{strategy} + {METHOD[row['repair']]} ({row['calib']}{fit})"


def scores(model, streams: dict[str, torch.Tensor], args) -> dict[str, float]:
    """Perplexity on each held-out text, each window after the start tokens the tokenizer adds (`eval`'s rule)."""
    return {text: perplexity(model, stream, args.window, args.stride, progress=text, framing=args.framing)
            for text, stream in streams.items()}


def build(row: dict[str, Any], folder: Path, args) -> float:
    """`lmshrink truncate` for one row; wall seconds."""
    cmd = truncate_command(row, folder, args)
    started = time.perf_counter()
    assert lmshrink(cmd) == 0, f"lmshrink {' '.join(cmd)} failed"
    return time.perf_counter() - started


def truncate_command(row: dict[str, Any], folder: Path, args) -> list[str]:
    """The `lmshrink truncate` command that builds one row's student in `folder`."""
    cmd = ["truncate", "--teacher", args.teacher, "--output", str(folder), "--num-layers", str(row["k"]),
           "--strategy", row["strategy"], "--calib-tokens", str(args.calib_tokens), "--overwrite",
           "--search-tokens", str(args.search_tokens), "--repair", row["repair"]]
    if row["strategy"] == "importance":
        cmd += ["--scores", str(folder.parent.parent / "scores" / "scores.json")]
    if row["repair"] != "none":
        cmd += ["--repair-data", ",".join(CALIBRATION[row["calib"]]), "--repair-tokens", str(args.repair_tokens),
                "--repair-fit", row.get("fit", "student")]
        if row.get("strength"):
            cmd += ["--repair-strength", ",".join(map(str, STRENGTHS if row["strength"] == "auto" else [row["strength"]]))]
        if row.get("refine"):
            cmd += ["--repair-epochs", str(row["refine"])]
        if row.get("downstream"):
            cmd.append("--repair-downstream")
    return cmd


def chart(teacher: dict[str, float], done: list[dict[str, Any]], path: Path, name: str, blocks: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r["k"] for r in done}, reverse=True)
    fig, axes = plt.subplots(1, len(depths), figsize=(8 * len(depths), 5), squeeze=False)
    for ax, k in zip(axes[0], depths, strict=True):
        rows = [r for r in done if r["k"] == k]
        width = 0.8 / len(TEXTS)
        for j, text in enumerate(TEXTS):
            ratios = [r["perplexity"][text] / teacher[text] for r in rows]
            ax.barh([i + j * width for i in range(len(rows))], ratios, width, label=text)
        ax.set_yticks([i + width for i in range(len(rows))], [r["label"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set(xlabel="perplexity / teacher's (log; 1 = the teacher)", title=f"{name}, {k}/{blocks} blocks, no training")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(TEXTS))
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def table(teacher: dict[str, float], done: list[dict[str, Any]], blocks: int) -> str:
    head = "| depth | student | build s | " + " | ".join(f"{t}" for t in TEXTS) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(TEXTS),
             f"| {blocks} | teacher | | " + " | ".join(f"{teacher[t]:.2f}" for t in TEXTS) + " |"]
    for r in done:
        cells = [f"{r['perplexity'][t]:.2f} ({r['perplexity'][t] / teacher[t]:.2f}x)" for t in TEXTS]
        lines.append(f"| {r['k']} | {r['label']} | {r['seconds']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path.home() / "lmshrink-runs" / "cut-quality"))
    parser.add_argument("--teacher", default=TEACHER, help="the model cut (a name, folder, Hub id or .gguf)")
    parser.add_argument("--depths", default="24,15")
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens of each text")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=512, help="256 is the usual; 512 halves the cost on a CPU")
    parser.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens of the block scores")
    parser.add_argument("--search-tokens", type=int, default=2048)
    parser.add_argument("--repair-tokens", type=int, default=16384)
    parser.add_argument("--heal-tokens", type=int, default=25600, help="0: no healing stage")
    parser.add_argument("--tasks", default="", help="zero-shot suite for the teacher, BI cut and best students")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    args = parser.parse_args()
    out = Path(args.output).expanduser()
    (out / "rows").mkdir(parents=True, exist_ok=True)
    teacher = load(args.teacher)
    blocks = teacher.model.config.num_hidden_layers
    streams = {t: token_stream(t, teacher.tokenizer, args.tokens) for t in TEXTS}
    args.framing = Framing.of(teacher.tokenizer)
    teacher_file = out / "rows" / "teacher.json"
    if not teacher_file.exists():
        write_json(teacher_file, {"perplexity": scores(teacher.model, streams, args)})
    teacher_ppl = json.loads(teacher_file.read_text())["perplexity"]
    del teacher
    if not (out / "scores" / "scores.json").exists():  # Block Influence, once for every importance row
        assert lmshrink(["score-layers", "--model", args.teacher, "--output", str(out / "scores"), "--tokens",
                         str(args.calib_tokens), "--no-ppl", "--no-width", "--dtype", "float32"]) == 0
    depths = [int(d) for d in args.depths.split(",")]
    only = set(filter(None, args.only.split(",")))
    for row in plan(depths):
        name = name_of(row)
        file = out / "rows" / f"{name}.json"
        if file.exists() or (only and name not in only):
            continue
        print(f"\n=== {name}", flush=True)
        folder = out / "students" / name
        built = out / "rows" / f"{name}.build.json"  # a built student is reused by a resumed run
        if not (built.exists() and (folder / "lmshrink.json").exists()):
            write_json(built, {"seconds": build(row, folder, args)})
        seconds = json.loads(built.read_text())["seconds"]
        record = json.loads((folder / "lmshrink.json").read_text())
        model = load(str(folder)).model
        result = {**row, "name": name, "label": label_of(row), "seconds": seconds, "kept_layers": record["kept_layers"],
                  "repair_record": record.get("repair"), "search": record.get("search"),
                  "perplexity": scores(model, streams, args)}
        write_json(file, result)
        print(json.dumps({k: result[k] for k in ("name", "seconds", "perplexity")}), flush=True)
    done = [json.loads((out / "rows" / f"{name_of(r)}.json").read_text()) for r in plan(depths)
            if (out / "rows" / f"{name_of(r)}.json").exists()]
    chart(teacher_ppl, done, out / "cut_quality.png", Path(args.teacher).name, blocks)
    text = table(teacher_ppl, done, blocks)
    text += "\n\n" + heal_and_tasks(out, done, teacher_ppl, streams, args)
    write_text(out / "report.md", text)
    print(text)


def best(done: list[dict[str, Any]], k: int) -> dict[str, Any] | None:
    """The training-free student of depth k with the lowest geometric-mean perplexity ratio."""
    rows = [r for r in done if r["k"] == k and r["repair"] != "none"]
    return min(rows, key=lambda r: sum(math.log(v) for v in r["perplexity"].values()), default=None)


def zero_shot(out: Path, done: list[dict[str, Any]], plain: dict[str, Any] | None, args) -> str:
    """The suite for the best training-free student of each depth, the plain BI cut and the teacher,
    one `lmshrink eval` per model (each kept in OUTPUT/zero-shot/NAME, so a stopped run resumes)."""
    models = {f"{d}: {b['label']}": b["name"] for d in sorted({r["k"] for r in done}, reverse=True)
              if (b := best(done, d)) is not None}
    if plain:
        models[f"{plain['k']}: {plain['label']}"] = plain["name"]
    models["teacher"] = "teacher"
    results = suite({label: (args.teacher if name == "teacher" else str(out / "students" / name), out / "zero-shot" / name)
                     for label, name in models.items()}, args.tasks, args.limit)
    intro = (f"Zero-shot `{args.tasks}` (lm-evaluation-harness, the first {args.limit} items of each task, %; "
             "one `lmshrink eval` per model, in OUTPUT/zero-shot; the last column: the difference of the task "
             "averages from the teacher's, with its 95% interval from a paired bootstrap over the items):")
    return intro + "\n\n" + paired_table(results, {"the teacher": "teacher"})


def suite(models: dict[str, tuple[str, Path]], tasks: str, limit: int) -> dict[str, dict[str, Any]]:
    """Each model's `lmshrink eval --tasks` row (label -> (model, folder)), with those tasks only: one run
    per model, kept in its folder, so a stopped run resumes where it was; a folder scored on other
    tasks is run again for the missing ones (eval keeps every task it finished)."""
    results, wanted = {}, expand(tasks.split(","))
    for label, (model, folder) in models.items():
        report = folder / "report.json"
        if not report.is_file() or not set(wanted) <= set(json.loads(report.read_text())["rows"][0]["tasks"]):
            assert lmshrink(["eval", "--models", model, "--tasks", tasks, "--limit", str(limit), "--no-speed",
                             "--output", str(folder)]) == 0, f"lmshrink eval of {model} failed"
        row = json.loads(report.read_text())["rows"][0]
        scores = {t: row["tasks"][t] for t in wanted}  # the average as eval takes it, of these tasks
        results[label] = {**row, "tasks": scores, "task_average": sum(s["value"] for s in scores.values()) / len(scores)}
    return results


def paired_table(results: dict[str, dict[str, Any]], against: dict[str, str]) -> str:
    """Per-task accuracies (%) of each model's `lmshrink eval --tasks` row, its average, its share of the
    first reference's, and its difference from each reference (`against`: column name -> label), with
    the 95% interval of a paired bootstrap over the items (the models answered the same ones)."""
    first = results[next(iter(against.values()))]
    tasks = list(first["tasks"])
    lines = ["| model | " + " | ".join(tasks) + " | average | share of " + next(iter(against)) + "'s | "
             + " | ".join(f"vs {name}" for name in against) + " |",
             "|---|" + "---:|" * (len(tasks) + 2 + len(against))]

    def items(row: dict[str, Any]) -> dict[str, list[list[float]]]:
        return {t: [row["tasks"][t]["per_item"]] for t in tasks}

    for label, row in results.items():
        cells = [f"{100 * row['tasks'][t]['value']:.1f}" for t in tasks]
        versus = []
        for reference in against.values():
            if label == reference:
                versus.append("")
                continue
            d = paired_bootstrap(items(row), items(results[reference]), higher_is_better=True)
            versus.append(f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * row['task_average']:.1f} | "
                     f"{100 * row['task_average'] / first['task_average']:.0f}% | " + " | ".join(versus) + " |")
    return "\n".join(lines)


def heal_and_tasks(out: Path, done: list[dict[str, Any]], teacher: dict[str, float], streams, args) -> str:
    """Heal three 24-block students the same way: the plain BI cut, the same blocks with truncate's
    default repair, and the best repaired student; then the zero-shot suite."""
    lines = []
    k = max(r["k"] for r in done)
    by_name = {r["name"]: r for r in done}
    plain, top = by_name.get(f"{k}-importance-none"), best(done, k)
    repaired = by_name.get(f"{k}-importance-{DEFAULT_REPAIR}-mix")
    if args.heal_tokens and plain and top:
        lines += [f"Healed with `lmshrink distill` ({args.heal_tokens:,} tokens of python-docs/library, "
                  "the DistilGPT-2 mix, block 256, batch 4):", "",
                  "| student | " + " | ".join(TEXTS) + " |", "|---|" + "---:|" * len(TEXTS)]
        for r in {r["name"]: r for r in (plain, repaired, top) if r}.values():  # each student once
            file = out / "rows" / f"healed-{r['name']}.json"
            if not file.exists():
                if not (out / "students" / r["name"] / "lmshrink.json").exists():  # removed to save disk: built again
                    build(r, out / "students" / r["name"], args)
                folder = out / "healed" / r["name"]
                shutil.rmtree(folder, ignore_errors=True)
                assert lmshrink(["distill", "--model", str(out / "students" / r["name"]), "--teacher", args.teacher,
                                 "--data", "python-docs/library",
                                 "--output", str(folder), "--max-tokens", str(args.heal_tokens), "--block-size", "256",
                                 "--batch-size", "4", "--eval-tokens", "2048", "--save-steps", "1000000"]) == 0
                model = load(str(folder / "model")).model
                write_json(file, {"name": r["name"], "perplexity": scores(model, streams, args)})
            healed = json.loads(file.read_text())["perplexity"]
            lines.append(f"| {r['label']} + distill | " + " | ".join(
                f"{healed[t]:.2f} ({healed[t] / teacher[t]:.2f}x)" for t in TEXTS) + " |")
    if args.tasks:
        lines += ["", zero_shot(out, done, plain, args)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
