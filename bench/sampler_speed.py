"""How fast lmshrink samples the teacher on this machine, against transformers' `generate`, in fp32 and
bf16, and the matrix-multiply rate that bounds each (docs/generate.md quotes one run of this script).

    python bench/sampler_speed.py [--batch 128] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GenerationConfig

from lmshrink.data.teacher_text import continue_rows
from lmshrink.models import DTYPES, load


def seconds(work, repeat: int = 1) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        work()
    return (time.perf_counter() - started) / repeat


def measure(dtype: str, ids: torch.Tensor, new_tokens: int, reference: bool) -> dict[str, float]:
    """Seconds of lmshrink's sampler (and of transformers' `generate` if `reference`) on `ids`, and the rate of
    one of SmolLM2's projections (GFLOP/s), all in `dtype`."""
    teacher = load("smollm2-135m", dtype)
    model, tokenizer = teacher.model.eval(), teacher.tokenizer
    result = {"ours": seconds(lambda: continue_rows(model, tokenizer, ids, new_tokens))}
    if reference:
        config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, pad_token_id=0)
        result["theirs"] = seconds(lambda: model.generate(ids, attention_mask=torch.ones_like(ids),
                                                          generation_config=config))
    a, w = torch.randn(len(ids), 576, dtype=DTYPES[dtype]), torch.randn(576, 1536, dtype=DTYPES[dtype])
    result["gflops"] = 2 * len(ids) * 576 * 1536 / seconds(lambda: a @ w, 200) / 1e9
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    ids = torch.randint(100, 20000, (args.batch, 32), generator=torch.Generator().manual_seed(0))
    tokens = args.batch * args.new_tokens
    fp32 = measure("float32", ids, args.new_tokens, reference=True)
    bf16 = measure("bfloat16", ids, args.new_tokens, reference=False)
    for name, m in (("float32", fp32), ("bfloat16", bf16)):
        print(f"{name}: continue_rows {tokens / m['ours']:.0f} tokens/s, matmul {m['gflops']:.0f} GFLOP/s")
    print(f"batch {args.batch}, 32 + {args.new_tokens} tokens: generate() {tokens / fp32['theirs']:.0f} tokens/s in "
          f"fp32, continue_rows {fp32['theirs'] / fp32['ours']:.2f}x that; bf16 {fp32['ours'] / bf16['ours']:.2f}x fp32")


if __name__ == "__main__":
    main()
