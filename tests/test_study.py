from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from lmshrink.cli import main
from lmshrink.config import load_yaml
from lmshrink.evaluate.verdicts import CONTRADICTED, INCONCLUSIVE, SUPPORTED, paired_bootstrap, verdict
from lmshrink.recipes.study import StudySettings, at_time

ROOT = Path(__file__).parent.parent


def test_the_verdict_rule_on_hand_made_numbers():
    # clearly apart, A better (higher is better): supported; reversed: contradicted
    assert verdict([0.80, 0.81, 0.82], [0.70, 0.71, 0.69], higher_is_better=True)["verdict"] == SUPPORTED
    assert verdict([0.70, 0.71, 0.69], [0.80, 0.81, 0.82], higher_is_better=True)["verdict"] == CONTRADICTED
    # lower is better (perplexity): A lower = supported
    assert verdict([10.0, 10.2], [20.0, 20.4], higher_is_better=False)["verdict"] == SUPPORTED
    # overlapping: inconclusive; one run a side: inconclusive whatever the gap
    assert verdict([0.70, 0.80, 0.75], [0.72, 0.78, 0.74], higher_is_better=True)["verdict"] == INCONCLUSIVE
    one = verdict([0.9], [0.1], higher_is_better=True)
    assert one["verdict"] == INCONCLUSIVE and one["low"] is None
    # the interval is the Welch one: same spread, larger n -> narrower
    wide = verdict([1.0, 2.0], [0.0, 1.0], True)
    narrow = verdict([1.0, 2.0] * 4, [0.0, 1.0] * 4, True)
    assert wide["verdict"] == INCONCLUSIVE and narrow["verdict"] == SUPPORTED
    assert narrow["high"] - narrow["low"] < wide["high"] - wide["low"]


def test_the_paired_interval_on_hand_made_item_results():
    rng = random.Random(0)
    answers = {"arc": [[float(rng.random() < 0.6) for _ in range(50)] for _ in range(2)],
               "piqa": [[float(rng.random() < 0.5) for _ in range(30)] for _ in range(2)]}
    same = paired_bootstrap(answers, answers, higher_is_better=True)
    assert same["difference"] == 0 and same["low"] <= 0 <= same["high"] and same["verdict"] == INCONCLUSIVE
    right = {task: [[1.0] * len(runs[0])] * 2 for task, runs in answers.items()}
    better = paired_bootstrap(right, answers, higher_is_better=True)
    assert better["low"] > 0 and better["verdict"] == SUPPORTED
    assert paired_bootstrap(answers, right, higher_is_better=True)["verdict"] == CONTRADICTED
    # the difference is that of the averages over tasks; seeds are resampled too (3 runs against 2)
    three = {task: [*runs, runs[0]] for task, runs in right.items()}
    assert paired_bootstrap(three, answers, True)["difference"] == pytest.approx(
        sum(1 - sum(map(sum, r)) / (2 * len(r[0])) for r in answers.values()) / 2)
    # one question ahead out of 20 (two won, one lost) is no evidence
    a, b = {"t": [[1.0] * 11 + [0.0] * 9]}, {"t": [[0.0] * 2 + [1.0] * 10 + [0.0] * 8]}
    assert paired_bootstrap(a, b, True)["verdict"] == INCONCLUSIVE
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap({"t": [[1.0, 0.0]]}, {"t": [[1.0]]}, True)


def test_pairing_decides_when_the_arms_differ_on_few_items_of_many():
    """A is B with 5 of 200 items turned right and none turned wrong, B right on half of them. Item
    by item the evidence is plain (every item where they differ favours A: supported); judged as
    two independent samples of 200 coin flips, a 2.5-point gap is noise (inconclusive). A bootstrap
    that drew each arm's items on its own would say the second."""
    b = [1.0, 0.0] * 100
    a = [1.0 if i < 10 else v for i, v in enumerate(b)]  # items 1, 3, 5, 7, 9: wrong in B, right in A
    paired = paired_bootstrap({"t": [a]}, {"t": [b]}, True)
    assert paired["difference"] == pytest.approx(5 / 200) and paired["low"] > 0 and paired["verdict"] == SUPPORTED


