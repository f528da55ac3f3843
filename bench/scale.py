"""How each one-shot step's cost grows with the model (issue #45): wall time and peak memory against
parameters, on random-weight models of the shapes users bring.

Each shape (from the published config.json of SmolLM2, Qwen2.5, Llama 3.x: ../shared/ASSETS.md) is
written once to OUTPUT/models/NAME as bf16 safetensors, tensor by tensor in 1 GiB shards
(`compress.sequential.ShardWriter`: the whole model is never in memory), with SmolLM2's tokenizer
(its ids fit every vocabulary here). Random weights measure cost, not quality: no score, perplexity
or choice these runs print means anything about the real models.

Every step is one `lmshrink` command under `/usr/bin/time -v` (its wall time and the kernel's peak
resident set size), at fixed token counts (1,024 calibration tokens in rows of 256):
- `score-layers`: block scores (BI, angular distances, the perplexity without each block), one block
  at a time (`--sequential on`, float32);
- `score-layers-whole`: the same with the whole model in memory (`--sequential off`, float32): run
  only where its float32 weights take under 60% of the machine's memory (else recorded as not run);
- `score-layers-bi`: Block Influence and angular distances alone (`--no-ppl`), one block at a time:
  one pass of each block, so the part of the cost that is linear in the parameters;
- `truncate`: keep 3/4 of the blocks (a quarter from the middle removed), `--repair refit` on 1,024
  tokens of python-docs/library, one block at a time, the student written shard by shard;
- `export`: that student as a q8_0 GGUF, one tensor at a time;
- `truncate-contiguous`: the same depth chosen by the contiguous search (every span repaired by refit
  and measured by KL on 1,024 tokens), block by block;
- `score-student-bi`, `score-student`: `score-layers-bi` and `score-layers` on that student;
- `prune`: the width to 3/4 of the parameters (`--ratio 0.75 --axes width`: heads, MLP channels and
  hidden size scored on 1,024 tokens and sliced), one block at a time;
- `eval`: the teacher's perplexity on 1,024 tokens of python-docs/library (windows of 256), one block
  at a time (`--sequential on`, float32 per block);
- `eval-whole`: the same with the whole model loaded in bfloat16 (`--sequential off`): run only where
  those weights take under 60% of the machine's memory.
The `startup` shape (3M parameters: 4 blocks 64 wide, SmolLM2's vocabulary) measures what each
command costs whatever the model's size; the growth exponents are also fitted on the time less it.
Resumable: each (model, step) result is kept in OUTPUT/results.json (a failure with its exit code,
not tried again unless `--retry`); a re-run measures only what is missing, then writes the table,
the log-log chart (scale.png) and the growth exponent of each step's time and memory (a least-squares
line through log time / log memory against log parameters).

    python bench/scale.py --output ~/lmshrink-runs/scale [--models smollm2-360m,qwen2.5-0.5b] [--steps score-layers]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmshrink.compress.sequential import ShardWriter
from lmshrink.models import resolve
from lmshrink.records import save_figure, write_json, write_text

# hidden, MLP, blocks, heads, kv heads, vocabulary, tied; Llama 3.x with its rope scaling, Qwen2.5 with biases
SHAPES = {
    "smollm2-135m": ("llama", 576, 1536, 30, 9, 3, 49152, True, {"rope_theta": 100000.0}),
    "smollm2-360m": ("llama", 960, 2560, 32, 15, 5, 49152, True, {"rope_theta": 100000.0}),
    "qwen2.5-0.5b": ("qwen2", 896, 4864, 24, 14, 2, 151936, True, {"rope_theta": 1000000.0}),
    "llama-3.2-1b": ("llama", 2048, 8192, 16, 32, 8, 128256, True, {"rope_theta": 500000.0}),
    "qwen2.5-1.5b": ("qwen2", 1536, 8960, 28, 12, 2, 151936, True, {"rope_theta": 1000000.0}),
    "smollm2-1.7b": ("llama", 2048, 8192, 24, 32, 32, 49152, True, {"rope_theta": 130000.0}),
    "llama-3.2-3b": ("llama", 3072, 8192, 28, 24, 8, 128256, True, {"rope_theta": 500000.0}),
    "qwen2.5-3b": ("qwen2", 2048, 11008, 36, 16, 2, 151936, True, {"rope_theta": 1000000.0}),
    "llama-3.1-8b": ("llama", 4096, 14336, 32, 32, 8, 128256, False, {"rope_theta": 500000.0}),
    # 3M parameters, nearly all SmolLM2's vocabulary table: what each command costs whatever the model's
    # size (Python, torch and transformers imported, tokenizer and text read, the lazy model built)
    "startup": ("llama", 64, 128, 4, 4, 2, 49152, True, {"rope_theta": 100000.0}),
}
STARTUP = "startup"
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
               "original_max_position_embeddings": 8192}
CALIBRATION = ["--data", "python-docs/library", "--tokens", "1024", "--seq-len", "256", "--dtype", "float32",
               "--no-width"]
STEPS = ("score-layers", "score-layers-whole", "score-layers-bi", "truncate", "export", "score-student-bi",
         "score-student", "prune", "eval", "eval-whole", "truncate-contiguous")
EVAL = ["eval", "--data", "python-docs/library", "--max-tokens", "1024", "--window", "256", "--stride", "256",
        "--no-speed", "--batch-size", "4"]
WHOLE = {"score-layers-whole": 4, "eval-whole": 2}  # steps that hold the whole model: bytes per parameter


def step_command(step: str, model: Path, runs: Path, n: int) -> list[str]:
    """The lmshrink command of one step on one model (n blocks); `runs` holds what the steps write.
    The cut keeps 3/4 of the blocks (24 of 32: a quarter from the middle removed)."""
    removed = set(range(n // 2, n // 2 + n // 4))
    keep = ",".join(str(i) for i in range(n) if i not in removed)
    student = runs / "student"
    return {
        "score-layers": ["score-layers", *CALIBRATION, "--sequential", "on", "--model", str(model)],
        "score-layers-whole": ["score-layers", *CALIBRATION, "--sequential", "off", "--model", str(model)],
        "score-layers-bi": ["score-layers", *CALIBRATION, "--sequential", "on", "--no-ppl", "--model", str(model)],
        "truncate": ["truncate", "--teacher", str(model), "--keep", keep, "--repair", "refit", "--repair-data",
                     "python-docs/library", "--repair-tokens", "1024", "--sequential", "on", "--overwrite",
                     "--output", str(student)],
        "truncate-contiguous": ["truncate", "--teacher", str(model), "--strategy", "contiguous", "--num-layers",
                                str(n - n // 4), "--repair", "refit", "--repair-data", "python-docs/library",
                                "--repair-tokens", "1024", "--calib-data", "python-docs/library", "--search-tokens",
                                "1024", "--sequential", "on", "--overwrite", "--output", str(runs / "contiguous")],
        "export": ["export", "--model", str(student), "--quant", "q8_0", "--sequential", "on", "--overwrite",
                   "--output", str(runs / "gguf")],
        "score-student-bi": ["score-layers", *CALIBRATION, "--sequential", "on", "--no-ppl", "--model", str(student)],
        "score-student": ["score-layers", *CALIBRATION, "--sequential", "on", "--model", str(student)],
        "prune": ["prune", "--teacher", str(model), "--ratio", "0.75", "--axes", "width", "--calib-data",
                  "python-docs/library", "--calib-tokens", "1024", "--sequential", "on", "--overwrite"],
        "eval": [*EVAL, "--models", str(model), "--sequential", "on"],
        "eval-whole": [*EVAL, "--models", str(model), "--sequential", "off", "--dtype", "bfloat16"],
    }[step] + ([] if step in ("truncate", "truncate-contiguous", "export") else ["--output", str(runs / step)])


def config_of(name: str):
    from transformers import AutoConfig

    kind, hidden, mlp, blocks, heads, kv, vocab, tied, extra = SHAPES[name]
    context = 131072 if name.startswith("llama-3") else 32768 if kind == "qwen2" else 8192  # as published
    extra = {**extra, **({"rope_scaling": LLAMA3_ROPE} if name.startswith("llama-3") else {})}
    return AutoConfig.for_model(kind, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=blocks,
                                num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                tie_word_embeddings=tied, max_position_embeddings=context, **extra)


def shapes_of(name: str) -> dict[str, torch.Size]:
    """Each stored tensor's shape (a tied head is the embeddings: not stored), from the config alone."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = config_of(name)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    head = "lm_head.weight" if config.tie_word_embeddings else None
    return {k: p.shape for k, p in model.named_parameters() if k != head}


