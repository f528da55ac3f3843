"""Perplexity of a token stream: the standard transformers sliding-window recipe.

Windows of `window` tokens start every `stride` tokens, and each token is scored once, in the
first window that reaches it, with the context that window gives it. stride == window is plain
chunked NLL (the first token of each chunk has no context and is not scored).

Each window is given to the model as the model saw sequences in training: after the tokenizer's
start tokens (`framing`, `lmshrink.data.sources.Framing`: Gemma's and Llama 3's `<bos>`; nothing for GPT-2
and SmolLM2), which are context only and not scored, and are not doubled where a window already
begins with them. llama.cpp's perplexity tool puts `<bos>` before every chunk too; without it
Gemma-3-270M scores 3x worse on the same text.

`model` is a transformers model (its NLL computed a chunk of positions at a time over the
vocabulary, `lmshrink.next_token`), or any function from (B, T) token ids to (B, T, V) logits
(llama.cpp's, in `lmshrink.export.llamacpp`), so every runtime is scored by the same windows.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from lmshrink import next_token
from lmshrink.data.sources import Framing


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a stream of n_tokens."""
    spans, scored_until, begin = [], 1, 0  # position 0 is never scored: it has no context
    while scored_until < n_tokens:
        end = min(begin + window, n_tokens)
        spans.append((begin, end, max(scored_until, begin + 1)))
        scored_until = end
        begin += stride
    return spans


@dataclass(frozen=True)
class Window:
    """One window as the model is given it: its input ids (after the start tokens `added` in front),
    where it begins in the stream and the first stream position it scores."""

    ids: torch.Tensor
    added: int
    begin: int
    first: int

    def scored(self, nll: torch.Tensor) -> torch.Tensor:
        """This window's scored targets (stream positions first..end-1) from its row of next-token NLL
        (what follows the window's own positions, padding, is not read)."""
        return nll[self.added + self.first - self.begin - 1 : self.ids.numel() - 1]


def framed_windows(tokens: torch.Tensor, window: int, stride: int, framing: Framing) -> list[Window]:
    """Every window over a 1-D token stream, each after the `framing`'s start tokens."""
    framed = []
    for begin, end, first in windows(tokens.numel(), window, stride):
        ids = framing.window(tokens[begin:end])
        framed.append(Window(ids, ids.numel() - (end - begin), begin, first))
    return framed


@torch.inference_mode()
def sliding_nll(model, tokens: torch.Tensor, window: int, stride: int, batch_size: int = 4,
                progress: str | None = None, *, framing: Framing) -> tuple[float, int]:
    """Summed NLL (nats) and number of scored tokens of a 1-D token stream, each window after the
    `framing`'s start tokens (`Framing.of(tokenizer)`; required: a tokenizer that adds `<bos>` gives a
    model scored without it a perplexity several times too high)."""
    spans = framed_windows(tokens, window, stride, framing)
    total, count = 0.0, 0
    groups: dict[int, list[Window]] = {}  # windows of equal input length batch together
    for span in spans:
        groups.setdefault(span.ids.numel(), []).append(span)
    done = 0
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            nll = next_token.nll(model, torch.stack([span.ids for span in chunk]))  # (B, T-1)
            for row, span in zip(nll, chunk, strict=True):
                total += span.scored(row).sum().item()
                count += span.scored(row).numel()
            done += len(chunk)
            if progress:
                print(f"\r  {progress}: {done}/{len(spans)} windows, ppl {math.exp(total / count):.2f}",
                      end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return total, count


def perplexity(model, tokens: torch.Tensor, window: int, stride: int, batch_size: int = 4,
               progress: str | None = None, *, framing: Framing) -> float:
    total, count = sliding_nll(model, tokens, window, stride, batch_size, progress, framing=framing)
    return math.exp(total / count)
