"""How close a training run comes to the hardware: model FLOPs per token and the device's peak.

Model FLOPs utilisation (MFU, PaLM appendix B) = achieved model FLOP/s / peak FLOP/s, where a
trained token costs 6 x (block and head parameters) + 12 x layers x width x sequence FLOPs
(forward and backward, attention scores included) and a frozen teacher's forward a third of
that. The peak is measured, not looked up: a large matrix product in the precision the run
computes in (bf16 on GPUs that have it, fp32 on CPU), once per process, and the highest
measurement on a device is kept (a busy moment measures low).
"""

from __future__ import annotations

import functools
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn


def matmul_parameters(model: nn.Module, trainable: bool = False) -> int:
    """Parameters that cost a multiply-add per token: every parameter but the input and position
    embeddings (lookups), plus the output head, which a tied model shares with its embedding
    (`trainable`: only those that train, whose weight gradients cost the same again)."""
    params = {id(p): p for p in model.parameters() if p.requires_grad or not trainable}
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings()
    total = sum(p.numel() for i, p in params.items() if i not in lookups)
    if head is not None and id(head.weight) in lookups and id(head.weight) in params:  # tied: the head is a matmul too
        total += head.weight.numel()
    return total


def flops_per_token(model: nn.Module, sequence: int, training: bool = True) -> float:
    """Model FLOPs of one token at sequence length `sequence`: 2N + 4 L d s forward; training adds
    the backward pass, 2N + 8 L d s for the activations' gradients and 2N' for the weights' (N' the
    matmul parameters that train: N unless some are frozen, so 6N + 12 L d s)."""
    config = model.config  # transformers maps these names onto every family's own (GPT-2: n_layer, n_embd)
    n, attention = matmul_parameters(model), 4 * config.num_hidden_layers * config.hidden_size * sequence
    if not training:
        return 2 * n + attention
    return (2 * n + attention) + (2 * n + 2 * attention) + 2 * matmul_parameters(model, trainable=True)


@functools.cache
def peak_flops(device_type: str, dtype: torch.dtype) -> float:
    """The device's matmul peak in `dtype`: the highest of this measurement and every earlier one
    on the same device (kept in the cache folder), so that one measurement taken while the machine
    was busy does not make every later MFU too high."""
    from lmshrink.models import cache_dir
    from lmshrink.records import write_json

    measured = measure_peak_flops(device_type, dtype)
    path = cache_dir() / "peak-flops.json"
    key = f"{device_name(device_type)} | {_processor() if device_type == 'cpu' else ''} | {dtype} | torch {torch.__version__}"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if measured > known.get(key, 0.0):
        known[key] = measured
        try:
            write_json(path, known)
        except OSError:  # a read-only cache: this measurement serves this process
            pass
    return max(measured, known[key])


def measure_peak_flops(device_type: str, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix product on this device, in `dtype` (the best of a few)."""
    size, repeats = (8192, 10) if device_type == "cuda" else (1024, 4)
    rng = torch.Generator(device_type).manual_seed(0)  # its own: training's random stream is left as it was
    a, b = (torch.randn(size, size, device=device_type, dtype=dtype, generator=rng) for _ in range(2))
    best = float("inf")
    for i in range(repeats + 2):
        if device_type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device_type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # two warm-ups
            best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def _processor() -> str:
    """The CPU's model name (Linux), so that a cache folder shared between machines keeps one peak each."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"