def parameters_of(name: str) -> int:
    return sum(math.prod(s) for s in shapes_of(name).values())


def write_model(name: str, folder: Path) -> int:
    """The random-weight bf16 checkpoint of a shape (written once; its parameter count either way)."""
    shapes = shapes_of(name)
    if (folder / "config.json").is_file():
        return sum(math.prod(s) for s in shapes.values())
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    writer = ShardWriter(partial)
    generator = torch.Generator().manual_seed(0)
    for key, shape in shapes.items():  # norms at 1, everything else N(0, 0.02), as transformers initialises
        tensor = (torch.ones(shape) if "norm" in key else torch.randn(shape, generator=generator) * 0.02)
        writer.add(key, tensor.to(torch.bfloat16))
    writer.close()
    config = config_of(name)
    config.torch_dtype = "bfloat16"
    config.save_pretrained(partial)
    tokenizer = Path(resolve("smollm2-135m"))
    for file in tokenizer.glob("*token*"):
        shutil.copy(file, partial / file.name)
    partial.replace(folder)
    return sum(math.prod(s) for s in shapes.values())


def measure(argv: list[str], log: Path) -> dict:
    """One lmshrink command under /usr/bin/time -v: wall seconds, peak RSS (bytes), exit code."""
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        rc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "lmshrink", *argv],
                            stdout=out, stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"rc": rc, "seconds": time.perf_counter() - started, "peak_bytes": int(peak[1]) * 1024 if peak else None,
            "command": "lmshrink " + " ".join(argv)}


