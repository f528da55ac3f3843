"""Models bigger than memory, one block at a time (llm-compressor's sequential onloading, GPTQ's
layer-by-layer pass): the model is built on the meta device, its weights stay in its safetensors
files (memory-mapped, read lazily) and each block is materialised in float32 while the
calibration rows' hidden states pass through it, then dropped again.

What is held at once: the model's non-block weights (embeddings, final norm, head; fp32), one
block's weights (fp32), and the hidden states the caller keeps (N rows x T tokens x H x 4 bytes
each). What a block is called with besides its hidden states (masks, positions, rotary
embeddings, per-layer attention kinds) is recorded from one lazy forward pass over the first rows,
as `repair.BlockReplay` records it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmshrink.architectures import architecture_of, blocks_of, get_path, student_config
from lmshrink.compress.repair import StopForward, patched, run_block
from lmshrink.compress.width import Plan, layout_of, pruned_config
from lmshrink.data.sources import Framing
from lmshrink.errors import LmshrinkError
from lmshrink.evaluate.perplexity import framed_windows
from lmshrink.losses import forward_kl
from lmshrink.models import device_memory, release_freed_memory, weight_files
from lmshrink.next_token import Head, Reference, chunk_positions, kl_chunk, linear_head, reference_of

SEQUENTIAL = ("auto", "on", "off")


class SequentialError(LmshrinkError, ValueError):
    pass


def checkpoint_folder(source: str) -> Path:
    """The local folder holding a model's safetensors (a Hub id: its snapshot, weights and configs only)."""
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    if not any(folder.glob("*.safetensors")):
        raise SequentialError(f"{source} holds no safetensors weights, which the block-by-block path reads one block "
                              "at a time; save the model with save_pretrained (safetensors), or use --sequential off")
    return folder


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def safetensors_index(path: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    """Where a safetensors file's data starts, and each tensor's dtype, shape and byte range in it."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


class LazyWeights:
    """A checkpoint's tensors by the model's names for them (transformers' renamings on load applied:
    GPT-NeoX's `embed_out` is the model's `lm_head`), each read from its safetensors file when asked,
    by plain reads (a memory map would keep every page read resident, counted against the process,
    until the run ends: the whole checkpoint, by the last block)."""

    def __init__(self, folder: Path, model):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        transforms = get_model_conversion_mapping(model)
        if any(type(t) is not WeightRenaming for t in transforms):
            raise SequentialError(f"a {model.config.model_type} checkpoint's tensors are converted as they load, "
                                  "which the block-by-block path does not do; use --sequential off")
        renames = [(pattern, t.target_patterns[min(i, len(t.target_patterns) - 1)])
                   for t in transforms for i, pattern in enumerate(t.source_patterns)]
        self.folder = folder
        self.where: dict[str, tuple[Path, int, dict[str, Any]]] = {}  # the model's name: (file, data start, entry)
        for file in weight_files(folder):
            start, header = safetensors_index(file)
            for key, entry in header.items():
                name = key
                for pattern, target in renames:
                    name = re.sub(pattern, target, name)
                self.where[name] = (file, start, entry)
        self.prefix = model.base_model_prefix  # (`model`, `transformer`): some checkpoints leave it out

    def _entry(self, name: str) -> tuple[Path, int, dict[str, Any]]:
        for key in (name, name.removeprefix(f"{self.prefix}."), f"{self.prefix}.{name}"):
            if key in self.where:
                return self.where[key]
        raise SequentialError(f"the checkpoint has no tensor {name!r}; it does not match the model's config "
                              "(re-save it with save_pretrained), or use --sequential off")

    def stored(self, name: str) -> Stored:
        """Where a tensor's bytes are, to copy them as they are (`ShardWriter`)."""
        path, start, entry = self._entry(name)
        begin, end = entry["data_offsets"]
        return Stored(path, start + begin, entry["dtype"], tuple(entry["shape"]), end - begin)

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's stored dtype, from the file's header (nothing read)."""
        return SAFETENSORS_DTYPES.get(self._entry(name)[2]["dtype"], torch.float32)

    def read(self, name: str) -> torch.Tensor:
        path, start, entry = self._entry(name)
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise SequentialError(f"{name} is stored as {entry['dtype']}, which the block-by-block path does not "
                                  "read; use --sequential off")
        begin, end = entry["data_offsets"]
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        data = bytearray(end - begin)
        with path.open("rb") as f:
            f.seek(start + begin)
            f.readinto(data)
        return torch.frombuffer(data, dtype=dtype).reshape(entry["shape"])


def lazy_model(source: str, config: Any, device: torch.device) -> tuple[Any, LazyWeights]:
    """The causal LM of `config` with its parameters on the meta device (its buffers real) and its
    non-block weights read in (on `device`: the token embeddings in their stored dtype, the rest in
    float32; an untied head is left to its first use); the weights to read the rest from."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval().requires_grad_(False)
    weights = LazyWeights(checkpoint_folder(source), model)
    blocks = architecture_of(config).blocks + "."
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    head = next(f"{n}.weight" for n, m in model.named_modules() if m is model.get_output_embeddings())
    embedding = next(f"{n}.weight" for n, m in model.named_modules() if m is model.get_input_embeddings())
    for name, _ in model.named_parameters():
        # a tied head is the embeddings; an untied one is read when a loss needs it (`Blockwise.nll`)
        if not name.startswith(blocks) and name != head:
            # the vocabulary-sized table stays in the checkpoint's dtype (the stream and the head's
            # products are float32 all the same): on Llama-3.1-8B 1.05 GB instead of 2.1
            _materialise(model, name, weights.read(name), device, keep_dtype=name == embedding)
    if tied:
        model.tie_weights()
    # the stream is float32 from the start, whatever the table's dtype
    model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.float())
    for module in model.modules():  # the buffers (rotary frequencies, masks) where the weights go
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    return model, weights


