"""The README and the manual in docs/ stay true: every link resolves, every `lmshrink` command they
show parses (the command and its flags exist, its config file exists), every command has a page
whose settings table matches its settings, and `--help` points at that page."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmshrink.cli import COMMANDS, command, main
from lmshrink.export import llamacpp
from lmshrink.manual import BEGIN, END, broken_links, command_problems, settings_table, shown_commands, with_table

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_is_a_landing_page():
    assert len((ROOT / "README.md").read_text().splitlines()) < 250


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(path):
    assert broken_links(path) == []


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_every_shown_command_parses(path, monkeypatch):
    monkeypatch.setattr(llamacpp, "available", lambda: False)  # as on a machine without the optional extras
    problems = [p for argv in shown_commands(path.read_text()) for p in command_problems(argv, ROOT)]
    assert problems == []


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_a_page_with_its_current_settings(name, capsys):
    page = ROOT / "docs" / f"{name}.md"
    text = page.read_text()
    assert BEGIN in text and END in text, f"{page.name} has no settings table: python -m lmshrink.manual"
    assert with_table(text, settings_table(command(name)[0])) == text, \
        f"{page.name}'s settings table is stale: python -m lmshrink.manual"
    with pytest.raises(SystemExit):
        main([name, "--help"])
    assert capsys.readouterr().out.rstrip().endswith(f"manual: docs/{name}.md")


def test_the_checks_catch_what_they_are_for(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [bad anchor](#nowhere)\n\n"
                    "```bash\nlmshrink truncate --teacher x \\\n    --no-such-flag 1 --output y  # comment\n"
                    "lmshrink eval --config configs/none.yaml\nlmshrink frobnicate\n```\n")
    assert broken_links(page) == ["page.md: missing.md (no such file)", "page.md: #nowhere (no such heading)"]
    shown = shown_commands(page.read_text())
    assert shown[0] == ["truncate", "--teacher", "x", "--no-such-flag", "1", "--output", "y"]
    problems = [p for argv in shown for p in command_problems(argv, ROOT)]
    assert problems == ["lmshrink truncate: no flag --no-such-flag",
                        "lmshrink eval: config file configs/none.yaml does not exist",
                        "lmshrink frobnicate: no such command"]
    # what the command itself would refuse: a stray word, a missing setting, two bounds (paths are placeholders)
    refused = [command_problems(argv, ROOT) for argv in (["clean", "--data", "my-corpus/", "more.jsonl.gz"],
                                                        ["finetune", "--model", "m", "--task", "sst2"],
                                                        ["pretrain", "--model", "m", "--data", "d", "--output", "o",
                                                         "--max-steps", "2", "--max-tokens", "9"])]
    assert refused[0] == ["lmshrink clean --data my-corpus/ more.jsonl.gz: does not parse"]
    assert refused[1] == ["lmshrink finetune --model m --task sst2: missing required setting(s): --output"]
    assert "both bound the run's length" in refused[2][0] and len(refused[2]) == 1


def test_every_checked_bad_input_is_on_its_command_page():
    from test_bad_inputs import CASES

    missing = [(args[0], message) for args, message in CASES
               if message.replace("|", "/") not in (ROOT / "docs" / f"{args[0]}.md").read_text()]
    assert missing == []


def test_the_readme_lists_every_command_from_the_cli_table():
    from lmshrink.manual import with_commands

    readme = (ROOT / "README.md").read_text()
    assert with_commands(readme) == readme, "README.md's commands table is stale: python -m lmshrink.manual"
    assert all(f"[`{name}`](docs/{name}.md)" in readme for name in COMMANDS)
