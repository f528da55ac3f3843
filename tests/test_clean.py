"""`lmshrink clean`: one literal sample per rejection reason, dedup, conservation, idempotence, resumption."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from datatrove.data import Document

from lmshrink.config import SettingsError, build
from lmshrink.data.assets import corpus_path
from lmshrink.data.cleaning import HtmlToText, NormalizeWhitespace, PaperLineFilter, non_alpha_fraction
from lmshrink.recipes.clean import CleanSettings, _records, run

TUTORIAL = ["classes", "controlflow", "datastructures", "errors", "inputoutput", "modules"]


def _prose(name: str) -> str:
    return (corpus_path("python-docs/tutorial") / f"{name}.rst.txt").read_text()


def _german() -> str:
    return ("Der schnelle braune Fuchs springt über den faulen Hund und läuft dann weiter in den Wald. "
            "Dies ist ein deutscher Text, der lang genug ist, um sicher als deutsch erkannt zu werden, "
            "und er hat genug Wörter für die anderen Regeln. Die Katze schläft auf dem warmen Sofa und "
            "träumt von Mäusen, während draußen der Regen fällt und die Kinder in der Schule lernen. "
            "Am Abend kommen alle nach Hause, essen zusammen und erzählen einander, was sie erlebt haben.\n")


def _spam() -> str:
    """Distinct lines, few symbols, but one phrase all over: Gopher's top-2-gram rule."""
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()
    return "\n".join(f"Buy cheap watches and cheap watches for {w} with the cheap watches of {words[-1 - i]} now"
                     for i, w in enumerate(words)) + "\n"


