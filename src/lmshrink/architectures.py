"""Where each decoder architecture keeps its blocks, and which config fields follow the depth.

This is the one table to extend for a new architecture: add its `config.model_type`, the
dotted path of the block list, the config field holding the layer count, the attributes
inside a block that carry its own index (checked after truncation), and the per-layer
config lists that must be re-indexed with the kept blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lmshrink.config import SettingsError
from lmshrink.errors import LmshrinkError


@dataclass(frozen=True)
class Architecture:
    blocks: str
    """Dotted path from the *ForCausalLM module to the `nn.ModuleList` of blocks."""
    layer_count: str
    """Config field holding the number of blocks."""
    layer_index: tuple[str, ...] = ()
    """Attributes (dotted, inside a block) holding that block's index, e.g. `self_attn.layer_idx`."""
    per_layer: tuple[str, ...] = ()
    """Config lists with one entry per block (e.g. `layer_types`), re-indexed on truncation."""
    fix_config: Callable[[Any], None] | None = field(default=None, compare=False)
    """Re-derives config fields that are stored in a compressed form (GPT-Neo)."""
    mlp_out: str | None = None
    """Dotted path inside a block of the MLP's output projection, whose output is added to the
    residual stream (where `lmshrink.compress.repair` folds its fits); None: there is none."""
    mlp_norm: str | None = None
    """Dotted path inside a block of the norm the MLP's output passes through before the residual
    add (Gemma 2 and 3's `post_feedforward_layernorm`); None: it is added unchanged."""
    mlp_out_missing: str = "its blocks have no MLP output projection that feeds the residual stream directly"
    """Why a repair cannot be folded into this architecture (when `mlp_out` is None)."""
    mlp_bias: str | None = None
    """Config flag that gives the MLP projections biases (Llama's `mlp_bias`), for the bias repair."""
    mlp_out_has_bias: bool = False
    """The MLP output projection always has a bias (GPT-2, GPT-Neo(X), OPT), for the bias repair."""
    final_norm: str = "model.norm"
    """Dotted path from the *ForCausalLM module to the norm after the last block (before the head)."""


def _gpt_neo_attention_types(config: Any) -> None:
    # GPT-Neo stores [[types, repeat], ...] and expands it to attention_layers on load:
    # write the kept blocks' types back in that form so a reload gives the same list.
    config.attention_types = [[[kind], 1] for kind in config.attention_layers]


_LLAMA_LIKE = Architecture("model.layers", "num_hidden_layers", ("self_attn.layer_idx",), ("layer_types",),
                           mlp_out="mlp.down_proj")

ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture("transformer.h", "n_layer", ("attn.layer_idx",), mlp_out="mlp.c_proj", mlp_out_has_bias=True,
                         final_norm="transformer.ln_f"),
    "gpt_neo": Architecture("transformer.h", "num_layers", ("attn.layer_id", "attn.attention.layer_id"),
                            ("attention_layers",), _gpt_neo_attention_types, mlp_out="mlp.c_proj",
                            mlp_out_has_bias=True, final_norm="transformer.ln_f"),
    "gpt_neox": Architecture("gpt_neox.layers", "num_hidden_layers", ("attention.layer_idx",), ("layer_types",),
                             mlp_out="mlp.dense_4h_to_h", mlp_out_has_bias=True, final_norm="gpt_neox.final_layer_norm"),
    "opt": Architecture("model.decoder.layers", "num_hidden_layers", ("self_attn.layer_idx",), mlp_out="fc2",
                        mlp_out_has_bias=True, final_norm="model.decoder.final_layer_norm"),
    "llama": replace(_LLAMA_LIKE, mlp_bias="mlp_bias"),
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    # the MLP output passes through an RMSNorm before the residual add: repairs fit through it
    "gemma2": replace(_LLAMA_LIKE, mlp_norm="post_feedforward_layernorm"),
    "gemma3_text": Architecture("model.layers", "num_hidden_layers", ("layer_idx", "self_attn.layer_idx"),
                                ("layer_types",), mlp_out="mlp.down_proj", mlp_norm="post_feedforward_layernorm"),
    "smollm3": Architecture("model.layers", "num_hidden_layers", ("self_attn.layer_idx",),
                            ("layer_types", "no_rope_layers"), mlp_out="mlp.down_proj", mlp_bias="mlp_bias"),
}


class UnsupportedArchitecture(LmshrinkError, ValueError):
    pass


