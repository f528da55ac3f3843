"""Stages of a recipe that runs other recipes (search, study): each stage is an ordinary lmshrink
run in its own folder. A finished run made with the same settings is reused; an interrupted
training run resumes from its last checkpoint; a run made with other settings is re-run, never
silently reused; a folder with a damaged file (`lmshrink.integrity`) is set aside and run again.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmshrink.config import to_dict
from lmshrink.integrity import folder_problem, set_aside
from lmshrink.records import RECORD, read_record

# settings that say how to run, not what the result is
HOW_TO_RUN = ("overwrite", "resume", "logging_steps", "save_steps", "save_total_limit", "report_to", "compile",
              "fused_head", "kd_chunk", "keep_checkpoints", "save_models", "profile_steps")


def leaves(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Resolved settings (as in `lmshrink.json`) as {dotted path: value}, groups flattened."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(leaves(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _what(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide a run's result, as plain JSON data."""
    return {path: value for path, value in leaves(json.loads(json.dumps(settings))).items()
            if path.rsplit(".", 1)[-1] not in HOW_TO_RUN}


def same_settings(recorded: dict[str, Any] | None, settings: Any) -> bool:
    return recorded is not None and _what(recorded) == _what(to_dict(settings))


def changed_settings(recorded: dict[str, Any] | None, settings: Any, free: tuple[str, ...] = ()) -> list[str]:
    """The settings that decide a run's result and differ from a run's `recorded` ones, as
    "path old -> new" (settings the record predates, and those named in `free`, aside)."""
    then, now = _what(recorded or {}), _what(to_dict(settings))
    return [f"{path} {then[path]!r} -> {now[path]!r}" for path in now
            if path in then and then[path] != now[path] and path.rsplit(".", 1)[-1] not in free]


def run_stage(name: str, folder: str | Path, settings: Any, run: Callable[[Any], Any],
              resumes_itself: bool = False) -> dict[str, Any]:
    """`run(settings)` writing `folder`, unless it already holds a finished run of these settings;
    returns the folder's `lmshrink.json` record. A command that `resumes_itself` (clean,
    finetune) is handed an unfinished folder as it is."""
    folder = Path(folder)
    # what a later stage reads must be whole (checkpoints aside: they are the resumption's to check)
    if (folder / RECORD).is_file() and (damage := folder_problem(folder, skip=("checkpoints",))):
        aside = set_aside(folder)
        print(f"[{name}] {folder} is damaged ({damage}): set aside as {aside.name}; running it again")
    record = read_record(folder)
    if record and same_settings(record.get("settings"), settings):
        print(f"[{name}] finished before, with the same settings: {folder}")
        return record
    checkpoint = _checkpoint(folder) if record is None else None
    if checkpoint and same_settings((read_record(checkpoint) or {}).get("settings"), settings):
        print(f"[{name}] resuming from {checkpoint}")
        settings = dataclasses.replace(settings, train=dataclasses.replace(settings.train, resume=True))
    elif folder.exists() and not (resumes_itself and record is None):
        print(f"[{name}] {folder} was made with other settings or did not finish: running it again")
        shutil.rmtree(folder)
    # Whatever outlives the stages (imported libraries, lm-eval's task index, the study's results) is
    # set aside from the garbage collector: the Trainer collects at every start, and scanning
    # that heap costs ~0.4 s each time. Only live objects are set aside (collected first).
    gc.collect()
    gc.freeze()
    started = time.perf_counter()
    run(settings)
    print(f"[{name}] done in {time.perf_counter() - started:.1f} s")
    return read_record(folder) or {}


def _checkpoint(folder: Path) -> Path | None:
    from lmshrink.heal.training import last_checkpoint

    found = last_checkpoint(folder / "checkpoints")
    return Path(found) if found else None