def _materialise(module: torch.nn.Module, name: str, tensor: torch.Tensor, device: torch.device,
                 keep_dtype: bool = False) -> None:
    *parents, leaf = name.split(".")
    owner = get_path(module, ".".join(parents)) if parents else module
    value = tensor.to(device) if keep_dtype else tensor.to(device, torch.float32)
    owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


class Blockwise:
    """Runs a lazily loaded model block by block over calibration rows (N, T): `entering()` is the
    stream entering block 0, `run(i, states)` block i on a stream, `nll(states)` the next-token loss
    of a stream leaving the last block. `block(i)` holds block i's weights while inside."""

    def __init__(self, model, weights: LazyWeights, rows: torch.Tensor, batch_size: int):
        self.model, self.weights, self.rows, self.batch_size = model, weights, rows, batch_size
        self.device = next(p.device for p in model.parameters() if p.device.type != "meta")
        self.arch = architecture_of(model.config)
        self.blocks = blocks_of(model)
        self.held: int | None = None
        self.edits: dict[int, tuple[str, torch.Tensor]] = {}  # repairs folded into a block each time it is read
        self.trained: dict[int, dict[str, torch.Tensor]] = {}  # its MLP output projection's tensors, after the fold
        self.calls: dict[int, tuple[tuple, dict]] = {}  # recorded at the first block run (a lazy pass over all)

    @contextmanager
    def block(self, i: int) -> Iterator[torch.nn.Module]:
        """Block i with its weights read in (fp32) and its repair (`edits`) folded in, dropped again on
        the way out."""
        block, prefix = self.blocks[i], f"{self.arch.blocks}.{i}"
        for name, _ in block.named_parameters():
            _materialise(block, name, self.weights.read(f"{prefix}.{name}"), self.device)
        previous, self.held = self.held, i
        try:
            with patched(self.model, {i: self.edits[i]} if i in self.edits else {}):  # a bias repair: one added
                proj = get_path(block, self.arch.mlp_out)
                folded = {name: proj._parameters[name] for name in self.trained.get(i, {})}
                proj._parameters.update(self.trained.get(i, {}))  # `refine_blockwise`'s, in place of the fold
                try:
                    yield block
                finally:
                    proj._parameters.update(folded)
        finally:
            for module in block.modules():  # the weights dropped; buffers (not in the checkpoint) kept
                for name, param in module._parameters.items():
                    if param is not None:
                        module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)
            release_freed_memory()
            self.held = previous

    @torch.no_grad()
    def _record(self, batch: torch.Tensor) -> dict[int, tuple[tuple, dict]]:
        """Each block's call (besides its hidden states) from one lazy forward pass over `batch`."""
        calls: dict[int, tuple[tuple, dict]] = {}
        holding: list[Any] = []
        outer = self.held  # a block its caller holds is already read in

        def before(_m, args, kwargs, i: int):
            calls[i] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            if i != outer:
                holding.append(self.block(i))
                holding[-1].__enter__()

        def after(_m, _a, _o, i: int):
            if i != outer:
                holding.pop().__exit__(None, None, None)
            if i == len(self.blocks) - 1:
                raise StopForward

        hooks = [b.register_forward_pre_hook(lambda m, a, k, i=i: before(m, a, k, i), with_kwargs=True)
                 for i, b in enumerate(self.blocks)]
        hooks += [b.register_forward_hook(lambda m, a, o, i=i: after(m, a, o, i)) for i, b in enumerate(self.blocks)]
        try:
            self.model.base_model(input_ids=batch.to(self.device), use_cache=False)
        except StopForward:
            pass
        finally:
            for hook in hooks:
                hook.remove()
            while holding:
                holding.pop().__exit__(None, None, None)
        return calls

    def _call(self, i: int, size: int) -> tuple[tuple, dict]:
        """Block i's recorded call for a batch of `size` rows (the last batch may be smaller)."""
        if not self.calls:  # the recording pass reads every block but the one held
            self.calls = self._record(self.rows[: self.batch_size])
        rest, kwargs = self.calls[i]
        return _rows(rest, size, self.batch_size), _rows(kwargs, size, self.batch_size)

    @torch.no_grad()
    def entering(self) -> torch.Tensor:
        """The stream entering block 0 for every row (N, T, H), float32 on the CPU. The blocks' calls are
        recorded first (a lazy pass over the first rows), while no block is held."""
        if not self.calls:
            self.calls = self._record(self.rows[: self.batch_size])
        got: list[torch.Tensor] = []

        def grab(_m, args, kwargs):
            got.append((args[0] if args else kwargs["hidden_states"]).float().cpu())
            raise StopForward

        hook = self.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for start in range(0, self.rows.shape[0], self.batch_size):
                try:
                    self.model.base_model(input_ids=self.rows[start : start + self.batch_size].to(self.device),
                                          use_cache=False)
                except StopForward:
                    pass
        finally:
            hook.remove()
        return torch.cat(got)

    @torch.no_grad()
    def run(self, i: int, states: torch.Tensor) -> torch.Tensor:
        """Block i (held by `block(i)`) on a stream entering it (N, T, H): the stream leaving it."""
        return self.run_with_features(i, states, None)[0]

    @torch.no_grad()
    def run_with_features(self, i: int, states: torch.Tensor,
                          proj_input: bool | None = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block i (held) on a stream: the stream leaving it, and its MLP output projection's input
        (`proj_input`) or output (False) as a repair fits it, float32 on the CPU (None: not asked)."""
        assert self.held == i, f"block {i} is not held"
        return run_block(self.blocks[i], states, lambda size: self._call(i, size), self.batch_size, self.device,
                         torch.float32, None if proj_input is None else self.arch.mlp_out, bool(proj_input))

    def _logits(self, states: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of a batch of streams leaving the last block (`head` of `_normed`)."""
        return self.head(self._normed(states))

    def _normed(self, states: torch.Tensor) -> torch.Tensor:
        """The last hidden states (float32, on the device) of streams leaving the last block: the final norm."""
        return get_path(self.model, self.arch.final_norm)(states.to(self.device)).float()

    @property
    def head(self) -> Head:
        """The output head in float32 a slice of the table at a time (an untied head read in its stored
        dtype at its first use), soft-capped where the model caps its logits."""
        head = self.model.get_output_embeddings()
        if head.weight.device.type == "meta":
            name = next(f"{n}.weight" for n, m in self.model.named_modules() if m is head)
            _materialise(self.model, name, self.weights.read(name), self.device, keep_dtype=True)
        return Head.of(self.model, torch.float32)

    @torch.no_grad()
    def reference(self, states: torch.Tensor) -> Reference:
        """The next-token distributions of a stream leaving the last block (N, T, H) as a
        `next_token.Reference` for a student sharing the head, made a row at a time and kept on the
        CPU: H + 1 floats a position (the head's rows averaged under them, and a constant) where the
        head is linear, else the last hidden states (the teacher's log-probabilities made again
        wherever they are read)."""
        head = self.head
        linear = linear_head(self.model)

        def row(r: int) -> Reference:  # one row's, moved off the device before the next is made
            ref = reference_of(self._normed(states[r : r + 1]), head, linear)
            if linear is None:
                return Reference(hidden=ref.hidden.cpu(), head=head)
            return Reference(expected=ref.expected.cpu(), constant=ref.constant.cpu())

        return Reference.cat([row(r) for r in range(states.shape[0])])

    @torch.no_grad()
    def token_nll(self, states: torch.Tensor) -> torch.Tensor:
        """Next-token NLL (N, T-1) of a stream leaving the last block against its rows, float32 on the
        CPU, a row at a time (`next_token.Head.logsumexp`: a slice of the vocabulary at a time)."""
        head, out = self.head, torch.empty(states.shape[0], states.shape[1] - 1)
        for r in range(states.shape[0]):
            lse, picked = head.logsumexp(self._normed(states[r : r + 1, :-1])[0], self.rows[r, 1:])
            out[r] = (lse - picked).cpu()
        return out

    def nll(self, states: torch.Tensor) -> tuple[float, int]:
        """Summed next-token NLL (and its token count) of the stream leaving the last block, each row's
        tokens 1..T-1 scored."""
        nll = self.token_nll(states)
        return nll.sum().item(), nll.numel()

    @torch.no_grad()
    def kl(self, students: dict[Any, torch.Tensor], teacher: torch.Tensor) -> dict[Any, float]:
        """Mean forward KL from the next-token distributions of stream `teacher` to those of each stream
        in `students` (all leaving the last block), over every position, a row at a time: through the
        teacher's `reference` (made once a row for all students, one log-sum-exp a position for each)
        where the head is linear; else a chunk of one row's positions at a time
        (`next_token.chunk_positions`: its logits in 64 MiB), the teacher's log-probabilities made once
        per chunk for all students."""
        totals, head, linear = dict.fromkeys(students, 0.0), self.head, linear_head(self.model)
        step = chunk_positions(self.model.get_output_embeddings().weight.shape[0])
        for r in range(teacher.shape[0]):
            if linear is not None:
                ref = replace(reference_of(self._normed(teacher[r : r + 1]), head, linear), head=None)
                for key, states in students.items():
                    totals[key] += kl_chunk(head, ref, self._normed(states[r : r + 1]), slice(None)).sum().item()
                continue
            for t in range(0, teacher.shape[1], step):
                log_pt = torch.log_softmax(self._logits(teacher[r : r + 1, t : t + step]), -1)
                for key, states in students.items():
                    log_ps = torch.log_softmax(self._logits(states[r : r + 1, t : t + step]), -1)
                    totals[key] += forward_kl(log_ps, log_pt).sum().item()
        return {key: total / (teacher.shape[0] * teacher.shape[1]) for key, total in totals.items()}


STREAM_BYTES = 1 << 30  # the float32 stream held between blocks while a model is evaluated block by block


@torch.no_grad()
def sliding_nll_blockwise(model, weights: LazyWeights, tokens: torch.Tensor, window: int, stride: int,
                          batch_size: int, *, framing: Framing, progress: str | None = None) -> tuple[float, int]:
    """`evaluate.perplexity.sliding_nll` of a model read one block at a time: the same windows, each
    after the start tokens, every window's stream carried through each block in turn (at most
    STREAM_BYTES of them at once: more windows are more passes over the weights). Windows shorter than
    the longest are padded after their end, which a causal model's earlier positions never see."""
    spans = framed_windows(tokens, window, stride, framing)
    length = max(span.ids.numel() for span in spans)
    per_pass = max(1, STREAM_BYTES // (length * model.config.get_text_config().hidden_size * 4))
    total, count, calls = 0.0, 0, {}
    for start in range(0, len(spans), per_pass):
        group = spans[start : start + per_pass]
        rows = torch.stack([F.pad(span.ids, (0, length - span.ids.numel()), value=int(span.ids[-1]))
                            for span in group])
        runner = Blockwise(model, weights, rows, batch_size)
        runner.calls = calls  # rows of one length: the blocks' calls, recorded by the first pass, serve every pass
        states = runner.entering()
        calls = runner.calls
        for i in range(len(runner.blocks)):
            with runner.block(i):
                states = runner.run(i, states)
            if progress:
                print(f"\r  {progress}: windows {start + 1}-{start + len(group)} of {len(spans)}, block "
                      f"{i + 1}/{len(runner.blocks)}", end="", file=sys.stderr, flush=True)
        for span, nll in zip(group, runner.token_nll(states), strict=True):
            total += span.scored(nll).sum().item()
            count += span.scored(nll).numel()
    if progress:
        print(f"\r  {progress}: {len(spans)} windows, ppl {math.exp(total / count):.2f}" + " " * 20, file=sys.stderr)
    return total, count


def _rows(value: Any, size: int, full: int) -> Any:
    """A recorded call argument for a batch of `size` rows: tensors with a batch dimension cut to it."""
    if size == full:
        return value
    if torch.is_tensor(value):
        return value[:size] if value.dim() and value.shape[0] == full and full > 1 else value
    if isinstance(value, dict):
        return {k: _rows(v, size, full) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, size, full) for v in value)
    return value


def weights_bytes(source: str) -> int:
    """Bytes of a model's weights in float32 (what the whole-model path holds), from its checkpoint's
    headers: every tensor's element count x 4."""
    return sum(math.prod(entry["shape"]) * 4 for path in checkpoint_folder(source).glob("*.safetensors")
               for entry in safetensors_index(path)[1].values())


def one_block_at_a_time(choice: str, source: str, dtype: str, device: torch.device) -> bool:
    """The `--sequential` setting: auto is on when the model's weights in the dtype it would load in
    take more than half the device's memory (the whole-model path holds them and its activations)."""
    if choice != "auto":
        return choice == "on"
    folder = Path(source)
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):  # a Hub id: the whole path downloads it
        return False
    size = weights_bytes(source) // 4 * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return size > device_memory(device) // 2


