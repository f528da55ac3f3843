"""Block choice that measures the cut: which blocks, once removed (and repaired), hurt least.

Block Influence scores each block alone, once. These strategies instead measure whole cuts on
calibration text, by the mean forward KL from the teacher's next-token distribution (or by
perplexity), with the chosen repair applied to every candidate:

  iterative   remove one block at a time, each time the one whose removal hurts the current
              student least (SLEB, Song et al. 2024; BlockPruner, Zhong et al. 2024)
  contiguous  the best run of n - k consecutive blocks (Gromov et al. 2024; Minitron found a
              contiguous span best downstream)

Every candidate is scored on the teacher itself, run with only the kept blocks and the repair's
fits patched into its projections for the time of one forward pass. The fits come from the
teacher's activations, captured once (fit on the teacher: a candidate costs one forward pass),
on the repair's own calibration text where one is given (`fit_rows`), so that a candidate is
measured on text its fit never saw: fitted and measured on the same 2,048 tokens, a span early in
SmolLM2-135M (where a 576 x 576 map fits a few thousand tokens closely) looked best, and held up
worst on held-out text. The student finally built is repaired again, on the student.

Memory: the teacher's streams (float32) and every block's fit features (float16; a batch float16
cannot hold stays float32) on the fit rows are kept: blocks x tokens x (4 hidden + 2 features)
bytes. For SmolLM2-135M at 16,384 tokens about 1.1 GB of streams, plus 0.5 GB of MLP outputs
(replaceme) or 1.4 GB of MLP hidden activations (refit, 1,536 wide); for Gemma-3-270M 0.8 GB and
1.1 GB (2,048 wide). The teacher's distributions on the search rows are 2 hidden + 1 floats a
token (`next_token.Reference`), never tokens x vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmshrink.architectures import architecture_of, blocks_of, only_blocks
from lmshrink.compress.model_gap import gap, references
from lmshrink.compress.repair import (
    Moments,
    capture,
    fit_span,
    fits_from_proj_input,
    heldout_split,
    patched,
    removed_spans,
    update_target,
)
from lmshrink.data.teacher_text import fingerprint
from lmshrink.integrity import kept
from lmshrink.models import cache_dir
from lmshrink.records import write_json


class CutSearch:
    """Scores candidate cuts of `teacher` on calibration rows (N, T)."""

    def __init__(self, teacher, rows: torch.Tensor, repair: str = "none", measure: str = "kl",
                 batch_size: int = 4, fit_rows: torch.Tensor | None = None, fit_blocks: set[int] | None = None) -> None:
        """`fit_blocks`: the blocks a fit may go into (default every one but the last); a contiguous
        search to k blocks needs only blocks 0..k-1 (`fit_blocks_for`)."""
        self.teacher, self.rows, self.repair, self.measure = teacher, rows, repair, measure
        self.batch_size = batch_size
        self.n = len(blocks_of(teacher))
        self.fits: dict[tuple[int, int], tuple[str, torch.Tensor]] = {}
        if repair != "none":
            fit_rows = rows if fit_rows is None else fit_rows
            self.held = heldout_split(fit_rows)
            blocks = set(range(self.n - 1)) if fit_blocks is None else fit_blocks
            self.states, self.projs = capture(teacher, fit_rows, set(range(self.n + 1)), blocks,
                                              batch_size, proj_input=fits_from_proj_input(repair),
                                              proj_dtype=torch.float16)
        self.teacher_refs = references(teacher, rows, batch_size) if measure == "kl" else None
        self.evaluated = 0
        self.progress: Path | None = None  # where `iterative` keeps its path, step by step (`progress_file`)
        self.resumed = 0  # removals `iterative` read from `progress` instead of scoring them

    def _fit(self, a: int, b: int) -> tuple[str, torch.Tensor]:
        """The repair of span a..b from the teacher's activations (cached per span)."""
        if (a, b) not in self.fits:
            m, h = self.projs[a - 1], self.held
            u = update_target(self.teacher, a - 1, m, self.states[b + 1], self.states[a], fits_from_proj_input(self.repair))
            param, _ = fit_span(self.repair, Moments.of(m[:-h], u[:-h]), Moments.of(m[-h:], u[-h:]))
            self.fits[(a, b)] = (self.repair, param)
        return self.fits[(a, b)]

    def edits(self, keep: list[int]) -> dict[int, tuple[str, torch.Tensor]]:
        """The repair of the cut that keeps `keep`, as `repair.patched` takes it (teacher block indices)."""
        if self.repair == "none":
            return {}
        return {a - 1: self._fit(a, b) for a, b in removed_spans(self.n, keep) if a > 0}

    @torch.inference_mode()
    def score(self, keep: list[int]) -> float:
        """The measure of the student that keeps `keep` (repaired): lower is better."""
        with patched(self.teacher, self.edits(keep)), only_blocks(self.teacher, keep):  # patch by teacher index first
            value = gap(self.teacher, self.rows, self.measure, self.teacher_refs, self.batch_size)
        self.evaluated += 1
        return value

    def iterative(self, k: int) -> tuple[list[int], list[dict]]:
        """Remove blocks one at a time, each time the one whose removal scores best, down to k.

        With `progress` set, the path is written there after every removal, and a search stopped
        midway carries on from it; the path to k blocks begins the path to fewer, so any depth reuses
        the removals already made."""
        keep, path = list(range(self.n)), []
        if self.progress is not None and kept(self.progress, "the search starts over"):
            path = json.loads(self.progress.read_text())["path"][:self.n - k]
            for step in path:
                keep.remove(step["removed"])
            self.resumed = len(path)
            print(f"  iterative: {len(path)} removals read from {self.progress}", flush=True)
        while len(keep) > k:
            started = time.perf_counter()
            candidates = {}
            for j in keep:
                candidates[j] = self.score([i for i in keep if i != j])
                if time.perf_counter() - started > 10:  # a line at least every ~10 s on slow machines
                    print(f"    without block {j:>2}: {self.measure} {candidates[j]:.4f} "
                          f"({len(candidates)}/{len(keep)})", flush=True)
            best = min(candidates, key=candidates.__getitem__)
            keep.remove(best)
            path.append({"removed": best, self.measure: candidates[best],
                         "candidates": {str(j): v for j, v in candidates.items()}})
            print(f"  iterative: removed block {best:>2} ({len(keep)} left), {self.measure} {candidates[best]:.4f} "
                  f"({len(candidates)} candidates, {time.perf_counter() - started:.0f} s)", flush=True)
            if self.progress is not None:  # the loop runs only past the kept path: this one is longer
                write_json(self.progress, {"path": path})
        return keep, path

    def contiguous(self, k: int) -> tuple[list[int], list[dict]]:
        """The run of n - k consecutive blocks whose removal scores best."""
        drop = self.n - k
        candidates, spans = [], self.n - drop + 1
        for start in range(spans):
            keep = [i for i in range(self.n) if not start <= i < start + drop]
            began = time.perf_counter()
            candidates.append({"start": start, "removed": list(range(start, start + drop)),
                               self.measure: self.score(keep)})
            if self.repair != "none" and start > 0:  # each block's fit features serve one span here
                self.projs.pop(start - 1, None)
            print(f"  contiguous: span {start}-{start + drop - 1} ({start + 1}/{spans}), {self.measure} "
                  f"{candidates[-1][self.measure]:.4f} ({time.perf_counter() - began:.0f} s)", flush=True)
        best = min(candidates, key=lambda c: c[self.measure])
        print(f"  contiguous: removed blocks {best['removed']}, {self.measure} {best[self.measure]:.4f} "
              f"(best of {len(candidates)} spans)", flush=True)
        return [i for i in range(self.n) if i not in best["removed"]], candidates


