"""Cutting a teacher's blocks, as `truncate` does and every command that cuts (prune, search,
the study, the demo) reuses: the `cut` settings group (`CutArgs`), the block choice (a fixed
strategy, block scores, or measured cuts by `compress.cut_search`), the cut
(`compress.truncation`) and its training-free repair (`compress.repair`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from lmshrink.architectures import blocks_of, context_limit
from lmshrink.compress.cut_search import (
    SEARCHES,
    CutSearch,
    contiguous_blockwise,
    files_fingerprint,
    fit_blocks_for,
    iterative_blockwise,
    progress_file,
)
from lmshrink.compress.model_gap import MEASURES
from lmshrink.compress.repair import FIT_ON, REPAIRS, needs, refine, repair, repair_problems
from lmshrink.compress.sequential import Blockwise, refine_blockwise, repair_blockwise
from lmshrink.compress.truncation import STRATEGIES, select_layers, truncate_model
from lmshrink.config import SettingsError, setting
from lmshrink.data.sources import Framing, calibration_rows
from lmshrink.data.teacher_text import PROBE_STEPS, TEACHER_TEXT, fingerprint, teacher_rows, writing_seconds
from lmshrink.errors import one_of
from lmshrink.evaluate.measure import count_parameters
from lmshrink.models import no_tokenizer

CHOICES = (*STRATEGIES, *SEARCHES)


@dataclass
class CutArgs:
    """How blocks are chosen by measuring cuts, and how the cut is repaired before any training."""

    repair: str = setting("refit", f"training-free repair of each removed span: {', '.join(REPAIRS)}")
    repair_data: list[str] = setting([TEACHER_TEXT, "python-docs/library"],
                                     f"calibration text of the repair, mixed in equal parts: sources, or "
                                     f"{TEACHER_TEXT!r} for text sampled from the teacher at T 1")
    repair_tokens: int = setting(16384, "calibration tokens of the repair (1/8 of the rows held out to choose lambda)")
    repair_teacher_minutes: float = setting(15.0, f"the longest the teacher may take writing its share of --repair-data "
                                                 f"(projected from {PROBE_STEPS} timed steps; written once, then "
                                                 "cached): over it the share is left out, said, where other sources "
                                                 "remain")
    repair_fit: str = setting("student", f"inputs of each span's fit: {', '.join(FIT_ON)} (student: the partly "
                                         "repaired student's own activations)")
    repair_strength: list[float] = setting([1.0], "strengths each span's fit is tried at (scaled by each); the one "
                                                  "whose output is closest to the teacher's on held-out rows (forward "
                                                  "KL) is kept (one value: applied as given); 1: the method as published")
    repair_epochs: int = setting(0, "passes of Adam fitting the repaired projections further on the output (forward "
                                    "KL from the teacher's next-token distribution on the calibration rows, every "
                                    "other weight frozen); the held-out rows keep the best pass; 0: the "
                                    "least-squares fit alone")
    repair_lr: float = setting(1e-3, "Adam's learning rate for --repair-epochs")
    repair_downstream: bool = setting(False, "also fit every kept block after the first cut the same way (the MLP "
                                             "output projection, least squares on the student's own stream), each "
                                             "to the teacher's stream where the same teacher block ends")
    search_measure: str = setting("kl", f"what strategies {' and '.join(SEARCHES)} minimise: {', '.join(MEASURES)} "
                                        "(kl: forward KL from the teacher)")
    search_tokens: int = setting(2048, f"calibration tokens (of --calib-data) on which {' and '.join(SEARCHES)} "
                                       "measure each candidate cut")

    def problems(self) -> list[str]:
        problems = []
        problems += one_of("repair", self.repair, REPAIRS)
        problems += one_of("repair_fit", self.repair_fit, FIT_ON)
        problems += one_of("search_measure", self.search_measure, MEASURES)
        if self.repair != "none" and not self.repair_data:
            problems.append("repair_data: name at least one calibration source (or --repair none)")
        if not self.repair_strength or any(not 0 < v <= 2 for v in self.repair_strength):
            problems.append("repair_strength: give one or more strengths in (0, 2], e.g. 0.5,0.75,1")
        if self.repair_epochs < 0 or self.repair_lr <= 0:
            problems.append("repair_epochs, repair_lr: give a pass count of 0 or more and a positive rate, e.g. 4 and 1e-3")
        if self.repair_epochs and self.repair == "none":
            problems.append("repair_epochs: fits the repaired projections further, and --repair none fits none; "
                            "choose a repair (e.g. --repair refit) or --repair-epochs 0")
        if self.repair_downstream and (self.repair == "none" or self.repair_fit != "student"):
            problems.append("repair_downstream: fits each block after the cut on the student's own stream; give a "
                            "repair (e.g. --repair refit) with --repair-fit student, or leave --repair-downstream out")
        if self.repair_teacher_minutes < 0:
            problems.append("repair_teacher_minutes: give 0 or more minutes (0: never wait for the teacher to write)")
        if self.repair_tokens < 2 or self.search_tokens < 2:
            problems.append("repair_tokens, search_tokens: must be at least 2")
        return problems


def kept_count(n: int, ratio: float) -> int:
    """Blocks kept by --ratio: n x ratio rounded half up (0.75 of 18 = 13.5 keeps 14), at least one."""
    return max(1, math.floor(n * ratio + 0.5))


def calibration_mix(sources: list[str], model, tokenizer, tokens: int, seq_len: int, seed: int = 0,
                    teacher_minutes: float = math.inf) -> tuple[torch.Tensor, list[str]]:
    """(N, seq_len) calibration rows and the sources they came from: an equal share of `tokens` from each source (`teacher`:
    sampled from `model` once, then read from the cache; left out, said, where writing it would take
    over `teacher_minutes` and other sources remain), shuffled together so held-out rows come from
    every source."""
    share = max(seq_len, tokens // len(sources))
    written = max(1, share // seq_len)  # the teacher's rows
    if TEACHER_TEXT in sources and len(set(sources)) > 1 and \
            (seconds := writing_seconds(model, tokenizer, written, seq_len, seed=seed)) > teacher_minutes * 60:
        sources = [s for s in sources if s != TEACHER_TEXT]
        print(f"[lmshrink] repair calibration: {', '.join(sources)} only; the teacher would take about "
              f"{seconds / 60:,.0f} min writing its {written * seq_len:,} tokens (projected from "
              f"{PROBE_STEPS} timed steps), over --repair-teacher-minutes {teacher_minutes:g}: raise it to have them "
              "written (once: they are cached)", flush=True)
        share = max(seq_len, tokens // len(sources))
    parts = [teacher_rows(model, tokenizer, written, seq_len, seed=seed) if source == TEACHER_TEXT
             else calibration_rows(source, tokenizer, share, seq_len) for source in sources]
    rows = torch.cat(parts)
    return rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))], sources


def removal_share(model, n: int, k: int) -> str:
    """What cutting n - k of n blocks removes, said before the cut: on Gemma-3-270M a quarter of the
    blocks is under a tenth of the parameters (the 262k-token embedding is most of the model)."""
    total = count_parameters(model)
    per_block = [count_parameters(block) for block in blocks_of(model)]
    least, most = sum(sorted(per_block)[: n - k]), sum(sorted(per_block)[k:])
    share = f"{least / total:.1%}" if least == most else f"{least / total:.1%}-{most / total:.1%}"
    outside = total - sum(per_block)
    return (f"cutting {n - k} of {n} blocks removes {share} of the {total / 1e6:,.1f}M parameters "
            f"({outside / 1e6:,.1f}M are outside the blocks: embeddings, head, final norm)")


def cut(teacher, tokenizer, n: int, k: int, strategy: str, keep: list[int] | None, scores: dict | None,
        metric: str, args: CutArgs, calib_data: str, calib_tokens: int):
    """Choose the blocks, cut and repair: the student and what its record says about the cut."""
    _check(teacher, tokenizer, strategy, keep, args)
    length = min(512, context_limit(teacher.config) or 512)
    record: dict[str, Any] = {"framing": Framing.of(tokenizer).record(tokenizer)} if tokenizer is not None else {}
    print(removal_share(teacher, n, k))
    started = time.perf_counter()
    repair_rows = None  # the repair's calibration rows: the search's fits and the student's repair
    calib_seconds, captured = 0.0, None
    if args.repair != "none":
        repair_rows, used = calibration_mix(args.repair_data, teacher, tokenizer, args.repair_tokens,
                                            min(length, args.repair_tokens), teacher_minutes=args.repair_teacher_minutes)
        args = dataclasses.replace(args, repair_data=used)  # what the record and the lines below name
        calib_seconds = time.perf_counter() - started
    if keep is None and strategy in SEARCHES:
        keep, record["search"], captured = _search(teacher, tokenizer, n, k, strategy, args, calib_data, length,
                                                   repair_rows)
        record["search"]["seconds"] = time.perf_counter() - started - calib_seconds
    else:
        keep = select_layers(n, strategy, k, keep, scores, metric)
    student = truncate_model(teacher, keep)
    if repair_rows is not None:
        student, record["repair"] = _repair(teacher, student, keep, repair_rows, args, captured, calib_seconds)
    return student, keep, record


def _check(teacher, tokenizer, strategy: str, keep: list[int] | None, args: CutArgs) -> None:
    """The cut's settings against this teacher, before any text is read."""
    problems = repair_problems(teacher.config, args.repair)
    if problems:
        raise SettingsError(problems[0])
    if keep is None and strategy in SEARCHES and tokenizer is None:
        raise no_tokenizer(teacher.name_or_path)
    if args.repair != "none" and tokenizer is None:  # the repair reads calibration text
        raise SettingsError(f"repair: {no_tokenizer(teacher.name_or_path)}; or cut without a repair: --repair none")