SHARD_BYTES = 1 << 30  # 1 GiB: what a writer holds at most (transformers' own default shards are larger)


@dataclass(frozen=True)
class Stored:
    """A tensor as a checkpoint stores it (its bytes at `begin` of `path`), copied into a new file
    without being read into memory whole."""

    path: Path
    begin: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


class ShardWriter:
    """A model folder written tensor by tensor, as `save_pretrained` lays it out: shards of at most
    SHARD_BYTES (`model-00001-of-0000N.safetensors`), each written whole and atomically once full,
    and the index (`model.safetensors.index.json`) last. A tensor is given as a tensor (held until its
    shard is written: at most a shard's worth) or as `Stored` bytes of another checkpoint (copied 64 MiB
    at a time when its shard is written: nothing held)."""

    COPY_BYTES = 64 << 20

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES):
        self.folder, self.shard_bytes = Path(folder), shard_bytes
        self.pending: dict[str, torch.Tensor | Stored] = {}
        self.written: list[dict[str, int]] = []  # per shard: tensor name -> bytes
        self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _size(value: torch.Tensor | Stored) -> int:
        return value.nbytes if isinstance(value, Stored) else value.numel() * value.element_size()

    def add(self, name: str, value: torch.Tensor | Stored) -> None:
        if self.pending and sum(map(self._size, self.pending.values())) + self._size(value) > self.shard_bytes:
            self._flush()
        self.pending[name] = value if isinstance(value, Stored) else value.detach().contiguous().cpu()

    def _flush(self) -> None:
        """Write the pending tensors as one safetensors file: the header, then each tensor's bytes from
        its own memory or its source file (safetensors' `save_file` builds the file's bytes in memory
        first: two more copies of a shard)."""
        from lmshrink.records import atomic_file

        names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, value in self.pending.items():
            dtype, shape = (value.dtype, list(value.shape)) if isinstance(value, Stored) else \
                (names[value.dtype], list(value.shape))
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + self._size(value)]}
            offset += self._size(value)
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        with atomic_file(self.folder / f".shard-{len(self.written):05d}.safetensors") as tmp, tmp.open("wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for value in self.pending.values():
                if isinstance(value, Stored):
                    with value.path.open("rb") as source:
                        source.seek(value.begin)
                        for done in range(0, value.nbytes, self.COPY_BYTES):
                            f.write(source.read(min(self.COPY_BYTES, value.nbytes - done)))
                elif value.numel():
                    f.write(memoryview(value.reshape(-1).view(torch.uint8).numpy()))
        self.written.append({k: self._size(v) for k, v in self.pending.items()})
        self.pending = {}
        release_freed_memory()

    def close(self) -> None:
        """Name the shards as transformers does and write the index (a single shard: model.safetensors)."""
        if self.pending:
            self._flush()
        n = len(self.written)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.folder / f".shard-{i:05d}.safetensors").replace(self.folder / name)
        if n > 1:
            from lmshrink.records import write_json

            write_json(self.folder / "model.safetensors.index.json", {
                "metadata": {"total_size": sum(sum(s.values()) for s in self.written)},
                "weight_map": {key: name for shard, name in zip(self.written, names, strict=True) for key in shard}})