# Every input document and the (step, reason) it must be rejected with; None = kept.
EXPECTED: dict[str, tuple[str, str] | None] = {
    "corpus/empty.txt": ("bad_input", "empty"),
    "corpus/blob.bin": ("bad_input", "binary"),
    "corpus/latin1.txt": ("bad_input", "invalid_utf8"),
    "corpus/giant.txt": ("bad_input", "giant_line"),
    "corpus/huge.txt": ("bad_input", "too_large"),
    "corpus/broken.txt.gz": ("bad_input", "corrupt_gzip"),
    "corpus/broken.parquet#unreadable": ("bad_input", "corrupt_parquet"),
    "corpus/records.jsonl:1": ("bad_input", "malformed_json"),
    "r2": ("bad_input", "missing_text"),  # a record's own id is kept
    "corpus/records.jsonl:6": ("bad_input", "missing_text"),  # text null
    "corpus/records.jsonl:7": ("bad_input", "missing_text"),  # a JSON list, not an object
    "corpus/records.jsonl:3": ("bad_input", "nul_bytes"),
    "m1": None,  # line 4 is blank: not a document
    "corpus/symbols.txt": ("line_filters", "no_lines_left"),
    "corpus/german.txt": ("language", "language_de"),
    "corpus/short.txt": ("gopher_quality", "gopher_short_doc"),
    "corpus/spam.txt": ("gopher_repetition", "top_2_gram"),
    "corpus/classes.rst.txt": None,
    "corpus/classes-copy.rst.txt": ("exact_duplicate", "exact_duplicate"),
    "corpus/errors.rst.txt": None,
    "corpus/errors-edited.rst.txt": ("near_duplicate", "near_duplicate"),
    "corpus/controlflow.rst.txt": None,
    "corpus/datastructures.rst.txt": None,
    "corpus/page.html": None,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("messy") / "corpus"
    root.mkdir()
    (root / "empty.txt").write_bytes(b"")
    (root / "blob.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (root / "latin1.txt").write_bytes("Café crème, déjà vu: naïve façade à la française.".encode("latin-1"))
    (root / "giant.txt").write_text("word " * 20_000)
    (root / "huge.txt").write_text("A perfectly fine line of prose that goes on.\n" * 30_000)
    (root / "broken.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage, not deflate")
    (root / "broken.parquet").write_bytes(b"PAR1 this is not really parquet PAR1")
    good = " ".join(_prose("modules").split()[:300])
    (root / "records.jsonl").write_text(
        '{"text": "unterminated\n' + json.dumps({"body": "no text field", "id": "r2", "url": "https://r.example"}) + "\n"
        + json.dumps({"text": "nul \x00 inside"}) + "\n\n"
        + json.dumps({"text": good, "id": "m1", "url": "https://m.example/1", "dump": "CC-MAIN-2024-10",
                      "source": "crawl", "metadata": {"date": "2024-03-01"}}) + "\n"
        + json.dumps({"text": None, "url": "https://n.example"}) + "\n" + json.dumps(["a", "list"]) + "\n")
    (root / "symbols.txt").write_text("x = [1, 2, 3]\n>>> print(x[0] + 42)\n----\n(ok)\n")
    (root / "german.txt").write_text(_german())
    (root / "short.txt").write_text("A short note that says very little at all.\n")
    (root / "spam.txt").write_text(_spam())
    for name in ("classes", "errors", "controlflow", "datastructures"):
        (root / f"{name}.rst.txt").write_text(_prose(name))
    shutil.copy(root / "classes.rst.txt", root / "classes-copy.rst.txt")
    edited = _prose("errors").replace("exception", "exceptions", 3).replace("Python", "python", 2)
    (root / "errors-edited.rst.txt").write_text(edited)
    (root / "page.html").write_text(
        "<!DOCTYPE html><html><head><title>Pages</title><style>body { color: red; }</style>"
        "<script>var tracking = 'SCRIPT-TEXT';</script></head><body>"
        + "".join(f"<p>{p}</p>" for p in _prose("inputoutput").split("\n\n")[4:40]) + "</body></html>")
    return root


def settings(data: list[str], output: Path, **extra) -> CleanSettings:
    return build(CleanSettings, {"data": data, "output": str(output), "workers": 1, "tasks": 3,
                                 "max_doc_mb": 1, "max_line_chars": 50_000, **extra})


def outcome(out: Path) -> dict[str, tuple[str, str] | None]:
    result: dict[str, tuple[str, str] | None] = {i: None for i, _, _ in _records(out / "kept")}
    for step in (out / "rejected").iterdir():
        for i, meta, _ in _records(step):
            assert i not in result, f"{i} both kept and rejected"
            result[i] = (step.name, meta.get("filter_reason", step.name))
    return result


@pytest.fixture(scope="module")
def cleaned(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    run(settings([str(corpus)], out))
    return out


def test_records_keep_their_id_and_every_field(cleaned):
    """Nothing a record carried is lost: its id, its fields (a field named like one of ours kept
    as original_<name>), its nested metadata, on kept and rejected documents alike."""
    kept = {i: meta for i, meta, _ in _records(cleaned / "kept")}
    assert kept["m1"]["url"] == "https://m.example/1" and kept["m1"]["dump"] == "CC-MAIN-2024-10"
    assert kept["m1"]["original_source"] == "crawl" and kept["m1"]["date"] == "2024-03-01"
    assert kept["m1"]["location"] == "corpus/records.jsonl:5" and kept["m1"]["source"] == "corpus/records.jsonl"
    rejected = {i: meta for i, meta, _ in _records(cleaned / "rejected" / "bad_input")}
    assert rejected["r2"]["url"] == "https://r.example" and rejected["r2"]["body"] == "no text field"
    assert rejected["corpus/records.jsonl:6"]["url"] == "https://n.example"


def test_every_document_kept_or_rejected_with_its_reason(cleaned):
    got = outcome(cleaned)
    # exact and near duplicates: which copy survives is the pipeline's choice; one does
    for a, b in (("corpus/classes.rst.txt", "corpus/classes-copy.rst.txt"),
                 ("corpus/errors.rst.txt", "corpus/errors-edited.rst.txt")):
        if got[a] is not None:
            got[a], got[b] = got[b], got[a]
    assert got == EXPECTED


def test_report_counts_and_conservation(cleaned):
    report = json.loads((cleaned / "report.json").read_text())
    n_rejected = sum(1 for v in EXPECTED.values() if v)
    assert report["input"]["documents"] == len(EXPECTED)
    assert report["kept"]["documents"] == len(EXPECTED) - n_rejected
    assert report["rejected_documents"] == n_rejected and report["conserved"]
    assert set(report["lines_removed"]) >= {"duplicate_line", "short_line", "non_alpha_line"}
    md = (cleaned / "report.md").read_text()
    assert "| bad_input | binary | 1 |" in md and "Every document accounted for: yes" in md
    assert (cleaned / "report.png").stat().st_size > 10_000
    assert json.loads((cleaned / "lmshrink.json").read_text())["command"] == "clean"


def test_kept_text_is_clean(cleaned):
    texts = {i: t for i, t in ((r["id"], r["text"]) for f in sorted((cleaned / "kept").glob("*.jsonl.gz"))
                                 for r in map(json.loads, gzip.open(f, "rt")))}
    page = texts["corpus/page.html"]
    assert "SCRIPT-TEXT" not in page and "color: red" not in page and "<p>" not in page
    for text in texts.values():
        lines = [ln for ln in text.split("\n") if ln]
        assert all(len(ln) >= 5 and non_alpha_fraction(ln) <= 0.10 for ln in lines)
        assert len({ln for ln in lines}) == len(lines)


def test_cleaning_clean_output_removes_nothing(cleaned, tmp_path):
    again = tmp_path / "again"
    summary = run(settings([str(cleaned / "kept")], again))
    assert summary["rejected_documents"] == 0 and summary["lines_removed"] == {}
    before = sorted(r["text"] for f in (cleaned / "kept").glob("*.jsonl.gz") for r in map(json.loads, gzip.open(f, "rt")))
    after = sorted(r["text"] for f in (again / "kept").glob("*.jsonl.gz") for r in map(json.loads, gzip.open(f, "rt")))
    assert before == after


def test_rerun_skips_finished_tasks_and_gives_the_same_result(corpus, tmp_path):
    out = tmp_path / "out"
    run(settings([str(corpus)], out))
    first = outcome(out)
    finished = out / "work" / "filter" / "000_00000.jsonl.gz"
    redone = out / "work" / "filter" / "000_00001.jsonl.gz"
    os.utime(finished, (1, 1))
    os.utime(redone, (1, 1))
    (out / "logs" / "filter" / "completions" / "00001").unlink()  # task 1 of stage 1 "interrupted"
    run(settings([str(corpus)], out))
    assert finished.stat().st_mtime == 1  # skipped
    assert redone.stat().st_mtime > 1  # redone
    assert outcome(out) == first
    with pytest.raises(SettingsError, match="other settings.*languages"):
        run(settings([str(corpus)], out, languages=["de"]))


def test_resuming_with_other_workers_keeps_the_task_split(corpus, tmp_path):
    """Interrupted with 1 worker (4 tasks by default), resumed with 2: the run keeps its 4 tasks, so
    every file is read once and the report accounts for every document."""
    out = tmp_path / "out"
    base = {"data": [str(corpus)], "output": str(out), "max_doc_mb": 1, "max_line_chars": 50_000}
    first = run(build(CleanSettings, {**base, "workers": 1}))
    before = outcome(out)
    (out / "logs" / "filter" / "completions" / "00003").unlink()  # task 3 of stage 1 "interrupted"
    again = run(build(CleanSettings, {**base, "workers": 2}))
    assert again["input"]["documents"] == first["input"]["documents"] == len(EXPECTED)
    assert outcome(out) == before and set(before) == set(EXPECTED)  # every document once, as before


def test_perplexity_scoring_drops_the_worst_share(tiny_gpt2_dir, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in TUTORIAL:
        (docs / f"{name}.txt").write_text(_prose(name))
    out = tmp_path / "out"
    summary = run(settings([str(docs)], out, perplexity_model=str(tiny_gpt2_dir), perplexity_tokens=64,
                           drop_worst_perplexity=0.34, minhash_dedup=False))
    ppl = {i: m["perplexity"] for folder in (out / "kept", out / "rejected" / "perplexity") for i, m, _ in _records(folder)}
    dropped = {i for i, _, _ in _records(out / "rejected" / "perplexity")}
    assert len(ppl) == len(TUTORIAL) and len(dropped) == 2
    assert min(ppl[i] for i in dropped) > max(v for i, v in ppl.items() if i not in dropped)
    assert summary["conserved"]
    # a fixed threshold instead: exactly the documents above it go, named as such
    limit = sorted(ppl.values())[2]
    out = tmp_path / "threshold"
    run(settings([str(docs)], out, perplexity_model=str(tiny_gpt2_dir), perplexity_tokens=64,
                 max_perplexity=limit, minhash_dedup=False))
    dropped = {i: m["filter_reason"] for i, m, _ in _records(out / "rejected" / "perplexity")}
    assert dropped == {i: "perplexity_threshold" for i, v in ppl.items() if v > limit}


def test_restart_starts_over_and_refuses_foreign_folders(corpus, tmp_path):
    out = tmp_path / "out"
    run(settings([str(corpus / "german.txt")], out, languages=["de"], gopher_quality=False))
    (out / "kept" / "marker").write_text("from the first run")
    summary = run(settings([str(corpus / "german.txt")], out, languages=["en"], gopher_quality=False, restart=True))
    assert not (out / "kept" / "marker").exists() and summary["rejected"][0]["reason"] == "language_de"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(SettingsError, match="not a `lmshrink clean` output"):
        run(settings([str(corpus / "german.txt")], foreign, restart=True))
    assert (foreign / "notes.txt").read_text() == "precious"


def test_paper_line_filters_one_literal_per_reason():
    f = PaperLineFilter()
    doc = Document(text="\n".join([
        "A sentence that stays in the document.",
        "A sentence that stays in the document.",  # duplicate_line
        "Some <b>bold</b> words in a line of markup.",  # html_tag_line
        "Tiny",  # short_line
        "Numbers 1234567890 and symbols {}[]()!",  # non_alpha_line
        "",
        "Another sentence that stays, after a blank line.",
    ]), id="d")
    assert f.filter(doc) is True
    assert doc.text == "A sentence that stays in the document.\n\nAnother sentence that stays, after a blank line."
    stats = {k: v.total for k, v in f.stats.stats.items()}
    assert {k: stats[k] for k in stats if k.startswith("lines_")} == {
        "lines_duplicate_line": 1, "lines_html_tag_line": 1, "lines_short_line": 1, "lines_non_alpha_line": 1}


def test_html_and_whitespace_formatters():
    doc = Document(text="<html><head><script>alert(1)</script><style>p{}</style></head>"
                        "<body><h1>Title</h1><p>Hello <b>world</b>.</p></body></html>", id="p",
                   metadata={"source": "x.html"})
    (out,) = HtmlToText()([doc])
    assert "alert" not in out.text and "p{}" not in out.text and "Hello world." in out.text
    assert NormalizeWhitespace().format("a\u00a0 b \t c  \n\n\n\n d\r\n") == "a b c\n\nd"


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(SettingsError, match="perplexity_model"):
        settings([str(tmp_path)], tmp_path / "o", drop_worst_perplexity=0.1)
    with pytest.raises(SettingsError, match="does not exist"):
        settings([str(tmp_path / "nope")], tmp_path / "o")
    with pytest.raises(SettingsError, match="unknown setting"):
        build(CleanSettings, {"data": [str(tmp_path)], "min_line_length": 3})


def test_two_workers_and_parquet_in_and_out(cleaned, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r for f in sorted((cleaned / "kept").glob("*.jsonl.gz")) for r in map(json.loads, gzip.open(f, "rt"))]
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"text": [r["text"] for r in rows] + [None]}), src / "part.parquet")
    out = tmp_path / "out"
    summary = run(build(CleanSettings, {"data": [str(src)], "output": str(out), "workers": 2, "output_format": "parquet"}))
    assert summary["kept"]["documents"] == len(rows) and summary["conserved"]
    assert [r["reason"] for r in summary["rejected"]] == ["missing_text"]
    kept = pq.read_table(next((out / "kept").glob("*.parquet"))).column("text").to_pylist()
    assert sorted(kept) == sorted(r["text"] for r in rows)


def test_nothing_to_clean_is_a_clear_error(tmp_path):
    from lmshrink.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["clean", "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2


def test_executor_options_from_flags_and_slurm_needs_its_basics(tmp_path):
    from lmshrink.recipes.clean import Stage, executor_for

    s = settings([str(tmp_path)], tmp_path / "o", executor="slurm",
                 executor_options="partition=cpu,time=01:00:00,cpus_per_task=2")
    assert s.executor_options == {"partition": "cpu", "time": "01:00:00", "cpus_per_task": 2}
    s = settings([str(tmp_path)], tmp_path / "o", executor="slurm", executor_options={"partition": "cpu"})
    with pytest.raises(SettingsError, match="needs 'time'"):
        executor_for(s, Stage("filter", [], 1), tmp_path / "logs", None)


def test_language_is_the_one_most_of_the_text_is_in():
    from lmshrink.data.cleaning import LangIdFilter

    english = "Run the following commands as root to install the package and restart the service.\n\n"
    doc = Document(text=english * 14 + _german() * 6, id="mixed")  # ~1,200 English then ~3,000 German characters
    assert LangIdFilter(["en"]).filter(doc) == (False, "language_de")
    assert 0.55 < doc.metadata["language_score"] < 0.85
    doc = Document(text=english * 30 + _german(), id="mostly-english")
    assert LangIdFilter(["en"]).filter(doc) is True and doc.metadata["language"] == "en"


def test_a_signal_keeps_the_finished_tasks_and_the_same_command_finishes(corpus, tmp_path, capsys, monkeypatch):
    from lmshrink.cli import main
    from lmshrink.data.cleaning import BadInputFilter

    out = tmp_path / "out"
    command = ["clean", "--data", str(corpus), "--output", str(out), "--workers", "1", "--tasks", "3",
               "--max-doc-mb", "1", "--max-line-chars", "50000"]
    seen, real = [], BadInputFilter.filter

    def terminated_midway(self, doc):
        seen.append(doc.id)
        if len(seen) == len(EXPECTED) - 1:  # in the last task
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, doc)

    with monkeypatch.context() as patch:
        patch.setattr(BadInputFilter, "filter", terminated_midway)
        assert main(command) == 143
    err = capsys.readouterr().err
    assert "stopped (SIGTERM)" in err and "run the same command to carry on" in err and "Traceback" not in err
    finished = sorted(p.name for p in (out / "logs" / "filter" / "completions").iterdir())
    assert finished and len(finished) < 3  # some tasks done, not all
    # a finished task's file cut short afterwards (issue #43): moved aside and the task run again
    written = sorted(p for p in out.rglob(f"{finished[0]}*.jsonl.gz") if "logs" not in p.parts)
    written[0].write_bytes(written[0].read_bytes()[:20])
    assert main([*command, "--workers", "2"]) == 0  # forked workers end when the pool ends them
    said = capsys.readouterr().out
    assert f"of finished task {finished[0]} of stage filter is damaged (not a whole gzip stream" in said
    assert (out / "damaged" / written[0].relative_to(out)).is_file()
    assert set(outcome(out)) == set(EXPECTED)  # every document kept or rejected once (and counts conserved)
    capsys.readouterr()
    assert main([*command, "--report-only"]) == 0  # the report again, shown
    assert (out / "report.md").read_text().strip() in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # datatrove's placement-group options, in Ray 2.60
def test_the_ray_executor_survives_killed_ranks_and_matches_the_local_one(corpus, tmp_path, capsys):
    """A local Ray cluster, started here, running 2 tasks at a time. The process running a rank is
    killed with SIGKILL (as the OOM killer would): killed every time, the first stage's ranks are given
    up and the command stops with one line (exit 1) instead of waiting for them; killed once, the rank
    runs again and the same command finishes, every document kept or rejected exactly once, as with
    the local executor. (With datatrove's own Ray worker, a killed rank left the command waiting for it
    forever; pytest-timeout's limit ends such a run.)"""
    ray = pytest.importorskip("ray")
    import threading

    import psutil

    from lmshrink.cli import main

    base = ["--data", str(corpus), "--workers", "2", "--tasks", "2", "--max-doc-mb", "1", "--max-line-chars", "50000"]
    assert main(["clean", *base, "--output", str(tmp_path / "local")]) == 0
    command = ["clean", *base, "--output", str(tmp_path / "ray"), "--executor", "ray"]

    def kill_ranks(stop: threading.Event, killed: list[int], most: int) -> None:
        while not stop.is_set() and len(killed) < most:
            running = {p.pid: p.info["ppid"] for p in psutil.process_iter(["cmdline", "ppid"])
                       if "RankProcessWorker.run_for_rank" in " ".join(p.info["cmdline"] or [])}
            ranks = [pid for pid, parent in running.items() if parent in running and pid not in killed]  # not yet reaped
            for pid in ranks[:most - len(killed)]:
                try:
                    os.kill(pid, signal.SIGKILL)  # a rank's own process, forked by its Ray actor
                    killed.append(pid)
                except ProcessLookupError:  # it had ended
                    pass
            stop.wait(0.02)

    def run_while_killing(most: int) -> tuple[int, list[int]]:
        stop, killed = threading.Event(), []
        killer = threading.Thread(target=kill_ranks, args=(stop, killed, most))
        killer.start()
        try:
            return main(command), killed
        finally:
            stop.set()
            killer.join()

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # logical CPUs: room for a retried rank
    try:
        capsys.readouterr()
        code, killed = run_while_killing(most=1_000)
        err = capsys.readouterr().err
        assert code == 1 and len(killed) == 8, err  # 2 ranks, each run 4 times (datatrove's 3 retries)
        assert "stage filter: 2 of 2 tasks did not finish" in err and "run the same command to carry on" in err
        code, killed = run_while_killing(most=1)
    finally:
        ray.shutdown()
    assert code == 0 and len(killed) == 1
    assert outcome(tmp_path / "ray") == outcome(tmp_path / "local")  # every document once, the same way
    ray_report, local_report = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("ray", "local"))
    assert ray_report["kept"] == local_report["kept"] and ray_report["conserved"]


@pytest.mark.parametrize("convention", ["none", "bos", "two"])
def test_perplexity_scoring_frames_documents_as_the_tokenizer_does(tokenizers, convention):
    """Each document is scored after what the tokenizer puts before every text (nothing for GPT-2 and
    SmolLM2, whatever their bos_token says; `<bos>` for Gemma): the perplexity of exactly those ids."""
    import math

    import torch
    import transformers as T

    from lmshrink.data.cleaning import PerplexityScorer
    from lmshrink.data.sources import Framing
    from lmshrink.losses import next_token_nll

    tokenizer = tokenizers[convention]
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer))).eval()
    text = "The interpreter reads a line, runs it and prints what it returns."
    start = list(Framing.of(tokenizer).start)
    ids = torch.tensor([start + tokenizer(text, add_special_tokens=False)["input_ids"][: 12 - len(start)]])
    with torch.no_grad():
        expected = math.exp(next_token_nll(model(ids).logits, ids).mean().item())
    got = PerplexityScorer("unused", max_tokens=12)._score(model, tokenizer, [text])
    assert got == pytest.approx([expected], rel=1e-5)
    assert len(start) == {"none": 0, "bos": 1, "two": 1}[convention]