def _search(teacher, tokenizer, n: int, k: int, strategy: str, args: CutArgs, calib_data: str, length: int,
            repair_rows: torch.Tensor | None) -> tuple[list[int], dict[str, Any], tuple[dict, dict] | None]:
    """The blocks a measured search keeps, its record, and the teacher's captures the student's
    repair will read (None without a repair)."""
    rows = calibration_rows(calib_data, tokenizer, args.search_tokens, min(length, args.search_tokens))
    fitted = (f", each candidate repaired by {args.repair} fitted on {repair_rows.numel():,} tokens of "
              f"{', '.join(args.repair_data)}" if repair_rows is not None else "")
    print(f"choosing {k} of {n} blocks by {strategy} search ({args.search_measure} on {rows.numel():,} tokens of "
          f"{calib_data}{fitted})")
    search = CutSearch(teacher, rows, args.repair, args.search_measure, fit_rows=repair_rows,
                       fit_blocks=fit_blocks_for(strategy, n, k))
    search.progress = progress_file(fingerprint(teacher), search.repair, search.measure, rows, repair_rows)  # carries on
    keep, path = SEARCHES[strategy](search, k)
    record = {"strategy": strategy, "measure": args.search_measure, "tokens": rows.numel(), "repair": args.repair,
              "candidates_scored": search.evaluated, "removals_read": search.resumed, "path": path}
    # what of the search's captures the student's repair reads is kept, the rest let go before
    # the student is built (on Gemma-3-270M 1.8 GB: every block's stream and fit features)
    captured = None
    if repair_rows is not None:
        states, projs = needs(n, keep, args.repair_fit, args.repair_downstream)
        captured = ({i: search.states[i] for i in states if i in search.states},
                    {i: search.projs[i] for i in projs if i in search.projs})
    return keep, record, captured