def test_perplexity_at_equal_wall_time_interpolates_the_curve():
    curve = [(0, 0.0, 100.0), (100, 10.0, 10.0), (200, 20.0, 5.0)]
    assert at_time(curve, 10.0) == pytest.approx(10.0)
    assert at_time(curve, 5.0) == pytest.approx(31.6227766)  # halfway in log-perplexity
    assert at_time(curve, 99.0) == 5.0


def test_presets_are_valid():
    for name in ("study-tiny", "study-smollm2-cpu", "study-gpt2-gpu"):
        values = load_yaml(ROOT / "configs" / f"{name}.yaml")
        from lmshrink.config import build

        build(StudySettings, values)


def _counts(text: str) -> tuple[int, int]:
    """(distinct stages reused, stages run again) in a study's output."""
    reused = {line.split("]")[0] for line in text.splitlines() if "finished before, with the same settings" in line}
    return len(reused), text.count("running it again")


def test_the_tiny_preset_end_to_end_resumes_and_reruns_what_changed(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "study"
    flags = ["study", "--config", str(ROOT / "configs" / "study-tiny.yaml"), "--teacher", str(tiny_gpt2_dir),
             "--output", str(out)]
    assert main(flags) == 0
    report = (out / "report.md").read_text()
    for part in ("## 1. Truncation + LM loss vs distillation", "## 2. Which blocks to keep", "## 3. KD during fine-tuning",
                 "## 4. Data cleaning", "## Re-running one stage", "inconclusive at this budget"):
        assert part in report
    record = json.loads((out / "report.json").read_text())
    results = record["results"]
    assert set(results) == {"healing", "strategies", "finetune_kd", "cleaning"}
    arms = results["healing"]["arms"]
    assert set(arms) == {"lm", "distilgpt2", "llm_kd"}
    assert all(len(a["train_seconds"]) == 2 and a["tokens"] == 512 for a in arms.values())
    assert all(len(c) >= 3 for a in arms.values() for c in a["curves"])  # before, mid-run evaluations, after
    for png in ("healing.png", "strategies.png", "finetune_kd.png", "cleaning.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    stages = len(record["commands"])
    accuracy = [c for q in results.values() for c in q["claims"] if c["higher_is_better"]]
    assert accuracy and all(c["method"] == "paired bootstrap over items and seeds" for c in accuracy)
    assert "items and seeds (paired)" in report
    # kept small: no Trainer checkpoints left, fine-tuned students keep scores only, the teacher its weights
    assert not list(out.rglob("checkpoints")) and not list((out / "finetune").glob("*/heal-*/*/seed-*/model"))
    assert list((out / "finetune").glob("*/teacher/none/seed-*/model/model.safetensors"))
    # a stage's command re-runs it alone from its config
    config = next(c for c in record["commands"].values() if "eval --config" in c).split("--config ")[1]
    assert load_yaml(config)["models"]

    capsys.readouterr()  # resumption: nothing is run again, the same report
    assert main(flags) == 0
    assert _counts(capsys.readouterr().out) == (stages, 0)
    assert json.loads((out / "report.json").read_text())["results"]["healing"]["arms"]["lm"]["ppl"] == arms["lm"]["ppl"]

    # interrupted after a stage (the teacher's evaluation lost), and a changed setting that only the
    # downstream fine-tuning reads: those stages run again, the healing runs are reused
    shutil.rmtree(out / "eval" / "teacher")
    assert main([*flags, "--questions", "healing", "--ft-examples", "24"]) == 0
    printed = capsys.readouterr().out
    finetunes = [k for k in record["commands"] if k.startswith("finetune/") and "/heal-" in k]
    heals = [k for k in record["commands"] if k.startswith("heal/") and "/main/" in k and "importance" in k]
    assert printed.count("running it again") == len(finetunes) == 6
    assert all(f"[{k}] finished before" in printed for k in heals) and len(heals) == 6
    assert "[eval/teacher] finished before" not in printed and (out / "eval" / "teacher" / "lmshrink.json").is_file()
