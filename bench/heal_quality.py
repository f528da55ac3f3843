"""Heal faster per token: which recipe brings a cut student closest to its teacher per token and per second.

Student: the real SmolLM2-135M cut from 30 to 24 blocks, by default the best training-free student
of bench/cut_quality.py: the `contiguous` search's span, repaired by `refit` (`--strategy
importance --repair replaceme` rebuilds the student of the first table: Block Influence + ReplaceMe;
`--repair-epochs 4` fits the refit further on the teacher's output: the best student by
perplexity before training, and no better after it, so not the default; `--repair-downstream` fits
every block after the cut to the teacher's stream as well: better still before training, and no
better after it either).
Arms, each healed on python-docs/library (block 256, batch 4) at every budget of --tokens:

- `clm`: `lmshrink pretrain` (the paper's method, the LM loss alone);
- `distilgpt2`: `lmshrink distill --recipe distilgpt2` (KD T 2 x5 + CE x2 + cosine x1);
- `minitron`: `lmshrink distill --recipe minitron` (logit-only forward KL at T 1, cosine decay);
- `kl-ce`: `lmshrink distill --recipe kl-ce` (forward KL at T 1 + next-token CE, token embeddings
  frozen, lr 3e-4 with linear decay: this bench's best distillation at 102,400 tokens);
- `kl-ce<gemma`: `kl-ce`'s settings with Gemma-3-270M as the teacher, whose tokenizer is not the
  student's: `--loss uld`, ULD's sorted-probability distance where both models have read the same
  text (a cross-tokenizer teacher);
- `local+minitron`: the same after `--local-steps` (a fifth of the budget's steps, counted in it);
- `minitron+teacher-text`: `minitron` on python-docs/library mixed 1:1 (by tokens) with text
  the teacher wrote itself (`lmshrink generate`, prompted by python-docs/library pages);
- `minitron+free-text`: the same with text the teacher wrote from nothing but its start token
  (its own distribution: general text, not documentation); `nucleus-text` is that text sampled
  at top-p 0.9 (the teacher's likelier tokens only: more fluent); `ARM+TEXT` mixes any of these
  texts into any arm's corpus the same way (e.g. `clm+free-text`: the LM loss on the teacher's
  samples, sequence-level KD);
- `ARM@LR` (e.g. `minitron@1e-3`): an arm at another peak learning rate (the recipes' are tuned
  for billions of tokens; a budget of a hundred steps may want more);
- `ARM~PART` (e.g. `clm~embeddings`, `distilgpt2~embeddings~blocks:0-5`): an arm with those parts
  of the student frozen (`--freeze`; the parts any `--freeze` value names).
- `ARM^SHARE` (e.g. `kl-ce^0.5`): an arm whose SHARE of the steps are on-policy (`distill --on-policy
  SHARE`, GKD): the student continues each block's first 64 tokens by 64 of its own at T 1 and learns
  the teacher's generalised JSD (beta 0.5) on them; its other steps as the arm's;
- `ARM/top-K`, `ARM/sampled-K` (e.g. `kl-ce/sampled-12`): the teacher read from `lmshrink cache-teacher`'s
  cache of the healing text (its first `--tokens`, at T 1; one cache per seed): its top-K tokens (a
  biased estimate of its distribution), or K tokens drawn from it (`--sampled`, an unbiased one);
  `ARM/online`: the teacher online on the blocks such a cache holds, in the same order (`--data-tokens`),
  so the caches are compared with the teacher itself on the same text.
An arm is `BASE[+TEXT]` and then `~PART`, `@LR` and `^SHARE` in any order (`minitron+nucleus-text~embeddings@3e-4`);
`--arms` names one that is not before anything runs.

Held-out perplexity on 2,048 tokens of python-docs/tutorial is measured during training (curves
against tokens and wall time); at the end every student is scored by `lmshrink eval` on the first
8,192 tokens of python-docs/tutorial, kernel-docs/process and fortunes/people (English of another
kind: neither arm trains on anything like it), window 512, stride 256. Optionally zero-shot
(`--tasks core --limit 200`) for the best arm and the baseline at the largest budget, beside the
teacher and the student they healed from, compared item by item (paired bootstrap).

`--seeds 42,1,2` runs every arm once per seed (42 is lmshrink's default; it changes the data order
and the held-out split) and prints each arm against the first, paired by seed, with a 95% interval.

Resumable: every run, text and score lives in OUTPUT, and the same command carries on.

    python bench/heal_quality.py --output ~/lmshrink-runs/heal-quality [--tokens 25600,102400] [--tasks core]
        [--strategy importance --repair replaceme] [--repair-epochs 4] [--repair-downstream] [--seeds 42,1,2]
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from cut_quality import paired_table, suite

from lmshrink.cli import main as lmshrink
from lmshrink.evaluate.verdicts import interval
from lmshrink.records import save_figure, write_json, write_text

TEACHER = "smollm2-135m"
TEXTS = ["python-docs/tutorial", "kernel-docs/process", "fortunes/people"]
TOKENS_PER_STEP = 4 * 256
HEAL = ["--data", "python-docs/library", "--eval-data", "python-docs/tutorial", "--eval-tokens", "2048",
        "--block-size", "256", "--batch-size", "4", "--save-steps", "25", "--logging-steps", "5", "--report-to", "none"]
BASES = ["clm", "distilgpt2", "minitron", "kl-ce", "local+minitron", "kl-ce<gemma"]  # the recipes an arm starts from
ARMS = [*BASES, "minitron+teacher-text", "minitron+free-text"]
SEED = 42  # lmshrink's default: runs at it keep their folder names
# the teacher's texts: what they continue, and how they are sampled
TEACHER_TEXTS = {"teacher-text": ["--prompts", "python-docs/library"], "free-text": ["--prompts", ""],
                 "nucleus-text": ["--prompts", "", "--top-p", "0.9"]}


def run(*args: str) -> None:
    assert lmshrink(list(args)) == 0, f"lmshrink {' '.join(args)} failed"


CACHES = {"top": "--top-k", "sampled": "--sampled"}  # ARM/top-K, ARM/sampled-K: the teacher from a cache


ON_POLICY = ["--prompt-tokens", "64", "--new-tokens", "64", "--policy-loss", "gjsd", "--beta", "0.5",
             "--sample-temperature", "1"]  # ARM^SHARE's on-policy steps


def parse_arm(arm: str) -> tuple[str, str | None, list[str], str | None, str | None]:
    """(base arm, teacher text, frozen parts, peak learning rate, on-policy share) of `BASE[+TEXT]`
    followed, in any order, by `~PART` (PART of the student frozen), `@LR` (another peak learning
    rate) and `^SHARE` (that share of the steps on-policy), and optionally `/top-K` or `/sampled-K`
    (the teacher read from a cache of the healing text: its top-K tokens, or K tokens drawn from it;
    T 1, so for kl-ce and minitron), or `/online` (the teacher online on that cache's blocks)."""
    arm, cache = arm.split("/", 1) if "/" in arm else (arm, None)
    if cache not in (None, "online") and (cache.rpartition("-")[0] not in CACHES
                                          or not cache.rpartition("-")[2].isdigit()):
        raise ValueError(f"{cache}: not a cache (top-K, sampled-K or online)")
    name, *marks = re.split(r"([~@^])", arm)
    base, _, text = name.rpartition("+")
    if text not in TEACHER_TEXTS or not base:
        base, text = name, None
    pairs = list(zip(marks[::2], marks[1::2], strict=True))
    rates, shares = ([value for mark, value in pairs if mark == m] for m in "@^")
    if (base not in BASES or len(rates) > 1 or len(shares) > 1 or (cache and base not in ("kl-ce", "minitron"))
            or (shares and (base in ("clm", "kl-ce<gemma") or cache))):
        raise ValueError(f"{arm}: not an arm (BASE[+TEXT][~PART...][@LR][^SHARE], BASE one of {', '.join(BASES)}; "
                         f"^SHARE needs a distillation arm with the teacher online)")
    return (base, text, [value for mark, value in pairs if mark == "~"], rates[0] if rates else None,
            shares[0] if shares else None)


def arm_command(arm: str, student: Path, folder: Path, tokens: int, texts: Path, seed: int = SEED) -> list[str]:
    """The lmshrink command of one arm (`parse_arm`); a teacher text (TEXTS/TEXT) is half the healing tokens."""
    base, text, frozen, lr, share = parse_arm(arm)
    argv = base_command(base, student, folder, tokens)
    if share:
        argv += ["--on-policy", share, *ON_POLICY]
    if cache := cache_command(arm, tokens, texts, seed):  # the teacher from the cache `cache_command` makes
        argv[argv.index("--teacher"): argv.index("--teacher") + 2] = ["--teacher-cache", cache[cache.index("--output") + 1]]
    if arm.endswith("/online"):  # the blocks a cache of this budget holds, the teacher online
        argv += ["--data-tokens", str(tokens)]
    if text:
        argv[argv.index("--data") + 1] = f"{texts / text},python-docs/library"
        argv += ["--data-weights", "1,1"]
    if frozen:
        argv += ["--freeze", ",".join(frozen)]
    if lr and "--lr" in argv:
        argv[argv.index("--lr") + 1] = lr
    elif lr:
        argv += ["--lr", lr]
    return argv


def cache_command(arm: str, tokens: int, out: Path, seed: int = SEED) -> list[str] | None:
    """The `lmshrink cache-teacher` command of an `ARM/top-K` or `ARM/sampled-K` arm (None for others): the
    first `tokens` of the healing text the arms read (HEAL's data flags), at T 1, drawn at the run's seed."""
    if "/" not in arm or arm.endswith("/online"):
        return None
    kind, _, k = arm.rpartition("/")[2].rpartition("-")
    data = HEAL[: HEAL.index("--block-size") + 2]  # --data, --eval-data, --eval-tokens, --block-size
    name = f"{kind}-{k}-{tokens // 1000}k{'' if seed == SEED else f'-seed{seed}'}"
    return ["cache-teacher", "--teacher", TEACHER, "--output", str(out / "caches" / name), *data,
            "--max-tokens", str(tokens), "--temperature", "1", CACHES[kind], k, "--seed", str(seed)]


def base_command(arm: str, student: Path, folder: Path, tokens: int) -> list[str]:
    steps = tokens // TOKENS_PER_STEP
    curve = ["--eval-steps", str(max(1, steps // 5))]
    if arm == "clm":
        return ["pretrain", "--model", str(student), "--output", str(folder), *HEAL, *curve, "--lr", "2e-4",
                "--warmup", "0.05", "--max-tokens", str(tokens)]
    common = ["distill", "--model", str(student), "--teacher", TEACHER, "--output", str(folder), *HEAL, *curve]
    if arm == "local+minitron":
        local = max(1, steps // 5)
        return [*common, "--recipe", "minitron", "--local-steps", str(local), "--local-lr", "1e-3",
                "--max-tokens", str(tokens - local * TOKENS_PER_STEP)]
    if arm == "kl-ce<gemma":  # another tokenizer: ULD on aligned positions
        common[common.index("--teacher") + 1] = "gemma-3-270m"
        return [*common, "--recipe", "kl-ce", "--loss", "uld", "--max-tokens", str(tokens)]
    return [*common, "--recipe", arm, "--max-tokens", str(tokens)]  # distilgpt2, minitron, kl-ce


def student_command(student: Path, strategy: str, repair: str, repair_tokens: int, keep: str | None,
                    repair_epochs: int = 0, downstream: bool = False) -> list[str]:
    """The `lmshrink truncate` command of the student every arm heals: 24 blocks chosen by `strategy`,
    or the teacher blocks `keep` (e.g. a search's choice, repaired on more calibration text), the
    repair fitted further on the output for `repair_epochs` passes, and (`downstream`) every block
    after the cut fitted too."""
    blocks = ["--keep", keep] if keep else ["--num-layers", "24", "--strategy", strategy]
    return ["truncate", "--teacher", TEACHER, "--output", str(student), *blocks, "--repair", repair,
            "--repair-tokens", str(repair_tokens), "--repair-epochs", str(repair_epochs),
            *(["--repair-downstream"] if downstream else []), "--overwrite"]


def cut_of(settings: dict) -> tuple:
    """(blocks, repair, repair tokens, output-fit passes, downstream fits) from the bench's arguments or
    a student's recorded settings."""
    cut = settings.get("cut", settings)
    keep = settings.get("keep")
    blocks = [int(b) for b in keep.split(",")] if isinstance(keep, str) else keep or settings["strategy"]
    return (blocks, cut["repair"], cut["repair_tokens"], cut.get("repair_epochs", 0),
            cut.get("repair_downstream", False))


def text_command(name: str, out: Path, samples: int) -> list[str]:
    """The `lmshrink generate` command of one teacher-written text (OUT/NAME): the same number of new
    tokens for each; fp32, as the tables were made."""
    return ["generate", "--teacher", TEACHER, "--output", str(out / name), *TEACHER_TEXTS[name], "--prompt-tokens",
            "32", "--new-tokens", "224", "--samples", str(samples), "--batch-size", "64", "--dtype", "float32"]


def history(folder: Path) -> tuple[list[dict[str, float]], float, float]:
    """Held-out perplexity during training against tokens and seconds spent (the local stage's
    first), and the run's total tokens and training seconds."""
    offset_tokens = offset_seconds = 0.0
    points = []
    for run_folder in (folder / "local", folder):
        if not (run_folder / "metrics.jsonl").is_file():
            continue
        seen = set()
        for line in (run_folder / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if "eval_loss" in r and r["step"] not in seen:  # the final evaluation repeats the last step's
                seen.add(r["step"])
                points.append({"tokens": offset_tokens + r["step"] * TOKENS_PER_STEP,
                               "seconds": offset_seconds + r.get("elapsed_s", 0.0), "ppl": math.exp(r["eval_loss"])})
        record = json.loads((run_folder / "lmshrink.json").read_text())["metrics"]
        offset_tokens += record["tokens_seen"]
        offset_seconds += record["train_seconds"]
    return points, offset_tokens, offset_seconds


def label_of(row: dict[str, Any]) -> str:
    seed = "" if row["seed"] == SEED else f", seed {row['seed']}"
    return f"{row['arm']} ({row['budget'] // 1000}k{seed})"


def across_seeds(rows: list[dict[str, Any]]) -> str:
    """Each arm against the first, text by text: the perplexity difference in % of the first arm's, paired
    by seed (same seed, same budget), mean and 95% t-interval over the seeds both ran."""
    base = rows[0]["arm"]
    lines = [f"Against `{base}`, paired by seed (perplexity difference, % of `{base}`'s; mean and 95% interval):", "",
             "| arm | seeds | " + " | ".join(TEXTS) + " |", "|---|---:|" + "---:|" * len(TEXTS)]
    for budget in dict.fromkeys(r["budget"] for r in rows):
        first = {r["seed"]: r for r in rows if r["arm"] == base and r["budget"] == budget}
        for arm in dict.fromkeys(r["arm"] for r in rows if r["arm"] != base):
            pairs = [(first[r["seed"]], r) for r in rows if r["arm"] == arm and r["budget"] == budget and r["seed"] in first]
            cells = []
            for text in TEXTS:
                d = interval([100 * (r["perplexity"][text] / b["perplexity"][text] - 1) for b, r in pairs])
                cells.append(f"{d['mean']:+.1f}%" + ("" if d["low"] is None else f" [{d['low']:+.1f}, {d['high']:+.1f}]"))
            lines.append(f"| {arm} ({budget // 1000}k) | {len(pairs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reach(rows: list[dict[str, Any]], budget: int) -> str:
    """How many tokens and seconds each run took to reach the DistilGPT-2 mix's held-out perplexity
    at the end of the largest budget (the curves' evaluations: 2,048 tokens of python-docs/tutorial)."""
    baseline = next((r for r in rows if r["arm"] == "distilgpt2" and r["budget"] == budget and r["curve"]), None)
    if baseline is None:
        return ""
    target = baseline["curve"][-1]["ppl"]
    lines = [f"Reaching the DistilGPT-2 mix's held-out perplexity after {budget:,} tokens ({target:.2f}):", "",
             "| run | tokens | train s |", "|---|---:|---:|"]
    for r in rows:
        hit = next((p for p in r["curve"] if p["ppl"] <= target + 1e-9), None)
        cells = f"{hit['tokens']:,.0f} | {hit['seconds']:,.0f}" if hit else "not reached | "
        lines.append(f"| {label_of(r)} | {cells} |")
    return "\n".join(lines)


def zero_shot(out: Path, rows: list[dict[str, Any]], budget: int, args) -> str:
    """The suite for the teacher, the student as cut and repaired, the best arm at `budget` and `clm`
    there, one `lmshrink eval` per model (each kept, so a stopped run resumes), each compared item by
    item with the teacher and with the student it healed from."""
    largest = [r for r in rows if r["budget"] == budget]
    best = min(largest, key=lambda r: r["ratio"])
    models = {"teacher": (TEACHER, out / "zero-shot" / "teacher"),
              "as cut + repaired": (str(out / "student"), out / "zero-shot" / "student")}
    chosen = largest if args.tasks_arms == "all" else (best, *(x for x in largest if x["arm"] == "clm"))
    for r in chosen:  # clm: when that budget has it
        models[label_of(r)] = (r["folder"] + "/model", Path(r["folder"]) / "zero-shot")
    against = {"the teacher": "teacher", "as cut": "as cut + repaired"}
    if args.tasks_arms == "all":  # every arm against the first
        against = {"the teacher": "teacher", f"`{largest[0]['arm']}`": label_of(largest[0])}
    results = suite(models, args.tasks, args.limit)
    return (f"Zero-shot `{args.tasks}` ({args.limit} items a task, %; differences of the task averages with the "
            "95% interval of a paired bootstrap over the items):\n\n" + paired_table(results, against))


def chart(rows: list[dict[str, Any]], path: Path, student: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in rows:
        points = r["curve"]
        label = f"{r['arm']} ({r['budget'] // 1000}k)"
        for ax, key in zip(axes, ("tokens", "seconds"), strict=True):
            ax.plot([p[key] for p in points], [p["ppl"] for p in points], marker=".", label=label)
    axes[0].set_xlabel("healing tokens")
    axes[1].set_xlabel("wall seconds (2-core CPU)")
    axes[0].set_ylabel("held-out perplexity, python-docs/tutorial")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M cut to 24/30 blocks ({student}), healed by each recipe")
    save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path.home() / "lmshrink-runs" / "heal-quality"))
    parser.add_argument("--tokens", default="25600,102400", help="healing budgets, comma-separated")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--teacher-samples", type=int, default=256,
                        help="teacher-written documents (about 200 tokens each: half of 102,400 tokens)")
    parser.add_argument("--seeds", default=str(SEED), help="one run of every arm per seed (comma-separated)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--tasks", default="", help="zero-shot suite for the best arm and clm at the largest budget")
    parser.add_argument("--tasks-arms", default="best", choices=("best", "all"),
                        help="the arms the zero-shot suite scores at the largest budget: the best and clm, or all "
                             "(each then compared with the first arm)")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--strategy", default="contiguous", help="how the student's 24 blocks are chosen (truncate's)")
    parser.add_argument("--repair", default="refit", help="the student's training-free repair (truncate's)")
    parser.add_argument("--repair-tokens", type=int, default=16384, help="the repair's calibration tokens (truncate's)")
    parser.add_argument("--repair-epochs", type=int, default=0,
                        help="passes fitting the repair further on the teacher's output (truncate's)")
    parser.add_argument("--keep", default=None, help="the student's teacher blocks, in place of --strategy")
    parser.add_argument("--repair-downstream", action="store_true",
                        help="fit every block after the cut to the teacher's stream too (truncate's)")
    args = parser.parse_args()
    arms, texts = args.arms.split(","), set()  # the teacher texts the arms train on
    for arm in arms:
        try:
            texts.add(parse_arm(arm)[1])
        except ValueError as err:
            parser.error(str(err))
    out = Path(args.output).expanduser()
    student = out / "student"
    if not (student / "lmshrink.json").is_file():
        run(*student_command(student, args.strategy, args.repair, args.repair_tokens, args.keep, args.repair_epochs,
                             args.repair_downstream))
    built, wanted = cut_of(json.loads((student / "lmshrink.json").read_text())["settings"]), cut_of(vars(args))
    if built != wanted:
        raise SystemExit(f"{student} was cut as {built}, not {wanted}: give those settings, or another --output")
    budgets = [int(t) for t in args.tokens.split(",")]
    for name in sorted(texts - {None}):
        run(*text_command(name, out, args.teacher_samples))
    rows, seeds = [], [int(s) for s in args.seeds.split(",")]
    for tokens in budgets:
        for arm in arms:
            for seed in seeds:
                folder = out / "runs" / f"{arm.replace('/', '_')}-{tokens // 1000}k{'' if seed == SEED else f'-seed{seed}'}"
                if cache := cache_command(arm, tokens, out, seed):
                    run(*cache)  # made once, carried on if interrupted
                argv = arm_command(arm, student, folder, tokens, out, seed)
                run(*argv, *([] if seed == SEED else ["--seed", str(seed)]))  # finished runs: nothing to do
                points, seen, seconds = history(folder)
                rows.append({"arm": arm, "budget": tokens, "seed": seed, "tokens": seen, "seconds": seconds,
                             "folder": str(folder), "curve": points})
    tag = "-".join(a.replace("+", "_").replace("/", "_") for a in arms)
    tag += "" if seeds == [SEED] else "-seeds" + "_".join(map(str, seeds))
    healed = []
    for tokens in budgets:  # one evaluation per budget (teacher and student in each), so a new budget adds one
        scores = out / f"eval-{tokens // 1000}k-{tag}"
        models = [str(student), *(r["folder"] + "/model" for r in rows if r["budget"] == tokens)]
        if not (scores / "report.json").is_file():
            run("eval", "--models", TEACHER + "," + ",".join(models), "--data", ",".join(TEXTS), "--max-tokens",
                str(args.eval_tokens), "--window", "512", "--stride", "256", "--no-speed", "--output", str(scores))
        table = json.loads((scores / "report.json").read_text())["rows"]
        teacher, as_cut = table[0]["perplexity"], table[1]["perplexity"]
        healed += table[2:]
    scores = out / f"eval-{'-'.join(f'{t // 1000}k' for t in budgets)}-{tag}"
    lines = ["| student | tokens | train s | " + " | ".join(TEXTS) + " | ratio to teacher (geo-mean) |",
             "|---|---:|---:|" + "---:|" * (len(TEXTS) + 1)]
    entries = [("teacher", None, teacher), ("as cut + repaired", None, as_cut),
               *((label_of(r), r, t["perplexity"]) for r, t in zip(rows, healed, strict=True))]
    for label, r, ppl in entries:
        ratio = math.exp(sum(math.log(ppl[s] / teacher[s]) for s in TEXTS) / len(TEXTS))
        if r:
            r.update(perplexity=ppl, ratio=ratio)
        lines.append(f"| {label} | {r['tokens'] if r else 0:,.0f} | {r['seconds'] if r else 0:,.0f} | "
                     + " | ".join(f"{ppl[s]:.2f}" for s in TEXTS) + f" | {ratio:.3f} |")
    chart(rows, scores / "heal_quality.png", f"{args.strategy} + {args.repair}")
    text = "\n".join(lines) + "\n\n" + reach(rows, max(budgets))
    if len(seeds) > 1:
        text += "\n\n" + across_seeds(rows)
    if args.tasks:
        text += "\n\n" + zero_shot(out, rows, max(budgets), args)
    write_text(scores / "report.md", text + "\n")
    write_json(scores / "rows.json", {"rows": rows, "teacher": teacher, "as_cut": as_cut})
    print(text)


if __name__ == "__main__":
    main()
