"""Throughput of `lmshrink clean`, against the authors' line filters written as plain Python.

Baseline: one process, one file after another, the paper's line filters as the authors wrote
them: line de-duplication (stripped length + first/last four words), a BeautifulSoup parse of
every line to find HTML tags, a minimum length and the non-alphabetic share. Against it, in
one run on the same corpus: `lmshrink clean` with only those line filters, and the full
pipeline (HTML to text, ftfy, whitespace, line filters, language id, Gopher rules, exact and
MinHash dedup), each with 1 and 2 workers. MB/s counts input bytes; wall time includes every
stage's start-up.

    python bench/clean_speed.py --data web-docs --output runs/bench-clean
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from lmshrink.config import build
from lmshrink.data.cleaning import input_files
from lmshrink.data.sources import resolve_path
from lmshrink.recipes.clean import CleanSettings, run

LINE_FILTERS_ONLY = dict(html_to_text=False, fix_unicode=False, normalize_whitespace=False, languages=[],
                         gopher_repetition=False, gopher_quality=False, exact_dedup=False, minhash_dedup=False)


def authors_line_filters(files: list[str], min_chars: int = 5, max_non_alpha: float = 0.10) -> tuple[int, int]:
    """The baseline: (lines kept, lines read) over every readable text file."""
    import warnings

    from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning

    warnings.filterwarnings("ignore", category=MarkupResemblesLocatorWarning)
    kept = read = 0
    for path in files:
        raw = Path(path).read_bytes()
        if b"\x00" in raw[:8192]:
            continue
        seen = set()
        for line in raw.decode("utf-8", errors="replace").split("\n"):
            line = line.strip()
            if not line:
                continue
            read += 1
            words = line.split()
            key = (len(line), hash((tuple(words[:4]), tuple(words[-4:]))))
            if key in seen:
                continue
            seen.add(key)
            try:
                if BeautifulSoup(line, "html.parser").find():
                    continue
            except Exception:  # bs4 raises ParserRejectedMarkup on e.g. `<![`: count it as markup
                continue
            if len(line) < min_chars:
                continue
            chars = [c for c in line if not c.isspace()]
            if sum(not c.isalpha() for c in chars) / len(chars) > max_non_alpha:
                continue
            kept += 1
    return kept, read


def clean_once(data: list[str], out: Path, workers: int, **options) -> tuple[float, dict]:
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    summary = run(build(CleanSettings, {"data": data, "output": str(out), "workers": workers, **options}))
    return time.perf_counter() - start, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["web-docs"])
    parser.add_argument("--output", default="runs/bench-clean")
    args = parser.parse_args()
    out = Path(args.output)
    paths = [str(resolve_path(d)) for d in args.data]
    files = [p for p, _ in input_files(paths)]
    mb = sum(Path(p).stat().st_size for p in files) / 1e6
    print(f"corpus: {len(files):,} files, {mb:,.1f} MB", file=sys.stderr)

    rows = []
    start = time.perf_counter()
    kept, read = authors_line_filters(files)
    seconds = time.perf_counter() - start
    rows.append({"run": "authors' line filters, plain Python + BeautifulSoup", "workers": 1, "seconds": seconds,
                 "detail": f"{kept:,} of {read:,} lines kept"})
    for name, options in (("lmshrink clean, line filters only", LINE_FILTERS_ONLY), ("lmshrink clean, full pipeline", {})):
        for workers in (1, 2):
            seconds, summary = clean_once(paths, out / f"{'lines' if options else 'full'}-{workers}", workers, **options)
            rows.append({"run": name, "workers": workers, "seconds": seconds,
                         "detail": f"{summary['kept']['documents']:,} of {summary['input']['documents']:,} documents kept"})
    base = rows[0]["seconds"]
    for row in rows:
        row["mb_per_s"] = mb / row["seconds"]
        row["mb_per_s_per_worker"] = row["mb_per_s"] / row["workers"]
        row["speedup_vs_baseline"] = base / row["seconds"]
    lines = [f"Corpus: {', '.join(args.data)} ({len(files):,} files, {mb:,.1f} MB), one run, same machine.", "",
             "| run | workers | wall s | MB/s | MB/s per worker | vs baseline | result |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['workers']} | {r['seconds']:.1f} | {r['mb_per_s']:.2f} | "
                     f"{r['mb_per_s_per_worker']:.2f} | {r['speedup_vs_baseline']:.2f}x | {r['detail']} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps({"mb": mb, "files": len(files), "rows": rows}, indent=2))
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
