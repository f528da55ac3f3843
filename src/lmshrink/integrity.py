"""Whether a file on disk is whole, read from its own headers before a run trusts it.

A write that a full disk, a lost node or `kill -9` cut short can leave a file that exists, has the
right name and fails only when something reads it, deep inside a library. Every format lmshrink
reads back says how long it must be: a safetensors header names the byte range of every tensor, a
zip archive (`torch.save`'s `.pt`, `.pth`, `.bin`) ends with a directory of its members, a GGUF
header names its tensors' offsets and shapes, JSON parses or does not. Checking those costs a few
reads, not a load. What fails is named (`problem`) and, where a run can do without it, set aside
under a new name (`set_aside`) rather than deleted: the user may want it.
"""

from __future__ import annotations

import json
import math
import stat
import struct
import zipfile
from pathlib import Path
from typing import Any


def _safetensors(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "shorter than a safetensors header"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"its header claims {length:,} bytes and the file has {size:,}"
        try:
            header = json.loads(f.read(length))
        except ValueError:
            return "its header is not valid JSON"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    wanted = 8 + length + max(ends, default=0)
    if wanted != size:
        return f"its tensors need {wanted:,} bytes and the file has {size:,}"
    return None


def _zip(path: Path) -> str | None:
    """torch.save's format since PyTorch 1.6: a zip whose central directory sits at the end, so a
    file cut short has none."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "not a whole zip archive (torch.save's format): cut short or overwritten"
    for member in members:
        if member.header_offset + member.compress_size > size:
            return f"its member {member.filename} runs past the end of the file"
    return None


def _json(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return "not valid JSON (cut short?)"
    return None


# GGUF metadata value types -> their size in bytes (8: a string, 9: an array; both sized as read)
_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_problem(path: Path) -> str | None:
    """The GGUF magic, a version llama.cpp and transformers read (2 or 3), and every tensor inside
    the file. The header is walked here, not by `gguf.GGUFReader`, which lays out every value and
    tensor (3 s for SmolLM2-135M, 11 s for Gemma-3-270M's 262k-token vocabulary) to say the same."""
    import mmap

    size = path.stat().st_size
    if size < 24:
        return "shorter than a GGUF header"
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            return "not a GGUF file (it does not start with the GGUF magic bytes)"
        (version,) = struct.unpack_from("<I", data, 4)
        if version not in (2, 3):
            return f"GGUF version {version}, where 2 and 3 are read"
        header = _GGUFHeader(data, size)
        try:
            layout, end = header.tensor_ends()
        except (struct.error, KeyError, ValueError):
            return "not a whole GGUF file: its header breaks off or does not read (cut short or damaged)"
        for name, tensor_end in layout:
            if end + tensor_end > size:
                return f"not a whole GGUF file: its tensor {name} runs past the end (cut short?)"
    return None


class _GGUFHeader:
    """A cursor over a GGUF file's header: its values skipped (the alignment kept), its tensors' ends."""

    def __init__(self, data: Any, size: int):
        self.data, self.size, self.at = data, size, 24

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return values

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        self.at += length
        if self.at > self.size:
            raise struct.error("a string runs past the end")
        return bytes(self.data[self.at - length : self.at]).decode("utf-8", "replace")

    def skip(self, kind: int) -> None:
        if kind == 8:
            self.string()
        elif kind == 9:
            inner, count = self.unpack("<IQ")
            if inner in _GGUF_SCALARS:
                self.at += count * _GGUF_SCALARS[inner]
            else:
                for _ in range(count):
                    self.skip(inner)
        elif kind in _GGUF_SCALARS:
            self.at += _GGUF_SCALARS[kind]
        else:
            raise struct.error(f"unknown value type {kind}")

    def tensor_ends(self) -> tuple[list[tuple[str, int]], int]:
        """Each tensor's name and where its data ends, from the start of the data section; and
        where that section starts (after the header, at the file's alignment)."""
        from gguf import GGML_QUANT_SIZES

        tensors, values = struct.unpack_from("<QQ", self.data, 8)
        alignment = 32
        for _ in range(values):
            key = self.string()
            (kind,) = self.unpack("<I")
            if key == "general.alignment" and kind == 4:
                (alignment,) = struct.unpack_from("<I", self.data, self.at)
            self.skip(kind)
        layout = []
        for _ in range(tensors):
            name = self.string()
            (dims,) = self.unpack("<I")
            if dims > 8:
                raise ValueError(f"tensor {name} has {dims} dimensions")
            shape = self.unpack(f"<{dims}Q")
            kind, offset = self.unpack("<IQ")
            block, nbytes = GGML_QUANT_SIZES[kind]
            layout.append((name, offset + math.prod(shape) // block * nbytes))
        return layout, -(-self.at // alignment) * alignment


def _jsonl(path: Path) -> str | None:
    text = path.read_text(errors="replace")
    if text and not text.endswith("\n"):
        return "its last line breaks off (cut short?)"
    for n, line in enumerate(text.splitlines(), 1):
        try:
            json.loads(line)
        except ValueError:
            return f"line {n} is not valid JSON"
    return None


def _gzip(path: Path) -> str | None:
    """Read through to the end: a gzip stream says it is whole only in its last bytes (a checksum)."""
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error):
        return "not a whole gzip stream (cut short or damaged)"
    return None


def _parquet(path: Path) -> str | None:
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except Exception:  # pyarrow's errors for a missing or broken footer vary by version
        return "not a whole Parquet file (its footer is missing or damaged)"
    return None


CHECKS = {".safetensors": _safetensors, ".pt": _zip, ".pth": _zip, ".bin": _zip, ".json": _json,
          ".jsonl": _jsonl, ".gguf": gguf_problem, ".gz": _gzip, ".parquet": _parquet}


_whole: set[tuple[int, int, int, int, str]] = set()  # found whole in this process: device, inode, size, mtime, check


def problem(path: str | Path) -> str | None:
    """What is wrong with one file, read from its headers (None: whole, or a format not checked).
    A file found whole is not read again while its inode, size and modification time stay the same
    (a teacher's 33 MB tokenizer.json parses once a process, not once a command)."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError:
        return "missing"
    if not stat.S_ISREG(info.st_mode):
        return "missing"
    version = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, path.suffix)  # a link's name picks its check
    if version in _whole:
        return None
    check = CHECKS.get(path.suffix)
    try:
        found = check(path) if check else None
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    if found is None:
        _whole.add(version)
    return found


def folder_problem(folder: str | Path, needed: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> str | None:
    """The first damaged file under `folder` (every format `CHECKS` knows, `needed` must exist; a
    sharded safetensors index's shards too; what `skip` names at the top passed over), as
    "name: what is wrong"; None when all are whole."""
    folder = Path(folder)
    for name in needed:
        if not (folder / name).exists():
            return f"{name}: missing"
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, OSError):
            return f"{index.name}: not a valid shard index"
        if missing := sorted(s for s in shards if not (folder / s).is_file()):
            return f"{missing[0]}: missing (listed in {index.name})"
    for path in sorted(folder.rglob("*")):
        inside = path.relative_to(folder).parts
        if inside[0] in skip or any(part.startswith(".") for part in inside):  # skipped; temporary files
            continue
        if path.is_file() and (found := problem(path)):
            return f"{path.relative_to(folder)}: {found}"
    return None


def kept(path: str | Path, instead: str) -> bool:
    """Whether a file an earlier run wrote can be trusted: True when it is whole; False when it is
    missing, or damaged (then set aside, said so, and `instead` says what the run does about it)."""
    path = Path(path)
    if not path.exists():
        return False
    if (found := problem(path)) is None:
        return True
    aside = set_aside(path)
    print(f"[lmshrink] {path} is damaged ({found}): set aside as {aside.name}; {instead}", flush=True)
    return False


ASIDE = "damaged-"
"""The name prefix of what `set_aside` moved out of the way (text sources pass such files over)."""


def set_aside(path: str | Path) -> Path:
    """Rename a damaged file or folder to `damaged-NAME` (`damaged-2-NAME`, ... where taken) beside
    it, out of the way of whatever looks for NAME, and return the new path."""
    path = Path(path)
    target, n = path.with_name(f"{ASIDE}{path.name}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{ASIDE}{n}-{path.name}")
    path.rename(target)
    return target
