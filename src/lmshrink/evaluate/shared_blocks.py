"""Blocks a model keeps unchanged from a model scored before it in the same `eval`, not run again.

A student cut from its teacher keeps the teacher's first blocks as they were (the demo's
importance student its first 13, `bottom` all 24 it has): on the same input, what enters its
first changed block is what entered that block in the teacher. Before the first model is scored,
`eval` reads each model's weight files and chains a digest over them (`Chain`: the config but
its depth, the dtype it is loaded in, every tensor outside the blocks, then block by block: its
tensors' bytes and its per-layer config entries). Where a later model's chain meets an earlier
one's for k blocks, the earlier model keeps the stream entering block k of every input it is
scored on (perplexity windows, lm-eval's batches), and the later one starts there
(`architectures.from_block`): the same numbers, k blocks fewer per pass.

Only on a CPU, where a block's pass over the scored text takes far longer than reading its weights
(the other way round on a GPU); only for local folders of safetensors weights; only inputs the
earlier model read exactly (a generation step with a KV cache is never shortened).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from lmshrink.architectures import ARCHITECTURES, architecture_of, blocks_of, from_block, get_path
from lmshrink.models import weight_files

KEPT_BYTES = 2 * 2**30
"""The most the kept streams of one run take (2 GiB); past it a stream is not kept, and the model
that would have started from it runs its first blocks itself."""


class Chain:
    """Digests of a model's weights read from its files: `at(k)` covers the config (depth and per-layer
    lists left out), the dtype it is loaded in, every tensor outside the blocks and blocks 0..k-1, so
    two models with equal `at(k)` compute the same stream entering block k. Blocks are read and hashed
    only as far as a comparison asks."""

    def __init__(self, folder: Path, config: Any, dtype: str):
        from safetensors import safe_open

        arch = architecture_of(config)
        self.depth = getattr(config, arch.layer_count)
        self.per_layer = {name: v for name in arch.per_layer
                          if isinstance(v := getattr(config, name, None), list) and len(v) == self.depth}
        core = {k: v for k, v in config.to_dict().items()
                if k not in (arch.layer_count, *arch.per_layer, "_name_or_path", "transformers_version", "dtype",
                             "torch_dtype")}
        pattern = re.compile(rf"(?:^|\.){re.escape(arch.blocks.split('.')[-1])}\.(\d+)\.(.+)$")
        # (name in the block, name in the file, file) of every tensor, block by block
        self.blocks: list[list[tuple[str, str, Path]]] = [[] for _ in range(self.depth)]
        outside = []
        for path in weight_files(folder):
            with safe_open(str(path), framework="pt") as handle:
                names = list(handle.keys())
            for name in names:
                match = pattern.search(name)
                if match and int(match[1]) < self.depth:
                    self.blocks[int(match[1])].append((match[2], name, path))
                else:
                    outside.append((name, name, path))
        digest = hashlib.sha256(json.dumps([core, dtype], sort_keys=True, default=str).encode())
        self._tensors(digest, outside)
        self.digests = [digest.hexdigest()]

    @staticmethod
    def _tensors(digest, named: list[tuple[str, str, Path]]) -> None:
        """Each tensor's name, shape, dtype and bytes into `digest`, read by a file handle closed after
        (an open memory map would keep every page read counted against this process)."""
        from safetensors import safe_open

        handles: dict[Path, Any] = {}
        for name, stored, path in sorted(named, key=lambda x: x[0]):
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt")
            tensor = handles[path].get_tensor(stored).contiguous()
            digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
            digest.update(memoryview(tensor.view(-1).view(torch.uint8).numpy()))

    def at(self, k: int) -> str:
        while len(self.digests) <= k:
            i = len(self.digests) - 1
            digest = hashlib.sha256(self.digests[-1].encode())
            digest.update(json.dumps({name: values[i] for name, values in self.per_layer.items()}).encode())
            self._tensors(digest, self.blocks[i])
            self.digests.append(digest.hexdigest())
        return self.digests[k]

    def common(self, other: Chain) -> int:
        """Blocks this model shares with `other` from the first on: -1 where even what comes before them differs."""
        if self.at(0) != other.at(0):
            return -1
        k = 0
        while k < min(self.depth, other.depth) and self.at(k + 1) == other.at(k + 1):
            k += 1
        return k


def chain_of(source: str, config: Any, dtype: str) -> Chain | None:
    """A model's `Chain`, or None where it cannot share blocks: not a local folder of safetensors,
    an architecture lmshrink does not know, or blocks the file names do not show."""
    folder = Path(source)
    if getattr(config, "model_type", None) not in ARCHITECTURES or not folder.is_dir() or not weight_files(folder):
        return None
    chain = Chain(folder, config, dtype)
    return chain if all(chain.blocks) else None


class SharedBlocks:
    """Which model of a run starts from which earlier one's stream, and those streams while needed.

    Made from every model's `Chain` in the order they are scored (None: shares nothing);
    `scoring(model, i)` is the context in which model i is scored; `done(i)` drops the streams no
    later model needs."""

    def __init__(self, chains: list[Chain | None]):
        self.chains = chains
        self.start = [0] * len(chains)  # the first block each model runs
        self.keep: list[set[int]] = [set() for _ in chains]  # where each model keeps its streams
        self.readers: dict[str, int] = {}  # a boundary's chain digest: models yet to start from it
        for j, chain in enumerate(chains):
            if chain is None:
                continue
            best, source = 0, None
            for i in range(j):
                if chains[i] is not None and (k := chain.common(chains[i])) > best and k >= self.start[i]:
                    best, source = k, i
            if source is not None:
                self.start[j] = best
                if best > self.start[source]:  # else the stream source started from is kept already
                    self.keep[source].add(best)
                key = chain.at(best)
                self.readers[key] = self.readers.get(key, 0) + 1
        self.streams: dict[tuple[str, str], torch.Tensor] = {}
        self.kept_bytes = 0

    @contextmanager
    def scoring(self, model, i: int) -> Iterator[None]:
        """Model i's forward passes while inside: each input's stream kept where later models start,
        and its own passes started from an earlier model's stream wherever that model read the same input."""
        if self.start[i] == 0 and not self.keep[i]:
            yield
            return
        chain, arch = self.chains[i], architecture_of(model.config)
        blocks, base = blocks_of(model), model.base_model
        current: dict[str, Any] = {}
        stack = ExitStack()

        def before(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            current["key"] = None
            if ids is None or kwargs.get("past_key_values") is not None or kwargs.get("inputs_embeds") is not None:
                return None
            mask = kwargs.get("attention_mask")
            digest = hashlib.sha256(f"{tuple(ids.shape)}".encode())
            digest.update(ids.detach().cpu().numpy().tobytes())
            if mask is not None:
                digest.update(mask.detach().cpu().numpy().tobytes())
            current["key"] = digest.hexdigest()
            stream = self.streams.get((chain.at(self.start[i]), current["key"])) if self.start[i] else None
            if stream is None:
                return None
            stack.enter_context(from_block(model, list(range(len(blocks))), self.start[i], stream))
            return args, {**kwargs, "use_cache": False}  # the skipped blocks would leave holes in a cache

        def after(_module, _args, _output):
            stack.close()

        def keeper(k: int):
            def grab(_module, args, kwargs):
                key = (chain.at(k), current.get("key"))
                stream = args[0] if args else kwargs["hidden_states"]
                size = stream.numel() * stream.element_size()
                if key[1] is not None and key not in self.streams and self.kept_bytes + size <= KEPT_BYTES:
                    self.streams[key] = stream.detach()
                    self.kept_bytes += size
            return grab

        hooks = [base.register_forward_pre_hook(before, with_kwargs=True), base.register_forward_hook(after)]
        for k in self.keep[i]:
            module = blocks[k] if k < len(blocks) else get_path(model, arch.final_norm)
            hooks.append(module.register_forward_pre_hook(keeper(k), with_kwargs=True))
        try:
            yield
        finally:
            stack.close()
            for hook in hooks:
                hook.remove()

    def done(self, i: int) -> None:
        """Model i is scored: the streams it started from are dropped once no later model needs them."""
        if self.start[i] == 0:
            return
        key = self.chains[i].at(self.start[i])
        self.readers[key] -= 1
        if self.readers[key] == 0:
            for name in [n for n in self.streams if n[0] == key]:
                stream = self.streams.pop(name)
                self.kept_bytes -= stream.numel() * stream.element_size()
