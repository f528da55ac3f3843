"""Depth, width or both at the same size: SmolLM2-135M cut to ~100M parameters three ways, each
healed with the same distillation budget, then compared on held-out perplexity (two sources),
the zero-shot suite, parameters and latency.

`lmshrink search` builds and heals the three candidates (activation importance for the width,
Block Influence for the depth, logit-only KD at T = 1 from the teacher, the same tokens, batch
and learning rate for all); `lmshrink eval` then puts them beside the teacher. Resumable: a
re-run reuses the finished candidates.

    python bench/width_vs_depth.py --target 100e6 --tokens 65536 --limit 100 --output runs/width-vs-depth
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmshrink.cli import main as lmshrink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="100e6", help="parameters of every candidate")
    parser.add_argument("--tokens", type=int, default=65536, help="healing tokens per candidate")
    parser.add_argument("--limit", type=int, default=100, help="items of each zero-shot task")
    parser.add_argument("--tasks", default="core")
    parser.add_argument("--output", default="runs/width-vs-depth")
    args = parser.parse_args()
    out = Path(args.output)
    assert lmshrink(["search", "--target-params", args.target, "--output", str(out), "--max-tokens", str(args.tokens),
                     "--eval-tokens", "8192", "--calib-tokens", "4096"]) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    models = ["smollm2-135m", *(r["healed"] for r in rows)]
    assert lmshrink(["eval", "--models", ",".join(models), "--data", "python-docs/tutorial,kernel-docs/process",
                     "--max-tokens", "16384", "--tasks", args.tasks, "--limit", str(args.limit),
                     "--output", str(out / "eval")]) == 0
    print((out / "report.md").read_text())
    print((out / "eval" / "report.md").read_text())


if __name__ == "__main__":
    main()
