"""The paper's cleaning ablation: the same truncated student pre-trained on raw and on cleaned
text at an equal token budget, compared by held-out perplexity on text neither run saw.

Raw text is the corpus as read (only what cannot be text at all, e.g. PNG files, is set
aside: `lmshrink clean` with every step off); cleaned text is `lmshrink clean` with its
defaults. The student is SmolLM2-135M cut to 24 blocks by Block Influence. Both runs start
from the same weights with the same seed, block size, batch, learning rate and token budget.

    python bench/clean_impact.py --data web-docs --tokens 49152 --output runs/bench-clean-impact
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from lmshrink.cli import main as lmshrink
from lmshrink.config import build
from lmshrink.recipes.clean import CleanSettings
from lmshrink.recipes.clean import run as clean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["web-docs"])
    parser.add_argument("--heldout", default="kernel-docs/process")
    parser.add_argument("--tokens", type=int, default=49152, help="training tokens per run")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--output", default="runs/bench-clean-impact")
    args = parser.parse_args()
    out = Path(args.output)
    if out.exists():
        shutil.rmtree(out)

    corpora = {}
    for name, options in (("raw", CleanSettings.PASS_THROUGH), ("cleaned", {})):
        summary = clean(build(CleanSettings, {"data": args.data, "output": str(out / f"corpus-{name}"),
                                              "workers": args.workers, **options}))
        corpora[name] = {"documents": summary["kept"]["documents"], "mb": summary["kept"]["bytes"] / 1e6}

    student = out / "student"
    assert lmshrink(["truncate", "--teacher", "smollm2-135m", "--strategy", "importance", "--metric", "block_influence",
                     "--num-layers", "24", "--calib-data", "python-docs/tutorial", "--output", str(student)]) == 0
    results = {}
    for name in corpora:
        run = out / f"pretrain-{name}"
        assert lmshrink(["pretrain", "--model", str(student), "--data", str(out / f"corpus-{name}" / "kept"),
                         "--eval-data", args.heldout, "--eval-tokens", str(args.eval_tokens), "--heldout", "0",
                         "--max-tokens", str(args.tokens), "--block-size", "256", "--batch-size", "4",
                         "--lr", "2e-4", "--warmup", "0.1", "--save-steps", "1000000", "--seed", "0",
                         "--output", str(run)]) == 0
        results[name] = json.loads((run / "lmshrink.json").read_text())["metrics"]

    before = results["raw"]["heldout_ppl_before"]
    lines = [f"Student: SmolLM2-135M cut to 24 blocks (Block Influence); {args.tokens:,} training tokens per run; "
             f"held-out `{args.heldout}` ({args.eval_tokens:,} tokens), perplexity before training {before:,.2f}.", "",
             "| training text | documents | MB | train s | held-out ppl after | change |", "|---|---:|---:|---:|---:|---:|"]
    for name, m in results.items():
        lines.append(f"| {name} | {corpora[name]['documents']:,} | {corpora[name]['mb']:,.1f} | {m['train_seconds']:.0f} | "
                     f"{m['heldout_ppl_after']:,.2f} | {m['heldout_ppl_after'] / before - 1:+.1%} |")
    ratio = results["raw"]["heldout_ppl_after"] / results["cleaned"]["heldout_ppl_after"]
    lines += ["", f"Raw / cleaned held-out perplexity after training: {ratio:.3f}x."]
    (out / "impact.json").write_text(json.dumps({"corpora": corpora, "results": results, "ratio": ratio}, indent=2))
    (out / "impact.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
