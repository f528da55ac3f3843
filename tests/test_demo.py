from __future__ import annotations

import json
import math

from lmshrink.cli import main


def test_demo_end_to_end_on_a_tiny_teacher(tiny_gpt2_dir, tmp_path, capsys):
    """The whole demo flow (score, cut three students, heal with KD and LM, evaluate, report) on a tiny GPT-2."""
    out = tmp_path / "demo"
    assert main(["demo", "--teacher", str(tiny_gpt2_dir), "--output", str(out), "--num-layers", "2",
                 "--calib-tokens", "256", "--perplexity.max-tokens", "300", "--window", "64", "--stride", "32",
                 "--train.max-tokens", "256", "--block-size", "64", "--batch-size", "2", "--limit", "3",
                 "--repair-tokens", "512", "--recipe", "minitron"]) == 0
    report = (out / "report.md").read_text()
    assert json.loads((out / "lmshrink.json").read_text())["command"] == "demo"
    for text in ("| teacher |", "| importance |", "| alt |", "| bottom |", "| angular |", "angular + refit + KD",
                 "angular + refit + LM", "Healing the angular + refit student", "Does the choice of blocks matter?",
                 "| angular + refit |", "## Repairing the cut, without training", "angular distance, Gromov et al.",
                 "| building angular + refit |", "## Zero-shot benchmarks", "arc_easy (acc_norm)",
                 "3 items of validation", "| zero-shot benchmarks |", "| healing: angular + refit + KD |",
                 "| **total** |"):
        assert text in report
    assert "KD is logit-only forward KL at T 1 (Minitron)" in report  # the KD run heals by the recipe asked for
    kd = json.loads((out / "healed-kd" / "lmshrink.json").read_text())["settings"]
    assert kd["recipe"] == "minitron" and (kd["kd"]["temperature"], kd["kd"]["alpha_clm"], kd["kd"]["alpha_cos"]) == (1, 0, 0)
    lm = json.loads((out / "healed-lm" / "lmshrink.json").read_text())["settings"]
    assert kd["train"]["freeze"] == lm["train"]["freeze"] == ["embeddings"]  # both heal as the bench's best arms did
    assert "warm-up 10%, embeddings frozen); KD is" in report
    data = json.loads((out / "report.json").read_text())
    healed = {row["model"]: row for row in data["rows"] if "heal" in row}
    assert set(healed) == {"angular + refit + KD", "angular + refit + LM"}
    # the repaired student (the bench's best kind: a contiguous span, refitted) beside the same blocks as cut
    rows = {row["model"]: row for row in data["rows"]}
    span = rows["angular + refit"]["kept_layers"]
    assert rows["angular"]["kept_layers"] == span and len(span) == 2
    dropped = sorted(set(range(4)) - set(span))
    assert dropped == list(range(dropped[0], dropped[0] + 2))  # one run of consecutive blocks
    scores = json.loads((out / "scores.json").read_text())["angular_distance"]["2"]  # the span of least angular distance
    assert dropped[0] == min(range(len(scores)), key=scores.__getitem__)
    record = json.loads((out / "student-repaired" / "lmshrink.json").read_text())
    assert record["repair"]["method"] == "refit"
    assert all(row["heal"]["tokens"] == 256 and row["heal"]["train_seconds"] > 0 for row in healed.values())
    # every model, healed ones included, scored on the same items of each quick task
    assert all(set(row["tasks"]) == {"arc_easy", "piqa", "winogrande"} for row in data["rows"])
    assert all(score["items"] == 3 for row in data["rows"] for score in row["tasks"].values())
    assert data["step_seconds"]["zero-shot benchmarks"] > 0
    for png in ("scores.png", "perplexity.png", "tasks.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # it ends by exporting its best student (lowest perplexity) as a q8_0 GGUF, with the command to run it
    import gguf

    students = [row for row in data["rows"] if row["model"] != "teacher"]
    best = min(students, key=lambda row: sum(map(math.log, row["perplexity"].values())))
    name = "demo-" + best["model"].replace(" + ", "-").replace(" ", "-")
    file = out / "gguf" / f"{name}-Q8_0.gguf"
    assert gguf.GGUFReader(file).fields["general.name"].contents() == name
    said = capsys.readouterr().out
    assert f"run it in llama.cpp: llama-cli -m {file}" in said
