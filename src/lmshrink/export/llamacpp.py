"""llama.cpp as an evaluation runtime: a GGUF file scored by llama.cpp itself, through llama-cpp-python.

llama-cpp-python is an optional extra (`make llamacpp`; it compiles llama.cpp, about 9 minutes
on 2 cores). Perplexity uses lmshrink's own windows (`lmshrink.evaluate.perplexity`) over llama.cpp's
logits and llama.cpp's own tokenizer, so the numbers are those of the file as users run it.
Speed is llama.cpp's: prompt processing (tokens/s over one prompt of `length` tokens) and greedy
generation (tokens/s, one token at a time with its KV cache).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmshrink.errors import LmshrinkError
from lmshrink.integrity import gguf_problem

INSTALL = "pip install llama-cpp-python (or `make llamacpp`; it compiles llama.cpp, about 9 minutes on 2 cores)"


class LlamaCppError(LmshrinkError, RuntimeError):
    pass


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def open_gguf(path: str | Path, n_ctx: int = 512, threads: int | None = None):
    """A llama.cpp model of a GGUF file, keeping the logits of every position."""
    if not available():
        raise LlamaCppError(f"--runtime llamacpp needs llama-cpp-python: {INSTALL}")
    from llama_cpp import Llama

    check_file(path)
    threads = threads or torch.get_num_threads()
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                 n_threads_batch=threads, logits_all=True, verbose=False)


def check_file(path: str | Path) -> None:
    """A GGUF file that exists and is whole (magic, version, every tensor inside it), else one line."""
    if not Path(path).is_file():
        raise LlamaCppError(f"{path} does not exist; give a .gguf file (`lmshrink export` writes them)")
    if problem := gguf_problem(Path(path)):
        raise LlamaCppError(f"{path}: {problem}; export it again (`lmshrink export`)")


class Tokenizer:
    """llama.cpp's tokenizer with the slice of the transformers interface `lmshrink.data.sources` uses."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.eos_token_id = llm.token_eos()

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=False)}

    def __len__(self) -> int:
        return self.llm.n_vocab()


def logits(llm):
    """(B, T) ids -> (B, T, V) float32 logits, each row evaluated from an empty context."""

    def forward(ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in ids.tolist():
            llm.reset()
            llm.eval(row)
            rows.append(torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32)))
        return torch.stack(rows)

    return forward


def speed(llm, length: int, gen_tokens: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """Prompt latency and throughput at 1 x length, and greedy generation speed (median of repeats)."""
    ids = torch.randint(3, llm.n_vocab(), (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    llm.reset()
    llm.eval(ids[:8])  # warm-up
    prompt = []
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        prompt.append(time.perf_counter() - start)
    gen = []
    for _ in range(max(1, repeats // 2)):
        llm.reset()
        llm.eval(ids[:16])
        start = time.perf_counter()
        for _ in range(gen_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        gen.append(time.perf_counter() - start)
    latency = statistics.median(prompt)
    return {"latency_ms": latency * 1000, "tokens_per_s": length / latency,
            "generate_tokens_per_s": gen_tokens / statistics.median(gen), "peak_memory_mb": None}


def describe(path: str | Path) -> dict[str, Any]:
    """Blocks, parameters and a vocabulary key (equal for files with the same tokens) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    blocks = reader.fields.get(f"{arch}.block_count")
    return {"layers": int(blocks.contents()) if blocks else None,
            "parameters": sum(int(np.prod([int(d) for d in t.shape])) for t in reader.tensors),
            "architecture": arch, "vocab_id": hash(tuple(reader.fields["tokenizer.ggml.tokens"].contents()))}
