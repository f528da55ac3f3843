"""Trainer plumbing shared by `pretrain` and `distill`: settings, data, logging, resumption.

Training runs on the transformers `Trainer`, so `accelerate launch` / `torchrun` give DDP,
FSDP (`--fsdp`) and DeepSpeed (`--deepspeed ds.json`) with no code of ours, and checkpoints,
resumption and mixed precision come with it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments, default_data_collator
from transformers.trainer_utils import TrainOutput

from lmshrink.architectures import blocks_of, check_length
from lmshrink.config import Settings, SettingsError, check, group, setting, to_dict
from lmshrink.data.sources import DataError, Framing, mix_blocks, pack, text_dataset
from lmshrink.errors import Stopped
from lmshrink.evaluate.measure import count_parameters
from lmshrink.export.model_card import save_model_record
from lmshrink.heal.speed import device_name, flops_per_token, peak_flops
from lmshrink.heal.stages import changed_settings
from lmshrink.integrity import ASIDE, folder_problem, set_aside
from lmshrink.losses import causal_lm_loss, fused_head_loss, head_step
from lmshrink.records import RECORD, count, exclusive, provenance, publish, read_record, write_json, write_text

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SWITCHES = ("auto", "on", "off")


@dataclass(kw_only=True)
class DataArgs:
    """Where training text comes from and how it is packed (the `corpus` group of pretrain, distill,
    cache-teacher and the LM fine-tuning task)."""

    data: list[str] = setting(
        [], "training text: files, folders, .jsonl(.gz), .parquet, hf:NAME[:CONFIG][:SPLIT], corpus names")
    data_weights: list[float] = setting([], "shares of training tokens from the --data sources, in order (e.g. 1,3): "
                                            "blocks are drawn from each with these odds until one runs out; default: "
                                            "every document of every source once")
    eval_data: list[str] = setting([], "held-out text; if empty, --heldout of the training documents is held out")
    heldout: float = setting(0.02, "fraction of training documents held out for evaluation when --eval-data is empty")
    block_size: int = setting(1024, "tokens per training sequence (the paper: 1024)")
    eval_tokens: int | None = setting(None, "cap on held-out tokens evaluated")
    streaming: bool = setting(False, "stream the training data (large Hub datasets); needs max_steps or max_tokens")
    num_proc: int = setting(1, "processes for tokenisation")
    seed: int = setting(42, "random seed (held-out split, data order, initialisation)")

    def problems(self) -> list[str]:
        problems = []
        if not 0 <= self.heldout < 1:
            problems.append("heldout: must be in [0, 1)")
        for name in ("block_size", "num_proc"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be positive")
        if self.data_weights and (len(self.data_weights) != len(self.data) or min(self.data_weights) < 0
                                  or sum(self.data_weights) <= 0):
            problems.append(f"data_weights: one weight >= 0 per --data source ({len(self.data)}), not all 0; "
                            f"got {self.data_weights}")
        if self.streaming and not self.eval_data:
            problems.append("streaming: give --eval-data (a streamed dataset cannot be split)")
        return problems


@dataclass(kw_only=True)
class TrainArgs:
    """The optimiser, schedule, precision, checkpoints and loggers of a Trainer run (the `train` group)."""

    ALTERNATIVES: ClassVar = (("max_steps", "max_tokens"),)  # both bound the run's length

    epochs: float = setting(1.0, "passes over the training data (ignored when max_steps or max_tokens is set)")
    max_steps: int = setting(-1, "optimizer steps to run (-1: from epochs or max_tokens; give this or max_tokens, "
                                 "not both: one given on the command line replaces the other from a config file)")
    max_tokens: int | None = setting(None, "token budget: sets max_steps = tokens / (batch x accumulation x block x processes)")
    batch_size: int = setting(8, "sequences per device per step")
    grad_accum: int = setting(1, "gradient accumulation steps")
    lr: float = setting(5e-5, "peak learning rate (the paper's truncated runs used the HF default 5e-5)")
    warmup: float = setting(0.0, "warm-up, as a fraction of the steps")
    scheduler: str = setting("linear", "learning-rate schedule (any transformers SchedulerType: linear, cosine, ...)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    adam_beta1: float = setting(0.9, "AdamW beta1 (decay of the gradient's running mean)")
    adam_beta2: float = setting(0.999, "AdamW beta2 (decay of the squared gradient's running mean; Llama-style "
                                       "pre-training uses 0.95)")
    max_grad_norm: float = setting(1.0, "gradient clipping norm")
    precision: str = setting("auto", "auto (bf16 or fp16 on GPUs that have it, fp32 on CPU), fp32, bf16 or fp16")
    logging_steps: int = setting(10, "steps between progress lines and metrics.jsonl records")
    save_steps: int = setting(500, "steps between checkpoints")
    eval_steps: int | None = setting(None, "steps between held-out evaluations (default: before and after only)")
    save_total_limit: int = setting(2, "checkpoints kept")
    resume: bool = setting(True, "carry on from the last whole checkpoint in output/checkpoints when the settings are "
                                 "the same (--no-resume refuses to, and starts over only with --overwrite)")
    overwrite: bool = setting(False, "start over: remove the run already in the output folder (checkpoints, "
                                     "metrics.jsonl, model/) first")
    keep_checkpoints: bool = setting(False, "keep the Trainer's checkpoints (optimizer state, to train on later) once "
                                            "the finished model is saved; by default they are removed")
    deepspeed: str | None = setting(None, "DeepSpeed JSON config (e.g. configs/deepspeed-zero2.json)")
    fsdp: str = setting("", "FSDP2 under torchrun / accelerate launch: 'on', or a JSON file of transformers' "
                            "fsdp_config (e.g. configs/fsdp.json)")
    report_to: list[str] = setting(["tensorboard"], "loggers (tensorboard, wandb, none)")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward to save memory")
    profile_steps: int = setting(0, "trace this many optimizer steps (after 3 to warm up and compile) with "
                                    "torch.profiler: output/profile/ gets a Perfetto trace and a table of the costliest ops")
    compile: str = setting("auto", "torch.compile the student (and a frozen teacher): auto (on CUDA), on, off")
    fused_head: str = setting("auto", "LM head and loss computed together chunk by chunk, never holding the "
                                      "(batch x block x vocab) logits: auto (on CUDA, and on a CPU once those "
                                      "logits reach 512 MiB), on, off")
    optim: str = setting("auto", "optimizer: auto (fused AdamW, on GPU and CPU) or a transformers optim name")
    freeze: list[str] = setting([], "parts of the model kept fixed while the rest trains: embeddings (the token "
                                    "embeddings, a head tied to them, and learned position embeddings), head (the "
                                    "output head), blocks:I-J (blocks I to J, from 0); e.g. --freeze embeddings")

    def problems(self) -> list[str]:
        problems = [f"freeze: {p}" for p in freeze_problems(self.freeze)]
        for name in ("compile", "fused_head"):
            if getattr(self, name) not in SWITCHES:
                problems.append(f"{name}: {getattr(self, name)!r} is not one of {', '.join(SWITCHES)}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.deepspeed and not Path(self.deepspeed).is_file():
            problems.append(f"deepspeed: no such config file {self.deepspeed!r} (e.g. configs/deepspeed-zero2.json)")
        if self.fsdp not in ("", "on") and not Path(self.fsdp).is_file():
            problems.append(f"fsdp: {self.fsdp!r} is neither 'on' nor a JSON file; pass --fsdp on, or a "
                            "transformers fsdp_config file such as configs/fsdp.json")
        if not 0 <= self.warmup < 1:
            problems.append("warmup: a fraction of the steps, in [0, 1)")
        if not self.lr > 0:
            problems.append(f"lr: the learning rate must be positive (got {self.lr:g}), e.g. 5e-5")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be 0 or more")
        if not self.adam_eps > 0:
            problems.append("adam_eps: must be positive")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name}: must be in [0, 1) (got {getattr(self, name):g})")
        if not self.epochs > 0:
            problems.append("epochs: must be positive")
        if self.max_tokens is not None and self.max_tokens < 1:
            problems.append("max_tokens: must be positive (or leave it out)")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append("max_steps: a positive number of steps, or -1 (from epochs or max_tokens)")
        elif self.max_steps > 0 and self.max_tokens is not None:
            problems.append(f"max_steps, max_tokens: both bound the run's length ({count(self.max_steps, 'step')}, "
                            f"{self.max_tokens:,} tokens); give one")
        if self.save_total_limit < 1:
            problems.append("save_total_limit: keep at least 1 checkpoint")
        if self.profile_steps < 0:
            problems.append("profile_steps: 0 (off) or more")
        for name in ("batch_size", "grad_accum", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be positive")
        return problems


def offline_corpus(**changes: Any) -> DataArgs:
    """The offline healing text of the demo, search and study: the Python library reference, with
    the Python tutorial (same manual, other pages) held out; 256-token blocks for a CPU."""
    return DataArgs(**{"data": ["python-docs/library"], "eval_data": ["python-docs/tutorial"], "heldout": 0.0,
                       "block_size": 256, "eval_tokens": 4096, **changes})


def cpu_budget(**changes: Any) -> TrainArgs:
    """A short healing run sized for a 2-core CPU (the demo, search and study defaults)."""
    return TrainArgs(**{"max_tokens": None if "max_steps" in changes else 16384, "lr": 3e-4, "batch_size": 4,
                        "warmup": 0.1, "logging_steps": 4,
                        "save_steps": 50, "report_to": ["none"], **changes})


@dataclass(kw_only=True)
class HealSettings(Settings):
    """A student, its training text and its optimiser: what pretrain and distill share."""

    model: str = setting(help="student to train: folder (e.g. from lmshrink truncate), Hub id or .gguf file")
    output: str = setting(help="run folder: checkpoints/, metrics.jsonl, tensorboard/, and the trained model in model/")
    dtype: str = setting("float32", "dtype the student is loaded in (weights); mixed precision is --precision")
    trust_remote_code: bool = setting(False, "allow models with custom code from the Hub")
    corpus: DataArgs = group(DataArgs, "training and held-out text")
    train: TrainArgs = group(TrainArgs, "optimiser, schedule, precision and checkpoints")

    def problems(self) -> list[str]:
        return needs_data(self.corpus) + super().problems() + stream_budget(self.corpus, self.train)


def needs_data(corpus: DataArgs) -> list[str]:
    return [] if corpus.data else ["data: give at least one training source"]


def stream_budget(corpus: DataArgs, train: TrainArgs) -> list[str]:
    if corpus.streaming and train.max_steps < 0 and train.max_tokens is None:
        return ["streaming: a streamed dataset has no length; set --max-steps or --max-tokens"]
    return []


def switched_on(choice: str) -> bool:
    """An auto/on/off setting: auto is on where there is a GPU."""
    return torch.cuda.is_available() if choice == "auto" else choice == "on"


FUSED_HEAD_CPU_BYTES = 1 << 29
"""On a CPU, `--fused-head auto` turns the fused head on once a batch's fp32 logits would take this
much (512 MiB: Gemma 3's 262k vocabulary at 4 x 256 tokens takes 1 GiB, SmolLM2's 49k 200 MB)."""


def fused_head_on(choice: str, batch: int, block: int, vocab: int) -> bool:
    """The fused head's auto/on/off setting: auto is on where there is a GPU, and on a CPU where the
    batch's (batch x block x vocab) fp32 logits reach FUSED_HEAD_CPU_BYTES, so memory never grows
    with the vocabulary."""
    if choice != "auto":
        return choice == "on"
    return torch.cuda.is_available() or 4 * batch * block * vocab >= FUSED_HEAD_CPU_BYTES


def run_precision(args: TrainingArguments) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def run_optimizer(args: TrainingArguments) -> str:
    return getattr(args.optim, "value", args.optim)


def precision_flags(precision: str) -> dict[str, bool]:
    if precision == "auto":
        if torch.cuda.is_available():
            return {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}
        return {}
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def tokens_per_step(settings: TrainArgs, block_size: int) -> int:
    """Tokens one optimizer step trains on, over every process."""
    return settings.batch_size * settings.grad_accum * block_size * world_size()


def run_length(settings: TrainArgs, block_size: int | None) -> tuple[int, str]:
    """The optimizer steps a run is bound to (-1: by epochs) and which setting bounds it, in words."""
    if settings.max_tokens is None:
        if settings.max_steps > 0:
            return settings.max_steps, f"{count(settings.max_steps, 'step')} (max_steps)"
        return -1, f"{count(settings.epochs, 'epoch')} (epochs)"
    if block_size is None:
        raise SettingsError("max_tokens: a token budget needs fixed-length blocks; set --max-steps or --epochs")
    per_step = tokens_per_step(settings, block_size)
    steps = max(1, math.ceil(settings.max_tokens / per_step))
    return steps, f"{count(steps, 'step')} (max_tokens {settings.max_tokens:,} at {per_step:,} tokens a step)"



def warmup_steps(warmup: float, max_steps: int) -> float:
    """The Trainer's warm-up: a fraction of the steps when the run's length is not known yet (epochs),
    else steps, never all of them (a 1-step run with warm-up would train at learning rate 0)."""
    if max_steps < 1 or warmup == 0:
        return float(warmup)
    return min(math.ceil(warmup * max_steps), max_steps - 1)


def training_arguments(settings: TrainArgs, output: str | Path, seed: int, block_size: int | None = None,
                       **overrides: Any) -> TrainingArguments:
    """The Trainer's arguments for a run into `output` (checkpoints in output/checkpoints); a
    --max-tokens budget needs the tokens per example, `block_size`."""
    max_steps, _ = run_length(settings, block_size)
    report_to = [r for r in settings.report_to if r != "none"]
    if "tensorboard" in report_to:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            report_to.remove("tensorboard")
            print("[lmshrink] tensorboard is not installed; logging to metrics.jsonl only")
    out = Path(output)
    # transformers 5 takes the TensorBoard folder from the environment; each run logs in its own folder
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    kwargs: dict[str, Any] = dict(
        num_train_epochs=settings.epochs,
        max_steps=max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        warmup_steps=warmup_steps(settings.warmup, max_steps),  # a float < 1 is a fraction of the steps
        lr_scheduler_type=settings.scheduler,
        weight_decay=settings.weight_decay,
        adam_epsilon=settings.adam_eps,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        max_grad_norm=settings.max_grad_norm,
        seed=seed,
        data_seed=seed,
        logging_steps=settings.logging_steps,
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        eval_strategy="steps" if settings.eval_steps else "no",
        eval_steps=settings.eval_steps,
        report_to=report_to or "none",
        activation_checkpointing=settings.gradient_checkpointing,
        torch_compile=switched_on(settings.compile),
        optim="adamw_torch_fused" if settings.optim == "auto" else settings.optim,  # one fused kernel, GPU or CPU
        deepspeed=settings.deepspeed,
        fsdp=bool(settings.fsdp),
        fsdp_config=settings.fsdp if settings.fsdp not in ("", "on") else None,
        dataloader_drop_last=True,
        disable_tqdm=False,
    )
    return trainer_arguments(out / "checkpoints", settings.precision, **{**kwargs, **overrides})


def trainer_arguments(output_dir: str | Path, precision: str = "auto", **kwargs: Any) -> TrainingArguments:
    """`TrainingArguments` with the choices every lmshrink trainer shares (the one place they are
    built): CPU where there is no GPU (so torchrun on CPUs gives gloo DDP), bf16/fp16 where the GPU
    has it, tokens counted, every column kept (our collators need them), no loggers unless asked."""
    common: dict[str, Any] = dict(
        output_dir=str(output_dir), report_to="none", remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=torch.cuda.is_available(),
        include_num_input_tokens_seen=True, logging_nan_inf_filter=False,  # its per-step isnan() syncs the GPU
        **precision_flags(precision))
    return TrainingArguments(**{**common, **kwargs})


def prepare_data(settings: DataArgs, tokenizer) -> tuple[Any, Any]:
    """Packed training and held-out blocks (split by document, so nothing leaks). With --data-weights
    each source is split and packed alone and its blocks drawn with those odds (`mix_blocks`)."""
    if settings.data_weights:  # each source alone; a source of weight 0 is not read
        weighted = [(s, w) for s, w in zip(settings.data, settings.data_weights, strict=True) if w > 0]
        sources, weights = [[s] for s, _ in weighted], [w for _, w in weighted]
    else:
        sources, weights = [settings.data], []
    packed, held = [], []
    for source in sources:
        docs = text_dataset(source, streaming=settings.streaming)
        if not settings.eval_data and settings.heldout > 0:  # with --eval-data, prepare_heldout reads that
            try:
                split = docs.train_test_split(test_size=settings.heldout, seed=settings.seed)
            except ValueError:  # e.g. one document cannot be split
                raise DataError(f"the training data ({', '.join(source)}) holds {docs.num_rows} document(s), too "
                                f"few to hold out {settings.heldout:.0%} of them for evaluation; give --eval-data "
                                "FILE, more documents, or --heldout 0") from None
            docs = split["train"]
            held.append(split["test"])
        train = pack(docs, tokenizer, settings.block_size, settings.num_proc)
        if hasattr(train, "num_rows") and train.num_rows == 0:
            raise DataError(f"the training data ({', '.join(source)}) holds less than one block of "
                            f"{settings.block_size} tokens")
        packed.append(train)
    train = mix_blocks(packed, weights, settings.seed) if len(packed) > 1 else packed[0]
    if len(held) > 1:
        from datasets import concatenate_datasets

        held = [concatenate_datasets(held)]
    return train, prepare_heldout(settings, tokenizer, held[0] if held else None)


def prepare_heldout(settings: DataArgs, tokenizer, docs=None):
    """Packed held-out blocks: of `docs` (documents split off the training data) or of
    --eval-data, capped at --eval-tokens; None when there is neither."""
    if settings.eval_data:
        docs = text_dataset(settings.eval_data)
    if docs is None:
        return None
    heldout = pack(docs, tokenizer, settings.block_size, settings.num_proc)
    if heldout.num_rows == 0:
        raise DataError(f"the held-out data holds less than one block of {settings.block_size} tokens; "
                        "give more text, a larger --heldout, or a smaller --block-size")
    return cap_heldout(heldout, settings)


def cap_heldout(heldout, settings: DataArgs):
    """The first --eval-tokens of held-out blocks (at least one block); all of them without a cap."""
    if heldout is None or not settings.eval_tokens:
        return heldout
    return heldout.select(range(min(heldout.num_rows, max(1, settings.eval_tokens // settings.block_size))))


def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack blocks; labels are the inputs (the model shifts them)."""
    batch = default_data_collator(features)
    batch["labels"] = batch["input_ids"].clone()
    return batch


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

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


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


