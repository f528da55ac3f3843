"""Distillation losses: pure functions of log-probabilities, chosen by name.

Every divergence takes `(log_p_student, log_p_teacher)` of shape (..., V) and returns the
per-position divergence (...,). Working on log-probabilities lets the same function score the
full vocabulary (online teacher) and the top-k + rest buckets of a cached teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
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


ULD_TOKENS = 256
"""Tokens of each distribution `universal_logit_distance` sorts: sorting Gemma 3's whole 262k
vocabulary takes 5 s per 256 positions on 2 CPU cores, its 256 likeliest 0.05 s."""


def universal_logit_distance(log_ps: torch.Tensor, log_pt: torch.Tensor, top: int = ULD_TOKENS) -> torch.Tensor:
    """ULD (Boizard et al. 2024): sum_i |p_s(i) - p_t(i)| with each distribution sorted by probability,
    so the two need not share a vocabulary, or even its size: (..., Vs) and (..., Vt). Over each one's
    `top` likeliest tokens (the shorter padded with zeros) plus the difference of the masses left
    beyond them: equal to the full sum where `top` covers both vocabularies, else a lower bound that
    misses only what the two tails differ by token by token."""
    a, b = (x.exp().topk(min(top, x.shape[-1]), dim=-1).values for x in (log_ps, log_pt))
    width = max(a.shape[-1], b.shape[-1])
    a, b = (F.pad(x, (0, width - x.shape[-1])) for x in (a, b))
    return (a - b).abs().sum(-1) + (b.sum(-1) - a.sum(-1)).abs()


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "gjsd": generalized_jsd,
    "skew_kl": skew_kl,
    "tv": total_variation,
    "uld": universal_logit_distance,
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


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits / temperature (at T = 1 no copy of a (..., V) tensor)."""
    logits = logits.float()
    return logits if temperature == 1 else logits / temperature