# --- a cut, repaired and written, one block at a time ------------------------------------------

def _repair_on_teacher(runner: Blockwise, held_out: Blockwise | None, keep: list[int],
                       spans: list[tuple[int, int]], method: str, strengths: tuple[float, ...]) -> list[dict[str, Any]]:
    """`repair_blockwise` with every span fitted from the teacher's own activations, in one pass."""
    from lmshrink.compress.cut_search import span_fits_blockwise

    infos: dict[tuple[int, int], dict] = {}
    fits = span_fits_blockwise(runner, {(a, b) for a, b in spans if a > 0}, method, infos)
    report: list[dict[str, Any]] = []
    for a, b in spans:
        if a == 0:
            report.append({"span": [a, b], "skipped": "no kept block before it to fold a fit into"})
            continue
        strength = strength_blockwise(runner, held_out, keep, a - 1, fits[(a, b)], strengths, infos[(a, b)])
        runner.edits[a - 1] = (method, fits[(a, b)][1] * strength)
        report.append({"span": [a, b], "block": a - 1, "student_block": keep.index(a - 1), "strength": strength,
                       **infos[(a, b)]})
    return report


def repair_blockwise(runner: Blockwise, keep: list[int], method: str, fit_on: str = "student",
                     downstream: bool = False, strengths: tuple[float, ...] = (1.0,)) -> list[dict[str, Any]]:
    """`repair.repair` (one strength) on a model read one block at a time. Fitted on the student: one
    pass of the teacher for the streams each span's fit aims at, then the student (the teacher's kept
    blocks, each span's fit folded in as it is made) from its first fitted block; on the teacher: every
    span fitted from the teacher's own activations in one pass (`cut_search.span_fits_blockwise`). The
    fits stay in `runner.edits` (by teacher block); the record per span (then per downstream fit,
    `downstream`: every kept block after the first fitted one fitted to the teacher's stream leaving
    the same teacher block) is `repair.repair`'s. With several `strengths`, each span's fit is applied
    at the one whose student (the earlier fits folded in) is closest to the teacher on the held-out
    rows, by forward KL (`strength_blockwise`)."""
    from lmshrink.compress.repair import (
        _fit,
        downstream_blocks,
        fits_from_proj_input,
        heldout_split,
        removed_spans,
        update_target,
    )

    n = len(runner.blocks)
    spans = removed_spans(n, keep)
    usable = [(a, b) for a, b in spans if a > 0]
    report: list[dict[str, Any]] = []
    if not usable:
        return [{"span": [a, b], "skipped": "no kept block before it to fold a fit into"} for a, b in spans]
    held_out = Blockwise(runner.model, runner.weights, runner.rows[-heldout_split(runner.rows):],
                         runner.batch_size) if len(strengths) > 1 else None  # where each strength is measured
    if fit_on == "teacher":
        return _repair_on_teacher(runner, held_out, keep, spans, method, strengths)
    held, proj_input = heldout_split(runner.rows), fits_from_proj_input(method)
    spanning = {keep.index(a - 1): (a, b) for a, b in usable}  # student block -> the span fitted into it
    after = set(downstream_blocks(keep, usable)) if downstream else set()
    # where each fit aims: the teacher's stream after the span, or after the same teacher block
    aims = {j: b + 1 for j, (_, b) in spanning.items()} | {j: keep[j] + 1 for j in after}
    first = usable[0][0] - 1
    stream, states, entering_first = runner.entering(), {}, None
    for i in range(max(aims.values())):  # the teacher, as far as the last stream a fit aims at
        if i == first:
            entering_first = stream
        with runner.block(i):
            stream = runner.run(i, stream)
        if i + 1 in aims.values():
            states[i + 1] = stream
    # the student's stream is the teacher's up to its first fitted block, unless block 0 was cut
    stream, start = (entering_first, keep.index(first)) if spans[0][0] > 0 else (runner.entering(), 0)
    report += [{"span": [a, b], "skipped": "no kept block before it to fold a fit into"} for a, b in spans if a == 0]
    last = max(aims)
    for j in range(start, last + 1):  # the student's blocks, each fit made where its block is reached
        if j in aims:
            with runner.block(keep[j]):
                out, m = runner.run_with_features(keep[j], stream, proj_input)
                target = update_target(runner.model, keep[j], m, states[aims[j]], out, proj_input)
            param, info = _fit(method, held, m, target)
            strength = strength_blockwise(runner, held_out, keep, keep[j], (method, param), strengths, info) \
                if j in spanning else 1.0
            runner.edits[keep[j]] = (method, param * strength)
            if j in spanning:
                a, b = spanning[j]
                report.append({"span": [a, b], "block": a - 1, "student_block": j, "strength": strength, **info})
            else:
                report.append({"block": keep[j], "student_block": j, "downstream": True, **info})
        if j < last:
            with runner.block(keep[j]):  # with its fit folded in
                stream = runner.run(keep[j], stream)
    return report