FREEZABLE = ("embeddings", "head", "blocks:I-J")


def _block_range(part: str) -> tuple[int, int] | None:
    """(I, J) of `blocks:I-J` (`blocks:I`: one block), or None if `part` is not of that form."""
    found = re.fullmatch(r"blocks:(\d+)(?:-(\d+))?", part)
    return None if found is None else (int(found[1]), int(found[2] or found[1]))


def freeze_problems(parts: list[str]) -> list[str]:
    problems = []
    for part in parts:
        if part in ("embeddings", "head"):
            continue
        span = _block_range(part)
        if span is None:
            problems.append(f"{part!r} is not one of {', '.join(FREEZABLE)} (e.g. blocks:0-11)")
        elif span[0] > span[1]:
            problems.append(f"{part!r}: the first block comes first (blocks:{span[1]}-{span[0]})")
    return problems


def freeze(model, parts: list[str]) -> str:
    """Turn off the gradients of `parts` of the model (see `TrainArgs.freeze`); the Trainer's optimizer
    then holds only the rest. A line saying what is frozen and what trains."""
    if not parts:
        return ""
    for part in parts:
        if part == "embeddings":  # every table: tokens, and learned positions where the model has them
            module = torch.nn.ModuleList(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
        elif part == "head":
            module = model.get_output_embeddings()
            if module is None:
                check([f"freeze: this {type(model).__name__} has no output head to freeze; leave 'head' out"])
        else:
            first, last = _block_range(part)
            blocks = blocks_of(model)
            if last >= len(blocks):
                check([f"freeze: {part} asks for block {last}, and the model has blocks 0-{len(blocks) - 1}"])
            module = blocks[first : last + 1]
        module.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        check([f"freeze: {', '.join(parts)} leaves nothing of the model to train; freeze less"])
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:  # tied: one tensor, both frozen
        said = {"embeddings": "embeddings (and the head tied to them)", "head": "head (and the embeddings tied to it)"}
        parts = [said.get(p, p) for p in parts]
    total = count_parameters(model)
    trains = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"frozen: {', '.join(parts)}: {(total - trains) / 1e6:.1f}M parameters; "
            f"{trains / 1e6:.1f}M of {total / 1e6:.1f}M train")


