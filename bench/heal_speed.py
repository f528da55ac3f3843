"""Cost per training step of the three ways to heal a student, measured in one run.

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
import subprocess
import sys
import time
from pathlib import Path

RUNNER = (
    "import sys, json; from lmshrink.cli import main; rc = main(sys.argv[1:]); "
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
    "print('BENCH ' + json.dumps({'rc': rc, 'peak_rss_mb': int(hwm) / 1024}))"
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
    args = parser.parse_args()
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
    }
    results = {}
    for name, command in runs.items():
        folder = out / name
        subprocess.run(["rm", "-rf", str(folder)], check=True)
        measured = lmshrink(*command, "--output", str(folder), *shape)
        tps = median_tokens_per_s(folder)
        results[name] = {"tokens_per_s": tps, "step_s": args.block_size * args.batch_size / tps,
                         "peak_rss_mb": measured["peak_rss_mb"]}
        print(f"{name:>10}: {tps:8.1f} tokens/s, {results[name]['step_s']:.2f} s/step, "
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