def _refine_targets(runner: Blockwise, before: list[int], held: int) -> tuple[Reference, Reference, torch.Tensor]:
    """`refine_blockwise`'s fixed inputs: the teacher's next-token distributions on the fit rows and on
    the `held` held-out rows (its blocks run with the student's edits set aside), made once; and the
    student's stream after its blocks `before` its first fitted one (teacher blocks, frozen)."""
    edits, trained, runner.edits, runner.trained = runner.edits, runner.trained, {}, {}
    stream = prefix = runner.entering()
    for i in range(len(runner.blocks)):
        with runner.block(i):
            stream = runner.run(i, stream)
    runner.edits, runner.trained = edits, trained
    target, held_target = runner.reference(stream[:-held]), runner.reference(stream[-held:])
    del stream
    for i in before:
        with runner.block(i):
            prefix = runner.run(i, prefix)
    return target, held_target, prefix


def _trainable(runner: Blockwise, fitted: list[int]) -> list[torch.nn.Parameter]:
    """The MLP output projections of the teacher blocks `fitted`, as the fit left them, made trainable
    (kept in `runner.trained`, which each later read of those blocks uses)."""
    for i in fitted:
        with runner.block(i) as block:
            runner.trained[i] = {name: torch.nn.Parameter(p.detach().clone())
                                 for name, p in get_path(block, runner.arch.mlp_out).named_parameters()}
    return [p for i in fitted for p in runner.trained[i].values()]


