"""Text the teacher writes: unconditional samples from its own distribution.

Sampling at temperature 1 with no top-k or top-p cut draws from the model's distribution itself,
so the text covers what the teacher knows rather than the domain of whatever corpus is at hand.
Batched through transformers' `generate` with the KV cache; end-of-text does not stop a row (the
teacher simply goes on to a new document, as in packed pre-training rows).
"""

from __future__ import annotations

import time

import torch
from transformers import GenerationConfig

TEACHER_TEXT = "teacher"
"""The calibration source name that means: text sampled from the teacher."""


def start_token(tokenizer) -> int:
    """The token a sample starts from: BOS if the tokenizer has one, else EOS (GPT-2)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start samples from")
    return token


@torch.inference_mode()
def sample_rows(model, tokenizer, rows: int, length: int, temperature: float = 1.0, seed: int = 0,
                batch_size: int = 16) -> torch.Tensor:
    """(rows, length) token ids sampled from the model, each row starting at `start_token`."""
    torch.manual_seed(seed)
    out, started = [], time.perf_counter()
    for start in range(0, rows, batch_size):
        n = min(batch_size, rows - start)
        out.append(continue_rows(model, tokenizer, torch.full((n, 1), start_token(tokenizer)), length - 1, temperature))
    sampled = torch.cat(out)[:, :length]
    seconds = time.perf_counter() - started
    print(f"  sampled {sampled.numel():,} tokens from the teacher at T {temperature:g} "
          f"({sampled.numel() / seconds:,.0f} tokens/s)", flush=True)
    return sampled


@torch.inference_mode()
def continue_rows(model, tokenizer, prompts: torch.Tensor, new_tokens: int, temperature: float = 1.0,
                  stop_at_eos: bool = False) -> torch.Tensor:
    """`prompts` (rows, p) with `new_tokens` sampled after each, in one batched `generate` call with
    the KV cache: (rows, p + new_tokens) on the CPU. With `stop_at_eos` a row ends at its first EOS
    and is padded with the pad (else EOS) token after it; else every row runs to its length."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              max_new_tokens=new_tokens, min_new_tokens=0 if stop_at_eos else new_tokens,
                              eos_token_id=tokenizer.eos_token_id if stop_at_eos else None, pad_token_id=pad)
    ids = prompts.to(device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config).cpu()
    return torch.nn.functional.pad(out, (0, prompts.shape[1] + new_tokens - out.shape[1]), value=pad)
