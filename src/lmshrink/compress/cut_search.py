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
from functools import partial
from pathlib import Path

import torch

from lmshrink import next_token
from lmshrink.architectures import architecture_of, blocks_of, from_block, residual_stream
from lmshrink.compress.model_gap import batch_gap, mean_gap
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
from lmshrink.integrity import kept
from lmshrink.models import cache_dir, release_freed_memory
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
        # the teacher's stream entering each block on the search rows: a candidate runs from its first
        # changed block on (`from_block`), and the teacher's distributions come from the last one
        device = next(teacher.parameters()).device
        next_token.split(teacher)  # its body/head split checked on the whole teacher, before any block is skipped
        self.streams = [residual_stream(teacher, rows[i : i + batch_size].to(device))
                        for i in range(0, rows.shape[0], batch_size)]
        self.teacher_refs = None
        if measure == "kl":
            self.teacher_refs = [self._from(list(range(self.n)), self.n, i, next_token.reference)
                                 for i in range(len(self.streams))]
        release_freed_memory()  # what the passes above freed, given back before the captures fill the memory
        if repair != "none":
            fit_rows = rows if fit_rows is None else fit_rows
            self.held = heldout_split(fit_rows)
            blocks = set(range(self.n - 1)) if fit_blocks is None else fit_blocks
            self.states, self.projs = capture(teacher, fit_rows, set(range(self.n + 1)), blocks,
                                              batch_size, proj_input=fits_from_proj_input(repair),
                                              proj_dtype=torch.float16)
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

    def _from(self, keep: list[int], first: int, batch: int, measure: Callable):
        """`measure(teacher, ids)` of one batch of the search rows with the blocks of `keep` from block
        `first` on, the teacher's own stream entering block `first` given to them."""
        ids = self.rows[batch * self.batch_size : (batch + 1) * self.batch_size]
        with from_block(self.teacher, keep, first, self.streams[batch][first]):
            return measure(self.teacher, ids.to(self.streams[batch][first].device))

    @torch.inference_mode()
    def score(self, keep: list[int]) -> float:
        """The measure of the student that keeps `keep` (repaired): lower is better. The blocks before
        the first one the cut changes (removed, or a fit folded in) are the teacher's: the candidate
        runs from there on the teacher's stream."""
        edits = self.edits(keep)
        first = min([i for i in range(self.n) if i not in keep] + list(edits), default=self.n)
        refs = self.teacher_refs or [None] * len(self.streams)
        with patched(self.teacher, edits):
            sums = [self._from(keep, first, batch, partial(batch_gap, measure=self.measure, teacher_ref=refs[batch]))
                    for batch in range(len(self.streams))]
        self.evaluated += 1
        return mean_gap(self.measure, sums)

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


def progress_file(weights: str, repair: str, measure: str, rows: torch.Tensor,
                  fit_rows: torch.Tensor | None) -> Path:
    """Where an iterative search's path is kept: lmshrink's cache (`cut-search/`), under the teacher's
    weights (`data.teacher_text.fingerprint`, or `files_fingerprint` of a teacher read block by block),
    the search's rows, the repair's fit rows, the repair and the measure."""
    digest = hashlib.sha256(json.dumps([weights, repair, measure]).encode())
    for tensor in (rows, fit_rows):
        digest.update(b"-" if tensor is None else tensor.cpu().numpy().tobytes())
    return cache_dir() / "cut-search" / f"{digest.hexdigest()[:32]}.json"


def files_fingerprint(folder: Path) -> str:
    """A checkpoint's weight files by name, size and modification time: written again, searched again."""
    files = sorted(folder.glob("*.safetensors"))
    return "files:" + json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])


SEARCHES: dict[str, Callable[[CutSearch, int], tuple[list[int], list[dict]]]] = {
    "iterative": CutSearch.iterative,
    "contiguous": CutSearch.contiguous,
}


# --- the searches on a teacher read one block at a time (`compress.sequential`) -----------------

Fit = tuple[str, torch.Tensor]


def span_fits_blockwise(runner, spans: set[tuple[int, int]], repair: str,
                        infos: dict | None = None) -> dict[tuple[int, int], Fit]:
    """Each span's repair (a, b: blocks a..b removed, a > 0) as `CutSearch` fits it, from the teacher's
    own activations on the fit rows of `runner`, in one pass of the teacher up to the last span's end:
    block a - 1's features and output are held from when the stream leaves it until every span from
    a has been fitted (the stream leaving block b is each one's target). `infos`, if given, gets each
    fit's held-out record (`repair._fit`'s)."""
    from lmshrink.compress.repair import _fit

    held, proj_input = heldout_split(runner.rows), fits_from_proj_input(repair)
    starts = {a - 1 for a, _ in spans}
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # block a - 1: (its features, its output)
    fits, stream = {}, runner.entering()
    for i in range(max((b for _, b in spans), default=-1) + 1):
        with runner.block(i):
            if i in starts:
                stream, m = runner.run_with_features(i, stream, proj_input)
                pending[i] = (m, stream)
            else:
                stream = runner.run(i, stream)
        for a, b in sorted(span for span in spans if span[1] == i):
            m, out = pending[a - 1]
            if architecture_of(runner.model.config).mlp_norm is None:
                u = stream - out
            else:
                with runner.block(a - 1):  # the norm before the residual add is the block's to apply
                    u = update_target(runner.model, a - 1, m, stream, out, proj_input)
            param, info = _fit(repair, held, m, u)
            fits[(a, b)] = (repair, param)
            if infos is not None:
                infos[(a, b)] = info
        for start in [s for s in pending if not any(a - 1 == s and b > i for a, b in spans)]:
            del pending[start]  # every span from it fitted
    return fits


TEACHER = "teacher"


