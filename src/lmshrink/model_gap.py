"""How far a model's next-token predictions are from a teacher's, on calibration rows (N, T):
the mean forward KL per token (`kl`), or the model's own perplexity (`ppl`). Lower is better.
Used to rank candidate cuts (`lmshrink.cut_search`) and to choose a repair's strength
(`lmshrink.repair`)."""

from __future__ import annotations

import math

import torch

from lmshrink.losses import forward_kl, next_token_nll

MEASURES = ("kl", "ppl")


@torch.inference_mode()
def log_probs(model, rows: torch.Tensor, batch_size: int = 4, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The model's next-token log-probabilities (B, T, V) for each batch of rows, kept in `dtype`."""
    device = next(model.parameters()).device
    return [torch.log_softmax(model(input_ids=rows[i : i + batch_size].to(device), use_cache=False).logits.float(),
                              -1).to(dtype) for i in range(0, rows.shape[0], batch_size)]


@torch.inference_mode()
def gap(model, rows: torch.Tensor, measure: str, teacher_logp: list[torch.Tensor] | None = None,
        batch_size: int = 4) -> float:
    """Mean forward KL from `teacher_logp` (from `log_probs` on the same rows and batch size), or perplexity."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i, start in enumerate(range(0, rows.shape[0], batch_size)):
        ids = rows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        if measure == "kl":
            values = forward_kl(torch.log_softmax(logits, -1), teacher_logp[i])
        else:
            values = next_token_nll(logits, ids)
        total += values.sum().item()
        count += values.numel()
    mean = total / count
    return math.exp(mean) if measure == "ppl" else mean
