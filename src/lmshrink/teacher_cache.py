"""`lmshrink cache-teacher`: store a teacher's top-k next-token log-probs once, train many students without it.

The cache is self-contained: the packed training blocks, and for every position the teacher's
k most likely tokens with their log-probabilities at the distillation temperature (the
remaining mass is 1 - sum of those). Per token that is 4 + 6k bytes (k = 32: 196 bytes).
Shards are written atomically and skipped when present, so an interrupted run resumes.

    <cache>/cache.json               teacher, temperature, k, block size, shard layout
    <cache>/tokenizer/               the teacher's tokenizer
    <cache>/shard-00000.safetensors  input_ids (R, T) int32, top_idx (R, T, k) int32, top_logp (R, T, k) fp16
    <cache>/heldout.safetensors      held-out input_ids, for evaluation during distillation
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from lmshrink.config import SettingsError, check, setting, to_dict
from lmshrink.models import load, pick_device
from lmshrink.records import RECORD, atomic_file, provenance, write_json
from lmshrink.training import DataSettings, prepare_data

FORMAT = 1


@dataclass(kw_only=True)
class CacheSettings(DataSettings):
    """Store the teacher's top-k log-probs over packed training data, for distill --teacher-cache."""

    output: str = setting(help="cache folder")
    teacher: str = setting("smollm2-135m", "teacher: folder, Hub id, .gguf file or smollm2-135m")
    top_k: int = setting(32, "teacher tokens kept per position")
    temperature: float = setting(2.0, "temperature of the stored log-probs (distill must use the same)")
    max_tokens: int | None = setting(None, "cache only the first N training tokens")
    batch_size: int = setting(8, "blocks per teacher forward pass")
    shard_blocks: int = setting(256, "blocks per shard file (the unit of resumption)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = setting("float32", "float32, bfloat16 or float16")
    trust_remote_code: bool = setting(False, "allow models with custom code from the Hub")

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.streaming:
            problems.append("streaming: the cache needs a map-style dataset; cap it with --max-tokens instead")
        if self.top_k < 1 or self.batch_size < 1 or self.shard_blocks < 1:
            problems.append("top_k, batch_size, shard_blocks: must be positive")
        if self.temperature <= 0:
            problems.append("temperature: must be positive")
        return problems


def _shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.safetensors"


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def run(settings: CacheSettings) -> Path:

    out = Path(settings.output)
    teacher = load(settings.teacher, settings.dtype, settings.trust_remote_code)
    model = teacher.model.to(pick_device(settings.device))
    train_data, heldout = prepare_data(settings, teacher.tokenizer)
    n_blocks = train_data.num_rows
    if settings.max_tokens is not None:
        n_blocks = min(n_blocks, max(1, settings.max_tokens // settings.block_size))
    layout = {"format": FORMAT, "teacher": settings.teacher, "top_k": settings.top_k,
              "temperature": settings.temperature, "block_size": settings.block_size, "blocks": n_blocks,
              "shard_blocks": settings.shard_blocks, "vocab": len(teacher.tokenizer),
              "data": settings.data, "eval_data": settings.eval_data, "heldout": settings.heldout,
              "seed": settings.seed}
    meta = out / "cache.json"
    if meta.is_file():
        previous = json.loads(meta.read_text())
        if previous.get("layout") != layout:
            check([f"output: {out} holds a cache made with other settings; choose another folder or remove it"])
    else:
        out.mkdir(parents=True, exist_ok=True)
        teacher.tokenizer.save_pretrained(out / "tokenizer")
        if heldout is not None:
            _save({"input_ids": torch.tensor(heldout["input_ids"], dtype=torch.int32)}, out / "heldout.safetensors")
        write_json(meta, provenance("cache-teacher", to_dict(settings), layout=layout, complete=False))
    n_shards = math.ceil(n_blocks / settings.shard_blocks)
    for shard in range(n_shards):
        path = _shard_path(out, shard)
        if path.is_file():
            continue  # finished before an interruption
        lo, hi = shard * settings.shard_blocks, min(n_blocks, (shard + 1) * settings.shard_blocks)
        ids = torch.tensor(train_data[lo:hi]["input_ids"], dtype=torch.long)
        top_idx, top_logp = teacher_top_k(model, ids, settings.top_k, settings.temperature, settings.batch_size)
        _save({"input_ids": ids.int(), "top_idx": top_idx, "top_logp": top_logp}, path)
        print(f"\r  cached shard {shard + 1}/{n_shards} ({hi:,}/{n_blocks:,} blocks)", end="", file=sys.stderr,
              flush=True)
    print(file=sys.stderr)
    record = json.loads(meta.read_text())
    record["complete"] = True
    record["bytes_per_token"] = sum(p.stat().st_size for p in out.glob("shard-*.safetensors")) / (
        n_blocks * settings.block_size)
    write_json(meta, record)
    write_json(out / RECORD, record)  # the finished cache describes itself like every output
    print(f"cached the teacher's top-{settings.top_k} on {n_blocks * settings.block_size:,} tokens "
          f"({record['bytes_per_token']:.0f} bytes/token) in {out}")
    return out


@torch.inference_mode()
def teacher_top_k(model, ids: torch.Tensor, k: int, temperature: float, batch_size: int):
    """Top-k token ids (int32) and log-probs at `temperature` (fp16) for every position: (N, T, k) each."""
    device = next(model.parameters()).device
    idx, logp = [], []
    for i in range(0, ids.shape[0], batch_size):
        logits = model(input_ids=ids[i : i + batch_size].to(device), use_cache=False).logits
        values, indices = F.log_softmax(logits.float() / temperature, dim=-1).topk(k, dim=-1)
        idx.append(indices.int().cpu())
        logp.append(values.half().cpu())
    return torch.cat(idx), torch.cat(logp)


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
            self._open[shard] = safe_open(str(_shard_path(self.folder, shard)), framework="pt")
        f = self._open[shard]
        return {
            "input_ids": f.get_slice("input_ids")[row : row + 1][0].long(),
            "teacher_idx": f.get_slice("top_idx")[row : row + 1][0],
            "teacher_logp": f.get_slice("top_logp")[row : row + 1][0],
        }


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
    record = json.loads(meta.read_text())
    layout = record["layout"]
    if not record.get("complete"):
        raise SettingsError(f"teacher_cache: {folder} is incomplete; re-run the same cache-teacher command to finish it")
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