def _kl_sum(runner: Blockwise, last: torch.Tensor, ref: Reference, idx: torch.Tensor, backward: bool = False) -> float:
    """The summed forward KL of a last stream (rows `idx` of `ref`), a chunk of one row's positions at a
    time; with `backward`, each chunk's share of the mean's gradient left in `last.grad`."""
    chunk = chunk_positions(runner.model.get_output_embeddings().weight.shape[0])
    total, count = torch.zeros((), device=last.device), last.shape[0] * last.shape[1]
    for r in range(last.shape[0]):
        row = ref.rows(idx[r : r + 1])
        for t in range(0, last.shape[1], chunk):
            part = kl_chunk(runner.head, row, runner._normed(last[r : r + 1, t : t + chunk]), slice(t, t + chunk))
            if backward:
                (part.sum() / count).backward()
            total += part.detach().sum()
    return total.item()  # one wait for the device a call, not one a chunk


def refine_blockwise(runner: Blockwise, keep: list[int], blocks: list[int], epochs: int, lr: float,
                     seed: int = 0) -> dict[str, Any]:
    """`repair.refine` on a model read one block at a time: the MLP output projections of the student's
    `blocks` (its fitted ones, `runner.edits` folded in) fitted further by Adam on the mean forward KL
    from the teacher over the calibration rows but the held-out ones, `runner.batch_size` rows a step,
    the best pass by held-out KL kept (in `runner.trained`). The same steps as the whole path: the
    teacher's distributions on the fit and held-out rows are made once (`Blockwise.reference`: H + 1 floats a
    position where the head is linear, as the whole path keeps them), the student's stream entering
    its first fitted block too; each step walks the student's blocks from there keeping each block's
    input (batch x T x H floats a block), then goes back block by block, each read again and run with
    gradients (activation checkpointing at block granularity): two reads of every block after the
    first fitted one a step."""
    from lmshrink.compress.repair import _tensor, heldout_split

    if not blocks:
        return {"epochs": 0, "lr": lr, "blocks": [], "skipped": "no repaired block to fit"}
    started = time.perf_counter()
    rows, size = runner.rows, runner.batch_size
    held = heldout_split(rows)
    first = min(blocks)
    target, held_target, prefix = _refine_targets(runner, keep[:first], held)
    params = _trainable(runner, [keep[j] for j in sorted(set(blocks))])
    optimizer = torch.optim.Adam(params, lr=lr)
    order = torch.Generator().manual_seed(seed)
    after = keep[first:]

    def forward(states: torch.Tensor, inputs: list | None = None) -> torch.Tensor:
        for i in after:
            if inputs is not None:
                inputs.append(states)
            with runner.block(i):
                states = runner.run(i, states)
        return states

    def heldout() -> float:
        with torch.no_grad():
            return _kl_sum(runner, forward(prefix[-held:]), held_target, torch.arange(held)) / (held * rows.shape[1])

    def step(idx: torch.Tensor) -> None:
        inputs: list[torch.Tensor] = []
        last = forward(prefix[idx], inputs).requires_grad_(True)
        _kl_sum(runner, last, target, idx, backward=True)
        grad = last.grad
        for i, states in zip(reversed(after), reversed(inputs), strict=True):  # back through each block
            with runner.block(i) as block, torch.enable_grad():
                states = states.detach().to(runner.device).requires_grad_(i != after[0])
                rest, kwargs = runner._call(i, states.shape[0])
                torch.autograd.backward(_tensor(block(states, *rest, **kwargs)).float(), grad.to(runner.device))
                grad = states.grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    losses = [heldout()]
    best = [p.detach().clone() for p in params]
    for epoch in range(epochs):
        perm = torch.randperm(rows.shape[0] - held, generator=order)
        for start in range(0, perm.numel(), size):
            step(perm[start : start + size])
        losses.append(heldout())
        if losses[-1] < min(losses[:-1]):
            best = [p.detach().clone() for p in params]
        print(f"  fitting on the output, one block at a time: pass {epoch + 1} of {epochs}, held-out KL "
              f"{losses[-1]:.4f}", flush=True)
    with torch.no_grad():
        for p, b in zip(params, best, strict=True):
            p.copy_(b)
            p.requires_grad_(False)
    kept = min(range(len(losses)), key=losses.__getitem__)
    return {"epochs": epochs, "lr": lr, "blocks": sorted(set(blocks)), "heldout_kl": losses, "kept_epoch": kept,
            "tokens": (rows.shape[0] - held) * rows.shape[1], "seconds": time.perf_counter() - started,
            "path": "sequential"}


