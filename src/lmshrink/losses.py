"""Distillation losses: pure functions of log-probabilities, chosen by name.

Every divergence takes `(log_p_student, log_p_teacher)` of shape (..., V) and returns the
per-position divergence (...,). Working on log-probabilities lets the same function score the
full vocabulary (online teacher) and the top-k + rest buckets of a cached teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v), with 0 log 0 = 0."""
    p = log_p.exp()
    # mask before multiplying, so a -inf log-prob where p = 0 gives neither NaN nor a NaN gradient
    return (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(p))).sum(-1)


def forward_kl(log_ps: torch.Tensor, log_pt: torch.Tensor) -> torch.Tensor:
    """KL(p_t || p_s): Hinton et al. 2015; mode-covering."""
    return _kl(log_pt, log_ps)


def reverse_kl(log_ps: torch.Tensor, log_pt: torch.Tensor) -> torch.Tensor:
    """KL(p_s || p_t): MiniLLM (Gu et al. 2024); mode-seeking."""
    return _kl(log_ps, log_pt)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w a + (1 - w) b), computed stably in log space."""
    if weight_a <= 0:
        return log_b
    if weight_a >= 1:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def generalized_jsd(log_ps: torch.Tensor, log_pt: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """GKD (Agarwal et al. 2024), eq. 1: beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s.

    beta = 0.5 is the Jensen-Shannon divergence; divided by beta it tends to KL(p_t || p_s) as beta -> 0.
    """
    log_m = _log_mix(log_pt, log_ps, beta)
    return beta * _kl(log_pt, log_m) + (1 - beta) * _kl(log_ps, log_m)


def skew_kl(log_ps: torch.Tensor, log_pt: torch.Tensor, lam: float = 0.1) -> torch.Tensor:
    """DistiLLM (Ko et al. 2024), skew KL: KL(p_t || lam p_t + (1 - lam) p_s); lam = 0 is forward KL."""
    return _kl(log_pt, _log_mix(log_pt, log_ps, lam))


def total_variation(log_ps: torch.Tensor, log_pt: torch.Tensor) -> torch.Tensor:
    """TV(p_t, p_s) = 1/2 sum_v |p_t - p_s|, in [0, 1]."""
    return 0.5 * (log_pt.exp() - log_ps.exp()).abs().sum(-1)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "gjsd": generalized_jsd,
    "skew_kl": skew_kl,
    "tv": total_variation,
}


def divergence(name: str, beta: float = 0.5, skew: float = 0.1) -> Divergence:
    """The divergence called `name`, with its parameter bound."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown KD loss {name!r}; known: {', '.join(DIVERGENCES)}")
    if name == "gjsd":
        return partial(generalized_jsd, beta=beta)
    if name == "skew_kl":
        return partial(skew_kl, lam=skew)
    return DIVERGENCES[name]


