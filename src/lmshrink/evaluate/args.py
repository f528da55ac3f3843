"""The evaluation settings groups every command that scores models shares (`eval`, the demo's and
the study's evaluations): which text a perplexity is measured on and how (`PerplexityArgs`),
which zero-shot benchmarks (`BenchmarkArgs`), and speed and memory (`TimingArgs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmshrink.config import setting
from lmshrink.evaluate.benchmarks import benchmark_root, task_problems


@dataclass(kw_only=True)
class PerplexityArgs:
    """Which text perplexity is measured on, and how (the `perplexity` group)."""

    data: list[str] = setting(
        [], "text sources for perplexity: files, folders, .jsonl, hf:NAME[:CONFIG][:SPLIT] or a corpus name")
    max_tokens: int = setting(16384, "tokens of each source to evaluate on")
    window: int = setting(512, "sliding-window length in tokens")
    stride: int = setting(256, "tokens between window starts (= window for plain chunked NLL)")

    def problems(self) -> list[str]:
        problems = []
        if self.window < 2:
            problems.append("window: must be at least 2 tokens")
        if not 1 <= self.stride <= self.window:
            problems.append(f"stride: must be between 1 and window ({self.window})")
        if self.max_tokens < 1:
            problems.append("max_tokens: must be positive")
        return problems


def two_sources(**changes: Any) -> PerplexityArgs:
    """Held-out perplexity on two offline sources: the Python tutorial (like the healing text) and
    the Linux kernel's process documentation (unlike it); window = stride, each token scored once."""
    return PerplexityArgs(**{"data": ["python-docs/tutorial", "kernel-docs/process"], "max_tokens": 4096,
                             "window": 512, "stride": 512, **changes})


@dataclass(kw_only=True)
class BenchmarkArgs:
    """Zero-shot benchmarks run by lm-evaluation-harness (the `benchmarks` group)."""

    tasks: list[str] = setting(
        [], "zero-shot benchmarks run by lm-evaluation-harness, e.g. arc_easy,hellaswag, or a suite: "
            "core (ARC-Easy/Challenge, HellaSwag, PIQA, WinoGrande, OpenBookQA, BoolQ, SciQ, COPA, LAMBADA), "
            "quick; mmlu is 5-shot by default")
    num_fewshot: int | None = setting(None, "examples in each benchmark prompt (default: 0; mmlu 5)")
    limit: int | None = setting(None, "score only the first N items of each benchmark task (CPU runs)")
    benchmark_source: str = setting("local", "local (the fetched real evaluation sets, offline) or hub "
                                             "(lm-eval's stock Hub datasets)")

    def problems(self) -> list[str]:
        problems = task_problems(self.tasks)
        if self.num_fewshot is not None and self.num_fewshot < 0:
            problems.append("num_fewshot: must be 0 or more")
        if self.limit is not None and self.limit < 1:
            problems.append("limit: must be positive (or none for every item)")
        if self.benchmark_source not in ("local", "hub"):
            problems.append(f"benchmark_source: {self.benchmark_source!r} is not local or hub")
        return problems

    def check_data(self) -> None:
        """A missing benchmark cache is reported before any model is loaded."""
        if self.tasks and self.benchmark_source == "local":
            benchmark_root()


@dataclass(kw_only=True)
class TimingArgs:
    """Latency, throughput, generation speed and memory (the `timing` group)."""

    speed: bool = setting(True, "also measure latency, throughput, generation speed and memory")
    speed_batch: int = setting(1, "batch size of the latency measurement")
    speed_length: int = setting(256, "sequence length of the latency measurement")
    gen_tokens: int = setting(32, "new tokens generated in the generation-speed measurement")
    repeats: int = setting(5, "timed repetitions (the median is reported)")

    def problems(self) -> list[str]:
        return [f"{name}: must be positive" for name in ("speed_batch", "speed_length", "gen_tokens", "repeats")
                if getattr(self, name) < 1]