def architecture_of(config: Any) -> Architecture:
    """The table entry for a model config, or a clear error listing the supported types."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"lmshrink does not know where a {kind!r} model keeps its blocks. Supported model types: "
            f"{', '.join(sorted(ARCHITECTURES))}. To add one, give it an entry in "
            "ARCHITECTURES in lmshrink/architectures.py (block path, layer-count field, per-layer lists)."
        )
    return ARCHITECTURES[kind]


def get_path(obj: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def set_path(obj: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for name in parents:
        obj = getattr(obj, name)
    setattr(obj, last, value)


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks."""
    return get_path(model, architecture_of(model.config).blocks)


def num_blocks(model: nn.Module) -> int:
    return len(blocks_of(model))


def student_config(config, keep: list[int]):
    """The teacher's config for a student that keeps blocks `keep`: its depth and per-layer lists."""
    arch = architecture_of(config)
    n = getattr(config, arch.layer_count)
    config = copy.deepcopy(config)
    setattr(config, arch.layer_count, len(keep))
    for name in arch.per_layer:
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) == n:
            setattr(config, name, [values[i] for i in keep])
    if arch.fix_config:
        arch.fix_config(config)
    return config


@contextmanager
def only_blocks(model: nn.Module, keep: list[int]) -> Iterator[nn.Module]:
    """Run the model with only the blocks in `keep` (the others skipped), without copying it.

    The config's depth and per-layer lists are narrowed too while inside, since some models
    pick each block's attention mask by position in `config.layer_types`. For measuring what
    removing blocks does, with `use_cache=False` forwards.
    """
    arch = architecture_of(model.config)
    config = model.config
    full = get_path(model, arch.blocks)
    saved = {name: getattr(config, name) for name in (arch.layer_count, *arch.per_layer) if hasattr(config, name)}
    set_path(model, arch.blocks, nn.ModuleList([full[i] for i in keep]))
    setattr(config, arch.layer_count, len(keep))
    for name in arch.per_layer:
        values = saved.get(name)
        if isinstance(values, list) and len(values) == len(full):
            setattr(config, name, [values[i] for i in keep])
    try:
        yield model
    finally:
        set_path(model, arch.blocks, full)
        for name, value in saved.items():
            setattr(config, name, value)


def residual_stream(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states entering each block, plus the last block's output: N+1 tensors (B, T, H), no
    gradient (what `from_block` can start a model from)."""
    blocks = blocks_of(model)
    states: list[torch.Tensor] = []

    def grab_input(_module, args, kwargs):
        states.append(args[0] if args else kwargs["hidden_states"])

    def grab_output(_module, _args, output):
        states.append(output[0] if isinstance(output, tuple) else output)

    hooks = [b.register_forward_pre_hook(grab_input, with_kwargs=True) for b in blocks]
    hooks.append(blocks[-1].register_forward_hook(grab_output))
    try:
        with torch.no_grad():
            model.base_model(input_ids=ids, use_cache=False)  # the blocks alone: no (B, T, vocab) logits
    finally:
        for hook in hooks:
            hook.remove()
    return states


@contextmanager
def entering(module: nn.Module, stream) -> Iterator[None]:
    """`module`'s input (its hidden states) replaced by `stream` while inside: a forward pre-hook."""
    def swap(_module, args, kwargs):
        return ((stream, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": stream})

    hook = module.register_forward_pre_hook(swap, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()


@contextmanager
def from_block(model: nn.Module, keep: list[int], first: int, stream) -> Iterator[nn.Module]:
    """Run the model with only the blocks of `keep` from block `first` on (`only_blocks`), `stream`
    (what enters block `first`, e.g. the teacher's own stream where the blocks before `first` are
    the teacher's) given to the first of them, or to the final norm where none is left, in place of
    the embedded ids: what the blocks before `first` would compute is not computed again."""
    arch, later = architecture_of(model.config), [i for i in keep if i >= first]
    target = get_path(model, arch.blocks)[later[0]] if later else get_path(model, arch.final_norm)
    with only_blocks(model, later), entering(target, stream):
        yield model


def context_limit(config: Any) -> int | None:
    """Longest sequence the model's position embeddings allow (None if unbounded or unknown)."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_length(config: Any, length: int, field: str, reserved: int = 0) -> None:
    """Refuse sequences longer than the model's context, naming the setting to lower; `reserved`:
    tokens the model is given on top of `length` (a perplexity window's start tokens)."""
    limit = context_limit(config)
    if limit is not None and length + reserved > limit:
        flag = "--" + field.replace("_", "-")
        extra = f" (+ {reserved} start token(s))" if reserved else ""
        raise SettingsError(f"{field}: {length} tokens{extra} exceed the model's context of {limit}; "
                            f"use {flag} {limit - reserved} or less")
