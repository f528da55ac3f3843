"""The training settings (`TrainArgs`, `HealSettings`) and how they become the Trainer's
`TrainingArguments`: precision, optimizer, run length, warm-up, what is frozen."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import TrainingArguments

from lmshrink.config import Settings, SettingsError, group, setting
from lmshrink.heal.corpus import DataArgs, needs_data
from lmshrink.models import LoadArgs
from lmshrink.records import count

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SWITCHES = ("auto", "on", "off")


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
    logging_steps: int = setting(10, "steps between progress lines and metrics.jsonl records", how_to_run=True)
    save_steps: int = setting(500, "steps between checkpoints", how_to_run=True)
    eval_steps: int | None = setting(None, "steps between held-out evaluations (default: before and after only)")
    save_total_limit: int = setting(2, "checkpoints kept", how_to_run=True)
    resume: bool = setting(True, "carry on from the last whole checkpoint in output/checkpoints when the settings are "
                                 "the same (--no-resume refuses to, and starts over only with --overwrite)", how_to_run=True)
    overwrite: bool = setting(False, "start over: remove the run already in the output folder (checkpoints, "
                                     "metrics.jsonl, model/) first", how_to_run=True)
    keep_checkpoints: bool = setting(False, "keep the Trainer's checkpoints (optimizer state, to train on later) once "
                                            "the finished model is saved; by default they are removed", how_to_run=True)
    deepspeed: str | None = setting(None, "DeepSpeed JSON config (e.g. configs/deepspeed-zero2.json)")
    fsdp: str = setting("", "FSDP2 under torchrun / accelerate launch: 'on', or a JSON file of transformers' "
                            "fsdp_config (e.g. configs/fsdp.json)")
    report_to: list[str] = setting(["tensorboard"], "loggers (tensorboard, wandb, none)", how_to_run=True)
    gradient_checkpointing: bool = setting(False, "recompute activations in backward to save memory")
    profile_steps: int = setting(0, "trace this many optimizer steps (after 3 to warm up and compile) with "
                                    "torch.profiler: output/profile/ gets a Perfetto trace and a table of the costliest ops",
                                 how_to_run=True)
    compile: str = setting("auto", "torch.compile the student (and a frozen teacher): auto (on CUDA), on, off", how_to_run=True)
    fused_head: str = setting("auto", "LM head and loss computed together chunk by chunk, never holding the "
                                      "(batch x block x vocab) logits: auto (on CUDA, and on a CPU once those "
                                      "logits reach 512 MiB), on, off", how_to_run=True)
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


def cpu_budget(**changes: Any) -> TrainArgs:
    """A short healing run sized for a 2-core CPU (the demo, search and study defaults)."""
    return TrainArgs(**{"max_tokens": None if "max_steps" in changes else 16384, "lr": 3e-4, "batch_size": 4,
                        "warmup": 0.1, "logging_steps": 4,
                        "save_steps": 50, "report_to": ["none"], **changes})


@dataclass(kw_only=True)
class HealSettings(Settings):
    """A student, its training text and its optimiser: what pretrain and distill share."""

    model: str = setting(help="student to train: folder (e.g. from lmshrink truncate), Hub id or .gguf file")
    output: str = setting(help="run folder: checkpoints/, metrics.jsonl, tensorboard/, and the trained model in model/",
                          how_to_run=True)
    load: LoadArgs = group(LoadArgs, "how the student (and distill's teacher) are loaded: the weights' dtype "
                                     "(mixed precision is --precision)")
    corpus: DataArgs = group(DataArgs, "training and held-out text")
    train: TrainArgs = group(TrainArgs, "optimiser, schedule, precision and checkpoints")

    def problems(self) -> list[str]:
        return needs_data(self.corpus) + super().problems() + stream_budget(self.corpus, self.train)


def stream_budget(corpus: DataArgs, train: TrainArgs) -> list[str]:
    if corpus.streaming and train.max_steps < 0 and train.max_tokens is None:
        return ["streaming: a streamed dataset has no length; set --max-steps or --max-tokens"]
    return []


def switched_on(choice: str) -> bool:
    """An auto/on/off setting: auto is on where there is a GPU."""
    return torch.cuda.is_available() if choice == "auto" else choice == "on"


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
        torch_compile=switched_on(settings.compile),
        optim="adamw_torch_fused" if settings.optim == "auto" else settings.optim,  # one fused kernel, GPU or CPU
        deepspeed=settings.deepspeed,
        fsdp=bool(settings.fsdp),
        fsdp_config=settings.fsdp if settings.fsdp not in ("", "on") else None,
        dataloader_drop_last=True,
        disable_tqdm=False,
    )
    # transformers renamed gradient_checkpointing to activation_checkpointing in 5.2x: either name
    kwargs[CHECKPOINTING] = settings.gradient_checkpointing
    return trainer_arguments(out / "checkpoints", settings.precision, **{**kwargs, **overrides})


CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                 else "gradient_checkpointing")


def trainer_arguments(output_dir: str | Path, precision: str = "auto", **kwargs: Any) -> TrainingArguments:
    """`TrainingArguments` with the choices every lmshrink trainer shares (the one place they are
    built): CPU where there is no GPU (so torchrun on CPUs gives gloo DDP), bf16/fp16 where the GPU
    has it, tokens counted, every column kept (our collators need them), no loggers unless asked."""
    common: dict[str, Any] = dict(
        output_dir=str(output_dir), report_to="none", remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=torch.cuda.is_available(),
        # batches copied to the GPU without waiting: a blocking copy waits for the previous step's
        # kernels, so the GPU would idle while the host prepares each step
        accelerator_config={"non_blocking": torch.cuda.is_available()},
        include_num_input_tokens_seen=True, logging_nan_inf_filter=False,  # its per-step isnan() syncs the GPU
        **precision_flags(precision))
    return TrainingArguments(**{**common, **kwargs})


FREEZABLE = ("embeddings", "head", "blocks:I-J")


def block_range(part: str) -> tuple[int, int] | None:
    """(I, J) of `blocks:I-J` (`blocks:I`: one block), or None if `part` is not of that form."""
    found = re.fullmatch(r"blocks:(\d+)(?:-(\d+))?", part)
    return None if found is None else (int(found[1]), int(found[2] or found[1]))


def freeze_problems(parts: list[str]) -> list[str]:
    problems = []
    for part in parts:
        if part in ("embeddings", "head"):
            continue
        span = block_range(part)
        if span is None:
            problems.append(f"{part!r} is not one of {', '.join(FREEZABLE)} (e.g. blocks:0-11)")
        elif span[0] > span[1]:
            problems.append(f"{part!r}: the first block comes first (blocks:{span[1]}-{span[0]})")
    return problems
