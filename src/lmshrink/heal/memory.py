"""Will a healing run fit its device? The memory a run's models and optimizer take, from their
configs alone, checked before either model loads.

Per device, one process, no sharding: the student's weights in their loaded dtype, its gradients
(same dtype) and AdamW's two moments (fp32) for every parameter that trains; the frozen teacher in
bf16 or fp16 where the run computes in it on a GPU (`DistillTrainer` casts it), else in its loaded
dtype. Activations come on top and depend on the batch (`--gradient-checkpointing` shrinks them),
so a run is refused only where these fixed parts alone exceed the device's memory; the line names
the settings that would make them fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmshrink.errors import LmshrinkError
from lmshrink.heal.training import freeze
from lmshrink.models import DTYPES, device_memory, pick_device, resolve_dtype

BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}
GB = 1e9


@dataclass(frozen=True)
class RunMemory:
    """Bytes of each fixed part of a training run on one device."""

    weights: int
    gradients: int
    optimizer: int
    teacher: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.teacher

    def describe(self) -> str:
        parts = [("student weights", self.weights), ("gradients", self.gradients), ("AdamW moments", self.optimizer),
                 ("teacher", self.teacher)]
        return " + ".join(f"{name} {size / GB:.1f}" for name, size in parts if size) + f" = {self.total / GB:.1f} GB"


def parameter_counts(config: Any, frozen: list[str] = ()) -> tuple[int, int]:
    """(all parameters, those that train with `frozen` parts fixed) of a model of this config, built on
    the meta device (no memory, no weights read)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    freeze(model, list(frozen))
    unique = {id(p): p for p in model.parameters()}.values()  # a tied head counted once
    return sum(p.numel() for p in unique), sum(p.numel() for p in unique if p.requires_grad)


def run_memory(student: Any, teacher: Any | None, dtype: str, frozen: list[str], half_teacher: bool) -> RunMemory:
    """The fixed parts of a run of `student` (loaded in `dtype`, `frozen` parts fixed) against `teacher`
    (None: a cached teacher, or none), the teacher in 2 bytes a parameter where `half_teacher`."""
    total, trains = parameter_counts(student, frozen)
    weight = BYTES[dtype]
    teacher_bytes = 0
    if teacher is not None:
        teacher_bytes = parameter_counts(teacher)[0] * (2 if half_teacher else weight)
    return RunMemory(weights=total * weight, gradients=trains * weight, optimizer=trains * 8, teacher=teacher_bytes)


def check_fits(student: Any, teacher: Any | None, settings: Any) -> None:
    """Refuse, with one line (exit 2), a run whose fixed parts cannot fit its device (`fit_problem`)."""
    from lmshrink.config import check

    if problem := fit_problem(student, teacher, settings, pick_device("auto")):  # where the Trainer puts a run
        check([problem])


def fit_problem(student: Any, teacher: Any | None, settings: Any, device: torch.device,
                available: int | None = None) -> str | None:
    """One line if this run's weights, gradients, optimizer and teacher cannot fit `device` (its
    memory, or `available` bytes), naming the settings with which they would; else None. Runs
    sharded or offloaded (FSDP, DeepSpeed) are not checked here."""
    train, dtype = settings.train, resolve_dtype(settings.load.dtype, device.type)
    if train.fsdp or train.deepspeed or dtype not in BYTES:  # (what else there is, the settings' check names)
        return None
    available = device_memory(device) if available is None else available
    half = device.type == "cuda" and train.precision != "fp32"
    try:
        need = run_memory(student, teacher, dtype, train.freeze, half)
    except LmshrinkError:  # (what the run itself would refuse, e.g. a head to freeze that is not there)
        raise
    except Exception:  # noqa: BLE001 - a config transformers cannot build here (custom code): the load says why
        return None
    if need.total <= available:
        return None
    options = []
    if teacher is not None and need.total - need.teacher <= available:
        options.append("--teacher-cache (a teacher cached by `lmshrink cache-teacher`, not held in memory)")
    if "embeddings" not in train.freeze:
        frozen = run_memory(student, teacher, dtype, [*train.freeze, "embeddings"], half)
        if frozen.total <= available:
            options.append("--freeze embeddings")
    if device.type == "cuda" and need.total - need.optimizer - need.gradients <= available:
        options.append("--deepspeed configs/deepspeed-zero2.json (the optimizer in CPU memory)")
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        options.append(f"--fsdp configs/fsdp.json under torchrun over the {torch.cuda.device_count()} GPUs")
    fix = ("; it would fit with " + ", or ".join(options)) if options else "; a smaller student or a larger device"
    return (f"memory: this run needs {need.describe()} before any activation, and the {device.type} device has "
            f"{available / GB:.1f} GB{fix}")


def engine_plans(student: Any, teacher: Any | None, gpus: int = 8) -> dict[str, tuple[int, int]]:
    """What each way of running a heal holds of its fixed parts (the batch's activations come on top),
    as (bytes per GPU, bytes of CPU memory), for a student of config `student` trained with AdamW in
    mixed precision (fp32 weights; bf16 where DeepSpeed keeps the working copy) and a frozen bf16
    teacher of config `teacher` (None: no teacher). P: student parameters, Pt: the teacher's.

    - one GPU: weights 4P + gradients 4P + AdamW moments 8P + teacher 2Pt (the check `distill` makes);
    - `--teacher-cache`: the teacher replaced by its cache on disk;
    - `--freeze embeddings`: gradients and moments only for the rest;
    - ZeRO-2 with the optimizer on the CPU (configs/deepspeed-zero2.json): bf16 weights 2P and
      gradients 2P on the GPU; fp32 master weights, gradients and moments (16P) in CPU memory;
    - FSDP2 over `gpus` GPUs (configs/fsdp.json): the student's 16P split over them; the teacher,
      not wrapped, whole on each (one block's gathered weights come on top while it runs)."""
    full = run_memory(student, teacher, "float32", [], half_teacher=True)
    student_parts = full.total - full.teacher
    half = run_memory(student, teacher, "bfloat16", [], half_teacher=True)
    return {
        "one GPU": (full.total, 0),
        "one GPU, --teacher-cache": (student_parts, 0),
        "one GPU, --freeze embeddings": (run_memory(student, teacher, "float32", ["embeddings"], True).total, 0),
        "one GPU, ZeRO-2 + CPU optimizer": (half.weights + half.gradients + half.teacher, student_parts),
        f"FSDP2 over {gpus} GPUs": (student_parts // gpus + full.teacher, 0),
    }
