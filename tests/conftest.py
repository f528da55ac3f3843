"""Tiny random models of every supported architecture, built here (no Hub), and real text."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import transformers as T

from lmshrink.data.assets import corpus_path, gpt2_tokenizer_path
from lmshrink.models import cache_dir

VOCAB = 128

TINY_CONFIGS = {
    "gpt2": lambda n: T.GPT2Config(n_layer=n, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=128,
                                   bos_token_id=0, eos_token_id=0),
    "gpt_neo": lambda n: T.GPTNeoConfig(num_layers=n, hidden_size=32, num_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=128, window_size=8,
                                        attention_types=[[["global", "local"], n // 2]],
                                        bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda n: T.GPTNeoXConfig(num_hidden_layers=n, hidden_size=32, num_attention_heads=2,
                                          intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128),
    "opt": lambda n: T.OPTConfig(num_hidden_layers=n, hidden_size=32, num_attention_heads=2, ffn_dim=64,
                                 vocab_size=VOCAB, word_embed_proj_dim=32, max_position_embeddings=128,
                                 pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "llama": lambda n: T.LlamaConfig(num_hidden_layers=n, hidden_size=32, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=64, vocab_size=VOCAB,
                                     tie_word_embeddings=True),
    "mistral": lambda n: T.MistralConfig(num_hidden_layers=n, hidden_size=32, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=64, vocab_size=VOCAB,
                                         sliding_window=8),
    "qwen2": lambda n: T.Qwen2Config(num_hidden_layers=n, hidden_size=32, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=64, vocab_size=VOCAB,
                                     use_sliding_window=True, sliding_window=8, max_window_layers=n // 2),
    "gemma3_text": lambda n: T.Gemma3TextConfig(num_hidden_layers=n, hidden_size=32, num_attention_heads=2,
                                                num_key_value_heads=1, intermediate_size=64, vocab_size=VOCAB,
                                                head_dim=16, sliding_window=8,
                                                layer_types=["sliding_attention", "full_attention"] * (n // 2)),
    "qwen3": lambda n: T.Qwen3Config(num_hidden_layers=n, hidden_size=32, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=64, vocab_size=VOCAB, head_dim=16),
    "phi3": lambda n: T.Phi3Config(num_hidden_layers=n, hidden_size=32, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=64, vocab_size=VOCAB,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma2": lambda n: T.Gemma2Config(num_hidden_layers=n, hidden_size=32, num_attention_heads=2,
                                       num_key_value_heads=1, intermediate_size=64, vocab_size=VOCAB,
                                       head_dim=16, sliding_window=8),
    "smollm3": lambda n: T.SmolLM3Config(num_hidden_layers=n, hidden_size=32, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=64, vocab_size=VOCAB,
                                         no_rope_layers=[1, 0] * (n // 2), pad_token_id=0,
                                         bos_token_id=1, eos_token_id=2),
}

ARCHS = list(TINY_CONFIGS)

# What a run keeps in lmshrink's cache for a later run to read back instead of computing
RUN_STATE = ("cut-search", "teacher-text")


@pytest.fixture(scope="session")
def asset_cache(tmp_path_factory) -> Path:
    """lmshrink's cache as the tests see it: every fetched asset, linked (so a corpus fetched on first
    use lands in the real cache, and a corpus's path, which keys `datasets`' cache, is the same all
    session), and none of the run state."""
    real, cache = cache_dir(), tmp_path_factory.mktemp("cache")
    real.mkdir(parents=True, exist_ok=True)
    for entry in real.iterdir():
        if entry.name not in RUN_STATE:
            (cache / entry.name).symlink_to(entry)
    return cache


@pytest.fixture(autouse=True)
def no_kept_run_state(asset_cache, tmp_path_factory, monkeypatch):
    """Each test sees none of the run state an earlier test or a user's run kept, and keeps none of
    its own where another can read it: a test that searches a cut or samples a teacher computes it."""
    for name in RUN_STATE:
        link = asset_cache / name
        link.unlink(missing_ok=True)
        link.symlink_to(tmp_path_factory.mktemp(name))
    monkeypatch.setenv("LMSHRINK_CACHE", str(asset_cache))


def tiny_model(kind: str, n_layers: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(TINY_CONFIGS[kind](n_layers))
    return model.eval()


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    return T.AutoTokenizer.from_pretrained(gpt2_tokenizer_path())


@pytest.fixture(scope="session")
def real_text(tmp_path_factory):
    """A few KB of real English (the Python tutorial) as a text file."""
    text = (corpus_path("python-docs/tutorial") / "introduction.rst.txt").read_text()[:6000]
    path = tmp_path_factory.mktemp("text") / "intro.txt"
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, gpt2_tokenizer):
    """A 4-block GPT-2 with GPT-2's real vocabulary and tokenizer, saved as a folder."""
    torch.manual_seed(0)
    config = T.GPT2Config(n_layer=4, n_embd=32, n_head=2, n_positions=256)
    model = T.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    model.save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    return folder


