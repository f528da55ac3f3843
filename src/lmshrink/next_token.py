"""Next-token quantities over the vocabulary (NLL, KL from a teacher), a chunk of positions at a time.

A model's logits for B x T tokens are B x T x V floats: 2.1 GB in fp32 for 4 x 512 tokens of
Gemma 3's 262,144-token vocabulary, and a log-softmax or a KL holds several such tensors at once.
Here the model runs to its last (normed) hidden state (B, T, H), and its output head (and the final
soft-capping Gemma 2 applies) turns `chunk_positions(V)` positions at a time into logits, so the
vocabulary costs at most ~4 x LOGIT_BYTES of memory however long the rows or large the vocabulary.
Where only a log-sum-exp over the vocabulary is needed (an NLL, a KL against a `Reference`), no
position's logits are made whole: `vocab_logsumexp` takes PIECE_ROWS positions against one slice
of the vocabulary at a time (`Head.logsumexp`), a tall product that runs near the machine's peak.
A teacher's reference for a KL (`Reference`) is H + 1 floats per position, not V: the head's rows
averaged under its distribution, from which the exact KL of any model sharing its head (a cut of
it, a repaired student) takes one head product and a log-sum-exp; else its last hidden state, its
log-probabilities recomputed chunk by chunk.

The split of a model into body and head is checked once per model against its own forward pass;
a model whose logits come out some other way (a logit scale the split does not know) is scored
from its full logits, with one line saying so. A runtime that is only a function from ids to
logits (llama.cpp's) is scored from its full logits.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from lmshrink.losses import chunked_mean, forward_kl, next_token_nll

LOGIT_BYTES = 1 << 26
"""fp32 logits per chunk (64 MiB): 64 positions of a 262k vocabulary, 341 of a 49k one; a chunk's
softmax holds a few such tensors at once (on Gemma-3-270M 256 MiB chunks put 0.9 GB on top of a search's peak)."""
HEAD_ROWS = 16384  # rows of an output head made float32 at a time (Llama 3's 128k x 4096: 256 MB of 2.1 GB)
PIECE_ROWS = 512
"""Positions whose logits `vocab_logsumexp` makes together, a slice of the vocabulary at a time. On Gemma-3-270M's
262k x 640 head (2 cores, float32) the product of 512 positions ran at 130 GFLOP/s where chunks of 64 whole-vocabulary
positions ran at 44 (the tall product is efficient; the short one re-reads the whole table per 64 positions)."""
FEW_ROWS = 2048  # rows of the head's table a decoding step multiplies at a time on a CPU (`Head.few`)
PIECE_BYTES = {"cpu": 1 << 23}
"""float32 logits of one piece (positions x vocabulary slice) per device type, LOGIT_BYTES elsewhere: on a CPU 8 MiB,
which glibc's malloc serves from its heap again and again, where each 64 MiB tensor is mapped and page-faulted afresh
(48 million minor faults, 138 s of system time, in one Gemma-3-270M score-layers run)."""

Split = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> whether its split reproduces it


def chunk_positions(vocab: int) -> int:
    """Positions whose fp32 logits fit LOGIT_BYTES."""
    return max(1, LOGIT_BYTES // (4 * vocab))


def _row_chunk(model, ids: torch.Tensor) -> int:
    """Positions of every row of `ids` (B, T) whose logits make one chunk."""
    return max(1, chunk_positions(head_size(model)) // ids.shape[0])


def _device(model) -> torch.device:
    return next(model.parameters()).device


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Logits soft-capped as a model with `final_logit_softcapping` (Gemma 2) makes them: cap x tanh(logits / cap)."""
    return torch.tanh(logits / cap) * cap if cap else logits


def vocab_slices(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 cap: float | None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first token id, float32 logits) of positions x (N, H) against one slice of the vocabulary after
    another: x W^T + b computed in x's dtype (a table stored otherwise converted a slice at a time),
    soft-capped by `cap` where the model caps its logits; each slice's logits `PIECE_BYTES`."""
    budget = PIECE_BYTES.get(x.device.type, LOGIT_BYTES)
    step = max(1, budget // (4 * max(1, x.shape[0])))
    for v in range(0, weight.shape[0], step):
        part = None if bias is None else bias[v : v + step].to(x.dtype)
        logits = F.linear(x, weight[v : v + step].to(x.dtype), part).float()
        yield v, soft_cap(logits, cap)


def vocab_logsumexp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, cap: float | None = None,
                    targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For each of N positions x (N, H): the log-sum-exp over the vocabulary of its logits x W^T + b
    (soft-capped by `cap`), and the logit of its token in `targets` (N,) where given (else None),
    float32; PIECE_ROWS positions against a slice of the vocabulary at a time (`vocab_slices`), so
    no position's V logits are ever held together."""
    lse = torch.empty(x.shape[0], device=x.device)
    picked = None if targets is None else torch.empty(x.shape[0], device=x.device)
    for s in range(0, x.shape[0], PIECE_ROWS):
        rows, parts = x[s : s + PIECE_ROWS], []
        wanted = None if targets is None else targets[s : s + PIECE_ROWS].to(x.device)
        for v, logits in vocab_slices(rows, weight, bias, cap):
            parts.append(torch.logsumexp(logits, -1))
            if wanted is not None:
                at = wanted - v
                inside = (at >= 0) & (at < logits.shape[1])
                got = logits.gather(1, at.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
                picked[s : s + PIECE_ROWS] = torch.where(inside, got, picked[s : s + PIECE_ROWS]) if v else got
        lse[s : s + PIECE_ROWS] = torch.logsumexp(torch.stack(parts, -1), -1)
    return lse, picked


class Head:
    """A model's output head: `head(hidden)` the logits (..., V) of last hidden states (..., H),
    soft-capped where the model caps them; `head.logsumexp(hidden, targets)` their log-sum-exp over
    the vocabulary (and the targets' logits) without making them (`vocab_logsumexp`), where the head
    is a linear layer. `dtype` None: the head computes in its own dtype; float32: its table is made
    float32 HEAD_ROWS rows at a time (a head read lazily in its stored dtype, `compress.sequential`)."""

    def __init__(self, output: torch.nn.Module, cap: float | None = None, dtype: torch.dtype | None = None):
        self.output, self.cap, self.dtype = output, cap, dtype

    @classmethod
    def of(cls, model, dtype: torch.dtype | None = None) -> Head:
        """The model's output embeddings with the soft-capping its config asks for."""
        return cls(model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None), dtype)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            logits = self.output(hidden)
        else:
            weight, x = self.output.weight, hidden.to(self.dtype)
            logits = torch.cat([x @ weight[v : v + HEAD_ROWS].to(self.dtype).T
                                for v in range(0, weight.shape[0], HEAD_ROWS)], dim=-1)
            if self.output.bias is not None:
                logits = logits + self.output.bias.to(self.dtype)
        return soft_cap(logits, self.cap)

    def few(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of a few positions' last hidden states (B, H), as a decoding step wants them.
        On a CPU as the table's rows times the states, FEW_ROWS rows of the table at a time: MKL ran
        the product h W^T of 16 rows against Gemma-3-270M's 262k x 640 table in 161 ms, W h^T by
        2,048-row slices in 84 ms (the table's read alone: 27 ms; 2 cores of an AMD EPYC). Elsewhere,
        or for a head that is not one linear layer, `head(hidden)`."""
        if hidden.device.type != "cpu" or self.dtype is not None or not isinstance(self.output, torch.nn.Linear):
            return self(hidden)
        weight, x = self.output.weight, hidden.T
        logits = torch.cat([weight[v : v + FEW_ROWS] @ x for v in range(0, weight.shape[0], FEW_ROWS)]).T
        if self.output.bias is not None:
            logits = logits + self.output.bias
        return soft_cap(logits, self.cap)

    def logsumexp(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log-sum-exp over the vocabulary (...), float32; the logits of `targets` (...) or None) of
        last hidden states (..., H). Not for a loss to differentiate (its pieces would all be kept)."""
        shape = hidden.shape[:-1]
        if not isinstance(self.output, torch.nn.Linear):
            logits = self(hidden).float()
            picked = None if targets is None else logits.gather(-1, targets.to(logits.device)[..., None])[..., 0]
            return torch.logsumexp(logits, -1), picked
        x = hidden.reshape(-1, hidden.shape[-1])
        lse, picked = vocab_logsumexp(x if self.dtype is None else x.to(self.dtype), self.output.weight,
                                      self.output.bias, self.cap, None if targets is None else targets.reshape(-1))
        return lse.view(shape), None if picked is None else picked.view(shape)


def logsumexp_of(head: Callable, hidden: torch.Tensor) -> torch.Tensor:
    """log-sum-exp over the vocabulary of head(hidden), float32: by `Head.logsumexp` where no gradient is
    wanted, else from the logits (a loss's backward needs them)."""
    if isinstance(head, Head) and not torch.is_grad_enabled():
        return head.logsumexp(hidden)[0]
    return torch.logsumexp(head(hidden).float(), -1)


def split(model) -> Split | None:
    """(body, head): ids (B, T) -> last hidden state (B, T, H), and hidden (..., H) -> logits (..., V),
    so that head(body(ids)) is model(ids).logits; None where that does not hold (checked once)."""
    if not isinstance(model, torch.nn.Module):
        return None
    output = model.get_output_embeddings()
    base = model.base_model
    if output is None or base is model:
        return None
    head = Head.of(model)

    def body(ids: torch.Tensor) -> torch.Tensor:
        return base(input_ids=ids.to(_device(model)), use_cache=False).last_hidden_state

    key = model
    if key not in _CHECKED:
        probe = torch.arange(min(8, model.config.vocab_size), device=_device(model))[None]
        with torch.inference_mode():
            whole = model(input_ids=probe, use_cache=False).logits.float()
            parts = head(body(probe)).float()
        scale = whole.abs().max().clamp(min=1.0)
        _CHECKED[key] = parts.shape == whole.shape and bool(((parts - whole).abs().max() <= 1e-3 * scale).item())
        if not _CHECKED[key]:
            print(f"[lmshrink] {type(model).__name__}: its logits are not its output head of its last hidden state; "
                  "scoring from full logits (memory grows with the vocabulary)", file=sys.stderr, flush=True)
    return (body, head) if _CHECKED[key] else None


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits: a transformers model's forward pass, or `model(ids)` for a runtime function."""
    if isinstance(model, torch.nn.Module):
        return model(input_ids=ids.to(_device(model)), use_cache=False).logits
    return model(ids)


@torch.inference_mode()
def logit_chunks(model, ids: torch.Tensor) -> Iterator[torch.Tensor]:
    """The logits of rows `ids` (B, T), a chunk of positions at a time: (B, c, V) tensors in order."""
    parts = split(model)
    if parts is None:
        yield full_logits(model, ids)
        return
    body, head = parts
    hidden = body(ids)
    step = _row_chunk(model, ids)
    for s in range(0, hidden.shape[1], step):
        yield head(hidden[:, s : s + step])


@torch.inference_mode()
def nll(model, ids: torch.Tensor) -> torch.Tensor:
    """NLL (nats) of every next token of rows `ids` (B, T): (B, T-1), position t predicting t + 1."""
    parts = split(model)
    if parts is None:
        logits = full_logits(model, ids)
        return next_token_nll(logits, ids.to(logits.device))
    body, head = parts
    lse, picked = head.logsumexp(body(ids)[:, :-1], ids[:, 1:])  # the last position predicts nothing here
    return lse - picked


def head_size(model) -> int:
    """The number of logits the model's head produces per position."""
    return model.get_output_embeddings().weight.shape[0]


@dataclass
class Reference:
    """A teacher's next-token distributions p on rows (B, T), kept in the least memory that gives
    the exact forward KL of another model:

    - `hidden` (B, T, H), the teacher's last hidden states, and its `head`: p recomputed a chunk at
      a time (one more head product per chunk);
    - where the head is linear, also `expected` (B, T, H), E_p[W_v] (the head's rows averaged under
      p), and `constant` (B, T), sum_v p_v log p_v - E_p[b_v]: for a model with the same head W, b
      and last hidden state h, KL(p || softmax(h W^T + b)) = constant - h . expected +
      logsumexp(h W^T + b), one head product and a log-sum-exp per position, nothing of V kept
      (a cut of the teacher, and every repaired student, shares its head);
    - `logp` (B, T, V) only for a model that cannot be split (`split`).
    """

    hidden: torch.Tensor | None = None
    head: Callable | None = None
    expected: torch.Tensor | None = None
    constant: torch.Tensor | None = None
    logp: torch.Tensor | None = None
    linear: torch.nn.Linear | None = None

    def rows(self, index) -> Reference:
        """The reference of some of its rows."""
        def take(v: torch.Tensor) -> torch.Tensor:
            return v[index.to(v.device)] if isinstance(index, torch.Tensor) else v[index]

        pick = {k: None if v is None else take(v) for k, v in self._tensors().items()}
        return replace(self, **pick)

    @classmethod
    def cat(cls, refs: list[Reference]) -> Reference:
        tensors = {k: None if v is None else torch.cat([r._tensors()[k] for r in refs]) for k, v in refs[0]._tensors().items()}
        return replace(refs[0], **tensors)

    def _tensors(self) -> dict[str, torch.Tensor | None]:
        return {"hidden": self.hidden, "expected": self.expected, "constant": self.constant, "logp": self.logp}

    def shares_head(self, model) -> bool:
        """Whether `model`'s head is this reference's linear head (same weights and bias)."""
        if self.expected is None:
            return False
        out = model.get_output_embeddings()
        if not isinstance(out, torch.nn.Linear) or out.weight.shape != self.linear.weight.shape:
            return False
        same = out.weight is self.linear.weight or torch.equal(out.weight, self.linear.weight)
        if (out.bias is None) != (self.linear.bias is None):
            return False
        return same and (out.bias is None or torch.equal(out.bias, self.linear.bias))


def linear_head(model) -> torch.nn.Linear | None:
    """The model's head where its logits are exactly h W^T + b (no soft-capping)."""
    out = model.get_output_embeddings()
    if isinstance(out, torch.nn.Linear) and not getattr(model.config, "final_logit_softcapping", None):
        return out
    return None


@torch.no_grad()  # not inference mode: a reference is a target of `mean_kl`'s backward
def reference(model, ids: torch.Tensor) -> Reference:
    """What `kl` needs of a teacher on rows `ids` (see `Reference`)."""
    parts = split(model)
    if parts is None:
        return Reference(logp=torch.log_softmax(full_logits(model, ids).float(), -1))
    body, head = parts
    return reference_of(body(ids), head, linear_head(model))


@torch.no_grad()
def reference_of(hidden: torch.Tensor, head: Callable, linear: torch.nn.Linear | None) -> Reference:
    """The `Reference` of last hidden states (B, T, H) under `head` (hidden -> logits): the shared-head
    form where `linear` is the head (no soft-capping), made PIECE_ROWS positions against a slice of
    the vocabulary at a time (`vocab_slices`: the log-sum-exp first, then p's averages), in the
    hidden states' dtype; else the hidden states alone."""
    if linear is None:
        return Reference(hidden=hidden, head=head)
    x = hidden.reshape(-1, hidden.shape[-1])
    lse, _ = vocab_logsumexp(x, linear.weight, linear.bias)
    expected = torch.zeros(x.shape, device=x.device)
    constant = torch.zeros(x.shape[0], device=x.device)
    for s in range(0, x.shape[0], PIECE_ROWS):
        rows = slice(s, s + PIECE_ROWS)
        for v, logits in vocab_slices(x[rows], linear.weight, linear.bias, None):
            logp = logits - lse[rows, None]
            p = logp.exp()
            expected[rows] += p @ linear.weight[v : v + p.shape[1]].float()
            constant[rows] += (p * logp).sum(-1)
            if linear.bias is not None:
                constant[rows] -= p @ linear.bias[v : v + p.shape[1]].float()
    return Reference(hidden=hidden, head=head, expected=expected.view(hidden.shape[:-1] + (-1,)),
                     constant=constant.view(hidden.shape[:-1]), linear=linear)


def kl_chunk(head: Callable, ref: Reference, hidden: torch.Tensor, index: slice) -> torch.Tensor:
    """Forward KL at each position of a chunk (B, c) of positions `index`, from the model's last
    hidden states there (B, c, H): through the teacher's expected head row where the model shares
    its head, else from the teacher's hidden states through its own head."""
    if ref.expected is not None and ref.head is None:  # `shares_head` decided: the shared-head formula
        e, c = ref.expected[:, index].to(hidden.device), ref.constant[:, index].to(hidden.device)
        return c - (hidden.float() * e).sum(-1) + logsumexp_of(head, hidden)
    log_ps = torch.log_softmax(head(hidden).float(), -1)
    with torch.no_grad():
        log_pt = torch.log_softmax(ref.head(ref.hidden[:, index].to(hidden.device)).float(), -1)
    return forward_kl(log_ps, log_pt)


def _for(model, ref: Reference) -> Reference:
    """`ref` as `kl_chunk` reads it for `model`: the shared-head form (head None), or the other."""
    if ref.shares_head(model):
        return replace(ref, head=None)
    if ref.hidden is None:
        raise ValueError("this reference holds neither hidden states nor a head the model shares")
    return replace(ref, expected=None, constant=None)


@torch.inference_mode()
def kl(model, ids: torch.Tensor, ref: Reference) -> torch.Tensor:
    """Forward KL(p_teacher || p_model) at every position of rows `ids` (B, T), from the teacher's
    `reference` on the same rows."""
    parts = split(model)
    if parts is None:
        log_ps = torch.log_softmax(full_logits(model, ids).float(), -1)
        return forward_kl(log_ps, ref.logp.to(log_ps.device))
    body, head = parts
    hidden, ref = body(ids), _for(model, ref)
    if ref.head is None:  # the shared-head formula: one log-sum-exp a position, by slices of the vocabulary
        return kl_chunk(head, ref, hidden, slice(None))
    step = _row_chunk(model, ids)
    return torch.cat([kl_chunk(head, ref, hidden[:, s : s + step], slice(s, s + step))
                      for s in range(0, hidden.shape[1], step)], dim=1)


def mean_kl(model, ids: torch.Tensor, ref: Reference) -> torch.Tensor:
    """The mean of `kl` over every position, differentiable in the model's weights: each chunk's
    logits are recomputed in backward (activation checkpointing), so training holds one chunk of
    them at a time."""
    parts = split(model)
    if parts is None:
        log_ps = torch.log_softmax(full_logits(model, ids).float(), -1)
        return forward_kl(log_ps, ref.logp.to(log_ps.device).float()).mean()
    body, head = parts
    hidden, ref = body(ids), _for(model, ref)
    step = _row_chunk(model, ids)
    positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[:2])

    def chunk_sum(h: torch.Tensor, at: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (kl_chunk(head, ref, h, slice(int(at[0, 0]), int(at[0, -1]) + 1)) * mask).sum()

    return chunked_mean(chunk_sum, (hidden, positions), torch.ones(hidden.shape[:2], device=hidden.device), step)
