"""The healing loop shared by `pretrain` and `distill`: `LMTrainer` (the loss from the last
hidden state, a fused head where it pays, tokens/s and MFU), freezing, and `train`, which runs
a command's settings (`heal.args`, `heal.corpus`) with its callbacks (`heal.callbacks`),
carried on or stopped as `heal.runs` decides, and saves the model.

Training runs on the transformers `Trainer`, so `accelerate launch` / `torchrun` give DDP,
FSDP (`--fsdp`) and DeepSpeed (`--deepspeed ds.json`) with no code of ours, and checkpoints,
resumption and mixed precision come with it.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from lmshrink.architectures import blocks_of, check_length
from lmshrink.config import check, to_dict
from lmshrink.data.sources import Framing
from lmshrink.evaluate.measure import count_parameters
from lmshrink.export.model_card import save_model_record
from lmshrink.heal.args import (
    HealSettings,
    block_range,
    run_length,
    run_optimizer,
    run_precision,
    tokens_per_step,
    training_arguments,
)
from lmshrink.heal.callbacks import MetricsFile, Profile, RecordCheckpoints, StopOnSignal
from lmshrink.heal.corpus import collate
from lmshrink.heal.runs import checkpoint_step, drop_checkpoints, last_checkpoint, start_over, trained
from lmshrink.heal.speed import device_name, flops_per_token, peak_flops
from lmshrink.losses import causal_lm_loss, fused_head_loss, head_step
from lmshrink.records import RECORD, count, exclusive, provenance, publish, read_record, write_json

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
            first, last = block_range(part)
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


@contextmanager
def real_heads(*models) -> Iterator[None]:
    """Inside `hidden_states_as_logits`, the models' own output heads back for a while (a student
    sampling its own continuations needs its logits)."""
    heads = [m.get_output_embeddings() for m in models]
    for head in heads:
        del head.forward
    try:
        yield
    finally:
        for head in heads:
            head.forward = _identity


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
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[run_precision(self.args)]
        # the fused head computes its products in the run's mixed precision, as autocast would
        self.head_dtype = None if dtype == torch.float32 else dtype
        if fused_head:
            self.head_weight = self.model.get_output_embeddings().weight
            self.ce_step = head_step("ce", compiled=self.args.torch_compile, dtype=self.head_dtype)
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

    def run_metrics(self, logged: list[dict[str, Any]]) -> dict[str, Any]:
        """What this trainer adds to the run's metrics, from every line of its metrics file."""
        return {}

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

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's FLOP count of a batch (its `total_flos`) from this run's count per token: the
        Trainer's own walks every module of the model at every step."""
        if not self.flops_per_token:
            return super().floating_point_ops(inputs)
        return int(inputs["input_ids"].numel() * self.flops_per_token)

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


def train(settings: HealSettings, command: str, trainer_cls: type[LMTrainer], model, tokenizer,
          train_data, heldout, extra_record: dict[str, Any] | None = None, **trainer_kwargs: Any) -> dict[str, Any]:
    """Run the Trainer (resuming if asked), evaluate before and after, save model/ atomically;
    the run folder is held for this run alone."""
    with exclusive(settings.output):
        return _train(settings, command, trainer_cls, model, tokenizer, train_data, heldout, extra_record,
                      **trainer_kwargs)