def _dense_chunk(div: Divergence, temperature: float, s: torch.Tensor, t: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    log_ps = F.log_softmax(s.float() / temperature, dim=-1)
    log_pt = F.log_softmax(t.float() / temperature, dim=-1)
    return (div(log_ps, log_pt) * mask).sum()


def _chunked_mean(chunk_sum: Callable[..., torch.Tensor], along_sequence: tuple[torch.Tensor, ...],
                  mask: torch.Tensor, chunk: int) -> torch.Tensor:
    """sum over chunks of `chunk_sum(*tensors[:, chunk], mask[:, chunk])` / masked positions.

    Each chunk runs under activation checkpointing when gradients flow, so its fp32 softmax
    intermediates are recomputed in backward instead of kept for the whole sequence.
    """
    total = along_sequence[0].new_zeros((), dtype=torch.float32)
    mask = mask.float()
    grad = along_sequence[0].requires_grad
    for start in range(0, along_sequence[0].shape[1], chunk):
        args = [x[:, start : start + chunk] for x in (*along_sequence, mask)]
        total = total + (checkpoint(chunk_sum, *args, use_reentrant=False) if grad else chunk_sum(*args))
    return total / mask.sum().clamp(min=1)


def kd_loss(div: Divergence, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float = 1.0, chunk: int = 128) -> torch.Tensor:
    """Mean divergence over masked positions, logits (B, T, V), mask (B, T), `chunk` positions at a time."""
    return _chunked_mean(partial(_dense_chunk, div, temperature), (student_logits, teacher_logits.detach()),
                         mask, chunk)


def _sparse_chunk(div: Divergence, temperature: float, s: torch.Tensor, top_idx: torch.Tensor,
                  top_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    z = s.float() / temperature
    # log p_s at the teacher's top-k: z[idx] - logsumexp(z); cheaper than a full log_softmax + gather
    log_ps = z.gather(-1, top_idx.long()) - torch.logsumexp(z, dim=-1, keepdim=True)
    return (div(*_buckets(log_ps, top_logp)) * mask).sum()


def _buckets(log_ps: torch.Tensor, top_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs over k+1 buckets: the teacher's top-k tokens and the rest."""
    rest_s = torch.log1p(-log_ps.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    top_logp = top_logp.float()
    rest_t = torch.log1p(-top_logp.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    return torch.cat([log_ps, rest_s], -1), torch.cat([top_logp, rest_t], -1)


def sparse_kd_loss(div: Divergence, student_logits: torch.Tensor, top_idx: torch.Tensor, top_logp: torch.Tensor,
                   mask: torch.Tensor, temperature: float = 1.0, chunk: int = 128) -> torch.Tensor:
    """`kd_loss` against a cached teacher: its top-k log-probs (at `temperature`) and their indices (B, T, k)."""
    return _chunked_mean(partial(_sparse_chunk, div, temperature), (student_logits, top_idx, top_logp), mask, chunk)


def ce_and_sparse_kd(div: Divergence, logits: torch.Tensor, labels: torch.Tensor, top_idx: torch.Tensor,
                     top_logp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token CE and `sparse_kd_loss` at T = 1 from one log-softmax and one gather.

    logits (B, T, V), labels (B, T) with -100 ignored, teacher top-k (B, T, k). The label of
    position t is labels[t + 1]; the CE's and the KD's log-probs are picked together, so the
    full-vocabulary work is that of a plain CE loss.
    """
    log_ps = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    target = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)  # (B, T)
    valid = target != -100
    picked = log_ps.gather(-1, torch.cat([target.clamp(min=0).unsqueeze(-1), top_idx.long()], dim=-1))
    ce = -(picked[..., 0] * valid).sum() / valid.sum().clamp(min=1)
    kd = (div(*_buckets(picked[..., 1:], top_logp)) * mask).sum() / mask.sum().clamp(min=1)
    return ce, kd


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL (nats) of every next token: position t of logits (B, T, V) predicts targets[:, t + 1];
    returns (B, T-1), 0 where the target is -100. (The flattened (B*(T-1), V) rows make
    cross_entropy ~5x faster than a (B, V, T-1) view.)"""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(), ignore_index=-100,
                          reduction="none")
    return nll.view(targets.shape[0], -1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, logits (B, T, V) and labels (B, T), -100 ignored."""
    return next_token_nll(logits, labels).sum() / (labels[:, 1:] != -100).sum().clamp(min=1)


def cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(h_s, h_t) over masked positions (DistilBERT / DistilGPT-2 alignment loss)."""
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.float().detach(), dim=-1)
    return ((1 - cos) * mask).sum() / mask.sum().clamp(min=1)


def mse_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per hidden unit over masked positions."""
    err = (student_hidden.float() - teacher_hidden.float().detach()).pow(2).mean(-1)
    return (err * mask).sum() / mask.sum().clamp(min=1)


HIDDEN_LOSSES = {"cosine": cosine_loss, "mse": mse_loss}
