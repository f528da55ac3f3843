"""The `corpus` settings group (`DataArgs`) and the text it names made into training blocks:
sources mixed by weight, packed, a held-out share, the collator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import default_data_collator

from lmshrink.config import setting
from lmshrink.data.sources import DataError, mix_blocks, pack, text_dataset


@dataclass(kw_only=True)
class DataArgs:
    """Where training text comes from and how it is packed (the `corpus` group of pretrain, distill,
    cache-teacher and the LM fine-tuning task)."""

    data: list[str] = setting(
        [], "training text: files, folders, .jsonl(.gz), .parquet, hf:NAME[:CONFIG][:SPLIT], corpus names")
    data_weights: list[float] = setting([], "shares of training tokens from the --data sources, in order (e.g. 1,3): "
                                            "blocks are drawn from each with these odds until one runs out; default: "
                                            "every document of every source once")
    eval_data: list[str] = setting([], "held-out text; if empty, --heldout of the training documents is held out")
    heldout: float = setting(0.02, "fraction of training documents held out for evaluation when --eval-data is empty")
    block_size: int = setting(1024, "tokens per training sequence (the paper: 1024)")
    eval_tokens: int | None = setting(None, "cap on held-out tokens evaluated")
    data_tokens: int | None = setting(None, "train on the first N tokens of the packed training text only (before "
                                            "any shuffling: the blocks a cache-teacher --max-tokens N holds); "
                                            "default: all of it")
    streaming: bool = setting(False, "stream the training data (large Hub datasets); needs max_steps or max_tokens")
    num_proc: int = setting(1, "processes for tokenisation")
    seed: int = setting(42, "random seed (held-out split, data order, initialisation)")

    def problems(self) -> list[str]:
        problems = []
        if not 0 <= self.heldout < 1:
            problems.append("heldout: must be in [0, 1)")
        for name in ("block_size", "num_proc"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be positive")
        if self.data_tokens is not None and self.data_tokens < self.block_size:
            problems.append(f"data_tokens: at least one block ({self.block_size} tokens); got {self.data_tokens}")
        if self.data_weights and (len(self.data_weights) != len(self.data) or min(self.data_weights) < 0
                                  or sum(self.data_weights) <= 0):
            problems.append(f"data_weights: one weight >= 0 per --data source ({len(self.data)}), not all 0; "
                            f"got {self.data_weights}")
        if self.streaming and not self.eval_data:
            problems.append("streaming: give --eval-data (a streamed dataset cannot be split)")
        return problems


def offline_corpus(**changes: Any) -> DataArgs:
    """The offline healing text of the demo, search and study: the Python library reference, with
    the Python tutorial (same manual, other pages) held out; 256-token blocks for a CPU."""
    return DataArgs(**{"data": ["python-docs/library"], "eval_data": ["python-docs/tutorial"], "heldout": 0.0,
                       "block_size": 256, "eval_tokens": 4096, **changes})


def needs_data(corpus: DataArgs) -> list[str]:
    return [] if corpus.data else ["data: give at least one training source"]


def prepare_data(settings: DataArgs, tokenizer) -> tuple[Any, Any]:
    """Packed training and held-out blocks (split by document, so nothing leaks). With --data-weights
    each source is split and packed alone and its blocks drawn with those odds (`mix_blocks`)."""
    if settings.data_weights:  # each source alone; a source of weight 0 is not read
        weighted = [(s, w) for s, w in zip(settings.data, settings.data_weights, strict=True) if w > 0]
        sources, weights = [[s] for s, _ in weighted], [w for _, w in weighted]
    else:
        sources, weights = [settings.data], []
    packed, held = [], []
    for source in sources:
        docs = text_dataset(source, streaming=settings.streaming)
        if not settings.eval_data and settings.heldout > 0:  # with --eval-data, prepare_heldout reads that
            try:
                split = docs.train_test_split(test_size=settings.heldout, seed=settings.seed)
            except ValueError:  # e.g. one document cannot be split
                raise DataError(f"the training data ({', '.join(source)}) holds {docs.num_rows} document(s), too "
                                f"few to hold out {settings.heldout:.0%} of them for evaluation; give --eval-data "
                                "FILE, more documents, or --heldout 0") from None
            docs = split["train"]
            held.append(split["test"])
        train = pack(docs, tokenizer, settings.block_size, settings.num_proc)
        if hasattr(train, "num_rows") and train.num_rows == 0:
            raise DataError(f"the training data ({', '.join(source)}) holds less than one block of "
                            f"{settings.block_size} tokens")
        packed.append(train)
    train = first_blocks(mix_blocks(packed, weights, settings.seed) if len(packed) > 1 else packed[0], settings)
    if len(held) > 1:
        from datasets import concatenate_datasets

        held = [concatenate_datasets(held)]
    return train, prepare_heldout(settings, tokenizer, held[0] if held else None)


def first_blocks(train, settings: DataArgs):
    """The first --data-tokens of the packed training blocks (whole blocks; all of them without it)."""
    if settings.data_tokens is None:
        return train
    n = settings.data_tokens // settings.block_size
    return train.take(n) if settings.streaming else train.select(range(min(n, train.num_rows)))


def prepare_heldout(settings: DataArgs, tokenizer, docs=None):
    """Packed held-out blocks: of `docs` (documents split off the training data) or of
    --eval-data, capped at --eval-tokens; None when there is neither."""
    if settings.eval_data:
        docs = text_dataset(settings.eval_data)
    if docs is None:
        return None
    heldout = pack(docs, tokenizer, settings.block_size, settings.num_proc)
    if heldout.num_rows == 0:
        raise DataError(f"the held-out data holds less than one block of {settings.block_size} tokens; "
                        "give more text, a larger --heldout, or a smaller --block-size")
    return cap_heldout(heldout, settings)


def cap_heldout(heldout, settings: DataArgs):
    """The first --eval-tokens of held-out blocks (at least one block); all of them without a cap."""
    if heldout is None or not settings.eval_tokens:
        return heldout
    return heldout.select(range(min(heldout.num_rows, max(1, settings.eval_tokens // settings.block_size))))


def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack blocks; labels are the inputs (the model shifts them)."""
    batch = default_data_collator(features)
    batch["labels"] = batch["input_ids"].clone()
    return batch