def fit_blocks_for(strategy: str, n: int, k: int) -> set[int] | None:
    """The blocks a search to k of n blocks may fold a fit into: a contiguous span that keeps k
    blocks starts at block k at the latest, so its fit goes into one of blocks 0..k-1."""
    return set(range(min(k, n - 1))) if strategy == "contiguous" else None


def progress_file(search: CutSearch, fit_rows: torch.Tensor | None) -> Path:
    """Where `search`'s iterative path is kept: lmshrink's cache (`cut-search/`), under the teacher's
    weights, the search's rows, the repair's fit rows (`fit_rows`, as given to `CutSearch`), the
    repair and the measure."""
    digest = hashlib.sha256(json.dumps([fingerprint(search.teacher), search.repair, search.measure]).encode())
    for tensor in (search.rows, fit_rows):
        digest.update(b"-" if tensor is None else tensor.cpu().numpy().tobytes())
    return cache_dir() / "cut-search" / f"{digest.hexdigest()[:32]}.json"


SEARCHES: dict[str, Callable[[CutSearch, int], tuple[list[int], list[dict]]]] = {
    "iterative": CutSearch.iterative,
    "contiguous": CutSearch.contiguous,
}


# --- the contiguous search on a teacher read one block at a time (`compress.sequential`) ---------

