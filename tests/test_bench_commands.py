"""The benchmark scripts build lmshrink command lines; each must still be one lmshrink accepts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from lmshrink.evaluate.benchmarks import expand
from lmshrink.manual import command_problems

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import cut_quality  # noqa: E402
import engines_resume  # noqa: E402
import heal_quality  # noqa: E402
import scale  # noqa: E402


@pytest.mark.parametrize("arm", [*heal_quality.ARMS, "clm+free-text", "local+minitron+teacher-text", "clm+nucleus-text"])
def test_every_heal_bench_arm_is_a_command_lmshrink_accepts(arm, tmp_path):
    argv = heal_quality.arm_command(arm, tmp_path / "student", tmp_path / "run", 25600, tmp_path)
    assert command_problems(argv, ROOT) == []
    base, _, text = arm.rpartition("+")
    if text in heal_quality.TEACHER_TEXTS:  # the teacher's text, mixed 1:1 with the corpus into the base arm's command
        data = argv[argv.index("--data") + 1].split(",")
        assert data == [str(tmp_path / text), "python-docs/library"]
        assert argv[argv.index("--data-weights") + 1] == "1,1"
        plain = heal_quality.arm_command(base, tmp_path / "student", tmp_path / "run", 25600, tmp_path)
        assert [a for a in argv if a not in (",".join(data), "--data-weights", "1,1")] == \
            [a for a in plain if a != "python-docs/library"]


@pytest.mark.parametrize("name", heal_quality.TEACHER_TEXTS)
def test_every_teacher_text_of_the_heal_bench_is_a_command_lmshrink_accepts(name, tmp_path):
    argv = heal_quality.text_command(name, tmp_path, 256)
    assert command_problems(argv, ROOT) == []
    assert argv[argv.index("--output") + 1] == str(tmp_path / name)


@pytest.mark.parametrize("arm", ["clm@1e-3", "minitron@1e-3", "local+minitron@1e-3"])
def test_a_heal_bench_arm_at_another_learning_rate_sets_it_once(arm, tmp_path):
    argv = heal_quality.arm_command(arm, tmp_path / "student", tmp_path / "run", 25600, tmp_path)
    assert command_problems(argv, ROOT) == []
    assert argv.count("--lr") == 1 and argv[argv.index("--lr") + 1] == "1e-3"
    base = heal_quality.arm_command(arm.split("@")[0], tmp_path / "student", tmp_path / "run", 25600, tmp_path)

    def without_lr(a):
        return a[:a.index("--lr")] + a[a.index("--lr") + 2:] if "--lr" in a else a
    assert without_lr(argv) == without_lr(base)  # nothing else changes


@pytest.mark.parametrize("arm", ["clm~embeddings", "distilgpt2~embeddings~blocks:0-5", "clm@5e-4~embeddings",
                                 "clm~embeddings@5e-4"])
def test_a_heal_bench_arm_with_frozen_parts_adds_only_the_freeze(arm, tmp_path):
    argv = heal_quality.arm_command(arm, tmp_path / "student", tmp_path / "run", 25600, tmp_path)
    assert command_problems(argv, ROOT) == []
    parts = [p.split("@")[0] for p in arm.split("~")[1:]]
    assert argv.count("--freeze") == 1 and argv[argv.index("--freeze") + 1] == ",".join(parts)
    base = heal_quality.arm_command(arm.replace("~" + "~".join(parts), ""), tmp_path / "student", tmp_path / "run",
                                    25600, tmp_path)
    assert [a for a in argv if a not in ("--freeze", ",".join(parts))] == base


def test_a_heal_bench_arm_takes_its_marks_in_any_order_and_a_bad_one_is_named(tmp_path):
    def command(arm):
        return heal_quality.arm_command(arm, tmp_path / "student", tmp_path / "run", 25600, tmp_path)

    argv = command("minitron+nucleus-text@3e-4~embeddings")
    assert argv == command("minitron+nucleus-text~embeddings@3e-4") and command_problems(argv, ROOT) == []
    assert heal_quality.parse_arm("minitron+nucleus-text@3e-4~embeddings") == ("minitron", "nucleus-text", ["embeddings"],
                                                                              "3e-4", None)
    assert argv[argv.index("--data") + 1] == f"{tmp_path / 'nucleus-text'},python-docs/library"
    on_policy = command("kl-ce^0.5~embeddings")
    assert on_policy == command("kl-ce~embeddings^0.5") and command_problems(on_policy, ROOT) == []
    assert on_policy[on_policy.index("--on-policy") + 1] == "0.5" and on_policy[on_policy.index("--recipe") + 1] == "kl-ce"
    cross = command("kl-ce<gemma")
    assert command_problems(cross, ROOT) == [] and cross[cross.index("--teacher") + 1] == "gemma-3-270m"
    assert cross[cross.index("--loss") + 1] == "uld" and cross[cross.index("--recipe") + 1] == "kl-ce"
    for bad in ("sgd", "clm@1e-3@2e-3", "clm+free-text+nucleus-text", "local", "clm^0.5", "kl-ce^0.5/top-12"):
        with pytest.raises(ValueError, match="not an arm"):
            heal_quality.parse_arm(bad)


def test_the_zero_shot_table_pairs_items_with_each_reference():
    def row(per_item):  # one task, its items right (1) or wrong (0)
        return {"tasks": {"copa": {"value": sum(per_item) / len(per_item), "per_item": per_item}},
                "task_average": sum(per_item) / len(per_item)}

    half = [1.0, 0.0] * 20
    results = {"teacher": row(half), "same": row(list(half)), "right": row([1.0] * 40)}
    lines = heal_quality.paired_table(results, {"the teacher": "teacher"}).splitlines()
    assert lines[0].endswith("| average | share of the teacher's | vs the teacher |")
    cells = {c[0]: c[1:] for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines[2:])}
    assert cells["teacher"][-1] == ""  # no comparison with itself
    assert cells["same"][-1] == "+0.0 [+0.0, +0.0]" and cells["same"][-2] == "100%"
    assert cells["right"][-1].startswith("+50.0 [") and float(cells["right"][-1].split("[")[1].split(",")[0]) > 0


def test_heal_bench_compares_arms_paired_by_seed():
    def row(arm, seed, scale):
        return {"arm": arm, "budget": 25600, "seed": seed,
                "perplexity": {t: scale * (10 + seed) for t in heal_quality.TEXTS}}  # seeds differ a lot

    rows = [row("clm", s, 1.0) for s in (42, 1, 2)] + [row("clm+free-text", s, 1.1) for s in (42, 1, 2)]
    line = heal_quality.across_seeds(rows).splitlines()[-1]
    assert line.startswith("| clm+free-text (25k) | 3 | +10.0% [+10.0, +10.0]")  # paired: the seeds' spread cancels
    rows += [row("minitron", 42, 0.9), row("minitron", 1, 1.1)]  # one seed better, one worse
    line = heal_quality.across_seeds(rows).splitlines()[-1]
    mean, low, high = (float(x) for x in line.split("|")[3].replace("%", "").replace("[", "").replace("]", "")
                       .replace(",", "").split())
    assert line.split("|")[2].strip() == "2" and low < 0 < high and mean == 0.0


@pytest.mark.parametrize("keep", [None, "0,1,2,3,4,5,6,7,8,9,10,11,12,19,20,21,22,23,24,25,26,27,28,29"])
def test_the_heal_bench_student_is_a_truncate_command_and_its_record_is_checked(keep, tmp_path):
    argv = heal_quality.student_command(tmp_path / "student", "contiguous", "refit", 65536, keep, 4, downstream=True)
    assert command_problems(argv, ROOT) == []
    assert argv[argv.index("--repair-epochs") + 1] == "4" and "--repair-downstream" in argv
    assert ("--keep" in argv) == bool(keep) and ("--strategy" in argv) != bool(keep)
    wanted = {"strategy": "contiguous", "repair": "refit", "repair_tokens": 65536, "repair_epochs": 4, "keep": keep,
              "repair_downstream": True}
    record = {"strategy": "alt" if keep else "contiguous", "keep": keep and [int(b) for b in keep.split(",")],
              "cut": {"repair": "refit", "repair_tokens": 65536, "repair_epochs": 4,
                      "repair_downstream": True}}  # a student's lmshrink.json settings
    assert heal_quality.cut_of(record) == heal_quality.cut_of(wanted)
    for other in ({"repair_tokens": 16384}, {"repair_epochs": 0}, {"repair_downstream": False}):
        assert heal_quality.cut_of({**record, "cut": {**record["cut"], **other}}) != heal_quality.cut_of(wanted)
    # a record from before the output fit and the downstream fits existed: no passes, no downstream fits
    assert heal_quality.cut_of({**record, "cut": {"repair": "refit", "repair_tokens": 65536}})[3:] == (0, False)


def test_every_cut_bench_row_is_a_truncate_command_lmshrink_accepts(tmp_path):
    args = argparse.Namespace(teacher="smollm2-135m", calib_tokens=4096, search_tokens=2048, repair_tokens=16384)
    rows = {cut_quality.name_of(r): r for r in cut_quality.plan([24, 15])}
    assert len(rows) == len(cut_quality.plan([24, 15]))  # every row its own folder
    argvs = {name: cut_quality.truncate_command(row, tmp_path / "students" / name, args) for name, row in rows.items()}
    for name, argv in argvs.items():
        assert command_problems(argv, ROOT) == [], name
    half = [name for name, row in rows.items() if row.get("strength") == cut_quality.HALF]
    assert half, "the half-strength rows are planned"
    for name in half:  # a fixed strength is passed as itself, not as the list a chosen strength tries
        assert argvs[name][argvs[name].index("--repair-strength") + 1] == "0.5"
    downstream = [name for name, row in rows.items() if row.get("downstream")]
    assert len(downstream) == 2 and all("--repair-downstream" in argvs[name] for name in downstream)
    assert not any("--repair-downstream" in argv for name, argv in argvs.items() if name not in downstream)


@pytest.mark.parametrize("engine", engines_resume.ENGINES)
@pytest.mark.parametrize("command", ["pretrain", "distill"])
def test_every_engine_check_is_a_command_lmshrink_accepts(engine, command, tmp_path):
    argv = engines_resume.lmshrink_args(engine, command, (tmp_path / "teacher", tmp_path / "student"), tmp_path / "data",
                                        tmp_path / "run", 6)
    assert command_problems(argv, ROOT) == []
    assert argv[argv.index("--save-steps") + 1] == "3"  # the checkpoint the second run carries on from


@pytest.mark.parametrize("arm", ["kl-ce/top-12", "kl-ce/sampled-12", "minitron~embeddings/sampled-4"])
def test_a_heal_bench_arm_from_a_cache_reads_it_instead_of_the_teacher(arm, tmp_path):
    cache = heal_quality.cache_command(arm, 25600, tmp_path)
    assert command_problems(cache, ROOT) == []
    kind, k = arm.rpartition("/")[2].split("-")
    assert cache[cache.index(heal_quality.CACHES[kind]) + 1] == k and cache[cache.index("--temperature") + 1] == "1"
    argv = heal_quality.arm_command(arm, tmp_path / "student", tmp_path / "run", 25600, tmp_path)
    assert command_problems(argv, ROOT) == []
    assert "--teacher" not in argv and argv[argv.index("--teacher-cache") + 1] == cache[cache.index("--output") + 1]
    with pytest.raises(ValueError, match="not an arm"):
        heal_quality.parse_arm("clm/top-12")  # the LM loss has no teacher to read from a cache
    # another seed draws its own cache (the same blocks: the arms' text has no held-out split)
    seeded = heal_quality.cache_command(arm, 25600, tmp_path, 1)
    assert seeded[seeded.index("--seed") + 1] == "1"
    assert seeded[seeded.index("--output") + 1] != cache[cache.index("--output") + 1]
    assert "--eval-data" in cache and "--heldout" not in cache
    # the teacher online on the cache's blocks: the same text flags, the first 25,600 tokens
    online = heal_quality.arm_command(arm.rpartition("/")[0] + "/online", tmp_path / "student", tmp_path / "run", 25600,
                                      tmp_path)
    assert command_problems(online, ROOT) == [] and "--teacher-cache" not in online
    assert online[online.index("--data-tokens") + 1] == "25600"
    assert all(cache[cache.index(flag) + 1] == online[online.index(flag) + 1]
               for flag in ("--data", "--eval-data", "--block-size"))


def test_the_scale_bench_steps_are_lmshrink_commands_and_its_shapes_build(tmp_path):
    for step in scale.STEPS:
        assert command_problems(scale.step_command(step, tmp_path / "m", tmp_path / "runs", 32), ROOT) == []
    keep = scale.step_command("truncate", tmp_path / "m", tmp_path / "runs", 32)
    assert len(keep[keep.index("--keep") + 1].split(",")) == 24
    for name in scale.SHAPES:  # every shape is a config transformers builds
        config = scale.config_of(name)
        assert config.num_hidden_layers == scale.SHAPES[name][3] and config.vocab_size == scale.SHAPES[name][6]
    assert scale.exponent([(1e8, 10.0), (1e9, 100.0), (1e10, 1000.0)]) == pytest.approx(1.0)


def test_the_zero_shot_suite_scores_a_folder_again_for_tasks_it_lacks(tmp_path, monkeypatch):
    """bench's `suite`: a model folder scored on LAMBADA alone is run again when `core` is asked (eval
    keeps the task it has), and each row holds the asked tasks only, averaged as eval averages them."""
    calls = []

    def fake_eval(argv):  # an eval report of the asked tasks, each scored 0.5 but LAMBADA 0.25
        calls.append(argv)
        names = expand(argv[argv.index("--tasks") + 1].split(","))
        tasks = {t: {"value": 0.25 if t == "lambada_openai" else 0.5, "per_item": [0.0]} for t in names}
        out = Path(argv[argv.index("--output") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps({"rows": [{"tasks": tasks, "task_average": 0.0}]}))
        return 0

    monkeypatch.setattr(cut_quality, "lmshrink", fake_eval)
    models = {"m": ("model", tmp_path / "m")}
    assert cut_quality.suite(models, "lambada_openai", 10)["m"]["task_average"] == 0.25
    core = cut_quality.suite(models, "core", 10)["m"]
    assert len(calls) == 2 and list(core["tasks"]) == expand(["core"])
    assert core["task_average"] == pytest.approx((0.25 + 0.5 * 9) / 10)
    again = cut_quality.suite(models, "lambada_openai", 10)["m"]  # the folder holds it: not run again
    assert len(calls) == 2 and list(again["tasks"]) == ["lambada_openai"] and again["task_average"] == 0.25
