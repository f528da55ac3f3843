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
def batch_gap(model, ids: torch.Tensor, measure: str, teacher_ref: next_token.Reference | None) -> tuple[float, int]:
    """Summed forward KL from the teacher (its reference on the same rows) or NLL over one batch of
    rows `ids`, and the count of positions it sums."""
    values = next_token.kl(model, ids, teacher_ref) if measure == "kl" else next_token.nll(model, ids)
    return values.sum().item(), values.numel()


def mean_gap(measure: str, sums: list[tuple[float, int]]) -> float:
    """`gap` from each batch's `batch_gap`."""
    mean = sum(total for total, _ in sums) / sum(count for _, count in sums)
    return math.exp(mean) if measure == "ppl" else mean


def gap(model, rows: torch.Tensor, measure: str, teacher_refs: list[next_token.Reference] | None = None,
        batch_size: int = 4) -> float:
    """Mean forward KL from the teacher whose `references` on the same rows and batch size are
    `teacher_refs`, or perplexity."""
    return mean_gap(measure, [batch_gap(model, rows[start : start + batch_size], measure,
                                        teacher_refs[i] if measure == "kl" else None)
                              for i, start in enumerate(range(0, rows.shape[0], batch_size))])
