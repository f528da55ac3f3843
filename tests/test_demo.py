from __future__ import annotations

import json

from lmshrink.cli import main


def test_demo_end_to_end_on_a_tiny_teacher(tiny_gpt2_dir, tmp_path):
    """The whole demo flow (score, cut three students, heal with KD and LM, evaluate, report) on a tiny GPT-2."""
    out = tmp_path / "demo"
    assert main(["demo", "--teacher", str(tiny_gpt2_dir), "--output", str(out), "--num-layers", "2",
                 "--calib-tokens", "256", "--eval-tokens", "300", "--window", "64", "--stride", "32",
                 "--heal-tokens", "256", "--heal-block", "64", "--heal-batch", "2"]) == 0
    report = (out / "report.md").read_text()
    for text in ("| teacher |", "| importance |", "| alt |", "| bottom |", "importance + KD", "importance + LM",
                 "Healing the importance-chosen student", "Does the choice of blocks matter?"):
        assert text in report
    data = json.loads((out / "report.json").read_text())
    healed = {row["model"]: row for row in data["rows"] if "heal" in row}
    assert set(healed) == {"importance + KD", "importance + LM"}
    assert all(row["heal"]["tokens"] == 256 and row["heal"]["train_seconds"] > 0 for row in healed.values())
    for png in ("scores.png", "perplexity.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
