"""Do `pretrain` and `distill` run, and resume, under each multi-device engine?

For each engine (DDP, FSDP2 with configs/fsdp.json, DeepSpeed ZeRO-2 with configs/deepspeed-zero2.json)
and each command: a run of --steps steps with a checkpoint halfway; then the run is made to look
stopped after that checkpoint (the later checkpoint, model/ and lmshrink.json removed, as a kill
would leave it) and the same command is run again, which carries on from the checkpoint. The
losses the carried-on run logs after the checkpoint are compared with the uninterrupted run's.
Small random-weight GPT-2 models (a 4-block teacher, its 2-block `alt` student), compile off.

    python bench/engines_resume.py --assets .gpu-assets --output runs/engines   # on a GPU machine
    python bench/engines_resume.py --assets .gpu-assets --engines ddp           # a dry run on CPUs

FSDP and DeepSpeed need a GPU (accelerate runs FSDP on accelerators only; DeepSpeed needs CUDA);
each run is launched with torchrun, one process per GPU (--procs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = {
    "ddp": [],
    "fsdp2": ["--fsdp", str(ROOT / "configs" / "fsdp.json")],
    "zero2": ["--deepspeed", str(ROOT / "configs" / "deepspeed-zero2.json")],
}


def make_models(assets: Path, out: Path) -> tuple[Path, Path]:
    """A 4-block random GPT-2 teacher (256 wide) with GPT-2's tokenizer, and its 2-block student."""
    import transformers as T

    teacher, student = out / "teacher", out / "student"
    if not (student / "config.json").is_file():
        T.set_seed(0)
        config = T.GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=512)
        T.AutoModelForCausalLM.from_config(config).save_pretrained(teacher)
        T.AutoTokenizer.from_pretrained(assets / "gpt2").save_pretrained(teacher)
        run([sys.executable, "-m", "lmshrink", "truncate", "--teacher", str(teacher), "--strategy", "alt",
             "--num-layers", "2", "--repair", "none", "--output", str(student), "--overwrite"])
    return teacher, student


def run(command: list[str]) -> str:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:  # the process's own error, not the launcher's traceback after it
        lines = [x for x in proc.stderr.splitlines() if "it/s]" not in x]
        end = next((i for i, x in enumerate(lines) if "torch/distributed/run.py" in x), len(lines))
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(command[-12:])}\n" + "\n".join(lines[max(0, end - 40):end]))
    return proc.stdout + proc.stderr


def losses(folder: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "train_loss" not in r}


def lmshrink_args(engine: str, command: str, models: tuple[Path, Path], data: Path, folder: Path, steps: int) -> list[str]:
    """The lmshrink command line of one run: `steps` steps, a checkpoint halfway, a loss every step."""
    teacher, student = models
    argv = [command, "--model", str(student), "--data", str(data), "--heldout", "0", "--block-size", "256",
            "--batch-size", "4", "--max-steps", str(steps), "--save-steps", str(steps // 2), "--logging-steps", "1",
            "--keep-checkpoints", "--compile", "off", "--report-to", "none", "--seed", "0", "--output", str(folder),
            *ENGINES[engine]]
    return argv + (["--teacher", str(teacher)] if command == "distill" else [])


def check(engine: str, command: str, models: tuple[Path, Path], args: argparse.Namespace, port: int) -> dict:
    folder = Path(args.output) / f"{engine}-{command}"
    shutil.rmtree(folder, ignore_errors=True)
    half = args.steps // 2
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.procs),
              "--master_port", str(port), "-m", "lmshrink",
              *lmshrink_args(engine, command, models, Path(args.assets) / "data", folder, args.steps)]
    started = time.perf_counter()
    first_log = run(launch)
    whole = losses(folder)
    first_s = time.perf_counter() - started
    # as a kill after the halfway checkpoint leaves it
    shutil.copy(folder / "metrics.jsonl", folder / "metrics-whole.jsonl")
    for path in [folder / "model", folder / "lmshrink.json", *(folder / "checkpoints").glob("checkpoint-*")]:
        if path.name.startswith("checkpoint-") and int(path.name.split("-")[1]) <= half:
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    started = time.perf_counter()
    log = run(launch)
    resumed_from = next((line for line in log.splitlines() if "resuming from" in line), "")
    carried = losses(folder)
    after = [s for s in whole if s > half]
    gaps = [abs(carried[s] - whole[s]) for s in after if s in carried]
    engine_line = next((line for line in first_log.splitlines() if "fused head" in line), "")
    return {"engine": engine, "command": command, "steps": args.steps, "checkpoint": half,
            "resumed": f"checkpoint-{half}" in resumed_from, "steps_after": len(gaps),
            "max_loss_gap": max(gaps) if gaps and len(gaps) == len(after) else None,
            "final_loss": carried.get(args.steps), "first_s": round(first_s, 1),
            "resume_s": round(time.perf_counter() - started, 1), "model_saved": (folder / "model").is_dir(),
            "path": engine_line.split("] ", 1)[-1][:160]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=".gpu-assets", help="bench/heal_speed.py --prepare's folder")
    parser.add_argument("--output", default="runs/engines")
    parser.add_argument("--engines", default="ddp,fsdp2,zero2")
    parser.add_argument("--commands", default="pretrain,distill")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--procs", type=int, default=1, help="processes (GPUs) per run")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    models = make_models(Path(args.assets), out)
    results = []
    for i, (engine, command) in enumerate((e, c) for e in args.engines.split(",") for c in args.commands.split(",")):
        try:
            result = check(engine, command, models, args, 29500 + i)
        except Exception as err:  # noqa: BLE001 - a failed engine is reported, the others still run
            result = {"engine": engine, "command": command, "error": str(err)[-1500:]}
        results.append(result)
        print(json.dumps(result), flush=True)
        (out / "engines.json").write_text(json.dumps(results, indent=2))
    print("\n| engine | command | resumed from | steps compared | max loss gap | first run s | resumed run s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['engine']} | {r['command']} | failed: {r['error'].splitlines()[-1][:100]} | | | | |")
        else:
            gap = "n/a" if r["max_loss_gap"] is None else f"{r['max_loss_gap']:.2e}"
            print(f"| {r['engine']} | {r['command']} | {'checkpoint-' + str(r['checkpoint']) if r['resumed'] else 'NOT'} "
                  f"| {r['steps_after']} | {gap} | {r['first_s']} | {r['resume_s']} |")


if __name__ == "__main__":
    main()
