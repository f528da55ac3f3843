"""Whether a run starts, carries on or is done: the settings that decide a result, checkpoints
whole or not, resuming, stopping on a signal, removing what a finished run no longer needs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import time
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerState
from transformers.trainer_utils import TrainOutput

from lmshrink.config import check, how_to_run_paths, leaves, names, to_dict
from lmshrink.errors import Stopped
from lmshrink.heal.args import HealSettings, TrainArgs
from lmshrink.heal.callbacks import MetricsFile, StopOnSignal
from lmshrink.integrity import ASIDE, folder_problem, set_aside
from lmshrink.records import RECORD, read_record


def flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Resolved settings (as in `lmshrink.json`) as {dotted path: value}, groups flattened."""
    found = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            found.update(flat(value, f"{prefix}{key}."))
        else:
            found[prefix + key] = value
    return found


def _what(values: dict[str, Any], settings: Any, free: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings that decide a run's result, as plain JSON data: every one but those marked
    `how_to_run` on `settings`' class (`config.setting`) and the dotted paths in `free`."""
    ignored = how_to_run_paths(type(settings)) | set(free)
    moved = names(type(settings))  # a record made before a setting moved into a group names it by its old path
    paths = {leaf.path for leaf in leaves(type(settings))}
    found = {(path if path in paths else moved.get(path, path)): value
             for path, value in flat(json.loads(json.dumps(values, default=str))).items()}
    return {path: value for path, value in found.items()
            if not any(path == i or path.startswith(i + ".") for i in ignored)}  # a mapping's keys with it


def same_settings(recorded: dict[str, Any] | None, settings: Any) -> bool:
    """Whether a run recorded with `recorded` settings is the run `settings` ask for."""
    return recorded is not None and _what(recorded, settings) == _what(to_dict(settings), settings)


def changed_settings(recorded: dict[str, Any] | None, settings: Any, free: tuple[str, ...] = ()) -> list[str]:
    """The settings that decide a run's result and differ from a run's `recorded` ones, as
    "path old -> new" (settings the record predates, and the dotted paths in `free`, aside)."""
    then, now = _what(recorded or {}, settings, free), _what(to_dict(settings), settings, free)
    return [f"{path} {then[path]!r} -> {now[path]!r}" for path in now if path in then and then[path] != now[path]]


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
RUN_FILES = ("checkpoints", "model", "metrics.jsonl", "samples.jsonl", RECORD, "tensorboard", "profile")


def carry_on(settings: HealSettings, out: str | Path | None = None, free: tuple[str, ...] = (),
             saves_model: bool = True) -> dict[str, Any] | None:
    """What a run's folder (`out`, by default the output folder) already holds decides how the run
    starts; checked before any model or data is loaded. Nothing there: a fresh run. An unfinished
    run with the same settings (`free` ones aside: they choose which runs a command makes, not what
    one computes): carried on from its last whole checkpoint (refused with --no-resume). A finished
    run with the same settings (its record, and its model/ unless the run keeps none): nothing to do,
    its record is returned. A run made with other settings: refused, naming what changed.
    --overwrite: whatever is there is replaced (removed by `_train`)."""
    out = Path(settings.output if out is None else out)
    if settings.train.overwrite:
        return None
    done = read_record(out) or read_record(out / "model")
    if done and done.get("metrics") and (not saves_model or (out / "model").is_dir()):
        changed = changed_settings(done.get("settings"), settings, free)
        if changed:
            check([f"output: {out} holds a finished {done.get('command', 'training')} run made with other settings "
                   f"({'; '.join(changed)}); pass --overwrite to replace it, or give another --output"])
        print(f"[lmshrink] {out} holds this run already, finished; nothing to do (--overwrite trains it again)",
              flush=True)
        return done
    checkpoint = last_checkpoint(out / "checkpoints", remove=False)
    if checkpoint:
        changed = changed_settings((read_record(checkpoint) or {}).get("settings"), settings, free)
        if changed:
            check([f"output: {out} holds an unfinished run ({Path(checkpoint).name}) made with other settings "
                   f"({'; '.join(changed)}); run it with those values to carry on, pass --overwrite to start "
                   "over, or give another --output"])
        if not settings.train.resume:
            check([f"output: {out} holds an unfinished run ({Path(checkpoint).name}); leave out --no-resume to "
                   "carry on from it, or pass --overwrite to start over"])
    return None


def trained(trainer: Trainer, checkpoint: str | None, metrics_file: MetricsFile, stop: StopOnSignal,
            carry_on: str) -> tuple[TrainOutput, float]:
    """`train_until_stopped` from `checkpoint`, and the run's wall seconds, counting the part before the
    checkpoint (read from its metrics file)."""
    earlier = metrics_file.elapsed()
    started = time.perf_counter() - earlier
    result = train_until_stopped(trainer, checkpoint, stop, carry_on, elapsed=earlier)
    return result, time.perf_counter() - started


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
