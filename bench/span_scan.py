"""Where a cut loses its zero-shot skill: every span of n - k consecutive blocks, as cut and repaired.

The real SmolLM2-135M with each run of n - k consecutive blocks removed (and a few other cuts
given by --cuts), scored without building a student: the teacher runs with only the kept blocks,
the repair's fits (from the teacher's activations on truncate's default calibration text, as the
contiguous search fits its candidates) patched into its projections. For each cut, as cut and
repaired: the contiguous search's own measure (mean KL from the teacher on the search's 2,048
tokens of python-docs/library) and zero-shot tasks through lm-eval (`lambada_openai` by default,
the task every cut loses most on) at --limit items, the same items `lmshrink eval --limit` scores.
It answers whether any span keeps what the cut loses, and whether the search's measure sees it.

Resumable: each cut's scores are a JSON file in OUTPUT/rows; a re-run skips them.

    python bench/span_scan.py --output ~/lmshrink-runs/span-scan
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lmshrink.architectures import blocks_of, only_blocks
from lmshrink.compress.cut import CutArgs, calibration_mix
from lmshrink.compress.cut_search import CutSearch
from lmshrink.compress.model_gap import gap
from lmshrink.compress.repair import patched
from lmshrink.data.sources import calibration_rows
from lmshrink.evaluate.benchmarks import run_tasks
from lmshrink.models import load
from lmshrink.records import save_figure, write_json, write_text

TEACHER = "smollm2-135m"
SEARCH_TEXT = "python-docs/library"  # truncate's --calib-data


def cuts_of(n: int, k: int, extra: str) -> dict[str, list[int]]:
    """name -> removed blocks: every span of n - k consecutive blocks, then the --cuts given."""
    drop = n - k
    cuts = {f"{a}-{a + drop - 1}": list(range(a, a + drop)) for a in range(n - drop + 1)}
    for removed in filter(None, extra.split(";")):
        blocks = sorted(int(b) for b in removed.split(","))
        cuts[",".join(map(str, blocks))] = blocks
    return cuts


def task_scores(model, tokenizer, tasks: list[str], limit: int) -> dict[str, float]:
    return {s.task: s.value for s in run_tasks(model, tokenizer, tasks, limit=limit)}


def chart(rows: dict[str, dict], teacher: dict[str, float], task: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    spans = [name for name in rows if "-" in name]
    x = [int(name.split("-")[0]) for name in spans]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for repair, style in (("none", "o--"), ("repaired", "s-")):
        top.plot(x, [rows[s][repair]["kl"] for s in spans], style, label="as cut" if repair == "none" else "repaired")
        bottom.plot(x, [100 * rows[s][repair]["tasks"][task] for s in spans], style)
    bottom.axhline(100 * teacher[task], color="grey", lw=1, label="teacher")
    for name in (name for name in rows if "-" not in name):  # the other cuts (--cuts), repaired
        bottom.axhline(100 * rows[name]["repaired"]["tasks"][task], ls=":", lw=1.5, color="green",
                       label=f"blocks {name} removed, repaired")
    top.set_yscale("log")
    top.set_ylabel("search KL (nats, log scale)")
    bottom.set_ylabel(f"{task} accuracy (%)")
    bottom.set_xlabel("first block of the removed span")
    top.legend()
    bottom.legend()
    top.set_title("every span of consecutive blocks removed: the search's measure and zero-shot accuracy")
    save_figure(fig, path)
    plt.close(fig)


def table(rows: dict[str, dict], teacher: dict[str, float], tasks: list[str]) -> str:
    head = "| removed | KL as cut | KL repaired | " + " | ".join(f"{t} as cut | {t} repaired" for t in tasks) + " |"
    lines = [head, "|---|" + "---:|" * (2 + 2 * len(tasks)),
             "| none (teacher) | 0 | 0 | " + " | ".join(f"{100 * teacher[t]:.1f} | {100 * teacher[t]:.1f}" for t in tasks) + " |"]
    for name, row in rows.items():
        cells = " | ".join(f"{100 * row['none']['tasks'][t]:.1f} | {100 * row['repaired']['tasks'][t]:.1f}"
                           for t in tasks)
        lines.append(f"| {name} | {row['none']['kl']:.3f} | {row['repaired']['kl']:.3f} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=str(Path.home() / "lmshrink-runs" / "span-scan"))
    parser.add_argument("--keep", type=int, default=24, help="blocks kept (of the teacher's 30)")
    parser.add_argument("--repair", default=CutArgs().repair, help="the repair (truncate's default)")
    parser.add_argument("--repair-tokens", type=int, default=CutArgs().repair_tokens)
    parser.add_argument("--search-tokens", type=int, default=CutArgs().search_tokens)
    parser.add_argument("--tasks", default="lambada_openai")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--cuts", default="13,14,15,17,25,26",
                        help="other cuts to score, removed blocks comma-separated, cuts ';'-separated "
                             "(default: Block Influence's choice at 24 of 30)")
    args = parser.parse_args()
    out = Path(args.output).expanduser()
    tasks = args.tasks.split(",")
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "cuts")}  # what a row's scores depend on
    recorded = out / "settings.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != settings:
        parser.error(f"{out} holds rows scored with other settings ({recorded}); give another --output")
    write_json(recorded, settings)
    loaded = load(TEACHER)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    model.config.use_cache = False  # the kept blocks keep their teacher layer numbers: no KV cache
    n = len(blocks_of(model))
    teacher_file = out / "teacher.json"
    if not teacher_file.is_file():
        write_json(teacher_file, task_scores(model, tokenizer, tasks, args.limit))
    teacher = json.loads(teacher_file.read_text())
    cuts = {name: (removed, out / "rows" / f"{name.replace(',', '_')}.json")
            for name, removed in cuts_of(n, args.keep, args.cuts).items()}
    if not all(path.is_file() for _, path in cuts.values()):  # the teacher's activations, once
        rows = calibration_rows(SEARCH_TEXT, tokenizer, args.search_tokens, min(512, args.search_tokens))
        fit_rows, _ = calibration_mix(CutArgs().repair_data, model, tokenizer, args.repair_tokens, 512)
        search = CutSearch(model, rows, args.repair, fit_rows=fit_rows)  # its teacher log-probs serve both columns
    done: dict[str, dict] = {}
    for name, (removed, path) in cuts.items():
        if not path.is_file():
            started, keep, row = time.perf_counter(), [i for i in range(n) if i not in removed], {}
            for label, edits in (("none", {}), ("repaired", search.edits(keep))):
                with patched(model, edits), only_blocks(model, keep):
                    row[label] = {"kl": gap(model, rows, "kl", search.teacher_refs, search.batch_size),
                                  "tasks": task_scores(model, tokenizer, tasks, args.limit)}
            write_json(path, {"removed": removed, **row, "seconds": time.perf_counter() - started})
        done[name] = json.loads(path.read_text())
        r = done[name]
        print(f"{name:>20}: KL {r['none']['kl']:.3f} -> {r['repaired']['kl']:.3f}  "
              + "  ".join(f"{t} {100 * r['none']['tasks'][t]:.1f} -> {100 * r['repaired']['tasks'][t]:.1f}"
                          for t in tasks), flush=True)
    write_text(out / "table.md", table(done, teacher, tasks) + "\n" + agreement(done, tasks) + "\n")
    chart(done, teacher, tasks[0], out / "span_scan.png")
    print(table(done, teacher, tasks) + "\n" + agreement(done, tasks))


def agreement(rows: dict[str, dict], tasks: list[str]) -> str:
    """Whether the search's measure ranks the repaired spans as the tasks do (Spearman's rho, the
    span the search would choose, the span each task scores best)."""
    from scipy.stats import spearmanr

    spans = [name for name in rows if "-" in name]
    kl = [rows[s]["repaired"]["kl"] for s in spans]
    lines = [f"the search chooses {min(spans, key=lambda s: rows[s]['repaired']['kl'])} (lowest repaired KL)"]
    for t in tasks:
        acc = [rows[s]["repaired"]["tasks"][t] for s in spans]
        rho = spearmanr(kl, [-a for a in acc]).statistic
        best = max(spans, key=lambda s: rows[s]["repaired"]["tasks"][t])
        lines.append(f"{t}: best span {best} ({100 * rows[best]['repaired']['tasks'][t]:.1f}); Spearman's rho "
                     f"between the repaired KL and the error, over the {len(spans)} spans: {rho:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
