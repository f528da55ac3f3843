"""Stages of a recipe that runs other recipes (search, study): each stage is an ordinary lmshrink
run in its own folder. A finished run made with the same settings is reused; an interrupted
training run resumes from its last checkpoint; a run made with other settings is re-run, never
silently reused; a folder with a damaged file (`lmshrink.integrity`) is set aside and run again.
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmshrink.heal.runs import last_checkpoint, same_settings
from lmshrink.integrity import folder_problem, set_aside
from lmshrink.records import RECORD, read_record


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
    found = last_checkpoint(folder / "checkpoints")
    return Path(found) if found else None
