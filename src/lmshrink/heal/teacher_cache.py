"""The teacher cache: a teacher's next-token distribution over packed training blocks, stored
once so that many students train without the teacher (`lmshrink cache-teacher` writes it,
`lmshrink distill --teacher-cache` reads it).

The cache is self-contained: the packed training blocks, and for every position either the
teacher's k most likely tokens with their log-probabilities at the distillation temperature (the
remaining mass is 1 - sum of those; a biased estimate of the distribution), or (`--sampled K`)
K tokens drawn from it, stored the same way as each distinct token with log(count / K), an
unbiased estimate, plus the teacher's entropy. Per token that is 4 + 6k bytes (k = 32: 196
bytes), and 6 + 6K for a sampled cache (at most K distinct tokens).
Shards are written atomically and skipped when present, so an interrupted run resumes.

    <cache>/cache.json               teacher, temperature, k, block size, shard layout
    <cache>/lmshrink.json            the same record, once the cache is complete
    <cache>/tokenizer/               the teacher's tokenizer
    <cache>/shard-00000.safetensors  input_ids (R, T) int32, top_idx (R, T, k) int32, top_logp (R, T, k) fp16
                                     (a sampled cache: also entropy (R, T) fp16)
    <cache>/heldout.safetensors      held-out input_ids, for evaluation during distillation
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from lmshrink import next_token
from lmshrink.config import SettingsError
from lmshrink.integrity import problem
from lmshrink.records import atomic_file

FORMAT = 1


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.safetensors"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


@torch.inference_mode()
def per_position(model, ids: torch.Tensor, batch_size: int, of: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]):
    """`of` applied to the teacher's logits of rows `ids` (N, T), `batch_size` rows and a chunk of positions
    at a time over the vocabulary (`lmshrink.next_token`); its tensors (each (rows, positions, ...))
    joined back into (N, T, ...), on the CPU."""
    rows = []
    for i in range(0, ids.shape[0], batch_size):
        chunks = [of(logits) for logits in next_token.logit_chunks(model, ids[i : i + batch_size])]
        rows.append([torch.cat(parts, 1).cpu() for parts in zip(*chunks, strict=True)])
    return tuple(torch.cat(parts) for parts in zip(*rows, strict=True))


def teacher_top_k(model, ids: torch.Tensor, k: int, temperature: float, batch_size: int):
    """Top-k token ids (int32) and log-probs at `temperature` (fp16) for every position: (N, T, k) each."""
    def top(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best = F.log_softmax(logits.float() / temperature, dim=-1).topk(k, dim=-1)
        return best.indices.int(), best.values.half()

    return per_position(model, ids, batch_size, top)


ZERO_MASS = torch.finfo(torch.float16).min
"""The log-prob of a sampled cache's unused slot: exp() is 0, and unlike -inf it never makes 0 * inf."""


def sample_counts(logits: torch.Tensor, k: int, temperature: float, generator: torch.Generator | None = None):
    """`k` tokens per position drawn with replacement from softmax(logits / temperature) (..., V), as a
    top-k cache stores its tokens: each distinct token drawn once, with log(count / k), so the stored
    distribution is an unbiased estimate of the teacher's (random-sampling KD, arXiv 2503.16870);
    unused slots repeat the first token with zero mass (`ZERO_MASS`). Also the teacher's entropy at
    each position, from which the distillation loss is reported as the forward KL.
    Returns ids (..., k) int32, log-probs (..., k) fp16, entropy (...) fp16."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    draws = torch.multinomial(logp.exp().flatten(0, -2), k, replacement=True, generator=generator)
    draws = draws.view(*logits.shape[:-1], k).sort(-1).values
    new = torch.ones_like(draws, dtype=torch.bool)
    new[..., 1:] = draws[..., 1:] != draws[..., :-1]
    group = new.cumsum(-1) - 1  # slot of each draw's distinct token
    counts = torch.zeros_like(draws).scatter_add_(-1, group, torch.ones_like(draws))
    ids = torch.zeros_like(draws).scatter_(-1, group, draws)
    ids = torch.where(counts > 0, ids, ids[..., :1])
    mass = torch.where(counts > 0, (counts.float() / k).log(), torch.full_like(counts, ZERO_MASS, dtype=torch.float))
    return ids.int(), mass.half(), entropy.half()


def teacher_samples(model, ids: torch.Tensor, k: int, temperature: float, batch_size: int, seed: int):
    """`sample_counts` at every position of rows `ids` (N, T): ids and log-probs (N, T, k), entropy (N, T)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    return per_position(model, ids, batch_size, lambda logits: sample_counts(logits, k, temperature, generator))


class CachedBlocks(torch.utils.data.Dataset):
    """Training blocks with the teacher's top-k, read lazily from the shards (memory-mapped)."""

    def __init__(self, folder: Path, blocks: int, shard_blocks: int):
        self.folder, self.blocks, self.shard_blocks = folder, blocks, shard_blocks
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.blocks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        shard, row = divmod(i, self.shard_blocks)
        if shard not in self._open:
            f = safe_open(str(shard_path(self.folder, shard)), framework="pt")
            self._open[shard] = f, "entropy" in f.keys()  # the entropy: a sampled cache
        f, sampled = self._open[shard]
        item = {
            "input_ids": f.get_slice("input_ids")[row : row + 1][0].long(),
            "teacher_idx": f.get_slice("top_idx")[row : row + 1][0],
            "teacher_logp": f.get_slice("top_logp")[row : row + 1][0],
        }
        if sampled:
            item["teacher_entropy"] = f.get_slice("entropy")[row : row + 1][0]
        return item


@dataclass
class TeacherCache:
    dataset: CachedBlocks
    heldout: Any
    tokenizer: Any
    block_size: int
    record: dict[str, Any]


def open_cache(folder: str, temperature: float) -> TeacherCache:
    """A finished cache, checked against the distillation temperature."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    path = Path(folder)
    meta = path / "cache.json"
    if not meta.is_file():
        raise SettingsError(f"teacher_cache: {folder} is not a teacher cache (no cache.json); run lmshrink cache-teacher")
    if damage := problem(meta):
        raise SettingsError(f"teacher_cache: {meta} is damaged ({damage}); make the cache again (cache-teacher into "
                            "another folder)")
    record = json.loads(meta.read_text())
    layout = record["layout"]
    if not record.get("complete"):
        raise SettingsError(f"teacher_cache: {folder} is incomplete; re-run the same cache-teacher command to finish it")
    shards = [shard_path(path, i) for i in range(math.ceil(layout["blocks"] / layout["shard_blocks"]))]
    for file in [*shards, *[f for f in [path / "heldout.safetensors"] if f.exists()]]:
        if damage := problem(file):  # found now, not steps into a training run
            raise SettingsError(f"teacher_cache: {file} is {damage if damage == 'missing' else f'damaged ({damage})'}; "
                                "run the same cache-teacher command again: it computes what is missing or damaged")
    if not math.isclose(layout["temperature"], temperature):
        raise SettingsError(f"temperature: the cache stores log-probs at T={layout['temperature']}; "
                            f"use --temperature {layout['temperature']} or re-cache")
    heldout = None
    if (path / "heldout.safetensors").is_file():
        with safe_open(str(path / "heldout.safetensors"), framework="pt") as f:
            heldout = Dataset.from_dict({"input_ids": f.get_tensor("input_ids").long().tolist()})
    return TeacherCache(CachedBlocks(path, layout["blocks"], layout["shard_blocks"]), heldout,
                        AutoTokenizer.from_pretrained(path / "tokenizer"), layout["block_size"],
                        {"teacher": layout["teacher"], **layout})