def strength_blockwise(runner: Blockwise, held_out: Blockwise | None, keep: list[int], block: int,
                       fit: tuple[str, torch.Tensor], strengths: tuple[float, ...], info: dict[str, Any]) -> float:
    """`repair._strength` on a model read one block at a time: of several strengths, the one at which
    `fit` (folded into teacher block `block`, every fit made so far in `runner.edits` with it) leaves
    the student closest to the teacher on the held-out rows by forward KL, the students walked beside
    the teacher (`cut_search.measure_blockwise`) over `held_out` (the held-out rows: one runner for
    every span, its blocks' calls recorded once); each KL kept in `info`."""
    if held_out is None:
        return strengths[0]
    from lmshrink.compress.cut_search import measure_blockwise

    method, param = fit
    students = {s: (keep, {**runner.edits, block: (method, param * s)}) for s in strengths}
    gaps = measure_blockwise(held_out, students, "kl", f"strengths of block {block}'s fit")
    info["strength_kl"] = {f"{s:g}": v for s, v in gaps.items()}
    return min(gaps, key=gaps.__getitem__)


def added_biases(model) -> dict[str, torch.Size]:
    """The tensors (name within a block -> shape) that the architecture's MLP bias flag (Llama's
    `mlp_bias`) adds to every block, as `repair.with_mlp_bias` turns it on; none where the MLP's
    output projection has a bias already. Read off the model built again on the meta device."""
    import copy

    arch = architecture_of(model.config)
    if get_path(blocks_of(model)[0], arch.mlp_out).bias is not None:
        return {}
    config = copy.deepcopy(model.config)
    setattr(config, arch.mlp_bias, True)
    with torch.device("meta"):
        biased = type(model)(config)
    before = dict(blocks_of(model)[0].named_parameters())
    return {name: p.shape for name, p in blocks_of(biased)[0].named_parameters() if name not in before}


