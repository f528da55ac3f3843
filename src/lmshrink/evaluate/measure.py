"""Size, speed and memory of a model: parameters, bytes on disk, forward latency and throughput,
generation speed, peak memory (CUDA allocator peak; on CPU the RSS high-water mark of a fresh
process).
"""

from __future__ import annotations

import contextlib
import functools
import io
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lmshrink.models import load


def count_parameters(model) -> int:
    """Parameters, each shared tensor (tied embeddings) counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def disk_bytes(folder: str) -> int | None:
    path = Path(folder)
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))


class PeakMemory:
    """Extra memory a block of code needs at its peak, beyond what was allocated when it started.

    CUDA: the allocator's peak. CPU: the process's resident-set high-water mark (Linux, where
    /proc/self/clear_refs can reset it); None elsewhere. On CPU this is only meaningful in a
    fresh process: memory freed earlier is re-used without raising the RSS (see `fresh_peak_memory`).
    """

    def __init__(self, device: torch.device):
        self.device, self.extra_bytes, self._start = device, None, None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                self._start = _proc_status("VmRSS")
            except OSError:
                self._start = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._start is None:
            return
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _proc_status("VmHWM")
        self.extra_bytes = max(0, peak - self._start)


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def weight_bytes(model) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_ids(model, batch: int, length: int) -> torch.Tensor:
    """A fixed (batch, length) batch of random token ids on the model's device."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    return ids.to(next(model.parameters()).device)


@torch.no_grad()
def speed(model, batch: int, length: int, gen_tokens: int, repeats: int) -> dict[str, float | None]:
    """Forward latency and throughput at batch x length, greedy generation speed, peak memory."""
    device = next(model.parameters()).device
    ids = random_ids(model, batch, length)
    model(input_ids=ids[:, :8], use_cache=False)  # warm-up
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            _sync(device)
            times.append(time.perf_counter() - start)
    latency = statistics.median(times)
    prompt = ids[:1, :16]
    generate = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=gen_tokens, min_new_tokens=gen_tokens,
                    do_sample=False, pad_token_id=0)
    model.generate(prompt, **{**generate, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up (caches, kernels)
    gen_times = []
    for _ in range(max(1, repeats // 2)):
        _sync(device)
        start = time.perf_counter()
        model.generate(prompt, **generate)
        _sync(device)
        gen_times.append(time.perf_counter() - start)
    return {
        "latency_ms": latency * 1000,
        "tokens_per_s": batch * length / latency,
        "generate_tokens_per_s": gen_tokens / statistics.median(gen_times),
        # weights + the activation peak of the timed forward passes (CUDA; CPU: see fresh_peak_memory)
        "peak_memory_mb": (weight_bytes(model) + mem.extra_bytes) / 2**20
        if mem.extra_bytes is not None and device.type == "cuda" else None,
    }


def peak_forward_memory(source: str, batch: int, length: int, dtype: str, trust_remote_code: bool) -> float | None:
    """MB for weights + the activation peak of one forward pass, in this (fresh) process, on CPU."""
    model = load(source, dtype, trust_remote_code).model
    ids = random_ids(model, batch, length)
    with torch.inference_mode():
        model(input_ids=ids[:1, :1], use_cache=False)  # pages in memory-mapped weights before measuring
        with PeakMemory(torch.device("cpu")) as mem:
            model(input_ids=ids, use_cache=False)
    return (weight_bytes(model) + mem.extra_bytes) / 2**20 if mem.extra_bytes is not None else None


# What a measuring process imports before it forks: torch, transformers' model loading and the two
# families most measured; a fork of it starts in milliseconds where a new interpreter spends ~5 s
FORK_PRELOAD = ["lmshrink.evaluate.measure", "transformers.modeling_utils", "transformers.models.auto.modeling_auto",
                "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2"]


@functools.cache
def _fresh_processes():
    """Where `fresh_peak_memory` starts its processes: a fork server that has imported
    `FORK_PRELOAD` and nothing else (no model, no freed memory), so each fork starts clean; spawn
    where there is no fork server (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(FORK_PRELOAD)
    return context


def _peak_into(pipe, environ: dict[str, str], *args: Any) -> None:
    """`peak_forward_memory(*args)` sent down `pipe` as ("ok", MB) or ("error", what went wrong),
    in the caller's environment (the fork server keeps the one it started with; multiprocessing
    itself gives the process the caller's folder and sys.path); the loaders' progress bars and
    warnings kept off the user's terminal."""
    from transformers.utils import logging as hf_logging

    os.environ.clear()
    os.environ.update(environ)
    hf_logging.disable_progress_bar()  # tqdm's bars would also leave semaphores to the parent's resource tracker
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            pipe.send(("ok", peak_forward_memory(*args)))
    except Exception as err:  # any failure: the parent reports it and carries on without the number
        pipe.send(("error", f"{said.getvalue().strip()[-300:]} {type(err).__name__}: {err}".strip()))


def fresh_peak_memory(source: str, batch: int, length: int, dtype: str = "float32",
                      trust_remote_code: bool = False, timeout: float = 900) -> float | None:
    """`peak_forward_memory` measured in a new process, so earlier work in this one does not hide it."""
    context = _fresh_processes()
    receive, send = context.Pipe(duplex=False)
    args = (send, dict(os.environ), source, batch, length, dtype, trust_remote_code)
    process = context.Process(target=_peak_into, args=args, daemon=True)
    process.start()
    send.close()
    try:
        status, value = receive.recv() if receive.poll(timeout) else ("error", f"no answer in {timeout:.0f} s")
    except EOFError:  # the process died without a word: killed (out of memory?) or crashed
        process.join()
        status, value = "error", f"the measuring process ended with exit code {process.exitcode}"
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receive.close()
    if status != "ok":
        print(f"[lmshrink] peak memory of {source} not measured: {value}", file=sys.stderr)
        return None
    return value
