"""`lmshrink cache-teacher`: store a teacher's top-k next-token log-probs once (the format is in
`lmshrink.heal.teacher_cache`), so that many students train without the teacher."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lmshrink.config import Settings, check, group, setting, to_dict
from lmshrink.heal.corpus import DataArgs, needs_data, prepare_data
from lmshrink.heal.teacher_cache import FORMAT, save_tensors, shard_path, teacher_samples, teacher_top_k
from lmshrink.integrity import kept, problem
from lmshrink.models import LoadArgs, pick_device
from lmshrink.records import RECORD, holding_output, provenance, write_json


@dataclass(kw_only=True)
class CacheSettings(Settings):
    """Store the teacher's top-k log-probs over packed training data, for distill --teacher-cache."""

    output: str = setting(help="cache folder")
    teacher: str = setting("smollm2-135m", "teacher: folder, Hub id, .gguf file or smollm2-135m")
    top_k: int = setting(32, "teacher tokens kept per position: its most likely ones")
    sampled: int | None = setting(None, "instead of the top-k, draw this many tokens per position from the teacher's "
                                        "distribution at --temperature: an unbiased estimate of it (random-sampling "
                                        "KD); distill then trains on the forward KL")
    temperature: float = setting(2.0, "temperature of the stored log-probs (distill must use the same)")
    max_tokens: int | None = setting(None, "cache only the first N training tokens")
    batch_size: int = setting(8, "blocks per teacher forward pass")
    shard_blocks: int = setting(256, "blocks per shard file (the unit of resumption)")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    load: LoadArgs = group(LoadArgs, "how the models are loaded")
    corpus: DataArgs = group(DataArgs, "the training and held-out text the teacher is run on")

    def problems(self) -> list[str]:
        problems = needs_data(self.corpus) + super().problems()
        if self.corpus.streaming:
            problems.append("streaming: the cache needs a map-style dataset; cap it with --max-tokens instead")
        if self.corpus.data_tokens is not None:
            problems.append("data_tokens: a cache's first tokens are chosen with --max-tokens (which also caps its "
                            f"held-out share); give --max-tokens {self.corpus.data_tokens}")
        if self.top_k < 1 or self.batch_size < 1 or self.shard_blocks < 1 or (self.sampled is not None
                                                                             and self.sampled < 1):
            problems.append("top_k, sampled, batch_size, shard_blocks: must be positive")
        if self.temperature <= 0:
            problems.append("temperature: must be positive")
        return problems


@holding_output
def run(settings: CacheSettings) -> Path:
    settings = dataclasses.replace(settings, load=settings.load.on(settings.device))  # recorded as run
    out = Path(settings.output)
    teacher = settings.load.load(settings.teacher)
    model = teacher.model.to(pick_device(settings.device))
    corpus = settings.corpus
    train_data, heldout = prepare_data(corpus, teacher.tokenizer)
    n_blocks = train_data.num_rows
    if settings.max_tokens is not None:
        n_blocks = min(n_blocks, max(1, settings.max_tokens // corpus.block_size))
        if heldout is not None and corpus.eval_tokens is None:  # --heldout of what is cached, not of the corpus
            cap = max(1, math.ceil(n_blocks * corpus.heldout / (1 - corpus.heldout)))
            heldout = heldout.select(range(min(heldout.num_rows, cap)))
    layout = {"format": FORMAT, "teacher": settings.teacher, "top_k": settings.top_k,
              "temperature": settings.temperature, "block_size": corpus.block_size, "blocks": n_blocks,
              "shard_blocks": settings.shard_blocks, "vocab": len(teacher.tokenizer),
              "data": corpus.data, "eval_data": corpus.eval_data, "heldout": corpus.heldout,
              "seed": corpus.seed, **({"sampled": settings.sampled} if settings.sampled else {})}
    meta = out / "cache.json"
    if meta.is_file() and (damage := problem(meta)):
        check([f"output: {meta} is damaged ({damage}), so what its shards were made with is unknown; give another "
               "folder, or remove this one"])
    if meta.is_file():
        previous = json.loads(meta.read_text())
        if previous.get("layout") != layout:
            check([f"output: {out} holds a cache made with other settings; choose another folder or remove it"])
    else:
        out.mkdir(parents=True, exist_ok=True)
        teacher.tokenizer.save_pretrained(out / "tokenizer")
        write_json(meta, provenance("cache-teacher", to_dict(settings), layout=layout, complete=False))
    if heldout is not None and not kept(out / "heldout.safetensors", "it is written again"):
        save_tensors({"input_ids": torch.tensor(heldout["input_ids"], dtype=torch.int32)}, out / "heldout.safetensors")
    n_shards = math.ceil(n_blocks / settings.shard_blocks)
    for shard in range(n_shards):
        path = shard_path(out, shard)
        if kept(path, "it is computed again"):
            continue  # finished before an interruption
        lo, hi = shard * settings.shard_blocks, min(n_blocks, (shard + 1) * settings.shard_blocks)
        ids = torch.tensor(train_data[lo:hi]["input_ids"], dtype=torch.long)
        if settings.sampled:  # drawn with the shard's own seed, so a shard made again is the same shard
            top_idx, top_logp, entropy = teacher_samples(model, ids, settings.sampled, settings.temperature,
                                                         settings.batch_size, corpus.seed + shard)
            extra = {"entropy": entropy}
        else:
            top_idx, top_logp = teacher_top_k(model, ids, settings.top_k, settings.temperature, settings.batch_size)
            extra = {}
        save_tensors({"input_ids": ids.int(), "top_idx": top_idx, "top_logp": top_logp, **extra}, path)
        print(f"\r  cached shard {shard + 1}/{n_shards} ({hi:,}/{n_blocks:,} blocks)", end="", file=sys.stderr,
              flush=True)
    print(file=sys.stderr)
    record = json.loads(meta.read_text())
    record["complete"] = True
    record["bytes_per_token"] = sum(p.stat().st_size for p in out.glob("shard-*.safetensors")) / (
        n_blocks * corpus.block_size)
    write_json(meta, record)
    write_json(out / RECORD, record)  # the finished cache describes itself like every output
    what = f"{settings.sampled} samples" if settings.sampled else f"top-{settings.top_k}"
    print(f"cached the teacher's {what} on {n_blocks * corpus.block_size:,} tokens "
          f"({record['bytes_per_token']:.0f} bytes/token) in {out}")
    return out