def _repair(teacher, student, keep: list[int], repair_rows: torch.Tensor, args: CutArgs,
            captured: tuple[dict, dict] | None, calib_seconds: float) -> tuple[Any, dict[str, Any]]:
    """The cut repaired (and fitted on the output with --repair-epochs), with what was done, said in a line each."""
    mark = time.perf_counter()
    student, fits = repair(teacher, student, keep, repair_rows, args.repair, args.repair_fit,
                           tuple(args.repair_strength), captured=captured, downstream=args.repair_downstream)
    spans = [s for s in fits if not s.get("downstream")]
    record = {"method": args.repair, "fit_on": args.repair_fit, "data": args.repair_data,
              "strengths": args.repair_strength, "downstream": [s for s in fits if s.get("downstream")],
              "tokens": repair_rows.numel(), "spans": spans, "seconds": time.perf_counter() - mark,
              "calibration_seconds": calib_seconds}
    if args.repair_epochs:
        blocks = [s["student_block"] for s in spans if "student_block" in s]
        record["refine"] = said(refine(teacher, student, blocks, repair_rows, args.repair_epochs, args.repair_lr))
    errors = ", ".join(f"{s['span'][0]}-{s['span'][1]}: {s['heldout_error']:.2f}"
                       + (f" (applied at strength {s['strength']:g})" if args.repair_strength != [1.0] else "")
                       for s in spans if "heldout_error" in s)
    print(f"repaired by {args.repair} on {repair_rows.numel():,} tokens of {', '.join(args.repair_data)} in "
          f"{record['seconds']:.0f} s (gathering the text: {calib_seconds:.0f} s); held-out error vs the plain cut "
          f"per span: {errors}")
    if args.repair_downstream:
        fitted = [s for s in record["downstream"] if s["heldout_error"] < 1]
        print(f"downstream: {len(fitted)} of {len(record['downstream'])} blocks after the cut fitted; held-out "
              "error vs unfitted: " + ", ".join(f"{s['block']}: {s['heldout_error']:.3f}" for s in fitted))
    return student, record


