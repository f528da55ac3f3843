"""The Trainer callbacks of every healing run: `metrics.jsonl`, checkpoints that describe
themselves, a signal turned into a whole checkpoint, the profiler."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lmshrink.records import RECORD, count, write_json, write_text


class MetricsFile(TrainerCallback):
    """Appends every log record to metrics.jsonl (main process only). A run resumed from step N keeps
    the records up to N and drops the later ones (they are trained again) and the stopped part's
    summary, so every step and one summary is in the file; a fresh run starts a fresh file."""

    def __init__(self, path: Path, keep_until: int = 0):
        self.path = path
        self.kept: list[dict[str, Any]] = []
        if path.is_file():
            records = map(json.loads, filter(str.strip, path.read_text().splitlines()))
            # a stopped run's end-of-training summary (train_loss, ...) is not kept: the run goes on
            self.kept = [r for r in records if keep_until and r.get("step", 0) <= keep_until and "train_loss" not in r]
            write_text(path, "".join(json.dumps(r) + "\n" for r in self.kept))

    def elapsed(self) -> float:
        """Seconds the kept part of the run took (a resumed run's clock carries on from there)."""
        return max((float(r["elapsed_s"]) for r in self.kept if "elapsed_s" in r), default=0.0)

    def loss_before(self) -> float | None:
        """The held-out loss measured before the first step, if this file kept it."""
        return next((r["eval_loss"] for r in self.kept if r.get("step") == 0 and "eval_loss" in r), None)

    def records(self) -> list[dict[str, Any]]:
        """Every record in the file now (the kept ones and those this run added)."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def add(self, record: dict[str, Any]) -> None:
        """Append one record (call on the main process only)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.add({"step": state.global_step, "epoch": state.epoch, **logs})


class RecordCheckpoints(TrainerCallback):
    """Writes the run's settings as lmshrink.json into every checkpoint, so each folder describes itself."""

    def __init__(self, record: dict[str, Any]):
        self.record = record

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                write_json(folder / RECORD, {**self.record, "step": state.global_step})


class StopOnSignal(TrainerCallback):
    """Ctrl-C (SIGINT) and SIGTERM (what Slurm, Kubernetes and cloud schedulers send before a kill):
    finish the current optimizer step, write a whole checkpoint, stop. A second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None:  # the second one: stop now
            self.restore()
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n[lmshrink] {signal.Signals(signum).name}: finishing this step and writing a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    @contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        try:
            yield self
        finally:
            self.restore()

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal is not None:
            control.should_save = True
            control.should_training_stop = True


class Profile(TrainerCallback):
    """torch.profiler over `steps` optimizer steps after `warmup`: writes folder/trace.json (open it in
    ui.perfetto.dev) and folder/ops.txt (the ops by total device time, or CPU time without a GPU)."""

    def __init__(self, folder: Path, steps: int, warmup: int = 3):
        self.folder, self.steps, self.warmup, self.profiler, self.written = folder, steps, warmup, None, False

    def on_step_begin(self, args, state, control, **kwargs):
        if self.profiler is None and state.global_step == self.warmup and state.is_world_process_zero:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities, record_shapes=True)
            self.profiler.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and state.global_step == self.warmup + self.steps:
            self.finish()

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is None and state.is_world_process_zero and not self.written:
            print(f"[lmshrink] no profile: the run ended before step {self.warmup + 1}", flush=True)
        self.finish()

    def finish(self) -> None:
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        profiler.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.folder / "trace.json"))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        write_text(self.folder / "ops.txt", profiler.key_averages().table(sort_by=sort, row_limit=40) + "\n")
        self.written = True
        print(f"[lmshrink] profile of {count(self.steps, 'step')}: {self.folder}/trace.json, {self.folder}/ops.txt", flush=True)
