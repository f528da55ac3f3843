"""Host time to fetch and collate one training batch, as `lmshrink pretrain` feeds the Trainer:
packed blocks of the offline healing text, rows handed out as Python lists (datasets' default)
against rows formatted as torch tensors (what training uses). Both in one run, same batches.

    python bench/collate_speed.py --block-size 1024 --batch-size 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers as T

from lmshrink.data.assets import gpt2_tokenizer_path
from lmshrink.data.sources import pack, text_dataset
from lmshrink.heal.corpus import collate


def ms_per_batch(dataset, batch_size: int, batches: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0), shuffle=True)
    it = iter(loader)
    next(it)  # warm-up
    times = []
    for _ in range(batches):
        started = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="python-docs/library")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    blocks = pack(text_dataset([args.data]), T.AutoTokenizer.from_pretrained(gpt2_tokenizer_path()), args.block_size)
    lists = ms_per_batch(blocks, args.batch_size, args.batches)
    tensors = ms_per_batch(blocks.with_format("torch"), args.batch_size, args.batches)
    print(f"| rows as | ms per {args.batch_size} x {args.block_size} batch (median of {args.batches}) |\n|---|---:|\n"
          f"| Python lists | {lists:.2f} |\n| torch tensors | {tensors:.2f} |\n\ntensors / lists: {tensors / lists:.2f}x")


if __name__ == "__main__":
    main()