def fused_head_problem(model, args: TrainingArguments) -> str | None:
    """Why the fused head cannot run here, or None."""
    if args.fsdp or args.deepspeed:
        return "FSDP and DeepSpeed own the head's weight outside the forward pass"
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return "the model's output head is not a bias-free linear layer"
    if getattr(model.config, "final_logit_softcapping", None):
        return "the model soft-caps its logits (final_logit_softcapping), which the fused head does not apply"
    return None


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


@contextmanager
def hidden_states_as_logits(*models) -> Iterator[None]:
    """While inside, each model's output head returns its input, so `model(...).logits` are the final
    (normed) hidden states, for a fused head loss; the heads are restored on the way out."""
    heads = [m.get_output_embeddings() for m in models]
    for head in heads:
        head.forward = _identity
    try:
        yield
    finally:
        for head in heads:
            del head.forward


def _warmup_from_first_step(schedule, warm: int, step: int) -> float:
    return (step + 1) / (warm + 1) if step < warm else schedule(step)


class LMTrainer(Trainer):
    """A Trainer whose progress lines carry the loss parts, tokens/s, model TFLOP/s and MFU, and
    whose LM loss runs through the fused head where that is on (`lm_loss`)."""

    @staticmethod
    def head_problem(**trainer_kwargs: Any) -> str | None:
        """Why this trainer's loss, with these arguments, cannot run through the fused head, or None."""
        return None

    def __init__(self, *args: Any, fused_head: bool = False, flops_per_token: float = 0.0, kd_chunk: int | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Our losses are means over the batch's tokens (blocks are full, no padding), so let the
        # Trainer divide by the accumulation steps rather than expect a sum over num_items.
        self.model_accepts_loss_kwargs = False
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._clock: tuple[float, int] | None = None
        self.speeds: list[float] = []
        self.flops_per_token = flops_per_token
        self.fused_head = fused_head  # then model(...).logits are hidden states (hidden_states_as_logits)
        self.kd_chunk = kd_chunk
        self._chunk: dict[int, int] = {}
        if fused_head:
            self.head_weight = self.model.get_output_embeddings().weight
            self.ce_step = head_step("ce", compiled=self.args.torch_compile)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[run_precision(self.args)]
        self.peak_flops = peak_flops(self.args.device.type, dtype)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The Trainer's schedule, its warm-up shifted by one step: the Trainer's ramps from learning
        rate 0 at the first step (a 4-step run with 10% warm-up trains its first step at 0); here warm-up
        step s of w runs at (s + 1) / (w + 1) of the peak, and the rest of the schedule is unchanged."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        warm = self.args.get_warmup_steps(num_training_steps)
        if warm > 0 and isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            scheduler.lr_lambdas = [partial(_warmup_from_first_step, f, warm) for f in scheduler.lr_lambdas]
            for group, lam, base in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, scheduler.base_lrs,
                                        strict=True):
                group["lr"] = base * lam(scheduler.last_epoch)
        return scheduler

    def head_models(self) -> list:
        """The models whose output head the fused head replaces (see `hidden_states_as_logits`)."""
        return [self.model] if self.fused_head else []

    def chunk_rows(self, rows: int, vocab: int) -> int:
        """Logit rows per loss chunk (`loss_chunk_rows`), chosen at the first step of each shape."""
        if rows not in self._chunk:
            free = torch.cuda.mem_get_info()[0] if self.args.device.type == "cuda" else None
            self._chunk[rows] = loss_chunk_rows(rows, vocab, self.args.per_device_train_batch_size, self.kd_chunk, free)
        return self._chunk[rows]

    def lm_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token CE of `logits` (B, T, V), or with the fused head of the final hidden states."""
        if not self.fused_head:
            return causal_lm_loss(logits, labels)
        rows = labels.numel()
        return fused_head_loss(self.ce_step, logits, self.head_weight, labels,
                               chunk=self.chunk_rows(rows, self.head_weight.shape[0]))[0]

    def _track_num_input_tokens(self, inputs):
        """Full blocks on every process: count them without the Trainer's per-step gather and .item(),
        a GPU sync that stalls the next step's launch."""
        if self.args.include_num_input_tokens_seen not in (False, "no"):
            self.state.num_input_tokens_seen += inputs["input_ids"].numel() * self.args.world_size

    def train(self, *args: Any, elapsed: float = 0.0, **kwargs: Any):
        # every log line carries the wall time since the run began (elapsed_s); a resumed run's
        # clock starts where the checkpoint's part of the run ended
        self._started = time.perf_counter() - elapsed
        return super().train(*args, **kwargs)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """A tied output layer is saved once, as the embeddings, so a checkpoint of a tied model
        (SmolLM2, GPT-2) never holds it: re-tie it and warn only about keys really missing."""
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or ())
        if tied & set(load_result.missing_keys):
            self.model.tie_weights()
            load_result = load_result._replace(missing_keys=[k for k in load_result.missing_keys if k not in tied])
        super()._issue_warnings_after_load(load_result)

    def get_eval_dataloader(self, eval_dataset=None):
        """Every held-out block is scored, the last partial batch too (training batches drop theirs:
        with drop_last, a held-out set smaller than one batch would never be evaluated)."""
        drop_last, self.args.dataloader_drop_last = self.args.dataloader_drop_last, False
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.args.dataloader_drop_last = drop_last

    def record(self, **parts: torch.Tensor) -> None:
        """Keep loss parts for the next log line (as tensors: reading them now would sync the GPU)."""
        for name, value in parts.items():
            self._parts.setdefault(name, []).append(value.detach() if torch.is_tensor(value) else torch.tensor(value))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if hasattr(self, "_started"):
            logs["elapsed_s"] = round(time.perf_counter() - self._started, 2)
        if "loss" in logs:
            for name, values in self._parts.items():
                logs[name] = float(torch.stack([v.float() for v in values]).mean())
            self._parts = {}
            now, seen = time.perf_counter(), self.state.num_input_tokens_seen
            if self._clock is not None and now > self._clock[0]:
                speed = (seen - self._clock[1]) / (now - self._clock[0])
                self.speeds.append(speed)
                logs["tokens_per_s"] = round(speed, 1)
                if self.flops_per_token:
                    achieved = speed * self.flops_per_token / max(1, self.args.world_size)  # per device
                    logs["tflops"] = round(achieved / 1e12, 3)
                    logs["mfu"] = round(achieved / self.peak_flops, 4)
            self._clock = (now, seen)
        super().log(logs, *args, **kwargs)

    def speed_record(self, whole_run_tps: float | None = None) -> dict[str, Any]:
        """The run's speed for lmshrink.json: median tokens/s over the logged intervals (or, for a run
        too short for two log lines, `whole_run_tps`: its tokens over its wall time, start-up
        included), model TFLOP/s and MFU per device, the peak they are measured against, and the
        fast-path choices."""
        tps = statistics.median(self.speeds) if self.speeds else whole_run_tps
        achieved = tps * self.flops_per_token / max(1, self.args.world_size) if tps else None
        return {"tokens_per_s": tps,
                "tokens_per_s_over": "logged intervals (median)" if self.speeds else "the whole run, start-up included",
                "model_flops_per_token": self.flops_per_token,
                "model_tflops": achieved / 1e12 if achieved else None,
                "mfu": achieved / self.peak_flops if achieved else None,
                "peak_tflops": self.peak_flops / 1e12, "device": device_name(self.args.device.type),
                "compile": self.args.torch_compile, "fused_head": self.fused_head,
                "optim": run_optimizer(self.args), "precision": run_precision(self.args)}