def exponent(points: list[tuple[float, float]]) -> float | None:
    """The slope of log y against log x (least squares), or None for fewer than two points."""
    if len(points) < 2:
        return None
    xs, ys = ([math.log(p[i]) for p in points] for i in (0, 1))
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def heal_table() -> list[str]:
    """Healing each size's 3/4-depth student against its bf16 teacher: what each engine setting holds
    per GPU (and in CPU memory) before activations, by `heal.memory.engine_plans` (the arithmetic
    `distill`'s refusal uses), from the configs alone."""
    from lmshrink.architectures import student_config
    from lmshrink.heal.memory import engine_plans, parameter_counts

    lines = []
    for name, shape in SHAPES.items():
        if name == STARTUP:
            continue
        teacher, n = config_of(name), shape[3]
        removed = set(range(n // 2, n // 2 + n // 4))
        student = student_config(teacher, [i for i in range(n) if i not in removed])
        plans = engine_plans(student, teacher)
        if not lines:
            lines = ["| teacher | student | " + " | ".join(plans) + " |", "|---|---:|" + "---:|" * len(plans)]
        cells = [f"{gpu / 1e9:.1f}" + (f" (+{cpu / 1e9:.0f} CPU)" if cpu else "") for gpu, cpu in plans.values()]
        lines.append(f"| {name} | {parameter_counts(student)[0] / 1e9:.2f}B | " + " | ".join(cells) + " |")
    return lines


NEEDS = ("truncate", "export", "score-layers-bi", "prune", "eval")  # the size table's columns


def cpu_gflops(out: Path) -> float:
    """This machine's float32 matrix-multiply rate (2,048-square products on every core), measured once."""
    file = out / "machine.json"
    if not file.is_file():
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        for _ in range(3):
            a @ b
        started = time.perf_counter()
        for _ in range(20):
            a @ b
        write_json(file, {"cpu_gflops": 2 * 2048**3 * 20 / (time.perf_counter() - started) / 1e9,
                          "cores": os.cpu_count()})
    return json.loads(file.read_text())["cpu_gflops"]


def needs_table(results: dict, params: dict[str, int], steps: tuple[str, ...] = NEEDS) -> list[str]:
    """What each size needs: per step, peak memory and wall time on this machine."""
    lines = ["| model | parameters | bf16 on disk | " + " | ".join(f"`{s}`" for s in steps) + " |",
             "|---|---:|---:|" + "---:|" * len(steps)]
    for name, n in sorted(params.items(), key=lambda item: item[1]):
        cells = []
        for step in steps:
            r = results.get(f"{name}/{step}", {})
            done = r.get("rc") == 0
            cells.append(f"{r['peak_bytes'] / 2**30:.1f} GiB, {r['seconds'] / 60:.1f} min" if done
                         else (r.get("skipped") or "").split(":")[0])
        lines.append(f"| {name} | {n / 1e9:.2f}B | {2 * n / 1e9:.1f} GB | " + " | ".join(cells) + " |")
    return lines


def trim_table(results: dict, params: dict[str, int], out: Path) -> list[str]:
    """Peak memory before and after block-by-block runs gave freed memory back (`malloc_trim`): the
    earlier figures, where kept (`results-before-trim.json`), beside the current ones."""
    file = out / "results-before-trim.json"
    if not file.is_file():
        return []
    before = json.loads(file.read_text())
    lines = ["| model | step | peak before | peak after |", "|---|---|---:|---:|"]
    for key, old in sorted(before.items(), key=lambda item: (params.get(item[0].split("/")[0], 0), item[0])):
        new = results.get(key, {})
        if old.get("rc") == 0 and new.get("rc") == 0:
            model, step = key.split("/")
            lines.append(f"| {model} | {step} | {old['peak_bytes'] / 2**30:.2f} GiB | {new['peak_bytes'] / 2**30:.2f} GiB |")
    return lines if len(lines) > 2 else []


def report(results: dict, params: dict[str, int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| model | parameters | step | wall | peak memory |", "|---|---:|---|---:|---:|"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    growth = []
    for step in STEPS:
        done = sorted((params[m], r) for key, r in results.items() for m in [key.split("/")[0]]
                      if key.endswith("/" + step) and r.get("rc") == 0 and m in params)
        for n, r in done:
            name = next(m for m in params if params[m] == n)
            lines.append(f"| {name} | {n / 1e9:.2f}B | {step} | {r['seconds'] / 60:.1f} min | "
                         f"{r['peak_bytes'] / 2**30:.2f} GiB |")
        if done:
            for ax, key in zip(axes, ("seconds", "peak_bytes"), strict=True):
                ax.loglog([n for n, _ in done], [r[key] for _, r in done], marker="o", label=step)
            t, m = (exponent([(n, r[k]) for n, r in done]) for k in ("seconds", "peak_bytes"))
            large = exponent([(n, r["seconds"]) for n, r in done if n >= 1e9])  # past the fixed costs
            fixed = results.get(f"{STARTUP}/{step}", {})
            net = exponent([(n, r["seconds"] - fixed["seconds"]) for n, r in done]) \
                if fixed.get("rc") == 0 and all(r["seconds"] > fixed["seconds"] for _, r in done) else None
            growth.append(f"- `{step}`: time grows as parameters^{t:.2f}"
                          + (f" (^{large:.2f} from 1B up)" if large is not None else "")
                          + (f"; less the {fixed['seconds']:.0f} s it takes on the 3M-parameter startup shape, "
                             f"as parameters^{net:.2f}" if net is not None else "")
                          + f", peak memory as parameters^{m:.2f}" if t is not None else f"- `{step}`: one size measured")
    for key, r in results.items():
        if r.get("rc") not in (0, None) or r.get("skipped"):
            lines.append(f"| {key.split('/')[0]} | | {key.split('/')[1]} | {r.get('skipped') or 'exit ' + str(r['rc'])} | |")
    axes[0].set_ylabel("wall seconds (2 cores)")
    axes[1].set_ylabel("peak resident memory (bytes)")
    for ax in axes:
        ax.set_xlabel("parameters")
        ax.legend(fontsize=7)
    fig.suptitle("one-shot steps on random-weight models of real shapes (cost, not quality)")
    save_figure(fig, out / "scale.png")
    plt.close(fig)
    gflops = cpu_gflops(out)
    heal = ["", f"What each size needs (peak memory, wall time on this machine's {os.cpu_count()} cores, float32 "
                f"matmul at {gflops:.0f} GFLOP/s):", "", *needs_table(results, params),
            "", "Healing the 3/4-depth student (GB per GPU before activations; CPU memory in brackets):", "",
            *heal_table()]
    heal += ["", "The README's table:", "", *needs_table(results, params, ("truncate", "export", "score-student-bi",
                                                                          "prune", "eval"))]
    if trims := trim_table(results, params, out):
        heal += ["", "Peak memory before and after freed memory was given back between blocks:", "", *trims]
    write_text(out / "scale.md", "\n".join(lines + [""] + growth + heal) + "\n")
    print("\n".join(lines + [""] + growth + heal))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path.home() / "lmshrink-runs" / "scale"))
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--retry", action="store_true", help="run failed steps again")
    parser.add_argument("--report-only", action="store_true", help="write the report of what is measured, run nothing")
    args = parser.parse_args()
    models, steps = args.models.split(","), args.steps.split(",")
    unknown = [m for m in models if m not in SHAPES] + [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown model or step: {', '.join(unknown)} (models: {', '.join(SHAPES)}; steps: "
                     f"{', '.join(STEPS)})")
    out = Path(args.output).expanduser()
    file = out / "results.json"
    results = json.loads(file.read_text()) if file.is_file() else {}
    params = {}
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for name in [] if args.report_only else models:
        folder = out / "models" / name
        params[name] = write_model(name, folder)
        for step in steps:
            key = f"{name}/{step}"
            if key in results and (results[key].get("rc") == 0 or results[key].get("skipped") or not args.retry):
                continue
            if step in WHOLE and params[name] * WHOLE[step] > 0.6 * memory:
                results[key] = {"skipped": f"not run: {params[name] * WHOLE[step] / 2**30:.0f} GiB of weights held "
                                           "whole"}
            else:
                print(f"{key} ...", flush=True)
                argv = step_command(step, folder, out / "runs" / name, SHAPES[name][3])
                results[key] = measure(argv, out / "logs" / f"{name}-{step}.log")
            write_json(file, results)
    measured = {key.split("/")[0] for key in results}
    report(results, {name: params.get(name) or parameters_of(name) for name in SHAPES
                     if name in measured and name != STARTUP}, out)


if __name__ == "__main__":
    main()