def said(refined: dict[str, Any]) -> dict[str, Any]:
    """A --repair-epochs fit's record (`repair.refine`, `sequential.refine_blockwise`), said in a line."""
    if "skipped" in refined:
        print(f"not fitted on the output: {refined['skipped']}")
    else:
        kl = refined["heldout_kl"]
        print(f"fitted on the output for {refined['epochs']} passes in {refined['seconds']:.0f} s: held-out "
              f"KL {kl[0]:.4f} -> {kl[refined['kept_epoch']]:.4f} (pass {refined['kept_epoch']} kept)")
    return refined


# --- the same cut on a teacher read one block at a time (`compress.sequential`) ------------------

def cut_sequential(model, weights, tokenizer, n: int, k: int, strategy: str, keep: list[int] | None,
                   scores: dict | None, metric: str, args: CutArgs, calib_data: str) -> tuple[Blockwise, list[int], dict]:
    """`cut` on a lazily read teacher (`compress.sequential`): the blocks chosen (a fixed strategy,
    scores, or the contiguous search walked block by block), the cut repaired block by block; the
    runner holding each span's fit (`write_student` folds them in), the kept blocks and the record.
    The tokenizer is the caller's to check. Text the teacher writes itself is left out of the repair's
    calibration, said: it would take a whole-model pass per token."""
    length = min(512, context_limit(model.config) or 512)
    record: dict[str, Any] = {"framing": Framing.of(tokenizer).record(tokenizer)} if tokenizer is not None else {}
    if k < n:
        print(removal_share(model, n, k))
    rows, sources = None, [s for s in args.repair_data if s != TEACHER_TEXT] or [calib_data]
    if args.repair != "none" and k < n:
        if TEACHER_TEXT in args.repair_data:
            print(f"[lmshrink] repair calibration: {', '.join(sources)} only; text the teacher writes itself would "
                  f"take a whole-model pass per token, which this block-by-block run does not make", flush=True)
        rows, _ = calibration_mix(sources, None, tokenizer, args.repair_tokens, min(length, args.repair_tokens))
    if keep is None and strategy in SEARCHES:
        started = time.perf_counter()
        search = calibration_rows(calib_data, tokenizer, args.search_tokens, min(length, args.search_tokens))
        print(f"choosing {k} of {n} blocks by {strategy} search ({args.search_measure} on {search.numel():,} tokens of "
              f"{calib_data}, one block at a time)", flush=True)
        fit_runner = Blockwise(model, weights, rows, 4) if rows is not None else None
        searched = Blockwise(model, weights, search, 4)
        if strategy == "contiguous":
            keep, path, scored = contiguous_blockwise(fit_runner, searched, k, args.repair, args.search_measure)
        else:
            progress = progress_file(files_fingerprint(weights.folder), args.repair, args.search_measure, search, rows)
            keep, path, scored = iterative_blockwise(fit_runner, searched, k, args.repair, args.search_measure, progress)
        record["search"] = {"strategy": strategy, "measure": args.search_measure, "tokens": search.numel(),
                            "repair": args.repair, "candidates_scored": scored, "path": path,
                            "seconds": time.perf_counter() - started, "sequential": True}
    elif k < n or keep is not None:
        keep = select_layers(n, strategy, k, keep, scores, metric)
    else:
        keep = list(range(n))
    runner = Blockwise(model, weights, rows if rows is not None else torch.zeros(1, 2, dtype=torch.long), 4)
    if rows is not None:
        started = time.perf_counter()
        fits = repair_blockwise(runner, keep, args.repair, args.repair_fit, args.repair_downstream,
                                tuple(args.repair_strength))
        spans = [s for s in fits if not s.get("downstream")]
        record["repair"] = {"method": args.repair, "fit_on": args.repair_fit, "data": sources,
                            "strengths": args.repair_strength,
                            "downstream": [s for s in fits if s.get("downstream")], "tokens": rows.numel(),
                            "spans": spans, "seconds": time.perf_counter() - started, "path": "sequential"}
        print(f"repaired by {args.repair} on {rows.numel():,} tokens of {', '.join(sources)}, one block at a time, "
              f"in {record['repair']['seconds']:.0f} s; held-out error vs the plain cut per span: "
              + ", ".join(f"{s['span'][0]}-{s['span'][1]}: {s['heldout_error']:.2f}" for s in spans
                          if "heldout_error" in s))
        if args.repair_downstream:
            print(f"downstream: {len(record['repair']['downstream'])} blocks after the cut fitted, one block at a time")
        if args.repair_epochs:
            blocks = [s["student_block"] for s in spans if "student_block" in s]
            record["repair"]["refine"] = said(refine_blockwise(runner, keep, blocks, args.repair_epochs, args.repair_lr))
    return runner, keep, record
