"""How much each block of a model matters, measured on calibration text.

Three scores per model, all on the same packed calibration blocks:
  - Block Influence (ShortGPT, Men et al. 2024): BI_i = 1 - E_tokens[cos(x_i, x_{i+1})], where x_i
    is the input of block i and x_{i+1} its output. Low BI: the block barely changes the stream.
  - Angular distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
    Layers"): d_n(l) = E_tokens[arccos(cos(x_l, x_{l+n})) / pi] for a run of n blocks starting at
    l. The run with the smallest d_n is the best n blocks to drop together.
  - Perplexity increase: the exact perplexity with block i removed, minus the full model's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmshrink import next_token
from lmshrink.architectures import blocks_of, from_block, residual_stream
from lmshrink.compress.model_gap import batch_gap, mean_gap
from lmshrink.compress.sequential import Blockwise
from lmshrink.compress.width import WidthSums
from lmshrink.config import SettingsError
from lmshrink.records import save_figure

METRICS = ("block_influence", "angular_distance", "ppl_increase")


class Similarities:
    """Block Influence per block and angular distance for every run length, summed over tokens
    batch by batch (`add`) and averaged at the end (`result`)."""

    def __init__(self, n: int):
        # angle_sum[k - 1][l]: summed angular distance between x_l and x_{l+k}, k = 1..n
        self.angle_sum = [torch.zeros(n - k + 1, dtype=torch.float64) for k in range(1, n + 1)]
        self.cos_sum = torch.zeros(n, dtype=torch.float64)
        self.tokens, self.n = 0, n

    def add(self, states: list[torch.Tensor]) -> None:
        """The n + 1 states x_0..x_n of the same tokens, (..., H) each."""
        states = [s.float().flatten(0, -2) for s in states]
        self.tokens += states[0].shape[0]
        for k in range(1, self.n + 1):
            for start in range(self.n - k + 1):
                cos = F.cosine_similarity(states[start], states[start + k], dim=-1).clamp(-1, 1)
                if k == 1:
                    self.cos_sum[start] += cos.sum().double().cpu()
                self.angle_sum[k - 1][start] += (torch.arccos(cos) / math.pi).sum().double().cpu()

    def result(self) -> dict[str, Any]:
        return {"block_influence": (1 - self.cos_sum / self.tokens).tolist(),
                "angular_distance": {str(k + 1): (a / self.tokens).tolist() for k, a in enumerate(self.angle_sum)}}


@torch.no_grad()
def removal_perplexities(model, rows: torch.Tensor, batch_size: int,
                         streams: list[list[torch.Tensor]]) -> tuple[float, list[float]]:
    """Perplexity of the full model and of the model with each single block removed, each row scored
    as one window (`next_token.nll`; each row already starts with the start tokens). `streams`: each
    batch's `residual_stream`. Without block i, the stream entering block i goes on from block i + 1
    (the blocks before it are the full model's, not run again), through the model's own forward with
    only the later blocks (`only_blocks`) and its input replaced; the full model's, and the one
    without the last block, enter its final norm."""
    n = len(blocks_of(model))
    next_token.split(model)  # its body/head split checked on the whole model, before any block is skipped

    def ppl(first: int, at: int) -> float:
        """Perplexity with blocks first..n-1 run on the stream `at` (an index into each batch's states)."""
        sums = []
        for start, states in zip(range(0, rows.shape[0], batch_size), streams, strict=True):
            with from_block(model, list(range(first, n)), first, states[at]):
                sums.append(batch_gap(model, rows[start : start + batch_size].to(states[at].device), "ppl", None))
        return mean_gap("ppl", sums)

    base = ppl(n, n)
    without = []
    for i in range(n):
        without.append(ppl(i + 1, i))
        print(f"  without block {i:>2}: perplexity {without[-1]:,.2f} (full model {base:,.2f})", flush=True)
    return base, without


@torch.no_grad()
def score(model, rows: torch.Tensor, batch_size: int = 4, ppl: bool = True) -> dict[str, Any]:
    """All importance scores of a model's blocks on packed calibration rows (N, T): one pass of the
    model for the similarities, whose states (with `ppl`: kept, (n + 1) x N x T x H in the model's dtype)
    then give each removal's perplexity from the removed block on."""
    device, n = next(model.parameters()).device, len(blocks_of(model))
    sums, streams = Similarities(n), []
    for i in range(0, rows.shape[0], batch_size):
        states = residual_stream(model, rows[i : i + batch_size].to(device))
        sums.add(states)
        if ppl:
            streams.append(states)
    scores = sums.result()
    if ppl:
        base, without = removal_perplexities(model, rows, batch_size, streams)
        scores.update(perplexity=base, ppl_without_block=without, ppl_increase=[w - base for w in without])
    scores["num_layers"] = n
    scores["tokens"] = rows.numel()
    return scores


@torch.no_grad()
def score_blockwise(runner: Blockwise, ppl: bool = True, widths: WidthSums | None = None) -> dict[str, Any]:
    """`score`'s scores from a model read one block at a time (`compress.sequential`): every row's
    stream passes each block once, and so does, for each block j already passed, the stream that
    skipped block j (the model without block j), so all n removals cost n(n - 1)/2 block passes
    where the whole-model path runs n whole models. Holds the n + 1 states (for the angular
    distances) and, with `ppl`, the n streams without a block: (2n + 1) x rows x T x H x 4 bytes.
    `widths` (the width scores' sums) watch each block on the full model's stream in the same pass."""
    n = len(runner.blocks)
    states, skipped = [runner.entering()], {}
    for i in range(n):
        with runner.block(i) as block:
            if ppl:
                skipped = {j: runner.run(i, x) for j, x in skipped.items()}
                skipped[i] = states[-1]  # the stream that skips block i goes on from block i + 1
            with widths.watching(i, block) if widths is not None else nullcontext():
                states.append(runner.run(i, states[-1]))
        print(f"  block {i:>2} of {n} passed", flush=True)
    sums = Similarities(n)
    sums.add(states)
    scores, last = sums.result(), states[-1]
    del states  # the head (an untied one is read now) needs the room more than the states
    if ppl:
        base = mean_gap("ppl", [runner.nll(last)])
        without = [mean_gap("ppl", [runner.nll(skipped[j])]) for j in range(n)]
        for i, value in enumerate(without):
            print(f"  without block {i:>2}: perplexity {value:,.2f} (full model {base:,.2f})", flush=True)
        scores.update(perplexity=base, ppl_without_block=without, ppl_increase=[w - base for w in without])
    scores["num_layers"] = n
    scores["tokens"] = runner.rows.numel()
    return scores


def plot(scores: dict[str, Any], path: str | Path, title: str) -> None:
    """Bar charts of Block Influence and perplexity increase, and a heat map of angular distances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = scores["num_layers"]
    has_ppl = "ppl_increase" in scores
    fig, axes = plt.subplots(1, 3 if has_ppl else 2, figsize=(16 if has_ppl else 11, 4))
    ax = axes[0]
    ax.bar(range(n), scores["block_influence"], color="tab:blue")
    ax.set(title="Block Influence = 1 - cos(in, out)", xlabel="block", ylabel="BI (higher = more important)")
    if has_ppl:
        ax = axes[1]
        inc = [max(v, 1e-3) for v in scores["ppl_increase"]]
        ax.bar(range(n), inc, color="tab:red")
        ax.set_yscale("log")
        ax.set(title=f"perplexity increase when removed (full: {scores['perplexity']:.2f})",
               xlabel="block", ylabel="delta perplexity (log)")
    ax = axes[-1]
    grid = torch.full((n, n), float("nan"))
    for k, values in scores["angular_distance"].items():
        grid[int(k) - 1, : len(values)] = torch.tensor(values)
    image = ax.imshow(grid.numpy(), aspect="auto", origin="lower", cmap="viridis")
    ax.set(title="angular distance of a run of n blocks", xlabel="first block l", ylabel="run length n")
    ax.set_yticks(range(0, n, max(1, n // 6)), [str(k + 1) for k in range(0, n, max(1, n // 6))])
    fig.colorbar(image, ax=ax)
    fig.suptitle(title, y=1.04)
    save_figure(fig, path)
    plt.close(fig)


def read_scores(path: str | Path, keys: Iterable[str], missing: str) -> dict[str, Any]:
    """A file score-layers wrote, holding `keys`; else one line naming the problem (`missing`: what
    to say, and do, when there is no such file)."""
    try:
        scores = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SettingsError(f"scores: {missing}") from None
    except json.JSONDecodeError as err:
        raise SettingsError(f"scores: {path} is not valid JSON ({err})") from None
    lacking = sorted(set(keys) - set(scores)) if isinstance(scores, dict) else sorted(keys)
    if lacking:
        raise SettingsError(f"scores: {path} is not a score-layers output (no {', '.join(lacking)})")
    return scores
