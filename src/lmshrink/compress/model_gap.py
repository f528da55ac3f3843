"""How far a model's next-token predictions are from a teacher's, on calibration rows (N, T):
the mean forward KL per token (`kl`), or the model's own perplexity (`ppl`). Lower is better.
Used to rank candidate cuts (`lmshrink.compress.cut_search`) and to choose a repair's strength
(`lmshrink.compress.repair`). Both run a chunk of positions at a time over the vocabulary
(`lmshrink.next_token`): the teacher is kept as 2 H + 1 floats a position (`next_token.Reference`),
never as N x T x V log-probabilities."""

from __future__ import annotations

import math

import torch

from lmshrink import next_token

MEASURES = ("kl", "ppl")


@torch.no_grad()
def references(model, rows: torch.Tensor, batch_size: int = 4) -> list[next_token.Reference]:
    """The teacher's reference (`next_token.reference`) for each batch of rows, for `gap`'s KL."""
    return [next_token.reference(model, rows[i : i + batch_size]) for i in range(0, rows.shape[0], batch_size)]


@torch.inference_mode()
def gap(model, rows: torch.Tensor, measure: str, teacher_refs: list[next_token.Reference] | None = None,
        batch_size: int = 4) -> float:
    """Mean forward KL from the teacher whose `references` on the same rows and batch size are
    `teacher_refs`, or perplexity."""
    total, count = 0.0, 0
    for i, start in enumerate(range(0, rows.shape[0], batch_size)):
        ids = rows[start : start + batch_size]
        if measure == "kl":
            values = next_token.kl(model, ids, teacher_refs[i])
        else:
            values = next_token.nll(model, ids)
        total += values.sum().item()
        count += values.numel()
    mean = total / count
    return math.exp(mean) if measure == "ppl" else mean
