"""Prune, quantize or both? The real SmolLM2-135M and students made from it, each exported to GGUF.

Models: the teacher; its 24/30- and 15/30-block students (Block Influence cut + ReplaceMe repair,
healed by `lmshrink distill` on 25,600 tokens); a width-pruned student of the 24/30 student's size
(`lmshrink prune --axes width`, healed the same way). Each is written by `lmshrink export` as f16,
q8_0, q5_0 and q4_0 GGUF and scored as a file: size on disk, perplexity on python-docs/tutorial and
kernel-docs/process (8,192 tokens each, window 512, stride 256) and prompt / generation tokens/s,
all through llama.cpp itself (`lmshrink eval --runtime llamacpp`) where llama-cpp-python is
installed, else perplexity of the file dequantised by transformers. Then, optionally, zero-shot
`core` (200 items a task) for the files on the Pareto front of size against perplexity.

Resumable: students, files and rows are kept in OUTPUT and a re-run skips what exists.

    python bench/size_quality.py --output ~/lmshrink-runs/size-quality [--tasks core --limit 200]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Any

from lmshrink.cli import main as lmshrink
from lmshrink.evaluate.benchmarks import SUITES
from lmshrink.export import llamacpp
from lmshrink.export.gguf import file_name
from lmshrink.records import save_figure, write_json, write_text

TEACHER = "smollm2-135m"
TEXTS = ["python-docs/tutorial", "kernel-docs/process"]
QUANTS = ["f16", "q8_0", "q5_0", "q4_0"]
HEAL = ["--data", "python-docs/library", "--block-size", "256", "--batch-size", "4", "--eval-tokens", "2048",
        "--save-steps", "1000000"]


def run(*args: str) -> None:
    assert lmshrink(list(args)) == 0, f"lmshrink {' '.join(args)} failed"


def cut_student(out: Path, name: str, layers: int, heal_tokens: int) -> str:
    """Block Influence cut + ReplaceMe, healed: the healed model's folder."""
    cut = out / "students" / f"{name}-cut"
    if not (cut / "lmshrink.json").exists() and not (out / "students" / name / "model" / "lmshrink.json").exists():
        run("truncate", "--teacher", TEACHER, "--output", str(cut), "--num-layers", str(layers), "--strategy",
            "importance", "--repair", "replaceme", "--overwrite")  # the default when the table was made
    return heal(out, name, cut, heal_tokens)


def heal(out: Path, name: str, student: Path, heal_tokens: int) -> str:
    healed = out / "students" / name
    if not (healed / "model" / "lmshrink.json").exists():
        shutil.rmtree(healed, ignore_errors=True)
        run("distill", "--model", str(student), "--teacher", TEACHER, "--output", str(healed), "--max-tokens",
            str(heal_tokens), *HEAL)
    return str(healed / "model")


def width_student(out: Path, name: str, like: str, heal_tokens: int) -> str:
    """Width-pruned (heads, MLP, hidden) to the parameter count of `like`, healed the same way."""
    from lmshrink.evaluate.measure import count_parameters
    from lmshrink.models import load

    pruned = out / "students" / f"{name}-cut"
    if not (pruned / "lmshrink.json").exists() and not (out / "students" / name / "model" / "lmshrink.json").exists():
        target = count_parameters(load(like, need_tokenizer=False).model)
        run("prune", "--teacher", TEACHER, "--output", str(pruned), "--target-params", str(target), "--axes", "width",
            "--overwrite")
    return heal(out, name, pruned, heal_tokens)


def score(file: Path, out: Path, args) -> dict[str, Any]:
    """One file's row: MB, perplexity per text, speed (llama.cpp) or dequantised perplexity."""
    report = out / "evals" / file.stem
    flags = ["--data", ",".join(TEXTS), "--max-tokens", str(args.tokens), "--window", "512", "--stride",
             str(args.stride), "--output", str(report)]
    if llamacpp.available():
        run("eval", "--models", str(file), "--runtime", "llamacpp", "--speed-length", "256", "--gen-tokens", "64",
            "--repeats", "3", *flags)
    else:
        run("eval", "--models", str(file), "--no-speed", *flags)
    row = json.loads((report / "report.json").read_text())["rows"][0]
    return {"mb": file.stat().st_size / 2**20, "perplexity": row["perplexity"],
            "prompt_tokens_per_s": row.get("tokens_per_s"), "gen_tokens_per_s": row.get("generate_tokens_per_s"),
            "runtime": "llamacpp" if llamacpp.available() else "transformers (dequantised)"}


