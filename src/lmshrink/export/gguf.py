"""A transformers causal LM as a GGUF file that llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs.

Written with the `gguf` package, the writer, tensor-name tables, vocabulary helpers and quantizers
llama.cpp's own converter uses; what is lmshrink's own is small and listed here:

- `FAMILIES`: which llama.cpp architecture a `config.model_type` becomes, its hyperparameters, and
  the two tensor layouts that differ from transformers': Llama/Mistral's query and key rows go back
  from transformers' rotate-half order to the interleaved order llama.cpp's RoPE expects, and GPT-2's
  Conv1D weights (stored in, out) are transposed. Every other family is refused with the reason.
- `tensor_type`: the quantization policy. Norms, biases and position tables stay F32; with a 4- or
  5-bit type the token embedding (and an untied output matrix) are kept at Q8_0, as in the GGUF
  SmolLM2 ships in; a matrix whose rows are not a whole number of quantization blocks falls back to
  F16 (counted in the file's record).
- the vocabulary: byte-level BPE tokenizers (GPT-2, SmolLM2, Llama 3, Qwen) become llama.cpp's
  `gpt2` model with the pre-tokenizer name (`PRE_TOKENIZERS`) read off the tokenizer's own
  pre-tokenizer; SentencePiece-style ones (Llama 2, Mistral) go through `gguf.LlamaHfVocab`. Special
  tokens, merges and the chat template come from `gguf.SpecialVocab`.
- provenance: the model's `lmshrink.json` (teacher, kept blocks, every setting) as metadata.

K-quants (q4_k_m, ...) and i-quants need llama.cpp's importance-aware quantizer, which the `gguf`
package does not have: export f16 and run `llama-quantize FILE-F16.gguf FILE-Q4_K_M.gguf Q4_K_M`.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmshrink.errors import LmshrinkError
from lmshrink.models import release_freed_memory
from lmshrink.records import atomic_file

QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
"""Every type the `gguf` package quantizes to (and llama.cpp runs), best first."""
LLAMA_QUANTIZE_ONLY = ("q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_m", "q3_k_s", "q3_k_l", "q2_k",
                       "iq4_xs", "iq4_nl", "iq3_m", "iq3_xxs", "iq2_m", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")


class ExportError(LmshrinkError, ValueError):
    pass


def _gguf():
    import gguf

    return gguf


def ggml_type(quant: str):
    return _gguf().GGMLQuantizationType[quant.upper()]


def file_type(quant: str):
    lft = _gguf().LlamaFileType
    return lft.ALL_F32 if quant == "f32" else lft[f"MOSTLY_{quant.upper()}"]


# --- families -----------------------------------------------------------------------------------


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _rope_problem(config) -> str | None:
    rope = getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "llama3") or (kind == "llama3" and config.model_type not in ("llama", "mistral")):
        return f"its RoPE is scaled ({kind}), which lmshrink does not write to GGUF yet"
    return None


def rope_factors(config) -> np.ndarray | None:
    """Llama 3's RoPE scaling as llama.cpp reads it: a `rope_freqs` tensor dividing each frequency
    (the default frequencies over transformers' own llama3-scaled ones); None for unscaled RoPE."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    default = 1.0 / (_rope_theta(config) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    return (default / scaled.double()).float().numpy()


def _llama_like(writer, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _gpt2(writer, config) -> None:
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_vocab_size(config.vocab_size)


def _gemma_shape(writer, config) -> None:
    """What every Gemma generation writes alike: sizes, heads, the norms' epsilon, the sliding window."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_sliding_window(config.sliding_window)
    writer.add_vocab_size(config.vocab_size)


def _gemma2(writer, config) -> None:
    """Gemma 2's hyperparameters, as llama.cpp's `gemma2` reads them: the RoPE base and the
    soft-capping of attention scores and of the final logits (tanh(x / c) * c). llama.cpp slides
    every other block from the first, whatever the file says (see `sliding_window_note`)."""
    _gemma_shape(writer, config)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _gemma2_problem(config) -> str | None:
    """What llama.cpp's `gemma2` graph fixes and this model does not have, or None."""
    if why := _rope_problem(config):
        return why
    if getattr(config, "query_pre_attn_scalar", config.head_dim) != config.head_dim:
        # llama.cpp takes 1/sqrt(hidden / heads) for a 46-block model (Gemma 2 27B), else 1/sqrt(head_dim)
        return "llama.cpp's gemma2 scales attention by 1/sqrt(head_dim) for a cut model, not by query_pre_attn_scalar"
    if not config.attn_logit_softcapping or not config.final_logit_softcapping:
        return "llama.cpp's gemma2 always soft-caps attention scores and logits, and this model does not"
    return None


def _gemma3(writer, config) -> None:
    """Gemma 3's hyperparameters, as llama.cpp's `gemma3` reads them: the full-attention blocks'
    RoPE base, the sliding window, and which blocks slide (`attention.sliding_window_pattern`, one
    flag a block: a cut student's blocks keep their own kinds, not the teacher's every-sixth pattern)."""
    _gemma_shape(writer, config)
    writer.add_rope_freq_base(_gemma3_rope(config)["full_attention"])
    writer.add_array(f"{writer.arch}.attention.sliding_window_pattern",
                     [kind == "sliding_attention" for kind in config.layer_types])


def _gemma3_rope(config) -> dict[str, float]:
    """RoPE base per attention kind (transformers 5 keeps one set of parameters per kind)."""
    rope = getattr(config, "rope_parameters", None) or {}
    return {kind: float((rope.get(kind) or {}).get("rope_theta", default))
            for kind, default in (("full_attention", 1_000_000.0), ("sliding_attention", 10_000.0))}


def _gemma3_problem(config) -> str | None:
    """What llama.cpp's `gemma3` graph fixes and this model does not have, or None."""
    rope = getattr(config, "rope_parameters", None) or {}
    if any((rope.get(kind) or {}).get("rope_type", "default") != "default" for kind in rope):
        return "its RoPE is scaled, which lmshrink does not write to GGUF yet"
    if _gemma3_rope(config)["sliding_attention"] != 10_000.0:
        return "llama.cpp's gemma3 fixes the sliding blocks' RoPE base at 10,000"
    if getattr(config, "query_pre_attn_scalar", config.head_dim) != config.head_dim:
        return "llama.cpp's gemma3 scales attention by 1/sqrt(head_dim), not by query_pre_attn_scalar"
    if getattr(config, "attn_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None):
        return "llama.cpp's gemma3 has no logit soft-capping"
    return None


def _gemma_tensor(name: str, tensor: torch.Tensor, config) -> torch.Tensor:
    if name.endswith("norm.weight"):  # Gemma's RMSNorm scales by 1 + weight; llama.cpp's by weight
        return tensor + 1
    return tensor


def _interleave_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Query/key rows from transformers' rotate-half order (each head: all real parts, then all
    imaginary parts) to the interleaved pairs llama.cpp's `llama` RoPE rotates."""
    rows, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(heads, 2, rows // heads // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def _llama_tensor(name: str, tensor: torch.Tensor, config) -> torch.Tensor:
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return _interleave_rope_rows(tensor, config.num_attention_heads)
    if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return _interleave_rope_rows(tensor, config.num_key_value_heads or config.num_attention_heads)
    return tensor


def _gpt2_tensor(name: str, tensor: torch.Tensor, config) -> torch.Tensor:
    if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
        return tensor.T  # Conv1D keeps (in, out); llama.cpp, like nn.Linear, (out, in)
    return tensor


def _same(name: str, tensor: torch.Tensor, config) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class Family:
    arch: str
    """llama.cpp's architecture name (gguf.MODEL_ARCH member)."""
    hparams: Callable[[Any, Any], None]
    tensor: Callable[[str, torch.Tensor, Any], torch.Tensor] = _same
    skip: tuple[str, ...] = ()
    """Suffixes of state-dict entries llama.cpp does not use."""


FAMILIES: dict[str, Family] = {
    "llama": Family("LLAMA", _llama_like, _llama_tensor, (".rotary_emb.inv_freq",)),
    "mistral": Family("LLAMA", _llama_like, _llama_tensor, (".rotary_emb.inv_freq",)),
    "qwen2": Family("QWEN2", _llama_like, skip=(".rotary_emb.inv_freq",)),
    "qwen3": Family("QWEN3", _llama_like, skip=(".rotary_emb.inv_freq",)),
    "gpt2": Family("GPT2", _gpt2, _gpt2_tensor, (".attn.bias", ".attn.masked_bias")),
    "gemma2": Family("GEMMA2", _gemma2, _gemma_tensor, (".rotary_emb.inv_freq",)),
    "gemma3_text": Family("GEMMA3", _gemma3, _gemma_tensor, (".rotary_emb.inv_freq",)),
}

REFUSED: dict[str, str] = {
    "phi3": "llama.cpp's phi3 stores fused QKV and gate/up tensors that lmshrink does not write yet",
    "smollm3": "llama.cpp's smollm3 needs its no-RoPE layer list, which lmshrink does not write yet",
    "opt": "llama.cpp has no OPT architecture",
    "gpt_neo": "llama.cpp has no GPT-Neo architecture",
    "gpt_neox": "llama.cpp's gptneox needs its fused QKV layout, which lmshrink does not write yet",
}


def export_problems(config) -> list[str]:
    """Why a model of this config cannot be exported to GGUF ([] if it can)."""
    kind = config.model_type
    if kind not in FAMILIES:
        why = REFUSED.get(kind, "lmshrink does not export it to GGUF yet")
        return [f"model: {kind} models cannot be exported to GGUF: {why}; llama.cpp's convert_hf_to_gguf.py "
                f"may convert the folder (exported: {', '.join(FAMILIES)})"]
    problem = {"gemma2": _gemma2_problem, "gemma3_text": _gemma3_problem, "gpt2": lambda config: None}.get(kind, _rope_problem)
    why = problem(config)
    if why:
        return [f"model: this {kind} model cannot be exported to GGUF: {why}"]
    return []


def sliding_window_note(config) -> str | None:
    """llama.cpp's llama and qwen2 graphs attend to the whole context, and its gemma2 graph slides
    every other block from the first: say so where the model would not."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "gemma2":
        kinds = getattr(config, "layer_types", None) or []
        differ = [i for i, kind in enumerate(kinds) if (kind == "sliding_attention") != (i % 2 == 0)]
        if differ:
            return (f"gemma2: llama.cpp slides blocks 0, 2, 4, ... over {window} tokens; this model's blocks "
                    f"{', '.join(map(str, differ))} are of the other kind (a cut keeps each block's own): outputs "
                    f"agree for contexts up to {window} tokens")
        return None
    used = config.model_type == "mistral" or getattr(config, "use_sliding_window", False)
    if window and used:
        return (f"{config.model_type}: llama.cpp attends to the whole context, the model to {window} tokens; "
                f"outputs agree for contexts up to {window} tokens")
    return None


# --- tensors -----------------------------------------------------------------------------------


def tensor_type(gguf_name: str, shape: tuple[int, ...], quant: str):
    """The GGML type one tensor is stored as in a file of type `quant`."""
    g = _gguf()
    types = g.GGMLQuantizationType
    if len(shape) == 1 or gguf_name.startswith("position_embd"):
        return types.F32
    wanted = ggml_type(quant)
    if quant in ("f32", "f16", "bf16"):
        return wanted
    if quant != "q8_0" and gguf_name.startswith(("token_embd.", "output.")):
        wanted = types.Q8_0
    block, _ = g.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else types.F16


def tensors(model, family: Family, weights=None) -> list[tuple[str, str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(transformers name, GGUF name, shape, a function giving the float32 array in llama.cpp's layout)
    of every tensor written, in order; each array is made only when asked for, one at a time. A
    tensor still on the meta device (a model read block by block, `compress.sequential`) is read
    from `weights`."""
    g = _gguf()
    config = model.config
    names = g.get_tensor_name_map(g.MODEL_ARCH[family.arch], config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    for name, tensor in model.state_dict().items():
        if name.endswith(family.skip) or (tied and name == "lm_head.weight"):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"{name}: no llama.cpp tensor name for it in {family.arch.lower()}; "
                              "the model has a tensor lmshrink does not know how to export")
        shape = tuple(family.tensor(name, torch.empty(tensor.shape, device="meta"), config).shape)

        def array(name: str = name, tensor: torch.Tensor = tensor) -> np.ndarray:
            value = weights.read(name) if tensor.device.type == "meta" else tensor
            return family.tensor(name, value.detach().float().cpu(), config).contiguous().numpy()

        out.append((name, gguf_name, shape, array))
    if (factors := rope_factors(config)) is not None:
        out.append(("rope_freqs", "rope_freqs.weight", factors.shape, lambda: factors))
    return out


# --- vocabulary --------------------------------------------------------------------------------

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

PRE_TOKENIZERS: dict[str, list[dict[str, Any]]] = {
    # llama.cpp's name for how text is split before the merges -> the tokenizer.json pre_tokenizer
    # steps that mean it (each step: the keys that must match)
    "gpt-2": [{"type": "ByteLevel", "use_regex": True}],
    "smollm": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}],
    "llama-bpe": [{"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}}, {"type": "ByteLevel", "use_regex": False}],
    "qwen2": [{"type": "Split", "pattern": {"Regex": _QWEN2_SPLIT}}, {"type": "ByteLevel", "use_regex": False}],
}


def _steps(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not pre:
        return []
    return pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json (None: none known)."""
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    for name, wanted in PRE_TOKENIZERS.items():
        if len(steps) == len(wanted) and all(all(step.get(k) == v for k, v in want.items())
                                             for step, want in zip(steps, wanted, strict=True)):
            return name
    return None


def tokenizer_kind(tokenizer_json: dict[str, Any]) -> str:
    """`gpt2` (byte-level BPE), `llama` (SentencePiece-style BPE with byte fallback), else refused."""
    model = tokenizer_json.get("model") or {}
    byte_level = any(step.get("type") == "ByteLevel" for step in _steps(tokenizer_json.get("pre_tokenizer")))
    if model.get("type") == "BPE" and byte_level:
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    raise ExportError(f"tokenizer: a {model.get('type')} tokenizer without byte-level pre-tokenization or byte "
                      "fallback cannot be written to GGUF by lmshrink")


def merge_scores(tokenizer_json: dict[str, Any]) -> dict[int, float]:
    """Token id -> minus the rank of the first BPE merge that makes it, from a tokenizer.json."""
    model = tokenizer_json.get("model") or {}
    vocab = model.get("vocab") or {}
    scores: dict[int, float] = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token = vocab.get(left + right)
        if token is not None and token not in scores:
            scores[token] = -float(rank)
    return scores


def adds_space_prefix(tokenizer_json: dict[str, Any]) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts a space before every text."""
    norm = tokenizer_json.get("normalizer") or {}
    norms = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    if any(n.get("type") == "Prepend" for n in norms):
        return True
    return any(step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never"
               and step.get("add_prefix_space", True) for step in _steps(tokenizer_json.get("pre_tokenizer")))


def _byte_level_vocab(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    types = _gguf().TokenType
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, kinds = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i].content)
            kinds.append(types.CONTROL if added[i].special else types.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            kinds.append(types.NORMAL)
        else:  # the embedding has rows the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            kinds.append(types.UNUSED)
    return tokens, kinds


def add_vocabulary(writer, tokenizer, n_vocab: int, pre: str | None) -> str:
    """Write the tokenizer into the file; returns the pre-tokenizer name used."""
    g = _gguf()
    if len(tokenizer) > n_vocab:
        raise ExportError(f"tokenizer: {len(tokenizer):,} tokens, more than the model's {n_vocab:,} embeddings")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp)
        if not (path / "tokenizer.json").is_file():
            raise ExportError("tokenizer: only fast tokenizers (tokenizer.json) can be written to GGUF")
        spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        kind = tokenizer_kind(spec)
        if kind == "gpt2":
            pre = pre or pre_tokenizer_name(spec)
            if pre is None:
                raise ExportError(
                    "tokenizer: its pre-tokenizer is not one lmshrink recognises "
                    f"({json.dumps(spec.get('pre_tokenizer'))[:120]}...); name llama.cpp's for it with "
                    f"--pre-tokenizer (known here: {', '.join(PRE_TOKENIZERS)})")
            tokens, kinds = _byte_level_vocab(tokenizer, n_vocab)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre)
            writer.add_token_list(tokens)
            writer.add_token_types(kinds)
        else:
            pre = pre or "default"
            vocab = g.LlamaHfVocab(path)
            texts, scores, kinds = [], [], []
            for text, score, kind_ in vocab.all_tokens():
                texts.append(text)
                scores.append(score)
                kinds.append(kind_)
            # llama.cpp's SentencePiece path merges the adjacent pair whose result scores highest;
            # `gguf` leaves every score at -1000 (no preference: other merges than the tokenizer's),
            # so each merge's result scores minus its rank, which makes llama.cpp merge in BPE order
            for token_id, score in merge_scores(spec).items():
                if token_id < len(scores):
                    scores[token_id] = score
            for i in range(len(texts), n_vocab):
                texts.append(f"[PAD{i}]".encode())
                scores.append(-1000.0)
                kinds.append(g.TokenType.UNUSED)
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre(pre)
            # llama.cpp's SentencePiece path puts a space before the text unless told otherwise:
            # Llama 2's tokenizer does (a Prepend normalizer or Metaspace), Gemma's does not
            writer.add_add_space_prefix(adds_space_prefix(spec))
            writer.add_token_list(texts)
            writer.add_token_scores(scores)
            writer.add_token_types(kinds)
        g.SpecialVocab(path, load_merges=kind == "gpt2", n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    return pre


# --- the file ----------------------------------------------------------------------------------


def write_gguf(model, tokenizer, path: str | Path, quant: str, name: str, record: dict[str, Any] | None = None,
               base_model: str | None = None, license: str | None = None, pre: str | None = None,
               weights=None) -> dict[str, Any]:
    """Write `model` (and its tokenizer) as one GGUF file of type `quant`, atomically, one tensor at a
    time (a model read block by block: its tensors from `weights`, `compress.sequential.LazyWeights`).

    Returns what the file holds: its types (tensors per GGML type) and pre-tokenizer."""
    g = _gguf()
    config = model.config
    problems = export_problems(config)
    if problems:
        raise ExportError(problems[0].removeprefix("model: "))
    if quant not in QUANTS:
        raise ExportError(f"quant: {quant!r} is not one of {', '.join(QUANTS)}")
    family = FAMILIES[config.model_type]
    arrays = tensors(model, family, weights)
    with atomic_file(path) as tmp:
        writer = g.GGUFWriter(tmp, g.MODEL_ARCH_NAMES[g.MODEL_ARCH[family.arch]])
        writer.add_type("model")
        writer.add_name(name)
        writer.add_quantized_by("lmshrink")
        if license:
            writer.add_license(license)
        if base_model:
            writer.add_base_model_count(1)
            writer.add_base_model_name(0, base_model)
        family.hparams(writer, config)
        writer.add_file_type(file_type(quant))
        writer.add_quantization_version(g.GGML_QUANT_VERSION)
        used_pre = add_vocabulary(writer, tokenizer, config.vocab_size, pre)
        if record:
            writer.add_string("lmshrink.record", json.dumps(record))
            if record.get("kept_layers") is not None:
                writer.add_array("lmshrink.kept_layers", [int(i) for i in record["kept_layers"]])
            if record.get("teacher"):
                writer.add_string("lmshrink.teacher", str(record["teacher"]))
        counts: dict[str, int] = {}
        types = [tensor_type(gguf_name, shape, quant) for _, gguf_name, shape, _ in arrays]
        for (_, gguf_name, shape, _), qtype in zip(arrays, types, strict=True):  # the tensors' table first
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
            stored = shape if qtype == g.GGMLQuantizationType.F32 else g.quants.quant_shape_to_byte_shape(shape, qtype)
            itemsize = 4 if qtype == g.GGMLQuantizationType.F32 else 1
            writer.add_tensor_info(gguf_name, stored, np.dtype(np.float32 if itemsize == 4 else np.uint8),
                                   math.prod(stored) * itemsize, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (_, _, _, array), qtype in zip(arrays, types, strict=True):  # then each tensor, made and written alone
            data = array()
            writer.write_tensor_data(data if qtype == g.GGMLQuantizationType.F32 else g.quants.quantize(data, qtype))
            del data
            release_freed_memory()
        writer.close()
    return {"tensor_types": counts, "pre_tokenizer": used_pre}


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, dequantised to float32 in llama.cpp's layout (row-major, (out, in))."""
    g = _gguf()
    reader = g.GGUFReader(str(path))
    return {t.name: g.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
            for t in reader.tensors}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The file's metadata as Python values (token lists left out)."""
    g = _gguf()
    reader = g.GGUFReader(str(path))
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    return {key: field.contents() for key, field in reader.fields.items() if key not in skip}


def file_name(name: str, quant: str) -> str:
    """The file `lmshrink export` writes for model `name` in type `quant`."""
    return f"{name}-{quant.upper()}.gguf"