def save_trained(trainer: Trainer, folder: Path, record: dict[str, Any], name: str) -> None:
    """Save a trained model with its record and card beside the final `folder`, then move it into
    place: an interrupted save never leaves a folder that looks finished."""
    partial = folder.with_name(f".{folder.name}.partial")
    trainer.save_model(str(partial))  # on every process: DeepSpeed / FSDP gather the weights here
    if trainer.is_world_process_zero():
        (partial / "training_args.bin").unlink(missing_ok=True)  # a pickle; lmshrink.json has the settings
        save_model_record(partial, record, name)
        publish(partial, folder)


# Rows per loss chunk on a GPU at most: the head + loss bench (bench/heal_speed.py) runs CE over
# 16,384 x 50,257 logits in 10 ms with chunks of 8,192 rows, so larger chunks add memory, not speed.
MAX_CHUNK_ROWS = 8192


CPU_CHUNK_BYTES = 1 << 30


def loss_chunk_rows(rows: int, vocab: int, batch: int, kd_chunk: int | None, free_bytes: int | None) -> int:
    """Logit rows per loss chunk: `kd_chunk` positions per sequence if set; else on a GPU a quarter of
    its free memory at ~32 bytes per logit (fp32 logits, their gradient and the softmax temporaries),
    at most MAX_CHUNK_ROWS; on a CPU 128 positions per sequence, within CPU_CHUNK_BYTES. Split into even chunks."""
    if kd_chunk:
        limit = kd_chunk * batch
    elif free_bytes is not None:
        limit = min(free_bytes // 4 // (32 * vocab), MAX_CHUNK_ROWS)
    else:  # at most 1 GiB of those bytes: 128 rows of Gemma 3's 262k vocabulary, 512 of a 49k one
        limit = min(128 * batch, CPU_CHUNK_BYTES // (32 * vocab))
    pieces = math.ceil(rows / max(1, limit))
    return math.ceil(rows / pieces)


def drop_checkpoints(trainer: Trainer, folder: Path, train: TrainArgs) -> None:
    """Remove a finished run's Trainer checkpoints (GBs of optimizer state) unless asked to keep them:
    the saved model replaces them. Damaged ones set aside (`last_checkpoint`) stay for the user."""
    if trainer.is_world_process_zero() and not train.keep_checkpoints and folder.is_dir():
        for path in folder.iterdir():
            if not path.name.startswith(ASIDE):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


def train_until_stopped(trainer: Trainer, resume_from: str | None, stop: StopOnSignal, carry_on: str,
                        **train_kwargs: Any):
    """`trainer.train`, with Ctrl-C and SIGTERM turned into a whole checkpoint and `Stopped`."""
    if resume_from and 0 < trainer.args.max_steps <= checkpoint_step(resume_from):
        return finished_checkpoint(trainer, resume_from)
    with stop.installed():
        result = trainer.train(resume_from_checkpoint=resume_from, **train_kwargs)
    if stop.signal is not None:
        raise Stopped(f"stopped at step {trainer.state.global_step} of {trainer.state.max_steps} "
                      f"({signal.Signals(stop.signal).name}); a whole checkpoint is in {trainer.args.output_dir}; "
                      f"{carry_on}", 128 + stop.signal)
    return result


# what a run writes into its output folder (removed by --overwrite; distill's local/ is a run of its own,
# started over by the same --overwrite)
RUN_FILES = ("checkpoints", "model", "metrics.jsonl", RECORD, "tensorboard", "profile")


def carry_on(settings: HealSettings) -> dict[str, Any] | None:
    """What the output folder already holds decides how a run starts; checked before any model or
    data is loaded. Nothing there: a fresh run. An unfinished run with the same settings: carried on
    from its last whole checkpoint (refused with --no-resume). A finished run with the same settings:
    nothing to do, its record is returned. A run made with other settings: refused, naming what
    changed. --overwrite: whatever is there is replaced (removed by `_train`)."""
    out = Path(settings.output)
    if settings.train.overwrite:
        return None
    done = read_record(out)
    if done and done.get("metrics") and (out / "model").is_dir():
        changed = changed_settings(done.get("settings"), settings)
        if changed:
            check([f"output: {out} holds a finished {done.get('command', 'training')} run made with other settings "
                   f"({'; '.join(changed)}); pass --overwrite to replace it, or give another --output"])
        print(f"[lmshrink] {out} holds this run already, finished (model/); nothing to do "
              "(--overwrite trains it again)", flush=True)
        return done
    checkpoint = last_checkpoint(out / "checkpoints", remove=False)
    if checkpoint:
        changed = changed_settings((read_record(checkpoint) or {}).get("settings"), settings)
        if changed:
            check([f"output: {out} holds an unfinished run ({Path(checkpoint).name}) made with other settings "
                   f"({'; '.join(changed)}); run it with those values to carry on, pass --overwrite to start "
                   "over, or give another --output"])
        if not settings.train.resume:
            check([f"output: {out} holds an unfinished run ({Path(checkpoint).name}); leave out --no-resume to "
                   "carry on from it, or pass --overwrite to start over"])
    return None


def start_over(out: Path) -> None:
    """--overwrite: remove the run an output folder holds (the folder and anything else in it stay)."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def finished_checkpoint(trainer: Trainer, checkpoint: str) -> TrainOutput:
    """Load the checkpoint a run wrote at its last step (it stopped while writing its model) without
    training: resumed there, the Trainer would run one step past the end."""
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return TrainOutput(trainer.state.global_step, statistics.fmean(losses) if losses else float("nan"), {})


def checkpoint_step(checkpoint: str | Path | None) -> int:
    """The optimizer step a `checkpoint-N` folder was written at (0: none)."""
    return int(Path(checkpoint).name.rsplit("-", 1)[-1]) if checkpoint else 0


def checkpoint_problem(folder: Path) -> tuple[str, str] | None:
    """What is wrong with a Trainer checkpoint (None: every file of it is whole), as (kind, detail).
    "incomplete": its trainer_state.json, the last file the Trainer writes into it (after the
    weights, optimizer, scheduler and RNG states), is missing or cut short, so the run stopped while
    writing it. "damaged": it was finished, but a file in it no longer reads whole (a disk that
    filled, a node lost while the file system caught up, a copy cut short): `integrity.folder_problem`
    checks every weight, optimizer, scheduler and RNG file against its own header."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "incomplete", "the run stopped while writing it"
    if found := folder_problem(folder):
        return "damaged", found
    return None


def last_checkpoint(folder: str | Path, remove: bool = True) -> str | None:
    """The newest whole `checkpoint-N` in a folder of Trainer checkpoints, if any. A newer one that is
    not whole is passed over and, if `remove`, said so: an incomplete one (the run was killed while
    writing it) is removed; a damaged one is set aside as `damaged-checkpoint-N` (the user may want
    its files), by the main process of a distributed run."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit()),
                   key=checkpoint_step, reverse=True)
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        if not remove or int(os.environ.get("RANK", "0")) != 0:
            continue
        kind, detail = problem
        if kind == "incomplete":
            print(f"[lmshrink] {path.name} is incomplete ({detail}): removed; the previous whole checkpoint is used",
                  flush=True)
            shutil.rmtree(path, ignore_errors=True)
        else:
            aside = set_aside(path)
            print(f"[lmshrink] {path.name} is damaged ({detail}): set aside as {aside.name}; the previous whole "
                  "checkpoint is used", flush=True)
    return None


def train(settings: HealSettings, command: str, trainer_cls: type[LMTrainer], model, tokenizer,
          train_data, heldout, extra_record: dict[str, Any] | None = None, **trainer_kwargs: Any) -> dict[str, Any]:
    """Run the Trainer (resuming if asked), evaluate before and after, save model/ atomically;
    the run folder is held for this run alone."""
    with exclusive(settings.output):
        return _train(settings, command, trainer_cls, model, tokenizer, train_data, heldout, extra_record,
                      **trainer_kwargs)


def _train(settings: HealSettings, command: str, trainer_cls: type[LMTrainer], model, tokenizer,
           train_data, heldout, extra_record: dict[str, Any] | None = None, **trainer_kwargs: Any) -> dict[str, Any]:
    check_length(model.config, settings.corpus.block_size, "block_size")
    out = Path(settings.output)
    if settings.train.overwrite:
        start_over(out)
    checkpoint = last_checkpoint(out / "checkpoints")  # carry_on checked it is this run's
    if settings.train.deepspeed and importlib.util.find_spec("deepspeed") is None:
        check(["deepspeed: DeepSpeed is not installed; pip install deepspeed (on a machine with CUDA), "
               "or leave --deepspeed out"])
    args = training_arguments(settings.train, out, settings.corpus.seed, settings.corpus.block_size)
    if settings.train.fsdp and args.device.type == "cpu":  # accelerate would quietly run DDP instead
        check(["fsdp: FSDP shards a model over GPUs and this run has none; leave --fsdp out (torchrun on "
               "CPUs runs DDP)"])
    if settings.train.gradient_checkpointing:
        model.config.use_cache = False
    if frozen := freeze(model, settings.train.freeze):
        print(f"[lmshrink] {frozen}", flush=True)
    source_record = read_record(model.name_or_path) or {}  # the loaded folder (GGUF / embedded names resolved)
    base_record = dict(student=settings.model, kept_layers=source_record.get("kept_layers"),
                       teacher=source_record.get("teacher"), origin=source_record or None,
                       framing=Framing.of(tokenizer).record(tokenizer), **(extra_record or {}))
    resume_from = checkpoint
    stop = StopOnSignal()
    metrics_file = MetricsFile(out / "metrics.jsonl", checkpoint_step(resume_from))
    callbacks = [metrics_file, RecordCheckpoints(provenance(command, to_dict(settings), **base_record)), stop]
    if settings.train.profile_steps:
        callbacks.append(Profile(out / "profile", settings.train.profile_steps))
    teacher = trainer_kwargs.get("teacher")
    fused = fused_head_on(settings.train.fused_head, args.per_device_train_batch_size, settings.corpus.block_size,
                          model.config.vocab_size)
    problem = next(filter(None, (*(fused_head_problem(m, args) for m in (model, teacher) if m is not None),
                                 trainer_cls.head_problem(**trainer_kwargs))), None)
    if fused and problem:
        print(f"[lmshrink] fused head off: {problem}; the loss is computed from full logits", flush=True)
        fused = False
    # datasets tables hand rows out as tensors, not Python lists: collating a 16 x 1024 batch costs
    # 0.3 ms instead of 2.3 ms of the host's time per step (measured on a 2-core CPU)
    train_data, heldout = (d.with_format("torch") if hasattr(d, "with_format") else d for d in (train_data, heldout))
    block = settings.corpus.block_size
    model_flops = flops_per_token(model, block) + (flops_per_token(teacher, block, training=False) if teacher else 0)
    trainer = trainer_cls(model=model, args=args, train_dataset=train_data, eval_dataset=heldout,
                          data_collator=collate, processing_class=tokenizer, callbacks=callbacks,
                          fused_head=fused, flops_per_token=model_flops, **trainer_kwargs)
    print(f"[lmshrink] {command} on {device_name(args.device.type)}: compile {'on' if args.torch_compile else 'off'}, "
          f"fused head {'on' if fused else 'off'}, optimizer {run_optimizer(args)}, {run_precision(args)}; "
          f"peak {trainer.peak_flops / 1e12:.1f} TFLOP/s (measured matmul); runs to "
          f"{run_length(settings.train, settings.corpus.block_size)[1]}", flush=True)
    if resume_from:
        print(f"[lmshrink] resuming from {Path(resume_from).name} (step {checkpoint_step(resume_from)} "
              f"of {args.max_steps if args.max_steps > 0 else 'the run'})", flush=True)
    with hidden_states_as_logits(*trainer.head_models()):
        if checkpoint:  # measured before the first step of the interrupted part
            before = metrics_file.loss_before()
        else:
            before = trainer.evaluate()["eval_loss"] if heldout is not None else None
        earlier = metrics_file.elapsed()  # a resumed run counts the part before its checkpoint
        started = time.perf_counter() - earlier
        result = train_until_stopped(trainer, resume_from, stop, "run the same command to carry on", elapsed=earlier)
        wall = time.perf_counter() - started
        after = trainer.evaluate()["eval_loss"] if heldout is not None else None
    metrics = {
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "train_seconds": wall,
        "heldout_ppl_before": math.exp(before) if before is not None else None,
        "heldout_ppl_after": math.exp(after) if after is not None else None,
        "heldout_tokens": heldout.num_rows * settings.corpus.block_size if heldout is not None else 0,
        "speed": trainer.speed_record(whole_run_tps=trainer.state.global_step
                                      * tokens_per_step(settings.train, settings.corpus.block_size) / max(wall, 1e-9)),
    }
    record = provenance(command, to_dict(settings), metrics=metrics, **base_record)
    save_trained(trainer, out / "model", record, out.name)
    drop_checkpoints(trainer, out / "checkpoints", settings.train)
    if trainer.is_world_process_zero():
        write_json(out / RECORD, record)
        print(f"{command}: {count(metrics['steps'], 'step')}, {count(metrics['tokens_seen'], 'token')} in {wall:.0f}s; "
              f"held-out perplexity on whole {settings.corpus.block_size}-token blocks (not `eval`'s sliding windows) "
              f"{metrics['heldout_ppl_before'] or float('nan'):.2f} -> "
              f"{metrics['heldout_ppl_after'] or float('nan'):.2f}; model in {out / 'model'}")
    return metrics
