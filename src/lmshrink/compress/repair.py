"""Training-free repair of a cut: what the removed blocks did, put back in the block before them.

Removing a contiguous span of blocks a..b from a model loses the update those blocks added to the
residual stream, U = x_{b+1} - x_a (x_k: the stream entering block k; x_n the last block's output).
Both repairs fold a fit of U into the last kept block before the span, i = a - 1, so the student
stays a plain model of the teacher's shapes that transformers loads without lmshrink:

- `replaceme` (Shopkhoev et al. 2025, arXiv 2505.02819): block i's MLP output M (tokens, H)
  becomes M T, with T (H, H) fitted by least squares so that M T = M + U. Written T = I + D and
  ridge-regularised towards the identity (lambda -> inf is the plain cut):
      D = (M^T M + lambda I)^-1 M^T U
  and folded into the MLP output projection (`down_proj`; GPT-2's Conv1D `c_proj`; OPT's `fc2`).
- `refit`: the same least squares with the projection's *input* z (tokens, I; the MLP's hidden
  activation, I = its width) in place of M: that projection's weights W become W + D with
      D = (z^T z + lambda I)^-1 z^T U,
  so that z (W + D) = M + U. For a projection without a bias (Llama's `down_proj`), M T = z W T =
  z (W + W D'), so every correction ReplaceMe can fold is one refit can (D = W D'). Refit has
  I x H parameters to ReplaceMe's H x H; the same held-out choice of lambda keeps the extra
  freedom from fitting noise. On SmolLM2-135M with six
  blocks cut it lowers the held-out perplexity ratio further than ReplaceMe on every text tried
  (bench/cut_quality.py).
- `bias` (the mean-update bias, arXiv 2407.16286): the span's mean update E[U] added to that
  projection's bias (Llama-style models get one through their `mlp_bias` config flag).

The fit's inputs (M and x_a) come from the teacher (`fit_on="teacher"`: one pass), or from the
student with the earlier spans already repaired (`fit_on="student"`), so each fit also corrects
what the ones before it left; the target x_{b+1} is always the teacher's. lambda = alpha
tr(M^T M) / H with alpha chosen among ALPHAS on held-out calibration rows, then refitted on all
rows (or the plain cut kept, where no fit beats it there).

The fits minimise the residual stream's error where each span ends, but the blocks after a cut
partly make up for what it removed (McGrath et al. 2023, "the Hydra effect"), so the full fit can
over-correct: on SmolLM2-135M the full mean-update bias lowers the stream's error for 95-99% of
tokens yet leaves the output's KL from the teacher almost where the plain cut was, while half the
bias cuts it by 11% (bench/bias_shrink.py). With several `strengths`, each span's fit is scaled
by the one that brings the student's output closest to the teacher's on the held-out rows.

Every fit is computed from sufficient statistics (`Moments`), so held-out errors and refits cost
a few H x H products, not another pass over the tokens.

`refine` then fits the same projections on what the student is for, its next-token distribution:
a few passes of Adam over the calibration rows on the forward KL from the teacher, every other
weight frozen, the held-out rows keeping the best pass (the least-squares fit itself included).
The stream's error is only a proxy for the output: on SmolLM2-135M cut to 24 blocks by Block
Influence, four passes took the refit student's held-out KL from 0.350 to 0.304 and its perplexity
8-11% lower on three held-out kinds of text (bench/cut_quality.py).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from lmshrink import next_token
from lmshrink.architectures import architecture_of, blocks_of, get_path
from lmshrink.compress.model_gap import gap, references
from lmshrink.errors import LmshrinkError, one_of

REPAIRS = ("none", "bias", "replaceme", "refit")
FIT_ON = ("student", "teacher")
ALPHAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def fits_from_proj_input(method: str) -> bool:
    """Whether a repair is fitted on the MLP output projection's input (refit solves for the projection
    itself) rather than on its output (replaceme's map after it; bias needs neither)."""
    return method == "refit"


class RepairError(LmshrinkError, ValueError):
    pass


def repair_problems(config, method: str) -> list[str]:
    """Why `method` cannot repair a model of this config ([] if it can)."""
    if method == "none":
        return []
    if method not in REPAIRS:
        return one_of("repair", method, REPAIRS)
    arch = architecture_of(config)
    if arch.mlp_out is None:
        return [f"repair: {config.model_type} models cannot be repaired: {arch.mlp_out_missing}; use --repair none"]
    if method == "bias" and arch.mlp_bias is None and not arch.mlp_out_has_bias:
        return [f"repair: the bias repair needs a bias on {arch.mlp_out}, which {config.model_type} models "
                "do not have (and cannot be given through their config); use --repair replaceme"]
    return []


def removed_spans(n: int, keep: list[int]) -> list[tuple[int, int]]:
    """Maximal runs (first, last) of the blocks not in `keep`, in order."""
    spans: list[tuple[int, int]] = []
    for i in range(n):
        if i in keep:
            continue
        if spans and spans[-1][1] == i - 1:
            spans[-1] = (spans[-1][0], i)
        else:
            spans.append((i, i))
    return spans


# --- activations ------------------------------------------------------------------------------

class StopForward(Exception):
    """Raised by a hook once everything wanted is captured, to skip the rest of the forward pass."""


def _tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture(model, rows: torch.Tensor, states: set[int], projections: set[int], batch_size: int = 4,
            on_device: bool = False, proj_input: bool = False,
            proj_dtype: torch.dtype = torch.float32) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """The residual stream x_k entering block k for k in `states` (k = n: the last block's output),
    and the MLP output projection's output (`proj_input`: its input, the MLP's hidden activation) of
    each block in `projections`: (N, T, H) float32 tensors
    on the CPU (`on_device`: as they are, where the model is); the projections in `proj_dtype`
    (float16 halves a search's largest store; a batch whose values float16 cannot hold stays float32).
    The forward pass stops after the last block that anything is wanted from."""
    if not states and not projections:
        return {}, {}
    blocks = blocks_of(model)
    proj_path = architecture_of(model.config).mlp_out
    device = next(model.parameters()).device
    stop_after = max([k - 1 for k in states] + list(projections))
    store = _Captured(rows.shape[0], on_device, proj_dtype)
    hooks = []
    if 0 in states:
        hooks.append(blocks[0].register_forward_pre_hook(
            lambda _m, args, kwargs: store.keep("state", 0, args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True))
    for i in projections:
        hooks.append(get_path(blocks[i], proj_path).register_forward_hook(
            lambda _m, args, out, i=i: store.keep("proj", i, args[0] if proj_input else _tensor(out))))

    def after_block(_m, _a, out, i: int) -> None:
        if i + 1 in states:
            store.keep("state", i + 1, _tensor(out))
        if i == stop_after:
            raise StopForward

    for i in range(max(stop_after + 1, 0)):
        hooks.append(blocks[i].register_forward_hook(lambda m, a, out, i=i: after_block(m, a, out, i)))
    try:
        for start in range(0, rows.shape[0], batch_size):
            batch = rows[start : start + batch_size]
            store.batch_shape, store.at = list(batch.shape), start
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        for hook in hooks:
            hook.remove()
    return store.result("state", states), store.result("proj", projections)


class _Captured:
    """What `capture` keeps: on the CPU, each tensor filled in place batch by batch (never held twice;
    projections in `proj_dtype` unless a batch's values do not fit it); `on_device`, the batches
    where the model is, joined at the end."""

    def __init__(self, rows: int, on_device: bool, proj_dtype: torch.dtype):
        self.rows, self.on_device, self.proj_dtype = rows, on_device, proj_dtype
        self.batches: dict[tuple[str, int], list[torch.Tensor]] = {}
        self.store: dict[tuple[str, int], torch.Tensor] = {}
        self.batch_shape: list[int] = []
        self.at = 0  # the current batch's first row

    def keep(self, kind: str, k: int, value: torch.Tensor) -> None:
        value = value.detach().reshape(*self.batch_shape, -1)  # (B, T, H); OPT's fc2 runs on (B * T, H)
        key = (kind, k)
        if self.on_device:
            self.batches.setdefault(key, []).append(value)
            return
        if key not in self.store:
            dtype = self.proj_dtype if kind == "proj" else torch.float32
            self.store[key] = torch.empty((self.rows, *value.shape[1:]), dtype=dtype)
        out = self.store[key]
        if out.dtype != torch.float32 and not torch.isfinite(value.to(out.dtype)).all():
            out = self.store[key] = out.float()  # values float16 cannot hold: this block stays float32
        out[self.at : self.at + value.shape[0]] = value.to(out.dtype)

    def result(self, kind: str, wanted: set[int]) -> dict[int, torch.Tensor]:
        if self.on_device:
            return {k: torch.cat(self.batches.pop((kind, k))) for k in sorted(wanted)}
        return {k: self.store[(kind, k)] for k in wanted}


class BlockReplay:
    """Runs a model's blocks one at a time over the hidden states of every calibration row (the
    layer-by-layer pass of GPTQ-style quantisers), so a student fitted span by span is computed
    once, from where its stream first leaves the teacher's, rather than from the embeddings again
    for every span. What a block is called with besides its hidden states (masks, positions,
    rotary embeddings, per-layer attention kinds) depends only on the batch's shape (full rows, no
    padding): it is recorded once per batch size from a forward pass over the first rows, and
    replayed."""

    def __init__(self, model, rows: torch.Tensor, blocks: range, batch_size: int = 4, proj_input: bool = False):
        self.model, self.batch_size, self.proj_input = model, batch_size, proj_input
        self.blocks = blocks_of(model)
        self.proj_path = architecture_of(model.config).mlp_out
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        sizes = {min(batch_size, rows.shape[0] - start) for start in range(0, rows.shape[0], batch_size)}
        self.calls = {size: self._record(rows[:size], blocks) for size in sizes}

    @torch.no_grad()
    def _record(self, batch: torch.Tensor, wanted: range) -> dict[int, tuple[tuple, dict]]:
        calls: dict[int, tuple[tuple, dict]] = {}

        def before(_m, args, kwargs, i: int):
            calls[i] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            if i == wanted[-1]:
                raise StopForward

        hooks = [self.blocks[i].register_forward_pre_hook(
            lambda m, a, k, i=i: before(m, a, k, i), with_kwargs=True) for i in wanted]
        try:
            self.model(input_ids=batch.to(self.device), use_cache=False)
        except StopForward:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        return calls

    @torch.no_grad()
    def run(self, i: int, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block i on the stream entering it (N, T, H): the stream leaving it and its MLP output
        projection's output, or input (`proj_input`), None where the architecture has none;
        float32 on the CPU."""
        return run_block(self.blocks[i], states, lambda size: self.calls[size][i], self.batch_size, self.device,
                         self.dtype, self.proj_path, self.proj_input)


@torch.no_grad()
def run_block(block: nn.Module, states: torch.Tensor, call: Callable[[int], tuple[tuple, dict]], batch_size: int,
              device: torch.device, dtype: torch.dtype, feature: str | None,
              proj_input: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A block on a stream (N, T, H), `batch_size` rows at a time, each batch called as `call(rows)`
    gives (its arguments besides the hidden states): the stream leaving it and the output, or input
    (`proj_input`), of its MLP output projection at path `feature` (None: not taken); float32 on the CPU."""
    outs, feats = [], []
    hook = None if feature is None else get_path(block, feature).register_forward_hook(
        lambda _m, args, out: feats.append((args[0] if proj_input else _tensor(out)).float().cpu()))
    try:
        for start in range(0, states.shape[0], batch_size):
            x = states[start : start + batch_size].to(device, dtype)
            rest, kwargs = call(x.shape[0])
            outs.append(_tensor(block(x, *rest, **kwargs)).float().cpu())
            if feats:
                feats[-1] = feats[-1].reshape(*x.shape[:2], -1)  # OPT's fc2 runs on (B * T, H)
    finally:
        if hook is not None:
            hook.remove()
    return torch.cat(outs), torch.cat(feats) if feats else None


# --- fits --------------------------------------------------------------------------------------

@dataclass
class Moments:
    """Sufficient statistics, over tokens, of a least-squares fit of U (tokens, H) from features M
    (tokens, F): the projection's output (F = H, ReplaceMe) or its input (F = the MLP's width, refit)."""

    gram: torch.Tensor
    """M^T M (F, F), float64."""
    cross: torch.Tensor
    """M^T U (F, H)."""
    u_sum: torch.Tensor
    """Sum of U over tokens (H,)."""
    u_sq: float
    """Sum of |U|^2: the plain cut's squared error."""
    count: int

    @classmethod
    def of(cls, m: torch.Tensor, u: torch.Tensor, chunk: int = 2048) -> Moments:
        """From (..., H) tensors, every position a token; summed in float64 `chunk` tokens at a
        time (a whole float64 copy of a wide model's features would be the fit's largest tensor)."""
        m, u = m.reshape(-1, m.shape[-1]), u.reshape(-1, u.shape[-1])
        total = None
        for s in range(0, max(1, m.shape[0]), chunk):
            mc, uc = m[s : s + chunk].double(), u[s : s + chunk].double()
            part = cls(mc.T @ mc, mc.T @ uc, uc.sum(0), float((uc * uc).sum()), uc.shape[0])
            total = part if total is None else total + part
        return total

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.gram + other.gram, self.cross + other.cross, self.u_sum + other.u_sum,
                       self.u_sq + other.u_sq, self.count + other.count)

    def ridge(self, alpha: float) -> torch.Tensor:
        """D = (M^T M + lambda I)^-1 M^T U, lambda = alpha tr(M^T M) / H."""
        h = self.gram.shape[0]
        trace = float(self.gram.diagonal().sum())
        lam = alpha * trace / h
        if trace <= 0:  # M is zero (the block's MLP writes nothing): nothing to scale
            return torch.zeros_like(self.cross)
        return torch.linalg.solve(self.gram + lam * torch.eye(h, dtype=self.gram.dtype), self.cross)

    def error(self, delta: torch.Tensor) -> float:
        """Sum over tokens of |M D - U|^2."""
        return float((delta * (self.gram @ delta)).sum() - 2 * (delta * self.cross).sum()) + self.u_sq

    def bias_error(self, mean: torch.Tensor) -> float:
        """Sum over tokens of |mean - U|^2."""
        return self.u_sq - 2 * float(mean @ self.u_sum) + self.count * float(mean @ mean)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-12)


@torch.no_grad()
def update_target(model, block: int, m: torch.Tensor, target: torch.Tensor, out: torch.Tensor,
                  proj_input: bool) -> torch.Tensor:
    """U (N, T, H), what a fit must add to the output y of block `block`'s MLP output projection so
    that the stream leaving the block, `out` now, becomes `target` (the teacher's); `m` is the
    projection's input (`proj_input`, refit) or its output. Where y enters the stream unchanged,
    U = target - out. Through a norm before the residual add (Gemma 2 and 3: N(y) = g * y / rms(y)),
    the stream can only take N's output: the MLP's part must become v = target - (out - N(y)), and N
    reaches v's direction from any y' along v / g (its scale is the norm's to undo, so y' keeps y's
    rms per token), so U = y' - y: the same least squares, on the norm's input. Channels whose gain
    is ~0 cannot be moved through the norm and are asked for nothing."""
    arch = architecture_of(model.config)
    if arch.mlp_norm is None:
        return target - out
    layer = blocks_of(model)[block]
    proj, norm = get_path(layer, arch.mlp_out), get_path(layer, arch.mlp_norm)
    w = proj.weight
    gain = norm(torch.ones(w.shape[0], device=w.device, dtype=w.dtype)).float().cpu()
    live = gain.abs() > 1e-2 * gain.abs().median()
    update = torch.empty_like(target)
    for r in range(0, m.shape[0], 4):  # a few rows at a time: the wide features stay in their store's dtype
        z = m[r : r + 4].to(w.device, w.dtype)
        y = proj(z) if proj_input else z
        normed = norm(y).float().cpu()
        y = y.float().cpu()
        direction = torch.where(live, (target[r : r + 4] - out[r : r + 4] + normed) / torch.where(live, gain, 1.0), 0.0)
        update[r : r + 4] = direction * (_rms(y) / _rms(direction)) - y
    return update


def fit_span(method: str, fit: Moments, held: Moments) -> tuple[torch.Tensor, dict]:
    """The repair's parameter (D for replaceme, the bias for bias), refitted on fit + held-out
    rows, and what the fit measured: the held-out squared error relative to the plain cut's.
    Where no fit beats the plain cut on the held-out rows, the parameter is zero (`alpha` None)."""
    base = max(held.u_sq, 1e-30)
    both = fit + held
    if method == "bias":
        error = held.bias_error(fit.u_sum / fit.count)
        if error >= held.u_sq:
            return torch.zeros(fit.cross.shape[1], dtype=torch.float64), {"heldout_error": 1.0, "kept_plain_cut": True}
        return both.u_sum / both.count, {"heldout_error": error / base}
    errors = {alpha: held.error(fit.ridge(alpha)) for alpha in ALPHAS}
    alpha = min(errors, key=errors.__getitem__)
    info = {"alpha_errors": {f"{a:g}": e / base for a, e in errors.items()}}
    if errors[alpha] >= held.u_sq:
        return torch.zeros_like(fit.cross), {"alpha": None, "heldout_error": 1.0, **info}
    return both.ridge(alpha), {"alpha": alpha, "heldout_error": errors[alpha] / base, **info}


# --- folding into the model ------------------------------------------------------------------

def projection(model, block: int) -> nn.Module:
    return get_path(blocks_of(model)[block], architecture_of(model.config).mlp_out)


@torch.no_grad()
def fold(proj: nn.Module, delta: torch.Tensor) -> None:
    """Make the projection's output y become y (I + D): weights and bias."""
    t = torch.eye(delta.shape[0], dtype=torch.float64) + delta
    w = proj.weight.data
    if hasattr(proj, "nf"):  # transformers' Conv1D: y = x W + b, W (in, out)
        new = w.double() @ t.to(w.device)
    else:  # nn.Linear: y = x W^T + b, W (out, in)
        new = t.T.to(w.device) @ w.double()
    proj.weight.data = new.to(w.dtype)
    if proj.bias is not None:
        proj.bias.data = (proj.bias.data.double() @ t.to(w.device)).to(proj.bias.dtype)


@torch.no_grad()
def refit(proj: nn.Module, delta: torch.Tensor, rows: int = 1024) -> None:
    """Make the projection's output y = x W become x (W + D): D (in, out) added to the weights, in
    float64, `rows` rows at a time (a whole float64 copy of Llama-3.1-8B's down projection is 470 MB),
    into new weights (a search's `patched` keeps the old ones to put back)."""
    w = proj.weight.data
    d = delta if hasattr(proj, "nf") else delta.T  # Conv1D's W is (in, out); nn.Linear's (out, in)
    new = torch.empty_like(w)
    for r in range(0, w.shape[0], rows):
        new[r : r + rows] = (w[r : r + rows].double() + d[r : r + rows].to(w.device)).to(w.dtype)
    proj.weight.data = new


@torch.no_grad()
def add_bias(proj: nn.Module, mean: torch.Tensor) -> None:
    if proj.bias is None:
        raise RepairError("the projection has no bias; build the student with `with_mlp_bias` first")
    proj.bias.data += mean.to(proj.bias.device, proj.bias.dtype)


def with_mlp_bias(model):
    """The model itself if its MLP output projection has a bias, else a copy built with the
    architecture's bias flag (e.g. Llama's `mlp_bias`) and zero biases: the same function."""
    arch = architecture_of(model.config)
    if projection(model, 0).bias is not None:
        return model
    config = copy.deepcopy(model.config)
    setattr(config, arch.mlp_bias, True)
    new = type(model)(config).to(model.dtype)
    missing = new.load_state_dict(model.state_dict(), strict=False).missing_keys
    if any(not key.endswith(".bias") for key in missing):
        raise RepairError(f"turning on {arch.mlp_bias} changed more than biases: {missing[:3]}")
    with torch.no_grad():
        for key in missing:
            new.get_parameter(key).zero_()
    new.generation_config = copy.deepcopy(model.generation_config)
    return new.eval()


APPLY = {"bias": add_bias, "replaceme": fold, "refit": refit}


@contextmanager
def patched(model, edits: dict[int, tuple[str, torch.Tensor]]) -> Iterator[None]:
    """Apply repairs {block: (method, parameter)} to a model's projections for a while, then put
    the weights back (for measuring candidate cuts on the teacher without copying it)."""
    saved = {}
    for block, (method, param) in edits.items():
        proj = projection(model, block)
        saved[block] = (proj.weight.data, None if proj.bias is None else proj.bias.data, proj.bias is None)
        if method == "bias":
            if proj.bias is None:
                proj.bias = nn.Parameter(torch.zeros(param.shape[0], dtype=proj.weight.dtype,
                                                     device=proj.weight.device), requires_grad=False)
            else:
                proj.bias.data = proj.bias.data.clone()
            add_bias(proj, param)
        else:
            APPLY[method](proj, param)
    try:
        yield
    finally:
        for block, (weight, bias, had_none) in saved.items():
            proj = projection(model, block)
            proj.weight.data = weight
            if had_none:
                proj.bias = None
            else:
                proj.bias.data = bias


def heldout_split(rows: torch.Tensor) -> int:
    """How many of the calibration rows (the last ones) are held out to choose lambda."""
    if rows.shape[0] < 2:
        raise RepairError(f"a repair needs at least 2 calibration rows (got {rows.shape[0]}); give more tokens")
    return max(1, rows.shape[0] // 8)


def downstream_blocks(keep: list[int], usable: list[tuple[int, int]]) -> list[int]:
    """The student blocks `--repair-downstream` fits: every kept block after the first span's fitted
    block that is not itself a span's fitted block."""
    span_blocks = {keep.index(a - 1) for a, _ in usable}
    return [i for i in range(min(span_blocks) + 1, len(keep)) if i not in span_blocks]


def needs(n: int, keep: list[int], fit_on: str = "student", downstream: bool = False) -> tuple[set[int], set[int]]:
    """The teacher's streams and MLP features (block indices, as `capture` takes them) the repair
    of the cut that keeps `keep` of n blocks reads: what a caller holding a search's captures keeps."""
    spans = removed_spans(n, keep)
    usable = [(a, b) for a, b in spans if a > 0]
    if not usable:
        return set(), set()
    # the student's stream equals the teacher's up to the first fitted block unless block 0 was cut
    shared = fit_on == "student" and spans[0][0] > 0
    after = downstream_blocks(keep, usable) if downstream else []
    targets = ({b + 1 for _, b in usable} | ({a for a, _ in usable} if fit_on == "teacher" else set())
               | {keep[i] + 1 for i in after})
    return (targets | ({usable[0][0] - 1} if shared else set()),
            {a - 1 for a, _ in usable} if fit_on == "teacher" else set())


def repair(teacher, student, keep: list[int], rows: torch.Tensor, method: str, fit_on: str = "student",
           strengths: tuple[float, ...] = (1.0,), batch_size: int = 4,
           captured: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] | None = None,
           downstream: bool = False):
    """Repair a student cut from `teacher` (keeping blocks `keep`) on calibration rows (N, T).

    With several `strengths`, each span's fit is applied scaled by the one whose student (the
    earlier spans already repaired) is closest to the teacher on the held-out rows, by forward KL.
    `captured`: the teacher's streams and projection outputs on these same rows, if already at hand
    (`capture`'s result; a measured search keeps them), saving a teacher pass.
    `downstream` (student fits only): every other kept block after the first repaired one (none where
    every span starts at block 0) gets the same fit, in order, so that the stream leaving it matches
    the teacher's leaving the same teacher block (what the span fits left of the cut's error, where
    each later block adds to it).
    Returns the repaired student (a new object only when the bias repair had to give the model
    biases) and a record per removed span: the teacher blocks, the block the fit went into, its
    held-out error relative to the plain cut's (and lambda's alpha for replaceme), the strength;
    then one per downstream fit (`downstream: True`, no `span`), in the student's block order.
    """
    problems = repair_problems(teacher.config, method)
    if problems:
        raise RepairError(problems[0].removeprefix("repair: "))
    if method == "none":
        return student, []
    n = len(blocks_of(teacher))
    spans = removed_spans(n, keep)
    usable = [(a, b) for a, b in spans if a > 0]
    held = heldout_split(rows)
    proj_input = fits_from_proj_input(method)
    if method == "bias":
        student = with_mlp_bias(student)
    by_student = fit_on == "student" and bool(usable)
    if downstream and fit_on != "student":
        raise RepairError("the downstream fits run on the student's own stream: fit on the student")
    wanted = needs(n, keep, fit_on, downstream)
    shared = by_student and spans[0][0] > 0  # the student's stream is the teacher's up to the first fit
    span_blocks = {keep.index(a - 1) for a, _ in usable}
    after = downstream_blocks(keep, usable) if downstream and usable else []
    if captured is not None and wanted[0] <= captured[0].keys() and wanted[1] <= captured[1].keys():
        states, projs = captured  # the teacher's activations on these rows, captured already (a search's)
    else:
        states, projs = capture(teacher, rows, *wanted, batch_size, proj_input=proj_input)
    teacher_refs = references(teacher, rows[-held:], batch_size) if len(strengths) > 1 and usable else None
    report: list[dict[str, Any]] = []
    fit = partial(_fit, method, held)
    if by_student:  # one layer-by-layer pass over the student, from its first fitted block on
        at, last = keep.index(usable[0][0] - 1), max(span_blocks | set(after))
        stream = states[usable[0][0] - 1] if shared else capture(student, rows, {at}, set(), batch_size)[0][at]
        walk = _Walk(student, BlockReplay(student, rows, range(at, last + 1), batch_size, proj_input=proj_input),
                     stream, at, after, states, keep, method, proj_input, fit, report)
    for a, b in spans:
        if a == 0:
            report.append({"span": [a, b], "skipped": "no kept block before it to fold a fit into"})
            continue
        j = keep.index(a - 1)
        if fit_on == "teacher":
            m, base, fitted = projs[a - 1], states[a], teacher
        else:
            walk.to(j)  # the blocks up to this span, with the earlier fits folded in
            base, m = walk.replay.run(j, walk.stream)
            fitted = student
        param, info = fit(m, update_target(fitted, j if fitted is student else a - 1, m, states[b + 1], base,
                                           proj_input))
        strength = _strength(student, j, method, param, strengths, rows[-held:], teacher_refs, batch_size, info)
        APPLY[method](projection(student, j), param * strength)
        report.append({"span": [a, b], "block": a - 1, "student_block": j, "strength": strength, **info})
    if after:
        walk.to(len(keep))  # the blocks after the last span
    return student, report


def _fit(method: str, held: int, m: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """One fit of U from M: its parameter from the fit rows, lambda from the last `held` (held-out) ones;
    in the dual form where there are fewer tokens than features (`fit_span_dual`)."""
    if method != "bias" and m.numel() // m.shape[-1] < m.shape[-1]:
        return fit_span_dual(held, m, u)
    return fit_span(method, Moments.of(m[:-held], u[:-held]), Moments.of(m[-held:], u[-held:]))


@torch.no_grad()
def fit_span_dual(held: int, m: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """`fit_span`'s ridge fit (replaceme, refit) in its dual form, for fewer tokens N than features F
    (a wide MLP on little calibration text): D = M^T (M M^T + lambda I)^-1 U is the primal
    (M^T M + lambda I)^-1 M^T U, from N x N systems in place of F x F ones (Llama-3.1-8B's refit on
    1,024 tokens: 1,024^2 where each F x F float64 matrix is 14,336^2 x 8 bytes = 1.6 GB); lambda,
    the held-out choice and the record as `fit_span`'s. The last `held` rows are held out."""
    features, width = m.shape[-1], u.shape[-1]

    def flat(x: torch.Tensor, rows: slice) -> torch.Tensor:
        return x[rows].reshape(-1, x.shape[-1]).double()

    mf, uf, mh, uh = flat(m, slice(None, -held)), flat(u, slice(None, -held)), flat(m, slice(-held, None)), \
        flat(u, slice(-held, None))
    base = max(float((uh * uh).sum()), 1e-30)
    gram, across = mf @ mf.T, mh @ mf.T
    trace = float(gram.diagonal().sum())
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    errors = {}
    for alpha in ALPHAS:  # the held-out prediction M_h D = (M_h M_f^T) A, no F x H matrix per alpha
        pred = across @ torch.linalg.solve(gram + alpha * trace / features * eye, uf) if trace > 0 else 0 * uh
        errors[alpha] = float(((pred - uh) ** 2).sum())
    alpha = min(errors, key=errors.__getitem__)
    info = {"alpha_errors": {f"{a:g}": e / base for a, e in errors.items()}}
    if errors[alpha] >= base:
        return torch.zeros(features, width, dtype=torch.float64), {"alpha": None, "heldout_error": 1.0, **info}
    ma, ua = flat(m, slice(None)), flat(u, slice(None))
    gram = ma @ ma.T
    lam = alpha * float(gram.diagonal().sum()) / features
    delta = ma.T @ torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), ua)
    return delta, {"alpha": alpha, "heldout_error": errors[alpha] / base, **info}


def _strength(student, j: int, method: str, param: torch.Tensor, strengths: tuple[float, ...], held_rows: torch.Tensor,
              refs, batch_size: int, info: dict[str, Any]) -> float:
    """The strength a fit is applied at: the one given, or of several the one whose student is closest
    to the teacher on the held-out rows by forward KL (each KL kept in `info`)."""
    if refs is None:
        return strengths[0]
    gaps = {}
    for s in strengths:
        with patched(student, {j: (method, param * s)}):
            gaps[s] = gap(student, held_rows, "kl", refs, batch_size)
    info["strength_kl"] = {f"{s:g}": v for s, v in gaps.items()}
    return min(gaps, key=gaps.__getitem__)


@dataclass
class _Walk:
    """The student's stream, carried block by block through the fits folded in so far (fits on the
    student): `to(block)` runs it from block `at` to the stream entering `block`, fitting the
    downstream blocks (`after`) on the way, each fit reported."""

    student: Any
    replay: BlockReplay
    stream: torch.Tensor
    at: int
    after: list[int]
    states: dict[int, torch.Tensor]
    keep: list[int]
    method: str
    proj_input: bool
    fit: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
    report: list[dict[str, Any]]

    def to(self, block: int) -> None:
        for i in range(self.at, block):
            out, m = self.replay.run(i, self.stream)
            if i in self.after:
                target = update_target(self.student, i, m, self.states[self.keep[i] + 1], out, self.proj_input)
                param, info = self.fit(m, target)
                APPLY[self.method](projection(self.student, i), param)
                out = self.replay.run(i, self.stream)[0]
                self.report.append({"block": self.keep[i], "student_block": i, "downstream": True, **info})
            self.stream = out
        self.at = block


def refine(teacher, student, blocks: list[int], rows: torch.Tensor, epochs: int, lr: float,
           batch_size: int = 4, seed: int = 0) -> dict:
    """Fit the MLP output projections of the student's `blocks` (a repair's fitted blocks) further
    on the output: `epochs` passes of Adam over the calibration rows (N, T) but the held-out ones, on
    the mean forward KL from the teacher's next-token distribution, every other weight frozen. After
    each pass the held-out KL is measured and the best pass's weights are kept (pass 0: as given),
    so the held-out rows never see a student worse than the repair it started from.
    The teacher's distributions on the fit rows are computed once and kept as 2 H + 1 floats a
    position (`next_token.Reference`: 76 MB for SmolLM2-135M at 16,384 tokens, where float16
    log-probabilities took 1.6 GB). Returns what the
    record keeps: the held-out KL after each pass, the pass kept, the seconds."""
    if not blocks:  # every span started at block 0: nothing was fitted, so nothing to fit further
        return {"epochs": 0, "lr": lr, "blocks": [], "skipped": "no repaired block to fit"}
    started = time.perf_counter()
    held = heldout_split(rows)
    fit, hold = rows[:-held], rows[-held:]
    device = next(student.parameters()).device
    target = next_token.Reference.cat(references(teacher, fit, batch_size))
    hold_refs = references(teacher, hold, batch_size)
    params = [p for j in sorted(set(blocks)) for p in projection(student, j).parameters()]
    trainable = {name: p.requires_grad for name, p in student.named_parameters()}
    student.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    order = torch.Generator().manual_seed(seed)
    heldout = [gap(student, hold, "kl", hold_refs, batch_size)]
    best = [p.detach().clone() for p in params]
    try:
        for _ in range(epochs):
            perm = torch.randperm(fit.shape[0], generator=order)
            for start in range(0, fit.shape[0], batch_size):
                idx = perm[start : start + batch_size]
                loss = next_token.mean_kl(student, fit[idx].to(device), target.rows(idx))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            heldout.append(gap(student, hold, "kl", hold_refs, batch_size))
            if heldout[-1] < min(heldout[:-1]):
                best = [p.detach().clone() for p in params]
    finally:
        with torch.no_grad():
            for p, b in zip(params, best, strict=True):
                p.copy_(b)
        for name, p in student.named_parameters():
            p.requires_grad_(trainable[name])
    kept = min(range(len(heldout)), key=heldout.__getitem__)
    return {"epochs": epochs, "lr": lr, "blocks": sorted(set(blocks)), "heldout_kl": heldout, "kept_epoch": kept,
            "tokens": fit.numel(), "seconds": time.perf_counter() - started}