def stopped_during_step_three(monkeypatch, command, signum: int = signal.SIGINT) -> int:
    """`command()` (a training run) with `signum` sent to this process as its step 3 begins, as a
    scheduler or Ctrl-C would: the run finishes the step, writes a checkpoint and stops."""
    from lmshrink.heal.callbacks import StopOnSignal

    def send(self, args, state, control, **kwargs):
        if state.global_step == 2:  # during step 3
            os.kill(os.getpid(), signum)

    with monkeypatch.context() as patch:
        patch.setattr(StopOnSignal, "on_step_begin", send, raising=False)
        return command()


def framed_tokenizer(tokenizer, start: list[str], end: list[str] = ()):
    """GPT-2's tokenizer made to add `start` tokens before every text and `end` tokens after it, as
    Gemma's (`<bos>`), Llama 3's (`<|begin_of_text|>`) or a BERT-like tokenizer (two) do."""
    import copy

    from tokenizers.processors import TemplateProcessing

    framed = copy.deepcopy(tokenizer)
    framed.add_special_tokens({"additional_special_tokens": [t for t in (*start, *end) if t not in framed.get_vocab()]})
    ids = [(t, framed.convert_tokens_to_ids(t)) for t in dict.fromkeys((*start, *end))]
    framed.backend_tokenizer.post_processor = TemplateProcessing(single=" ".join([*start, "$A", *end]), special_tokens=ids)
    return framed


@pytest.fixture(scope="session")
def tokenizers(gpt2_tokenizer) -> dict:
    """Three conventions: nothing added (GPT-2, SmolLM2), one start token (Gemma, Llama 3), and two
    special tokens around each text (a start and an end)."""
    return {"none": gpt2_tokenizer, "bos": framed_tokenizer(gpt2_tokenizer, ["<bos>"]),
            "two": framed_tokenizer(gpt2_tokenizer, ["<s>"], ["</s>"])}


# --- the fast loop ------------------------------------------------------------------------------
# `make test-fast` runs the tests that took under E2E_SECONDS in the last recorded run
# (tests/durations.json, rewritten by `make durations`): every unit and numerical test, none of the
# whole-command runs. CI runs everything.
#
# `make test` runs one pytest-xdist worker per core. Each worker (and every process a test starts)
# gets its share of the cores as torch threads, since a worker per core each on every core thrashes;
# and the workers take the modules with the most recorded seconds first, each module's longest tests
# first, so no long test is left to run alone at the end (a module stays together: its fixtures are
# built once per worker).
DURATIONS = Path(__file__).with_name("durations.json")
E2E_SECONDS = 1.5
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS: no affinity
    THREADS = max(1, CORES // WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    torch.set_num_threads(THREADS)


def longest_first(items: list, seconds: dict[str, float]) -> list:
    """`items` with the modules of most recorded `seconds` first, each module's own longest first
    (sorts are stable: ties keep the collected order)."""
    module = {}
    for item in items:
        name = item.nodeid.split("::")[0]
        module[name] = module.get(name, 0.0) + seconds.get(item.nodeid, 0.0)
    return sorted(items, key=lambda item: (-module[item.nodeid.split("::")[0]], -seconds.get(item.nodeid, 0.0)))


def pytest_addoption(parser):
    parser.addoption("--record-durations", action="store_true",
                     help="write each test's setup + call + teardown seconds to tests/durations.json")


def pytest_collection_modifyitems(config, items):
    import json

    recorded = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    for item in items:
        if recorded.get(item.nodeid, 0) >= E2E_SECONDS:
            item.add_marker(pytest.mark.e2e)
    if WORKERS > 1:
        items[:] = longest_first(items, recorded)


def pytest_collection_finish(session):
    """Every object alive once the tests are collected (torch, transformers and the test modules:
    ~400k) moved out of the collector's sight: a full collection (accelerate runs one as each
    training run ends) then costs milliseconds instead of ~0.2 s. They live all session anyway."""
    import gc

    gc.collect()
    gc.freeze()


_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
    _seconds[report.nodeid] = _seconds.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    worker = hasattr(session.config, "workerinput")  # under xdist the controller hears every report
    if session.config.getoption("--record-durations") and _seconds and not worker:
        import json

        from lmshrink.records import write_json

        recorded = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
        write_json(DURATIONS, dict(sorted({**recorded, **{k: round(v, 2) for k, v in _seconds.items()}}.items())))
