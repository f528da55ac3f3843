"""Text the teacher writes: unconditional samples from its own distribution.

Sampling at temperature 1 with no top-k or top-p cut draws from the model's distribution itself,
so the text covers what the teacher knows rather than the domain of whatever corpus is at hand.
Batched with a KV cache allocated once (transformers' StaticCache) and drawn by inverse CDF
(`draw`): transformers' `generate` spent much of each step on copying its growing cache and on
`torch.multinomial`'s random numbers; on 2 CPU cores this loop samples SmolLM2-135M 1.12x faster
(149 against 133 tokens/s, batch 128, one run each). Each step runs the model's body and its head on the
last position only (`next_token.Head.few`: on a CPU by slices of the head's table, 1.4x faster sampling
of Gemma-3-270M's 262k vocabulary on an AMD EPYC). End-of-text does not stop a row unless asked
(the teacher simply goes on to a new document, as in packed pre-training rows).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from lmshrink import next_token

TEACHER_TEXT = "teacher"
"""The calibration source name that means: text sampled from the teacher."""


def start_tokens(tokenizer) -> list[int]:
    """The tokens a sample starts from: what the tokenizer puts before every text (`Framing`:
    Gemma's and Llama 3's `<bos>`), else its BOS token (SmolLM2's `<|im_start|>`), else EOS (GPT-2)."""
    from lmshrink.data.sources import Framing

    start = list(Framing.of(tokenizer).start)
    if start:
        return start
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start samples from")
    return [token]


@torch.inference_mode()
def sample_rows(model, tokenizer, rows: int, length: int, temperature: float = 1.0, seed: int = 0,
                batch_size: int = 64) -> torch.Tensor:
    """(rows, length) token ids sampled from the model, each row starting at `start_tokens`."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    out, started = [], time.perf_counter()
    with tqdm(total=rows * length, unit="tok", unit_scale=True, desc="the teacher writes", leave=False) as bar:
        for start in range(0, rows, batch_size):
            n = min(batch_size, rows - start)
            start_ids = torch.tensor([start_tokens(tokenizer)] * n)
            bar.update(start_ids.numel())
            out.append(continue_rows(model, tokenizer, start_ids, length - start_ids.shape[1],
                                     temperature, on_step=bar.update))
    sampled = torch.cat(out)[:, :length]
    seconds = time.perf_counter() - started
    print(f"  sampled {sampled.numel():,} tokens from the teacher at T {temperature:g} "
          f"({sampled.numel() / seconds:,.0f} tokens/s)", flush=True)
    return sampled


def fingerprint(model) -> str:
    """A digest of a model's weights (names, shapes and the first values of every tensor): any
    training or other checkpoint changes it; computed in milliseconds."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _cache_path(model, tokenizer, rows: int, length: int, temperature: float, seed: int) -> tuple[Any, str]:
    """Where `teacher_rows` keeps these rows in lmshrink's cache, and the key it is kept under."""
    from lmshrink.models import cache_dir

    start = start_tokens(tokenizer)  # one token: the key as before, so earlier caches stay valid
    key = json.dumps([fingerprint(model), rows, length, temperature, seed, start[0] if len(start) == 1 else start])
    return cache_dir() / "teacher-text" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors", key


def teacher_rows(model, tokenizer, rows: int, length: int, temperature: float = 1.0, seed: int = 0) -> torch.Tensor:
    """`sample_rows`, kept in lmshrink's cache (`teacher-text/`) under the teacher's weights and the
    sampling settings: a teacher writes its calibration text once, and every later repair of a cut
    from it reads the same rows back (sampling is most of a repair's time on a CPU)."""
    from safetensors.torch import load_file, save_file

    from lmshrink.integrity import kept
    from lmshrink.records import atomic_file

    path, key = _cache_path(model, tokenizer, rows, length, temperature, seed)
    if kept(path, "the teacher writes it again"):
        ids = load_file(path)["ids"]
        print(f"  {ids.numel():,} teacher-written tokens read from {path}", flush=True)
        return ids
    ids = sample_rows(model, tokenizer, rows, length, temperature, seed)
    with atomic_file(path) as tmp:
        save_file({"ids": ids.contiguous()}, str(tmp), metadata={"settings": key})
    return ids


PROBE_STEPS = 8


def writing_seconds(model, tokenizer, rows: int, length: int, temperature: float = 1.0, seed: int = 0,
                    batch_size: int = 64) -> float:
    """How long `teacher_rows` would take: 0 where the rows are cached, else `sample_rows`' steps
    projected from PROBE_STEPS of them timed at its batch size (the KV cache's growth not counted:
    a little under the real time)."""
    if _cache_path(model, tokenizer, rows, length, temperature, seed)[0].is_file():
        return 0.0
    start_ids = torch.tensor([start_tokens(tokenizer)] * min(batch_size, rows))
    started = time.perf_counter()
    continue_rows(model, tokenizer, start_ids, PROBE_STEPS, temperature)
    per_step = (time.perf_counter() - started) / PROBE_STEPS
    return per_step * (length - start_ids.shape[1]) * math.ceil(rows / batch_size)


NUCLEUS_K = 1024
"""How many of a row's likeliest tokens a nucleus is first looked for in."""


def draw(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), by inverse CDF: a single uniform draw
    per row against the cumulative probabilities (summed in float64). `torch.multinomial` draws one
    random number per vocabulary entry instead: on 2 CPU cores, 180 ms a step for 128 rows of a 49k
    vocabulary, longer than SmolLM2-135M's own forward pass at that batch. With `top_p` < 1 (nucleus
    sampling) only the most likely tokens whose probabilities reach `top_p` together can be drawn."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    order = None
    if top_p < 1:
        probs, order = nucleus(probs, top_p)
    cdf = probs.cumsum(-1, dtype=torch.float64)
    u = torch.rand(len(cdf), 1, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[-1] - 1)  # first cdf > u
    return (picked if order is None else order.gather(-1, picked)).squeeze(-1)