def ratio(row: dict[str, Any], teacher: dict[str, float]) -> float:
    """Geometric mean over the texts of perplexity / the teacher's f16 file's."""
    return math.exp(sum(math.log(row["perplexity"][t] / teacher[t]) for t in TEXTS) / len(TEXTS))


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Files no other file beats on both size and perplexity ratio, smallest first."""
    front, best = [], math.inf
    for row in sorted(rows, key=lambda r: (r["mb"], r["ratio"])):
        if row["ratio"] < best:
            front.append(row)
            best = row["ratio"]
    return front


def chart(rows: list[dict[str, Any]], front: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    markers = dict(zip(QUANTS, "os^v", strict=True))
    for i, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        mine = [r for r in rows if r["model"] == model]
        for r in mine:
            ax.scatter(r["mb"], r["ratio"], color=f"C{i}", marker=markers[r["quant"]], s=50,
                       label=model if r is mine[0] else None)
            ax.annotate(r["quant"], (r["mb"], r["ratio"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted(front, key=lambda r: r["mb"])
    ax.plot([r["mb"] for r in front], [r["ratio"] for r in front], color="black", lw=1, ls="--",
            label="Pareto front")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="GGUF file size (MB, log)", ylabel="perplexity / teacher f16's (geometric mean of 2 texts, log)",
           title="SmolLM2-135M: prune, quantize or both")
    ax.axhline(1, color="grey", lw=0.6)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def table(rows: list[dict[str, Any]], front: list[dict[str, Any]]) -> str:
    lines = ["| model | type | MB | " + " | ".join(TEXTS) + " | ratio | prompt tok/s | gen tok/s | front |",
             "|---|---|---:|" + "---:|" * len(TEXTS) + "---:|---:|---:|---|"]
    for r in rows:
        speed = [f"{r[k]:,.0f}" if r.get(k) else "n/a" for k in ("prompt_tokens_per_s", "gen_tokens_per_s")]
        lines.append(f"| {r['model']} | {r['quant']} | {r['mb']:.1f} | "
                     + " | ".join(f"{r['perplexity'][t]:.2f}" for t in TEXTS)
                     + f" | {r['ratio']:.3f} | {' | '.join(speed)} | {'yes' if r in front else ''} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path.home() / "lmshrink-runs" / "size-quality"))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--heal-tokens", type=int, default=25600)
    parser.add_argument("--models", default="teacher,24,width,15", help="which of teacher, 24, width, 15, in order")
    parser.add_argument("--tasks", default="", help="zero-shot suite for the Pareto front's files, e.g. core")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--zero-shot-files", default="",
                        help="comma-separated file stems to score zero-shot (default: every file on the Pareto front)")
    parser.add_argument("--respeed", action="store_true",
                        help="measure every file's speed again in one pass (when the first runs shared the CPU)")
    args = parser.parse_args()
    out = Path(args.output).expanduser()
    wanted = args.models.split(",")
    depth24 = lambda: cut_student(out, "depth-24", 24, args.heal_tokens)  # noqa: E731
    builders = {"teacher": ("teacher (30 blocks)", lambda: TEACHER),
                "24": ("24/30 blocks, repaired + healed", depth24),
                "width": ("width-pruned to 24/30's size + healed",
                          lambda: width_student(out, "width-24", depth24(), args.heal_tokens)),
                "15": ("15/30 blocks, repaired + healed", lambda: cut_student(out, "depth-15", 15, args.heal_tokens))}
    rows = []
    for key in wanted:  # each model is built, exported and scored before the next is built
        label, build = builders[key]
        source = build()
        slug = Path(source).parent.name if source != TEACHER else "teacher"
        folder = out / "gguf" / slug
        run("export", "--model", source, "--output", str(folder), "--name", slug, "--quant", ",".join(QUANTS))
        for quant in QUANTS:
            file = folder / file_name(slug, quant)
            row_file = out / "rows" / f"{file.stem}.json"
            if not row_file.exists():
                print(f"\n=== {file.name}", flush=True)
                write_json(row_file, {"model": label, "quant": quant, "file": str(file), **score(file, out, args)})
            rows.append(json.loads(row_file.read_text()))
    if args.respeed and llamacpp.available():  # every file's speed again, back to back, nothing else running
        for r in rows:
            llm = llamacpp.open_gguf(r["file"], n_ctx=512)
            fast = llamacpp.speed(llm, 256, 64, 5)
            llm.close()
            r.update(prompt_tokens_per_s=fast["tokens_per_s"], gen_tokens_per_s=fast["generate_tokens_per_s"],
                     speed="one pass over every file (--respeed)")
            write_json(out / "rows" / f"{Path(r['file']).stem}.json", r)
            print(f"{Path(r['file']).name}: prompt {fast['tokens_per_s']:,.0f} tokens/s, "
                  f"generation {fast['generate_tokens_per_s']:,.1f} tokens/s", flush=True)
    teacher = next((r["perplexity"] for r in rows if r["model"].startswith("teacher") and r["quant"] == "f16"), None)
    if teacher is None:
        raise SystemExit("the teacher's f16 row is needed as the reference: include teacher in --models")
    for r in rows:
        r["ratio"] = ratio(r, teacher)
    front = pareto(rows)
    chart(rows, front, out / "size_quality.png")
    text = table(rows, front)
    if args.tasks:  # one eval per file, so an interrupted run keeps the files already scored
        shown = SUITES.get(args.tasks, args.tasks.split(","))
        lines = ["| file | MB | ratio | " + " | ".join(shown) + " | average |",
                 "|---|---:|---:|" + "---:|" * (len(shown) + 1)]
        picked = [r for r in front if not args.zero_shot_files
                  or Path(r["file"]).stem in args.zero_shot_files.split(",")]
        for r in picked:
            eval_out = out / "zero-shot" / Path(r["file"]).stem
            if not (eval_out / "report.json").exists():
                run("eval", "--models", r["file"], "--tasks", args.tasks, "--limit", str(args.limit), "--no-speed",
                    "--output", str(eval_out))
            got = json.loads((eval_out / "report.json").read_text())["rows"][0]
            r["zero_shot"] = {"average": got["task_average"], **{t: v["value"] for t, v in got["tasks"].items()}}
            lines.append(f"| {Path(r['file']).name} | {r['mb']:.1f} | {r['ratio']:.3f} | "
                         + " | ".join(f"{100 * r['zero_shot'].get(t, float('nan')):.1f}" for t in shown)
                         + f" | {100 * r['zero_shot']['average']:.1f} |")
        text += (f"\n\nZero-shot `{args.tasks}` ({args.limit} items a task, lm-evaluation-harness), the Pareto "
                 "front's files dequantised by transformers:\n\n" + "\n".join(lines))
    write_text(out / "report.md", text + "\n")
    write_json(out / "report.json", {"rows": rows, "front": [r["file"] for r in front]})
    print(text)


if __name__ == "__main__":
    main()
