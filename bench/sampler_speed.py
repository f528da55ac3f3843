"""How fast lmshrink samples the teacher on this machine, against transformers' `generate`, and the
fp32 matrix-multiply rate that bounds both (docs/generate.md quotes one run of this script).

    python bench/sampler_speed.py [--batch 128] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import GenerationConfig

from lmshrink.models import load
from lmshrink.sampling import continue_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    teacher = load("smollm2-135m", "float32")
    model, tokenizer = teacher.model.eval(), teacher.tokenizer
    ids = torch.randint(100, 20000, (args.batch, 32), generator=torch.Generator().manual_seed(0))
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, pad_token_id=0)
    started = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    theirs = time.perf_counter() - started
    started = time.perf_counter()
    continue_rows(model, tokenizer, ids, args.new_tokens)
    ours = time.perf_counter() - started
    tokens = args.batch * args.new_tokens
    a, w = torch.randn(args.batch, 576), torch.randn(576, 1536)  # one of SmolLM2's projections
    started = time.perf_counter()
    for _ in range(200):
        a @ w
    rate = 2 * args.batch * 576 * 1536 * 200 / (time.perf_counter() - started) / 1e9
    print(f"batch {args.batch}, 32 + {args.new_tokens} tokens: generate() {tokens / theirs:.0f} tokens/s, "
          f"continue_rows {tokens / ours:.0f} tokens/s ({theirs / ours:.2f}x); fp32 matmul {rate:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
