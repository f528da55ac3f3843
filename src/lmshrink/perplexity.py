"""Perplexity of a token stream: the standard transformers sliding-window recipe.

Windows of `window` tokens start every `stride` tokens, and each token is scored once, in the
first window that reaches it, with the context that window gives it. stride == window is plain
chunked NLL (the first token of each chunk has no context and is not scored).

`model` is a transformers model, or any function from (B, T) token ids to (B, T, V) logits
(llama.cpp's, in `lmshrink.llamacpp`), so every runtime is scored by the same windows.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch

from lmshrink.losses import next_token_nll


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a stream of n_tokens."""
    spans, scored_until, begin = [], 1, 0  # position 0 is never scored: it has no context
    while scored_until < n_tokens:
        end = min(begin + window, n_tokens)
        spans.append((begin, end, max(scored_until, begin + 1)))
        scored_until = end
        begin += stride
    return spans


def logits_of(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, T) ids -> (B, T, V) logits: a transformers model's forward pass, or `model` itself if it
    is already such a function."""
    if not isinstance(model, torch.nn.Module):
        return model
    device = next(model.parameters()).device
    return lambda ids: model(input_ids=ids.to(device), use_cache=False).logits


@torch.inference_mode()
def sliding_nll(model, tokens: torch.Tensor, window: int, stride: int, batch_size: int = 4,
                progress: str | None = None) -> tuple[float, int]:
    """Summed NLL (nats) and number of scored tokens of a 1-D token stream."""
    forward = logits_of(model)
    spans = windows(tokens.numel(), window, stride)
    total, count = 0.0, 0
    # Group windows of equal length so they batch; only the last one can be shorter.
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    done = 0
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            ids = torch.stack([tokens[b:e] for b, e, _ in chunk])  # (B, T)
            logits = forward(ids)
            nll = next_token_nll(logits, ids.to(logits.device))  # (B, T-1)
            for row, (b, _, first) in enumerate(chunk):
                scored = nll[row, first - b - 1 :]  # targets at positions first..end-1
                total += scored.sum().item()
                count += scored.numel()
            done += len(chunk)
            if progress:
                print(f"\r  {progress}: {done}/{len(spans)} windows, ppl {math.exp(total / count):.2f}",
                      end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return total, count


def perplexity(model, tokens: torch.Tensor, window: int, stride: int, batch_size: int = 4,
               progress: str | None = None) -> float:
    total, count = sliding_nll(model, tokens, window, stride, batch_size, progress)
    return math.exp(total / count)
