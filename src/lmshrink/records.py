"""Atomic file writes and the `lmshrink.json` provenance record every output carries."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmshrink import __version__
from lmshrink.errors import LmshrinkError

RECORD = "lmshrink.json"


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; whatever was written there becomes `path` only when the
    block succeeds. A crash leaves the old file or none, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); a result file is made like any other
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def count(n: float, noun: str) -> str:
    """A number and its noun, as a report says it: '1 step', '2 steps', '16,384 tokens', '1.5 epochs'."""
    return (f"{int(n):,}" if float(n).is_integer() else f"{n:g}") + f" {noun}" + ("" if n == 1 else "s")


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a binary file atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `path`, renamed to `path` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
        publish(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, path: Path) -> None:
    """Move a finished folder `tmp` to `path`, replacing any folder there."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


def save_atomically(path: str | Path, save: Callable[[Path], None]) -> Path:
    """Run `save(tmp_folder)` and publish the folder at `path` only if it completed."""
    with atomic_dir(path) as tmp:
        save(tmp)
    return Path(path)


@contextmanager
def exclusive(folder: str | Path) -> Iterator[Path]:
    """Hold `folder` for one run: a second run writing the same folder at the same time stops at
    once with one clear line, instead of interleaving its checkpoints and records with ours."""
    import fcntl

    folder = Path(folder)
    if int(os.environ.get("RANK", "0")) != 0:  # one lock per run: the main process of a distributed run holds it
        yield folder
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lmshrink.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise LmshrinkError(f"{folder} is being written by another lmshrink run ({holder}); wait for it to "
                                "finish, or give another --output") from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        try:
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def output_problem(path: str | Path) -> str | None:
    """Why an output folder cannot be written (None when it can): it is an existing file, or the
    nearest folder that exists above it cannot be written to. Checked when the setting is read, before
    any model loads."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        return f"{path} is a file, and this is the folder the results are written into; give a folder"
    above = path
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        return f"{above} is a file, so {path} cannot be made under it; give a folder"
    if not os.access(above, os.W_OK | os.X_OK):
        return f"{above} cannot be written to (permissions); give a folder you can write"
    return None


def holding_output(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A command's `run(settings)` that holds `settings.output` for itself while it runs
    (`exclusive`): a second run into the same folder stops at once."""
    @functools.wraps(run)
    def held(settings: Any) -> Any:
        with exclusive(settings.output):
            return run(settings)

    return held


def md_table(header: Sequence[Any], rows: Iterable[Sequence[Any]] = (), align: str = "") -> list[str]:
    """A markdown table's lines: the header, its alignment row (`align`: a letter a column, `l` for
    text, `r` for numbers; every column `l` if not given) and a line a row, each cell as str() gives it."""
    align = align or "l" * len(header)
    if len(align) != len(header):
        raise ValueError(f"md_table: {len(header)} columns and {len(align)} alignments")

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(map(str, cells)) + " |"

    return [line(header), "|" + "".join("---:|" if a == "r" else "---|" for a in align), *map(line, rows)]


def git_hash() -> str | None:
    """The commit of the lmshrink checkout in use, if it is one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def provenance(command: str, settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The record written as `lmshrink.json`: what made this output, with which settings."""
    return {
        "command": command,
        "lmshrink_version": __version__,
        "git": git_hash(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": settings,
        **extra,
    }


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """The `lmshrink.json` of a folder, or None if it has none."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise LmshrinkError(f"{path} is damaged (not valid JSON); it says what made the folder, so re-create the "
                            "folder with the command that wrote it") from None


def save_figure(fig: Any, path: str | Path) -> None:
    """Save a matplotlib figure atomically."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