@torch.inference_mode()
def walk_blockwise(search, students: dict, label: str) -> tuple[dict, torch.Tensor]:
    """Every student (key: (kept teacher blocks, {teacher block: its fit})) walked beside the teacher
    over the rows of `search` (a `Blockwise`), block by block, each block run while it is held by
    every stream that needs it: students that have run the same blocks with the same fits so far
    share one stream (a candidate cut costs nothing until it differs). The streams leaving the last
    block, and the teacher's."""
    everyone = {**students, TEACHER: (range(len(search.blocks)), {})}
    streams: dict[tuple, torch.Tensor] = {(): search.entering()}  # what was run so far -> the stream
    at = dict.fromkeys(everyone, ())
    for i in range(len(search.blocks)):
        with search.block(i):
            moved: dict[tuple, torch.Tensor] = {}
            for key, (keep, fits) in everyone.items():
                if i not in keep:
                    continue
                step = (i, id(fits[i])) if i in fits else (i,)
                went = (*at[key], step)
                if went not in moved:
                    with patched(search.model, {i: fits[i]} if i in fits else {}):
                        moved[went] = search.run(i, streams[at[key]])
                at[key] = went
            streams = {path: moved[path] if path in moved else streams[path] for path in set(at.values())}
        print(f"  {label}, one block at a time: block {i:>2} of {len(search.blocks)} ({len(streams)} streams)",
              flush=True)
    return {key: streams[at[key]] for key in students}, streams[at[TEACHER]]


def measure_blockwise(search, students: dict, measure: str, label: str) -> dict:
    """Each student's measure (`kl` from the teacher, or perplexity) over the rows of `search`."""
    ends, teacher = walk_blockwise(search, students, label)
    if measure == "kl":
        return search.kl(ends, teacher)
    return {key: math.exp(total / count) for key, (total, count) in ((k, search.nll(s)) for k, s in ends.items())}


def contiguous_blockwise(fit_runner, search, k: int, repair: str, measure: str) -> tuple[list[int], list[dict], int]:
    """`CutSearch.contiguous` on a teacher read one block at a time: every span's repair fitted in one
    pass of the teacher over the fit rows of `fit_runner` (None: no repair), then every span's student
    (the teacher without the span, its fit folded into the block before it) walked beside the teacher
    over the search rows of `search` (`walk_blockwise`: the students share the teacher's stream up to
    their span). Holds one stream per span (rows x T x H x 4 bytes). The kept blocks, every span's
    measure, and how many were scored."""
    n = len(search.blocks)
    drop = n - k
    spans = {a: (a, a + drop - 1) for a in range(k + 1)}
    fits = span_fits_blockwise(fit_runner, {s for s in spans.values() if s[0] > 0}, repair) \
        if fit_runner is not None else {}
    students = {a: ([i for i in range(n) if not a <= i <= b], {a - 1: fits[(a, b)]} if (a, b) in fits else {})
                for a, (a, b) in spans.items()}
    values = measure_blockwise(search, students, measure, "contiguous")
    candidates = []
    for a in sorted(students):
        candidates.append({"start": a, "removed": list(range(a, a + drop)), measure: values[a]})
        print(f"  contiguous: span {a}-{a + drop - 1}, {measure} {values[a]:.4f}", flush=True)
    best = min(candidates, key=lambda c: c[measure])
    print(f"  contiguous: removed blocks {best['removed']}, {measure} {best[measure]:.4f} "
          f"(best of {len(candidates)} spans)", flush=True)
    return [i for i in range(n) if i not in best["removed"]], candidates, len(candidates)


def iterative_blockwise(fit_runner, search, k: int, repair: str, measure: str,
                        progress: Path | None = None) -> tuple[list[int], list[dict], int]:
    """`CutSearch.iterative` on a teacher read one block at a time: at each removal, the repair of
    every span a candidate would leave (those not fitted at an earlier removal) fitted in one pass of
    the teacher over the fit rows of `fit_runner` (None: no repair), then every candidate walked beside
    the teacher over the search rows (`walk_blockwise`: a candidate shares the current student's stream
    up to the block where it differs). The path is kept in `progress` after every removal, and read
    back by a search stopped midway, as the whole-model search does. The kept blocks, the path, and
    how many candidates this run scored."""
    n = len(search.blocks)
    keep, path, fits, scored = list(range(n)), [], {}, 0
    if progress is not None and kept(progress, "the search starts over"):
        path = json.loads(progress.read_text())["path"][: n - k]
        for step in path:
            keep.remove(step["removed"])
        print(f"  iterative: {len(path)} removals read from {progress}", flush=True)
    while len(keep) > k:
        started = time.perf_counter()
        candidates = {j: [i for i in keep if i != j] for j in keep}
        needed = {span for c in candidates.values() for span in removed_spans(n, c) if span[0] > 0}
        fits = {span: fit for span, fit in fits.items() if span in needed}  # the rest are never asked again
        if fit_runner is not None and needed - fits.keys():
            fits.update(span_fits_blockwise(fit_runner, needed - fits.keys(), repair))
        students = {j: (c, {a - 1: fits[(a, b)] for a, b in removed_spans(n, c) if (a, b) in fits})
                    for j, c in candidates.items()}
        values = measure_blockwise(search, students, measure, f"iterative, removal {len(path) + 1}")
        best, scored = min(values, key=values.__getitem__), scored + len(values)
        keep.remove(best)
        path.append({"removed": best, measure: values[best], "candidates": {str(j): v for j, v in values.items()}})
        print(f"  iterative: removed block {best:>2} ({len(keep)} left), {measure} {values[best]:.4f} "
              f"({len(candidates)} candidates, {time.perf_counter() - started:.0f} s)", flush=True)
        if progress is not None:
            write_json(progress, {"path": path})
    return keep, path, scored