def span_fits_blockwise(runner, drop: int, k: int, repair: str) -> dict[int, tuple[str, torch.Tensor]]:
    """Each contiguous span's repair as `CutSearch` fits it (from the teacher's own activations on the
    fit rows of `runner`), by the teacher block it folds into: the span starting at a (a = 1..k)
    folds into block a - 1, fitted when the teacher's stream has passed block a + drop - 1. Holds
    the features and output of the drop + 1 blocks whose spans are open."""
    from lmshrink.compress.repair import _fit

    held, proj_input = heldout_split(runner.rows), fits_from_proj_input(repair)
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block a - 1: (its features, its output)
    fits, stream = {}, runner.entering()
    for i in range(k + drop):  # the last span (a = k) ends at block k + drop - 1 = n - 1
        with runner.block(i):
            if i < k:
                stream, m = runner.run_with_features(i, stream, proj_input)
                pending[i] = (m, stream)
            else:
                stream = runner.run(i, stream)
        a = i + 1 - drop  # the span whose target (the stream leaving block a + drop - 1) is here
        if a >= 1:
            m, out = pending.pop(a - 1)
            if architecture_of(runner.model.config).mlp_norm is None:
                u = stream - out
            else:
                with runner.block(a - 1):  # the norm before the residual add is the block's to apply
                    u = update_target(runner.model, a - 1, m, stream, out, proj_input)
            fits[a - 1] = (repair, _fit(repair, held, m, u)[0])
    return fits


@torch.inference_mode()
def contiguous_blockwise(search, fits: dict[int, tuple[str, torch.Tensor]], k: int,
                         measure: str) -> tuple[list[int], list[dict]]:
    """`CutSearch.contiguous` on a teacher read one block at a time: every span's student (the
    teacher with the span removed and its fit, `fits`, folded into the block before it) is walked
    beside the teacher over the search rows of `search` (a `Blockwise`), block by block, each block
    passed by every student that runs it while it is held; then each student's measure against
    the teacher (`kl`) or its own perplexity. Holds one stream per span (rows x T x H x 4 bytes)."""
    n = len(search.blocks)
    drop = n - k
    teacher, students = search.entering(), {}
    if drop < n:
        students[0] = teacher  # the span from block 0: the stream entering block 0 goes on at block drop
    for i in range(n):
        with search.block(i):
            for a, stream in students.items():
                if a + drop <= i:  # past its span
                    students[a] = search.run(i, stream)
            if i + 1 <= k and i + 1 + drop <= n:  # the span from block i + 1 leaves block i with its fit
                with patched(search.model, {i: fits[i]} if i in fits else {}):
                    students[i + 1] = search.run(i, teacher)
            teacher = search.run(i, teacher)
        print(f"  contiguous, one block at a time: block {i:>2} of {n} passed by the teacher and "
              f"{sum(a + drop <= i for a in students) + (i + 1 in students)} spans", flush=True)
    candidates = []
    kls = search.kl(students, teacher) if measure == "kl" else {}
    for a in sorted(students):
        if measure == "kl":
            value = kls[a]
        else:
            total, count = search.nll(students[a])
            value = math.exp(total / count)
        candidates.append({"start": a, "removed": list(range(a, a + drop)), measure: value})
        print(f"  contiguous: span {a}-{a + drop - 1}, {measure} {value:.4f}", flush=True)
    best = min(candidates, key=lambda c: c[measure])
    print(f"  contiguous: removed blocks {best['removed']}, {measure} {best[measure]:.4f} "
          f"(best of {len(candidates)} spans)", flush=True)
    return [i for i in range(n) if i not in best["removed"]], candidates