def nucleus(probs: torch.Tensor, top_p: float, k: int = NUCLEUS_K) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's nucleus: its most likely tokens, in order, until their mass reaches `top_p`, as
    (probabilities, zero past the nucleus; token ids). Sorting a 49k vocabulary for 64 rows takes
    ~370 ms on a CPU core and taking the 256 likeliest ~20 ms, so rows whose `k` likeliest tokens
    reach `top_p` (most rows) are cut from those, and only the others are sorted whole: SmolLM2-135M
    wrote 246 tokens/s at top-p 0.9 (219 with k 256; 271 with no nucleus cut; bf16, batch 64)."""
    k = min(k, probs.shape[-1])
    top, order = probs.topk(k, dim=-1)
    wide = top.sum(-1) < top_p
    if wide.any():  # padded with probability 0 (never drawn), then those rows sorted whole
        width = probs.shape[-1] - k
        top, order = torch.nn.functional.pad(top, (0, width)), torch.nn.functional.pad(order, (0, width))
        top[wide], order[wide] = probs[wide].sort(dim=-1, descending=True)
    return top * (top.cumsum(-1) - top < top_p), order  # kept: the mass before the token is under top_p


def _cache(model, length: int):
    """A KV cache allocated once for `length` positions (a growing cache concatenates every layer's
    keys and values at every step: 40% of a decode step on CPU), where the model supports one."""
    from transformers import DynamicCache, StaticCache

    if getattr(model, "_can_compile_fullgraph", False):
        return StaticCache(config=model.config, max_cache_len=length)
    return DynamicCache(config=model.config)


@torch.inference_mode()
def continue_rows(model, tokenizer, prompts: torch.Tensor, new_tokens: int, temperature: float = 1.0,
                  stop_at_eos: bool = False, top_p: float = 1.0,
                  on_step: Callable[[int], object] | None = None) -> torch.Tensor:
    """`prompts` (rows, p) with `new_tokens` sampled after each, batched with a KV cache allocated
    once: (rows, p + new_tokens) on the CPU. Every row has the same prompt length, so no padding
    or attention mask is needed. With `stop_at_eos` a row ends at its first EOS and is padded with
    the pad (else EOS) token after it (sampling stops once every row has ended); else every row
    runs to its length. `on_step(rows)` after each step (a progress bar's update)."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, length = prompts.shape
    out = torch.full((rows, length + new_tokens), pad, dtype=torch.long)
    out[:, :length] = prompts
    cache, ended = _cache(model, length + new_tokens), torch.zeros(rows, dtype=torch.bool)
    parts = next_token.split(model)  # the model's body, then its head on the last position (`Head.few`)
    run = model if parts is None else model.base_model
    takes = inspect.signature(run.forward).parameters  # transformers 5.2x: `cache`, which counts positions itself
    step = {"cache" if "cache" in takes else "past_key_values": cache, "use_cache": True}

    def last_logits(ids: torch.Tensor, start: int) -> torch.Tensor:
        """The next-token logits (rows, V) after `ids` (rows, n), which enter the cache at `start`."""
        at = {"cache_position": torch.arange(start, start + ids.shape[1], device=device)} if "cache_position" in takes else {}
        if parts is None:
            return model(input_ids=ids.to(device), logits_to_keep=1, **at, **step).logits[:, -1]
        return parts[1].few(run(input_ids=ids.to(device), **at, **step).last_hidden_state[:, -1])

    logits = last_logits(prompts, 0)
    for t in range(new_tokens):
        token = torch.where(ended, pad, draw(logits, temperature, top_p).cpu())
        out[:, length + t] = token
        if on_step is not None:
            on_step(rows)
        if stop_at_eos:
            ended |= token == tokenizer.eos_token_id
            if ended.all():
                break
        if t + 1 < new_tokens:
            logits = last_logits(token[:, None], length + t)
    return out