def _train(settings: HealSettings, command: str, trainer_cls: type[LMTrainer], model, tokenizer,
           train_data, heldout, extra_record: dict[str, Any] | None = None, **trainer_kwargs: Any) -> dict[str, Any]:
    out = Path(settings.output)
    use_cache = getattr(model.config, "use_cache", None)  # turned off for training; a saved model generates with it
    checkpoint, args = _prepare(settings, model, out)
    source_record = read_record(model.name_or_path) or {}  # the loaded folder (GGUF / embedded names resolved)
    base_record = dict(student=settings.model, kept_layers=source_record.get("kept_layers"),
                       teacher=source_record.get("teacher"), origin=source_record or None,
                       framing=Framing.of(tokenizer).record(tokenizer), **(extra_record or {}))
    stop = StopOnSignal()
    metrics_file = MetricsFile(out / "metrics.jsonl", checkpoint_step(checkpoint))
    callbacks = [metrics_file, RecordCheckpoints(provenance(command, to_dict(settings), **base_record)), stop]
    if settings.train.profile_steps:
        callbacks.append(Profile(out / "profile", settings.train.profile_steps))
    teacher = trainer_kwargs.get("teacher")
    fused = _fused_head(settings, args, model, trainer_cls, trainer_kwargs)
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
          f"{run_length(settings.train, block)[1]}", flush=True)
    if checkpoint:
        print(f"[lmshrink] resuming from {Path(checkpoint).name} (step {checkpoint_step(checkpoint)} "
              f"of {args.max_steps if args.max_steps > 0 else 'the run'})", flush=True)
    with hidden_states_as_logits(*trainer.head_models()):
        metrics = _run(trainer, checkpoint, metrics_file, stop, heldout is not None)
    metrics["heldout_tokens"] = heldout.num_rows * block if heldout is not None else 0
    metrics["speed"] = trainer.speed_record(whole_run_tps=metrics["steps"] * tokens_per_step(settings.train, block)
                                            / max(metrics["train_seconds"], 1e-9))
    record = provenance(command, to_dict(settings), metrics=metrics, **base_record)
    if use_cache is not None:
        model.config.use_cache = use_cache
    save_trained(trainer, out / "model", record, out.name)
    drop_checkpoints(trainer, out / "checkpoints", settings.train)
    if trainer.is_world_process_zero():
        write_json(out / RECORD, record)
        print(f"{command}: {count(metrics['steps'], 'step')}, {count(metrics['tokens_seen'], 'token')} in "
              f"{metrics['train_seconds']:.0f}s; held-out perplexity on whole {block}-token blocks (not `eval`'s "
              f"sliding windows) {metrics['heldout_ppl_before'] or float('nan'):.2f} -> "
              f"{metrics['heldout_ppl_after'] or float('nan'):.2f}; model in {out / 'model'}")
    return metrics


def _prepare(settings: HealSettings, model, out: Path) -> tuple[str | None, TrainingArguments]:
    """Checks that need the model, the run folder started over if asked, the checkpoint to carry on
    from (None: a fresh run), the Trainer's arguments, and the frozen parts."""
    check_length(model.config, settings.corpus.block_size, "block_size")
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
    return checkpoint, args


def _fused_head(settings: HealSettings, args: TrainingArguments, model, trainer_cls: type[LMTrainer],
                trainer_kwargs: dict[str, Any]) -> bool:
    """Whether the loss runs through the fused head: the setting, unless this run cannot (one line why)."""
    teacher = trainer_kwargs.get("teacher")
    fused = fused_head_on(settings.train.fused_head, args.per_device_train_batch_size, settings.corpus.block_size,
                          model.config.vocab_size)
    problem = next(filter(None, (*(fused_head_problem(m, args) for m in (model, teacher) if m is not None),
                                 trainer_cls.head_problem(**trainer_kwargs))), None)
    if fused and problem:
        print(f"[lmshrink] fused head off: {problem}; the loss is computed from full logits", flush=True)
        return False
    return fused


def _run(trainer: LMTrainer, checkpoint: str | None, metrics_file: MetricsFile, stop: StopOnSignal,
         evaluated: bool) -> dict[str, Any]:
    """Train (carrying on from `checkpoint`), the held-out loss measured before and after; the run's
    metrics, its clock counting the part before the checkpoint."""
    if checkpoint:  # measured before the first step of the interrupted part
        before = metrics_file.loss_before()
    else:
        before = trainer.evaluate()["eval_loss"] if evaluated else None
    result, wall = trained(trainer, checkpoint, metrics_file, stop, "run the same command to carry on")
    after = trainer.evaluate()["eval_loss"] if evaluated else None
    return {"train_loss": result.training_loss, "steps": trainer.state.global_step,
            "tokens_seen": trainer.state.num_input_tokens_seen, "train_seconds": wall,
            "heldout_ppl_before": math.exp(before) if before is not None else None,
            "heldout_ppl_after": math.exp(after) if after is not None else None,
            **trainer.run_metrics(metrics_file.records())}
