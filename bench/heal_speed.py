"""Cost per training step of the three ways to heal a student, measured in one run.

On a GPU (or with --shapes), the paper's GPT-2 shapes (12 -> 6 blocks `alt`, block 1024, batch 16)
and SmolLM2-135M's (30 -> 15, block 2048, batch 8), random weights: a bare PyTorch loop eager and
under torch.compile, `lmshrink pretrain`, online `distill` and cached `distill`, as shipped; tokens/s,
model TFLOP/s, MFU against the measured bf16 matmul peak, peak memory and ratios. First, on this
machine (it needs lmshrink's offline assets), write the tokenizers, SmolLM2's config and the text
into a folder to carry; then run on the GPU machine:

    python bench/heal_speed.py --prepare .gpu-assets
    python bench/heal_speed.py --assets .gpu-assets --output runs/bench-heal-gpu

Without a GPU and without --shapes, the CPU bench below runs on the real SmolLM2-135M:

CLM-only (`lmshrink pretrain`), online KD (`lmshrink distill`, teacher in memory) and cached
KD (`lmshrink distill --teacher-cache`, teacher top-k read from disk) at the DistilGPT-2
temperature T = 2 and at T = 1 (where the KD term re-uses the CE loss's softmax), on the same
student, data, block size and batch. Each mode runs in its own process, so its peak memory is
its own.

    python bench/heal_speed.py --steps 10 --block-size 256 --batch-size 4 --output runs/bench-heal
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

RUNNER = (
    "import sys, json, torch; from lmshrink.cli import main; rc = main(sys.argv[1:]); "
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
    "gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None; "
    "print('BENCH ' + json.dumps({'rc': rc, 'peak_rss_mb': int(hwm) / 1024, 'peak_gpu_mb': gpu}))"
)


def lmshrink(*args: str) -> dict:
    """Run one lmshrink command in a fresh process; return its exit code and peak RSS."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH ")]
    if proc.returncode != 0 or not line or json.loads(line[0][6:])["rc"] != 0:
        raise SystemExit(f"lmshrink {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(line[0][6:]), "wall_s": time.perf_counter() - started}


def median_tokens_per_s(run: Path) -> float:
    """Median tokens/s over the logged steps; the first step (start-up) carries no tokens/s and is left out."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = sorted(x["tokens_per_s"] for x in lines if "tokens_per_s" in x)
    return speeds[len(speeds) // 2]


# ---------------------------------------------------------------- GPU: random weights at real shapes

SHAPES = {  # teacher config, student blocks (`alt`), block size, batch
    "gpt2": dict(layers=6, block=1024, batch=16),
    "smollm2": dict(layers=15, block=2048, batch=8),
    "tiny": dict(layers=1, block=64, batch=2),  # a dry run of the GPU path on a CPU
}


def prepare(folder: Path) -> None:
    """Tokenizers, SmolLM2-135M's config and ~1 MB of English text, from lmshrink's offline assets."""
    from transformers import AutoTokenizer

    from lmshrink.data.assets import corpus_path, gpt2_tokenizer_path
    from lmshrink.models import load

    folder.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(gpt2_tokenizer_path()).save_pretrained(folder / "gpt2")
    smol = load("smollm2-135m")
    smol.tokenizer.save_pretrained(folder / "smollm2")
    smol.model.config.save_pretrained(folder / "smollm2")
    (folder / "data").mkdir(exist_ok=True)
    for part in ("howto", "tutorial", "reference"):
        shutil.copytree(corpus_path("python-docs") / part, folder / "data" / part, dirs_exist_ok=True)


def teacher_config(shape: str, assets: Path):
    import transformers as T

    if shape == "gpt2":
        return T.GPT2Config(), assets / "gpt2"  # GPT-2 small: 12 blocks, 768 wide, 50257 tokens
    if shape == "smollm2":
        return T.AutoConfig.from_pretrained(assets / "smollm2"), assets / "smollm2"
    return T.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=256), assets / "gpt2"


def make_models(shape: str, assets: Path, out: Path) -> tuple[Path, Path]:
    """A random-weight teacher of the shape, saved with its tokenizer, and its `alt` student."""
    import transformers as T

    teacher, student = out / shape / "teacher", out / shape / "student"
    if not (student / "config.json").is_file():
        config, tokenizer = teacher_config(shape, assets)
        T.set_seed(0)
        T.AutoModelForCausalLM.from_config(config).save_pretrained(teacher)
        T.AutoTokenizer.from_pretrained(tokenizer).save_pretrained(teacher)
        lmshrink("truncate", "--teacher", str(teacher), "--strategy", "alt", "--num-layers",
                 str(SHAPES[shape]["layers"]), "--repair", "none", "--output", str(student), "--overwrite")
    return teacher, student


BARE = """
import json, sys, time, torch
from transformers import AutoModelForCausalLM
from lmshrink.heal.speed import flops_per_token, peak_flops
folder, block, batch, steps, compiled = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
profile_steps, profile_to = int(sys.argv[6]), sys.argv[7]
cuda = torch.cuda.is_available()
device = "cuda" if cuda else "cpu"
model = AutoModelForCausalLM.from_pretrained(folder).to(device).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
run = torch.compile(model) if compiled else model
ids = torch.randint(0, model.config.vocab_size, (batch, block), device=device)
def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
        loss = run(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
for _ in range(3):
    step()
if cuda:
    torch.cuda.synchronize()
started = time.perf_counter()
for _ in range(steps):
    step()
if cuda:
    torch.cuda.synchronize()
tps = steps * batch * block / (time.perf_counter() - started)
if profile_steps:  # after the timing: the same ops table lmshrink's --profile-steps writes
    from pathlib import Path
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(profile_steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    Path(profile_to).mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(profile_to + "/trace.json")
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    Path(profile_to, "ops.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
peak = peak_flops(device, torch.bfloat16 if cuda else torch.float32)
print("BENCH " + json.dumps({"tokens_per_s": tps, "mfu": tps * flops_per_token(model, block) / peak,
                             "peak_tflops": peak / 1e12,
                             "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}))
"""


def bare_loop(student: Path, shape: dict, steps: int, compiled: bool, profile_steps: int = 0) -> dict:
    """The bare loop in its own process; with `profile_steps`, a profile of that many more steps is
    written beside the student (bare-compiled/ or bare-eager/: trace.json, ops.txt)."""
    profile_to = student.parent / ("bare-compiled" if compiled else "bare-eager") / "profile"
    proc = subprocess.run([sys.executable, "-c", BARE, str(student), str(shape["block"]), str(shape["batch"]),
                           str(steps), "1" if compiled else "0", str(profile_steps), str(profile_to)],
                          capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(line[0][6:])


def lmshrink_run(folder: Path, *command: str) -> dict:
    """One lmshrink training run: its median tokens/s and MFU (lmshrink.json) and peak memory."""
    shutil.rmtree(folder, ignore_errors=True)
    measured = lmshrink(*command, "--output", str(folder))
    speed = json.loads((folder / "lmshrink.json").read_text())["metrics"]["speed"]
    return {"tokens_per_s": speed["tokens_per_s"], "mfu": speed["mfu"], "peak_tflops": speed["peak_tflops"],
            "peak_gpu_mb": measured["peak_gpu_mb"], "peak_rss_mb": measured["peak_rss_mb"],
            "fast_path": {k: speed[k] for k in ("compile", "fused_head", "optim", "precision")}}


def loss_bench(rows: int = 16384, width: int = 768, vocab: int = 50257, repeats: int = 10) -> dict[str, dict]:
    """The head + loss alone at GPT-2's shapes (bf16 autocast): full logits vs lmshrink's fused head,
    eager and compiled, vs Liger-Kernel's Triton fused linear cross-entropy where it is installed;
    forward + backward time, peak memory and the loss's difference from the full-logits one."""
    import torch

    from lmshrink.losses import causal_lm_loss, divergence, fused_head_loss, head_step, kd_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device).manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # (autocast is off on a CPU)
    hidden = torch.randn(rows // 1024, 1024, width, device=device, generator=g, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, width, device=device, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, hidden.shape[:2], device=device, generator=g)
    t_hidden = torch.randn_like(hidden).detach()
    t_weight = (torch.randn(vocab, width, device=device, generator=g) * 0.02).to(dtype)
    div = divergence("forward_kl")
    head_dtype = torch.bfloat16 if device == "cuda" else None  # as a bf16 run builds its fused head
    ce_eager, ce_compiled = head_step("ce", dtype=head_dtype), head_step("ce", compiled=True, dtype=head_dtype)
    kd_compiled = head_step("dense", div, 2.0, vocab, compiled=True, dtype=head_dtype)
    chunk = 8192

    def full_ce():
        return causal_lm_loss(hidden @ weight.t(), labels)

    def full_kd():
        logits = hidden @ weight.t()
        t_logits = (t_hidden @ t_weight.t())
        return 2.0 * causal_lm_loss(logits, labels) + 20.0 * kd_loss(div, logits, t_logits, torch.ones_like(labels), 2.0,
                                                                     chunk // hidden.shape[0])

    variants = {
        "CE: full logits": full_ce,
        "CE: lmshrink fused head, eager": lambda: fused_head_loss(ce_eager, hidden, weight, labels, chunk=chunk)[0],
        "CE: lmshrink fused head, compiled": lambda: fused_head_loss(ce_compiled, hidden, weight, labels, chunk=chunk)[0],
        "KD+CE: full logits, chunked KD": full_kd,
        "KD+CE: lmshrink fused head, compiled": lambda: fused_head_loss(
            kd_compiled, hidden, weight, labels, (t_hidden, None), t_weight, (2.0, 20.0), chunk)[0],
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], 1).flatten()
        variants["CE: Liger-Kernel fused linear CE (Triton)"] = lambda: liger(weight, hidden.flatten(0, 1), shifted)
    except Exception as err:  # noqa: BLE001 - any import failure means: not measured here
        print(f"[loss bench] Liger-Kernel not measured: {type(err).__name__}: {err}", flush=True)
    results, reference = {}, {}
    for name, fn in variants.items():
        try:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                for _ in range(3):
                    loss = fn()
                    loss.backward()
                hidden.grad = weight.grad = None
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if device == "cuda" else 0
                started = time.perf_counter()
                for _ in range(repeats):
                    loss = fn()
                    loss.backward()
                    hidden.grad = weight.grad = None
                if device == "cuda":
                    torch.cuda.synchronize()
            kind = name.split(":")[0]
            reference.setdefault(kind, float(loss))
            results[name] = {"ms": (time.perf_counter() - started) / repeats * 1000,
                             "extra_gpu_mb": (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else None,
                             "loss": float(loss), "loss_vs_full": float(loss) / reference[kind] - 1}
        except Exception as err:  # noqa: BLE001 - a variant that fails is reported, the others still run
            results[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        print(f"[loss bench] {name}: {results[name]}", flush=True)
    return results


def print_loss_table(results: dict) -> None:
    print("\nhead + loss alone, 16 x 1024 rows, 768 wide, 50257 tokens, bf16 (forward + backward)\n")
    print("| variant | ms | extra GPU memory | loss vs full logits |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | {r['error'][:80]} | | |")
        else:
            memory = f"{r['extra_gpu_mb'] / 1024:.2f} GB" if r["extra_gpu_mb"] is not None else "n/a"
            print(f"| {name} | {r['ms']:.1f} | {memory} | {r['loss_vs_full']:+.1e} |")


# Runs in this order, so that a time budget cuts the least needed ones: first the paper's GPT-2
# shapes' comparisons, then SmolLM2's, then the rest.
ORDER = [("gpt2", "bare loop, torch.compile"), ("gpt2", "lmshrink pretrain"), ("gpt2", "lmshrink distill (online)"),
         ("gpt2", "lmshrink distill (cached top-32)"), ("gpt2", "bare loop, eager"),
         ("smollm2", "bare loop, torch.compile"), ("smollm2", "lmshrink pretrain"), ("smollm2", "lmshrink distill (online)"),
         ("gpt2", "lmshrink pretrain, fast path off"), ("smollm2", "lmshrink distill (cached top-32)"),
         ("smollm2", "bare loop, eager"), ("smollm2", "lmshrink pretrain, fast path off")]
ORDER += [("tiny", mode) for _, mode in ORDER[:5]] + [("tiny", ORDER[8][1])]


def modes_for(shape_name: str, args: argparse.Namespace) -> dict:
    out, assets, shape = Path(args.output), Path(args.assets), SHAPES[shape_name]
    teacher, student = make_models(shape_name, assets, out)
    from safetensors import safe_open

    with safe_open(teacher / "model.safetensors", "pt") as f:
        TEACHER_PARAMS[shape_name] = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    data = ["--data", str(assets / "data"), "--heldout", "0"]
    run = ["--block-size", str(shape["block"]), "--batch-size", str(shape["batch"]), "--max-steps", str(args.steps),
           "--logging-steps", str(args.log_every), "--save-steps", "100000", "--report-to", "none", "--seed", "0",
           *args.extra.split(), *(["--profile-steps", str(args.profile_steps)] if args.profile_steps else [])]
    cache = out / shape_name / "cache"

    def cached():
        if not (cache / "cache.json").is_file():
            lmshrink("cache-teacher", "--teacher", str(teacher), *data, "--output", str(cache), "--block-size",
                     str(shape["block"]), "--max-tokens", str(args.steps * shape["block"] * shape["batch"]),
                     "--top-k", "32", "--temperature", "2")
        return lmshrink_run(out / shape_name / "distill-cached", "distill", "--model", str(student), "--teacher-cache",
                            str(cache), "--alpha-cos", "0", *run)

    return {
        "bare loop, eager": lambda: bare_loop(student, shape, args.bare_steps, False, args.profile_steps),
        "bare loop, torch.compile": lambda: bare_loop(student, shape, args.bare_steps, True, args.profile_steps),
        "lmshrink pretrain": lambda: lmshrink_run(out / shape_name / "pretrain", "pretrain", "--model", str(student),
                                                  *data, *run),
        "lmshrink distill (online)": lambda: lmshrink_run(
            out / shape_name / "distill", "distill", "--model", str(student), "--teacher", str(teacher), *data, *run),
        "lmshrink distill (cached top-32)": cached,
        "lmshrink pretrain, fast path off": lambda: lmshrink_run(
            out / shape_name / "pretrain-slow", "pretrain", "--model", str(student), *data, *run, "--compile", "off",
            "--fused-head", "off", "--optim", "adamw_torch"),
    }


def gpu_bench(args: argparse.Namespace) -> None:
    import torch

    out, started = Path(args.output), time.perf_counter()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    shapes = args.shapes.split(",")
    results: dict[str, dict[str, dict]] = {shape: {} for shape in shapes}
    out.mkdir(parents=True, exist_ok=True)
    losses = loss_bench(rows=args.loss_rows) if args.loss_rows else {}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    modes: dict[str, dict] = {}
    for shape_name, name in ORDER:
        if shape_name not in shapes or (args.only and not any(x in name for x in args.only.split(","))):
            continue
        if time.perf_counter() - started > args.budget_s:
            results[shape_name][name] = {"error": "skipped: out of time budget"}
            continue
        t0 = time.perf_counter()
        try:
            if shape_name not in modes:
                modes[shape_name] = modes_for(shape_name, args)
            results[shape_name][name] = {**modes[shape_name][name](), "wall_s": round(time.perf_counter() - t0, 1)}
        except (Exception, SystemExit) as err:  # noqa: BLE001 - a failed run is reported, the others still run
            results[shape_name][name] = {"error": str(err)[-600:] or type(err).__name__}
        print(f"[{shape_name}] {name}: {json.dumps(results[shape_name][name])[:400]}", flush=True)
        (out / "bench-gpu.json").write_text(json.dumps({"device": device, "settings": vars(args), "losses": losses,
                                                        "results": results}, indent=2))
    if losses:
        print_loss_table(losses)
    print_gpu_table(results, device)


TEACHER_PARAMS: dict[str, int] = {}


def _numel(shape: list[int]) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def teacher_bytes(shape: str) -> int:
    """The teacher's weights in bf16 (2 bytes a parameter)."""
    return 2 * TEACHER_PARAMS.get(shape, 0)


def print_gpu_table(results: dict, device: str) -> None:
    print(f"\n{device}: tokens/s, MFU (model FLOP/s / measured bf16 matmul peak), peak GPU memory, "
          "ratio to the compiled bare loop")
    for shape_name, modes in results.items():
        shape = SHAPES[shape_name]
        print(f"\n{shape_name} ({shape['layers']}-block student, block {shape['block']}, batch {shape['batch']})\n")
        print("| path | tokens/s | MFU | peak GPU memory | tokens/s vs compiled bare loop |")
        print("|---|---:|---:|---:|---:|")
        base = modes.get("bare loop, torch.compile", {}).get("tokens_per_s")
        for name, r in modes.items():
            if "error" in r:
                print(f"| {name} | {r['error'].splitlines()[-1][:80] if r['error'] else 'failed'} | | | |")
                continue
            memory = f"{r['peak_gpu_mb'] / 1024:.1f} GB" if r.get("peak_gpu_mb") else "n/a"
            ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "n/a"
            print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['mfu']:.0%} | {memory} | {ratio} |")
        pre, online, cached = (modes.get(k, {}) for k in ("lmshrink pretrain", "lmshrink distill (online)",
                                                            "lmshrink distill (cached top-32)"))
        if "tokens_per_s" in pre and "tokens_per_s" in online:
            memory = [online.get("peak_gpu_mb") or online["peak_rss_mb"], pre.get("peak_gpu_mb") or pre["peak_rss_mb"]]
            teacher_mb = teacher_bytes(shape_name) / 2**20
            print(f"\nonline distill / pretrain tokens/s: {online['tokens_per_s'] / pre['tokens_per_s']:.2f}x "
                  f"(target >= 0.6x); peak memory {memory[0] / (memory[1] + teacher_mb):.2f}x pretrain's + the "
                  f"teacher's bf16 weights ({teacher_mb / 1024:.2f} GB; target <= 1.2x)")
        if "tokens_per_s" in pre and "tokens_per_s" in cached:
            print(f"cached distill step time / pretrain's: {pre['tokens_per_s'] / cached['tokens_per_s']:.2f}x (target <= 1.1x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--student-layers", type=int, default=24)
    parser.add_argument("--data", default="python-docs/library")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--output", default="runs/bench-heal")
    parser.add_argument("--prepare", help="write the GPU bench's tokenizers, config and text into this folder, and stop")
    parser.add_argument("--assets", default=".gpu-assets", help="folder written by --prepare (GPU bench)")
    parser.add_argument("--shapes", help="GPU bench shapes, e.g. gpt2,smollm2 (default on a GPU: both); tiny: a CPU dry run")
    parser.add_argument("--log-every", type=int, default=5, help="GPU bench: steps per logged tokens/s interval")
    parser.add_argument("--bare-steps", type=int, default=20, help="GPU bench: timed steps of the bare loops")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="GPU bench: skip runs after this many seconds")
    parser.add_argument("--only", help="GPU bench: comma-separated parts of the mode names to run")
    parser.add_argument("--loss-rows", type=int, default=16384, help="GPU bench: rows of the head + loss bench (0: skip)")
    parser.add_argument("--extra", default="", help="GPU bench: extra flags for every lmshrink run, one string")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="GPU bench: profile this many steps of every path (lmshrink's after 3 warm-up steps, the "
                             "bare loops' after their timing) into RUN/profile/ops.txt and trace.json")
    args = parser.parse_args()
    if args.prepare:
        return prepare(Path(args.prepare))
    import torch

    if args.shapes or torch.cuda.is_available():
        args.shapes = args.shapes or "gpt2,smollm2"
        if args.steps == 10:
            args.steps = 40
        return gpu_bench(args)
    out = Path(args.output)
    student = out / "student"
    if not (student / "config.json").is_file():
        lmshrink("truncate", "--teacher", args.teacher, "--strategy", "importance", "--num-layers",
                 str(args.student_layers), "--calib-data", args.data, "--output", str(student), "--overwrite")
    shape = ["--block-size", str(args.block_size), "--batch-size", str(args.batch_size), "--max-steps",
             str(args.steps), "--logging-steps", "1", "--report-to", "none", "--heldout", "0", "--seed", "0"]
    tokens = args.steps * args.block_size * args.batch_size
    caches, cache_runs = {}, {}
    for temperature in ("2", "1"):
        caches[temperature] = out / f"cache-t{temperature}"
        cache_runs[temperature] = lmshrink(
            "cache-teacher", "--teacher", args.teacher, "--data", args.data, "--output", str(caches[temperature]),
            "--block-size", str(args.block_size), "--max-tokens", str(tokens), "--top-k", str(args.top_k),
            "--heldout", "0", "--temperature", temperature)
    runs = {
        "clm": ["pretrain", "--model", str(student), "--data", args.data],
        "online_kd": ["distill", "--model", str(student), "--teacher", args.teacher, "--data", args.data],
        "cached_kd": ["distill", "--model", str(student), "--teacher-cache", str(caches["2"]), "--alpha-cos", "0"],
        "cached_kd_t1": ["distill", "--model", str(student), "--teacher-cache", str(caches["1"]), "--alpha-cos", "0",
                         "--temperature", "1"],
        # the optimizer alone: a foreach AdamW instead of the default fused one
        "clm_foreach_adamw": ["pretrain", "--model", str(student), "--data", args.data, "--optim", "adamw_torch"],
    }
    results = {}
    for name, command in runs.items():
        folder = out / name
        subprocess.run(["rm", "-rf", str(folder)], check=True)
        measured = lmshrink(*command, "--output", str(folder), *shape)
        tps = median_tokens_per_s(folder)
        results[name] = {"tokens_per_s": tps, "step_s": args.block_size * args.batch_size / tps,
                         "peak_rss_mb": measured["peak_rss_mb"]}
        print(f"{name:>17}: {tps:8.1f} tokens/s, {results[name]['step_s']:.2f} s/step, "
              f"peak RSS {measured['peak_rss_mb']:.0f} MB", flush=True)
    base = results["clm"]
    for r in results.values():
        r["step_time_vs_clm"] = r["step_s"] / base["step_s"]
        r["memory_vs_clm"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    cache_meta = json.loads((caches["2"] / "cache.json").read_text())
    report = {"settings": vars(args), "results": results, "cache_seconds": cache_runs["2"]["wall_s"],
              "cache_bytes_per_token": cache_meta["bytes_per_token"]}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    print("\n| mode | tokens/s | s/step | step time vs CLM | peak RSS MB | memory vs CLM |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | {r['step_time_vs_clm']:.2f}x | "
              f"{r['peak_rss_mb']:.0f} | {r['memory_vs_clm']:.2f}x |")
    print(f"\nteacher cache: {cache_meta['bytes_per_token']:.0f} bytes/token, built in {cache_runs['2']['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