def write_student(runner: Blockwise, keep: list[int], folder: Path,
                  narrow: tuple[Plan, dict[str, int]] | None = None) -> None:
    """The student that keeps teacher blocks `keep` (with `runner.edits` folded in), written tensor by
    tensor in the checkpoint's own dtype, shard by shard (`ShardWriter`), with its config (and the
    teacher's generation config): a folder `from_pretrained` loads. With `narrow` (a width plan and
    its target, `lmshrink prune`), every tensor is sliced to the kept units (`compress.width`) and the
    config narrowed with it. Holds one shard and one block at a time."""
    model, arch = runner.model, runner.arch
    prefix = arch.blocks + "."
    added = added_biases(model) if any(m == "bias" for m, _ in runner.edits.values()) else {}
    if added and narrow:
        raise SequentialError("a width-pruned student with the bias repair is not written block by block; use "
                              "--repair refit, or --sequential off on a machine that holds the teacher")
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    head = next(f"{n}.weight" for n, m in model.named_modules() if m is model.get_output_embeddings())
    writer = ShardWriter(folder)
    names = [k for k in model.state_dict() if not (tied and k == head)]
    layout = layout_of(model.config) if narrow else None
    dtypes = set()
    for name in names:  # the embeddings, final norm and head: their bytes copied as stored (or sliced)
        if not name.startswith(prefix):
            writer.add(name, layout.slice(name, runner.weights.read(name), narrow[0]) if narrow
                       else runner.weights.stored(name))
            dtypes.add(runner.weights.dtype(name))
    for j, i in enumerate(keep):
        inside = {k[len(f"{prefix}{i}."):]: k for k in names if k.startswith(f"{prefix}{i}.")}
        dtype = runner.weights.dtype(f"{prefix}{i}.{arch.mlp_out}.weight")
        if i not in runner.edits and not narrow:  # a block as the teacher has it: copied
            for short, full in inside.items():
                writer.add(f"{prefix}{j}.{short}", runner.weights.stored(full))
            for short, shape in added.items():  # the bias flag's new tensors: zero, the same function
                writer.add(f"{prefix}{j}.{short}", torch.zeros(shape, dtype=dtype))
            continue
        stored = {short: runner.weights.dtype(full) for short, full in inside.items()} | dict.fromkeys(added, dtype)
        with runner.block(i) as block:  # read in fp32, its fit folded in, written in the stored dtype
            values = block.state_dict()
            for short in stored:
                name, value = f"{prefix}{j}.{short}", values.get(short, torch.zeros(added.get(short, ())))
                writer.add(name, (layout.slice(name, value, narrow[0]) if narrow else value).to(stored[short]))
    writer.close()
    config = student_config(model.config, keep)
    if added:
        setattr(config, arch.mlp_bias, True)
    if narrow:
        config = pruned_config(config, narrow[1])
    config.torch_dtype = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None
    config.save_pretrained(folder)
    generation = runner.weights.folder / "generation_config.json"
    if generation.is_file():
        shutil.copy(generation, folder / generation.name)