def _dense_chunk(div: Divergence, temperature: float, s: torch.Tensor, t: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    log_ps = F.log_softmax(_scaled(s, temperature), dim=-1)
    log_pt = F.log_softmax(_scaled(t, temperature), dim=-1)
    return (div(log_ps, log_pt) * mask).sum()


def chunked_mean(chunk_sum: Callable[..., torch.Tensor], along_sequence: tuple[torch.Tensor, ...],
                 mask: torch.Tensor, chunk: int, *, of_first: bool = False) -> torch.Tensor:
    """sum over chunks of `chunk_sum(*tensors[:, chunk], mask[:, chunk])` / masked positions.

    Each chunk runs under activation checkpointing when gradients flow, so its fp32 softmax
    intermediates are recomputed in backward instead of kept for the whole sequence. With
    `of_first` (`chunk_sum` reads no differentiable tensor but its first argument, e.g. a student's
    logits), each chunk's gradient is computed with its value instead (`_ChunkGradients`): nothing
    is recomputed, 1.6x faster for SmolLM2's 49k-token vocabulary on 2 CPU cores.
    """
    mask = mask.float()
    first, *rest = along_sequence
    if first.requires_grad and of_first and torch.is_grad_enabled():
        total = _ChunkGradients.apply(first, chunk_sum, (*rest, mask), chunk)
        return total / mask.sum().clamp(min=1)
    total = first.new_zeros((), dtype=torch.float32)
    for start in range(0, first.shape[1], chunk):
        args = [x[:, start : start + chunk] for x in (*along_sequence, mask)]
        total = total + (checkpoint(chunk_sum, *args, use_reentrant=False) if first.requires_grad else chunk_sum(*args))
    return total / mask.sum().clamp(min=1)


class _ChunkGradients(torch.autograd.Function):
    """sum over chunks of `chunk_sum(x[:, chunk], *rest[:, chunk])`, with x's gradient found with each
    chunk's value (torch.func) and kept: backward only scales it, as `_FusedHead` does for the head."""

    @staticmethod
    def forward(ctx, x, chunk_sum, rest, chunk):
        step = torch.func.grad_and_value(chunk_sum)
        grad = torch.empty_like(x)
        total = x.new_zeros((), dtype=torch.float32)
        for start in range(0, x.shape[1], chunk):
            piece = slice(start, start + chunk)
            grad[:, piece], value = step(x[:, piece], *(r[:, piece] for r in rest))
            total += value
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None


def aligned_kd_loss(div: Divergence, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    align_student: torch.Tensor, align_teacher: torch.Tensor, temperature: float = 1.0,
                    chunk: int = 128) -> torch.Tensor:
    """Mean divergence between the student's logits (B, Ts, Vs) and the teacher's (B, Tt, Vt) at aligned
    positions: align_student[b, k] and align_teacher[b, k] (B, K; -1 where row b has fewer than K)."""
    rows, slots = (align_student >= 0).nonzero(as_tuple=True)
    student = student_logits[rows, align_student[rows, slots]][None]
    teacher = teacher_logits[rows, align_teacher[rows, slots]][None]
    return kd_loss(div, student, teacher, torch.ones(student.shape[:2], device=student.device), temperature, chunk)


def kd_loss(div: Divergence, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float = 1.0, chunk: int = 128) -> torch.Tensor:
    """Mean divergence over masked positions, logits (B, T, V), mask (B, T), `chunk` positions at a time."""
    return chunked_mean(partial(_dense_chunk, div, temperature), (student_logits, teacher_logits.detach()),
                        mask, chunk, of_first=True)


def _sparse_chunk(div: Divergence, temperature: float, s: torch.Tensor, top_idx: torch.Tensor,
                  top_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    z = _scaled(s, temperature)
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
    return chunked_mean(partial(_sparse_chunk, div, temperature), (student_logits, top_idx, top_logp.detach()), mask,
                        chunk, of_first=True)


def sampled_kl_offset(top_logp: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """What turns a sampled cache's bucket forward KL (`sparse_kd_loss`, KL(q || p_s) for the sampled
    distribution q) into an unbiased estimate of the teacher's KL(p_t || p_s): H(q) - H(p_t), averaged
    over positions. A constant for the student, so the gradient is untouched: E[grad] = p_s - p_t."""
    q = top_logp.float().exp()
    return (-(q * top_logp.float()).sum(-1) - entropy.float()).mean()


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


def selective_lm_loss(logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor,
                      keep: float) -> torch.Tensor:
    """Rho-1's selective language modelling (Lin et al. 2024, arXiv 2404.07965): the mean next-token
    CE over the `keep` share of the batch's tokens where the model's NLL exceeds a reference model's
    most (the excess loss: what the model can still learn there; a token the reference cannot predict
    either is noise to it). A distilled student's reference is its teacher. keep 1: `causal_lm_loss`."""
    if keep >= 1:
        return causal_lm_loss(logits, labels)
    nll = next_token_nll(logits, labels)
    valid = labels[:, 1:] != -100
    with torch.no_grad():
        excess = (nll - next_token_nll(reference_logits, labels)).masked_fill(~valid, float("-inf"))
    k = max(1, round(keep * int(valid.sum())))
    return nll.flatten()[excess.flatten().topk(k).indices].mean()


def cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(h_s, h_t) over masked positions (DistilBERT / DistilGPT-2 alignment loss)."""
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.float().detach(), dim=-1)
    return ((1 - cos) * mask).sum() / mask.sum().clamp(min=1)


def mse_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error per hidden unit over masked positions."""
    err = (student_hidden.float() - teacher_hidden.float().detach()).pow(2).mean(-1)
    return (err * mask).sum() / mask.sum().clamp(min=1)


def normalised_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error over the target's squared norm, over the (masked) positions: 0 when equal, 1 for
    a zero output (the local stage's loss: scale-free across blocks whose residual streams differ in size)."""
    target = teacher_hidden.float().detach()
    err, norm = (student_hidden.float() - target).pow(2).sum(-1), target.pow(2).sum(-1)
    if mask is not None:
        err, norm = err * mask, norm * mask
    return err.sum() / norm.sum().clamp(min=1e-12)


HIDDEN_LOSSES = {"cosine": cosine_loss, "mse": mse_loss, "nmse": normalised_mse}


# --- the fused head: the LM head and its losses chunk by chunk, logits never held whole -------------

HEAD_KINDS = ("ce", "dense", "sparse")


def head_chunk_loss(div: Divergence | None, temperature: float, vocab: int, kind: str, dtype: torch.dtype | None,
                    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, teacher_a: torch.Tensor | None,
                    teacher_b: torch.Tensor | None, teacher_weight: torch.Tensor | None,
                    scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of rows of `fused_head_loss`: logits = hidden @ weight.T (rows, V), then

    - `kind` "ce": the summed next-token CE over rows whose target is not -100;
    - "dense": CE and the summed KD divergence against the teacher's logits
      teacher_a @ teacher_weight.T (teacher_a: the teacher's final hidden states of these rows);
    - "sparse": CE and the summed KD divergence against a cached top-k (teacher_a: indices,
      teacher_b: log-probs).

    KD runs over the first `vocab` columns (padding rows dropped), at `temperature`, through the
    same chunk functions as `kd_loss` / `sparse_kd_loss`. Returns (scales . (ce, kd), (ce, kd)).
    With `dtype` (a run's autocast precision, e.g. bf16) the head's matrix products run in it, as
    autocast runs the full-logits head: autocast does not reach into torch.func's transforms, and
    an fp32 head ran its three products as TF32 at under half bf16's speed on an H200.
    """
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    logits = hidden @ weight.t()
    ce = F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum")
    if kind == "ce":
        kd = torch.zeros_like(ce)
    else:
        ones = torch.ones(logits.shape[:-1], device=logits.device)
        if kind == "dense":
            with torch.no_grad():
                t_dtype = dtype or teacher_weight.dtype
                t_logits = teacher_a.to(t_dtype) @ teacher_weight[:vocab].to(t_dtype).t()
            kd = _dense_chunk(div, temperature, logits[..., :vocab], t_logits, ones)
        else:
            kd = _sparse_chunk(div, temperature, logits[..., :vocab], teacher_a, teacher_b, ones)
    parts = torch.stack([ce, kd])
    return (parts * scales).sum(), parts.detach()


class _FusedHead(torch.autograd.Function):
    """Loss and gradients of the head computed together in forward, chunk by chunk (the technique
    of Liger-Kernel's chunked losses): backward only scales the stored gradients, so nothing is
    recomputed and no (rows, V) tensor outlives its chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, step, chunk, rows, fixed):
        # a frozen head (`--freeze embeddings` with a tied head) gets no (V, H) gradient at all
        train_weight = ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if train_weight else None
        total = hidden.new_zeros((), dtype=torch.float32)
        parts = hidden.new_zeros(2, dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            args = (hidden[start : start + chunk], weight, *_rows(rows, start, chunk), *fixed)
            if train_weight:
                (g_hidden, g_weight), (value, chunk_parts) = step.grad(*args)
                grad_weight += g_weight
            else:
                g_hidden, (value, chunk_parts) = step.grad_hidden(*args)
            grad_hidden[start : start + chunk] = g_hidden
            total += value
            parts += chunk_parts
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, grad_total, grad_parts):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_total, None if grad_weight is None else grad_weight * grad_total,
                None, None, None, None)


def _rows(rows: tuple[torch.Tensor | None, ...], start: int, chunk: int) -> list[torch.Tensor | None]:
    return [None if x is None else x[start : start + chunk] for x in rows]


@dataclass(frozen=True)
class HeadStep:
    """The per-chunk loss of `fused_head_loss` and its (gradients, value) function; built once per
    run, so that with `compiled` torch.compile traces it once per chunk shape."""

    loss: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    grad: Callable[..., tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]
    grad_hidden: Callable[..., tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]
    """The gradient for the hidden states alone, for a frozen head."""


def head_step(kind: str, div: Divergence | None = None, temperature: float = 1.0, vocab: int = 0,
              compiled: bool = False, dtype: torch.dtype | None = None) -> HeadStep:
    """The chunk step of `fused_head_loss` (see `head_chunk_loss`; `dtype`: the head's compute precision)."""
    loss = partial(head_chunk_loss, div, temperature, vocab, kind, dtype)
    grad = torch.func.grad_and_value(loss, argnums=(0, 1), has_aux=True)
    grad_hidden = torch.func.grad_and_value(loss, argnums=0, has_aux=True)
    if compiled:
        loss, grad, grad_hidden = (torch.compile(f, dynamic=False) for f in (loss, grad, grad_hidden))
    return HeadStep(loss, grad, grad_hidden)


def fused_head_loss(step: HeadStep, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    teacher: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
                    teacher_weight: torch.Tensor | None = None, weights: tuple[float, float] = (1.0, 0.0),
                    chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """weights[0] x mean next-token CE + weights[1] x mean KD divergence, from the final hidden
    states (B, T, H) and the head `weight` (V, H), never materialising the (B, T, V) logits.

    labels (B, T), -100 ignored (position t predicts labels[t + 1]). `teacher` holds (B, T, ...)
    tensors: (its final hidden states, None) with its head `teacher_weight` for online KD, or
    (top-k indices, top-k log-probs) of a cached teacher; `step` is `head_step(kind, ...)` for the
    matching kind. Returns (loss, (mean CE, mean KD)); the KD mean is over every position, as in `kd_loss`.
    """
    batch, length = labels.shape
    target = torch.cat([labels[:, 1:], labels.new_full((batch, 1), -100)], dim=1).flatten()
    # built on the device from Python numbers: a tensor made from a list would be copied from the
    # host, and such a copy waits for every queued kernel (a GPU sync per step)
    labelled = (target != -100).sum().clamp(min=1).float()
    counts = torch.stack([labelled, torch.full_like(labelled, batch * length)])
    scales = torch.stack([weights[0] / counts[0], weights[1] / counts[1]])
    rows = (target, *(None if x is None else x.flatten(0, 1) for x in teacher))
    fixed = (teacher_weight, scales)
    flat = hidden.flatten(0, 1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        total, parts = _FusedHead.apply(flat, weight, step, chunk, rows, fixed)
    else:  # evaluation: the loss alone, chunk by chunk
        values = [step.loss(flat[s : s + chunk], weight, *_rows(rows, s, chunk), *fixed)
                  for s in range(0, flat.shape[0], chunk)]
        total, parts = sum(v[0] for v in values), sum(v[1] for v in values)
    return total, parts / counts
