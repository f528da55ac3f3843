from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from conftest import TINY_CONFIGS, framed_tokenizer, tiny_model

from lmshrink.architectures import UnsupportedArchitecture, blocks_of, only_blocks
from lmshrink.cli import main
from lmshrink.compress.truncation import LayerSelectionError, importance_keep, select_layers, truncate_model
from lmshrink.models import load


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_keeping_every_block_reproduces_the_teacher(arch, ids):
    teacher = tiny_model(arch)
    student = truncate_model(teacher, list(range(6)))
    assert torch.equal(logits(student, ids), logits(teacher, ids))


@pytest.mark.parametrize("keep", [[0, 2, 4], [1, 2, 5], [3]])
def test_subset_equals_teacher_with_other_blocks_skipped(arch, ids, keep):
    teacher = tiny_model(arch)
    student = truncate_model(teacher, keep)
    assert len(blocks_of(student)) == len(keep)
    with only_blocks(teacher, keep):
        expected = logits(teacher, ids)
    torch.testing.assert_close(logits(student, ids), expected, rtol=0, atol=1e-6)
    # and the student is really smaller: the dropped blocks' parameters are gone
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())


def test_save_load_round_trip_is_exact(arch, ids, tmp_path):
    teacher = tiny_model(arch)
    student = truncate_model(teacher, [0, 3, 5])
    student.save_pretrained(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, ids), logits(student, ids))
    assert reloaded.config.num_hidden_layers == 3


def test_per_layer_config_lists_follow_the_kept_blocks():
    teacher = tiny_model("gemma3_text")  # sliding, full, sliding, full, ...
    student = truncate_model(teacher, [0, 2, 3])
    assert student.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert [b.self_attn.layer_idx for b in blocks_of(student)] == [0, 1, 2]
    neo = truncate_model(tiny_model("gpt_neo"), [1, 3, 4])
    assert neo.config.attention_layers == ["local", "local", "global"]
    # GPT-Neo re-derives attention_layers from attention_types on load: they must agree.
    again = T.GPTNeoConfig.from_dict(neo.config.to_dict())
    assert again.attention_layers == ["local", "local", "global"]


@pytest.mark.parametrize("kind", ["gpt2", "gemma3_text", "llama"])
def test_tied_weights_stay_tied(kind):
    student = truncate_model(tiny_model(kind), [0, 5])
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    teacher = tiny_model(kind)
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)


def test_student_does_not_share_memory_with_teacher():
    teacher = tiny_model("llama")
    student = truncate_model(teacher, [0, 1])
    with torch.no_grad():
        blocks_of(student)[0].mlp.up_proj.weight.zero_()
    assert blocks_of(teacher)[0].mlp.up_proj.weight.abs().sum() > 0


def test_paper_strategies_on_gpt2_depth():
    assert select_layers(12, "alt", 6) == [0, 2, 4, 6, 8, 10]
    assert select_layers(12, "distil", 6) == [0, 2, 4, 7, 9, 11]
    assert select_layers(12, "bottom", 6) == [0, 1, 2, 3, 4, 5]
    assert select_layers(12, "top", 6) == [6, 7, 8, 9, 10, 11]
    assert select_layers(12, "distil", 3) == [0, 6, 11]  # the paper's "3l" student
    assert select_layers(12, "alt") == [0, 2, 4, 6, 8, 10]  # default depth: half


@pytest.mark.parametrize("strategy", ["alt", "distil", "bottom", "top"])
@pytest.mark.parametrize("n,k", [(30, 24), (7, 3), (5, 5), (9, 1)])
def test_strategies_generalise_to_any_depth(strategy, n, k):
    keep = select_layers(n, strategy, k)
    assert len(keep) == k and keep == sorted(set(keep)) and 0 <= keep[0] and keep[-1] < n


def test_importance_keeps_the_highest_scoring_blocks():
    scores = {"num_layers": 5, "block_influence": [0.9, 0.1, 0.5, 0.05, 0.7],
              "ppl_increase": [100.0, 1.0, 0.5, 2.0, 3.0],
              "angular_distance": {"2": [0.9, 0.8, 0.1, 0.7]}}
    assert select_layers(5, "importance", 3, scores=scores) == [0, 2, 4]
    assert importance_keep(scores, 3, "ppl_increase") == [0, 3, 4]
    assert importance_keep(scores, 3, "angular_distance") == [0, 1, 4]  # drops the run 2,3


@pytest.mark.parametrize("keep,message", [
    ([0, 6], "out of range"), ([1, 1], "listed twice"), ([], "at least one"), ([3, 1], "increasing order"),
])
def test_bad_layer_lists_name_the_fix(keep, message):
    with pytest.raises(LayerSelectionError, match=message):
        truncate_model(tiny_model("gpt2"), keep)


def test_bad_depth_and_strategy():
    with pytest.raises(LayerSelectionError, match="choose 1..12"):
        select_layers(12, "alt", 13)
    with pytest.raises(LayerSelectionError, match="known: alt"):
        select_layers(12, "middle", 6)
    with pytest.raises(LayerSelectionError, match="needs scores"):
        select_layers(12, "importance", 6)


def test_unknown_architecture_is_refused():
    model = T.BloomForCausalLM(T.BloomConfig(n_layer=2, hidden_size=32, n_head=2, vocab_size=VOCAB_BLOOM))
    with pytest.raises(UnsupportedArchitecture, match="ARCHITECTURES"):
        truncate_model(model, [0])


VOCAB_BLOOM = 64


def test_every_tested_architecture_is_in_the_table():
    from lmshrink.architectures import ARCHITECTURES

    assert set(TINY_CONFIGS) <= set(ARCHITECTURES)


def test_truncate_command_end_to_end(tiny_gpt2_dir, real_text, tmp_path, capsys):
    out = tmp_path / "student"
    code = main(["truncate", "--teacher", str(tiny_gpt2_dir), "--output", str(out), "--strategy", "importance",
                 "--num-layers", "2", "--calib-data", str(real_text), "--calib-tokens", "1024", "--repair", "none"])
    assert code == 0
    record = json.loads((out / "lmshrink.json").read_text())
    assert record["teacher_layers"] == 4 and len(record["kept_layers"]) == 2 and "repair" not in record
    assert record["strategy"] == "importance" and len(record["scores"]["block_influence"]) == 4
    assert record["lmshrink_version"]
    student = load(str(out))
    assert student.model.config.n_layer == 2
    assert student.tokenizer("Hello world")["input_ids"] == [15496, 995]
    teacher = load(str(tiny_gpt2_dir)).model
    kept = truncate_model(teacher, record["kept_layers"])
    ids = torch.tensor([[15496, 995, 11, 612]])
    assert torch.equal(logits(student.model, ids), logits(kept, ids))


def test_an_explicit_keep_list_is_the_depth_said_before_the_cut(tiny_gpt2_dir, tmp_path, capsys):
    code = main(["truncate", "--teacher", str(tiny_gpt2_dir), "--output", str(tmp_path / "s"), "--keep", "0,1,3",
                 "--repair", "none"])
    assert code == 0
    assert "cutting 1 of 4 blocks" in capsys.readouterr().out


def test_the_teacher_writes_its_share_of_the_calibration_only_within_its_time(tiny_gpt2_dir, real_text, tmp_path,
                                                                             capsys):
    common = ["truncate", "--teacher", str(tiny_gpt2_dir), "--keep", "0,3", "--repair", "refit", "--repair-data",
              f"teacher,{real_text}", "--repair-tokens", "512"]

    def used(out: str) -> list[str]:
        return json.loads((tmp_path / out / "lmshrink.json").read_text())["repair"]["data"]

    assert main([*common, "--output", str(tmp_path / "a"), "--repair-teacher-minutes", "0"]) == 0
    said = capsys.readouterr().out
    assert f"repair calibration: {real_text} only; the teacher would take about" in said
    assert used("a") == [str(real_text)] and f"tokens of {real_text} in" in said
    assert main([*common, "--output", str(tmp_path / "b")]) == 0  # within 15 minutes: written, and kept
    assert used("b") == ["teacher", str(real_text)]
    assert main([*common, "--output", str(tmp_path / "c"), "--repair-teacher-minutes", "0"]) == 0
    assert "teacher-written tokens read from" in capsys.readouterr().out and used("c") == used("b")  # kept: no wait


@pytest.mark.parametrize("strategy", ["iterative", "contiguous"])
def test_measured_choice_and_repair_end_to_end(tiny_gpt2_dir, real_text, tmp_path, strategy):
    out = tmp_path / "student"
    assert main(["truncate", "--teacher", str(tiny_gpt2_dir), "--output", str(out), "--strategy", strategy,
                 "--num-layers", "2", "--calib-data", str(real_text), "--search-tokens", "512",
                 "--repair-data", f"teacher,{real_text}", "--repair-tokens", "2048",
                 *(["--repair-epochs", "1"] if strategy == "contiguous" else ["--repair-downstream"])]) == 0
    record = json.loads((out / "lmshrink.json").read_text())
    keep = record["kept_layers"]
    search = record["search"]
    assert search["strategy"] == strategy and search["repair"] == "refit" and search["candidates_scored"] > 1
    if strategy == "iterative":
        assert sorted(step["removed"] for step in search["path"]) == [i for i in range(4) if i not in keep]
    else:
        best = min(search["path"], key=lambda c: c["kl"])
        assert best["removed"] == [i for i in range(4) if i not in keep]
    repair = record["repair"]
    assert repair["method"] == "refit" and repair["data"] == ["teacher", str(real_text)]
    assert repair["tokens"] >= 2048 - 256 and repair["spans"]
    fitted = [s for s in repair["spans"] if "heldout_error" in s]
    assert all(s["block"] == s["span"][0] - 1 and keep[s["student_block"]] == s["block"] for s in fitted)
    # downstream (iterative): every kept block after the first fitted one, other than the fitted ones
    after = [b for b in keep if fitted and b > fitted[0]["block"] and b not in {s["block"] for s in fitted}]
    assert [s["block"] for s in repair["downstream"]] == (after if strategy == "iterative" else [])
    # a plain transformers folder: loads without lmshrink, and differs from the plain cut where a fit took
    student = T.AutoModelForCausalLM.from_pretrained(out).eval()
    plain = truncate_model(load(str(tiny_gpt2_dir)).model, keep)
    ids = torch.tensor([[15496, 995, 11, 612]])
    refined = repair.get("refine", {})
    if strategy == "contiguous":  # one pass fitting the repaired projection on the output
        assert refined["blocks"] == [s["student_block"] for s in fitted]
        assert len(refined.get("heldout_kl", [])) == (2 if fitted else 0)
    untouched = all(s.get("alpha") is None for s in fitted + repair["downstream"]) and refined.get("kept_epoch", 0) == 0
    assert torch.equal(logits(student, ids), logits(plain, ids)) == untouched


def test_repair_refusals_are_one_line(tiny_gpt2_dir, tmp_path, capsys):
    assert main(["truncate", "--teacher", str(tiny_gpt2_dir), "--output", str(tmp_path / "s"), "--keep", "0,3",
                 "--repair", "magic"]) == 2
    assert "repair: 'magic' is unknown" in capsys.readouterr().err


def test_gemma_is_cut_and_repaired_with_every_default(tmp_path, gpt2_tokenizer, capsys):
    """Gemma 3 (sub-layer outputs normed before the residual add) takes the default repair."""
    gemma, tokenizer = tmp_path / "gemma", framed_tokenizer(gpt2_tokenizer, ["<bos>"])
    config = T.Gemma3TextConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                intermediate_size=64, vocab_size=len(tokenizer), head_dim=16, sliding_window=8,
                                layer_types=["sliding_attention", "full_attention"] * 2)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(gemma)
    tokenizer.save_pretrained(gemma)
    assert main(["truncate", "--teacher", str(gemma), "--output", str(tmp_path / "g"), "--keep", "0,3",
                 "--repair-data", "python-docs/library", "--repair-tokens", "2048"]) == 0
    record = json.loads((tmp_path / "g" / "lmshrink.json").read_text())
    assert record["repair"]["method"] == "refit" and record["repair"]["spans"][0]["block"] == 0
    assert record["framing"]["start"] == ["<bos>"]


def test_truncate_command_reports_bad_requests(tiny_gpt2_dir, tmp_path, capsys):
    assert main(["truncate", "--teacher", str(tiny_gpt2_dir), "--output", str(tmp_path / "s"), "--keep", "0,9"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # nothing half-written
    assert main(["truncate", "--teacher", str(tiny_gpt2_dir), "--output", str(tmp_path / "s"),
                 "--keep", "0,1", "--num-layers", "2"]) == 2
    assert "already fixes the depth" in capsys.readouterr().err
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "precious.txt").write_text("keep me")
    assert main(["truncate", "--teacher", str(tiny_gpt2_dir), "--output", str(tmp_path / "s"), "--keep", "0"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "s" / "precious.txt").exists()
    assert main(["truncate", "--teacher", str(tiny_gpt2_dir), "--output", str(tmp_path / "s"), "--keep", "0",
                 "--overwrite"]) == 0
    assert not (tmp_path / "s" / "precious.txt").exists() and (tmp_path / "s" / "lmshrink.json").exists()


def test_smollm3_no_rope_layers_follow_the_kept_blocks():
    student = truncate_model(tiny_model("smollm3"), [1, 2, 5])
    assert student.config.no_rope_layers == [0, 1, 0]


def test_a_stopped_iterative_search_carries_on_and_serves_any_depth(tiny_gpt2_dir, real_text, tmp_path, monkeypatch):
    """The iterative search keeps its path after every removal: stopped after the first, the same
    command scores only the later removals' candidates and ends where a search never stopped ends;
    a shallower cut reads its removals from the same path and scores nothing."""
    from lmshrink.compress import cut_search

    def truncate(k: int, name: str, cache: str) -> dict:
        monkeypatch.setenv("LMSHRINK_CACHE", str(tmp_path / cache))
        code = main(["truncate", "--teacher", str(tiny_gpt2_dir), "--output", str(tmp_path / name), "--strategy",
                     "iterative", "--num-layers", str(k), "--calib-data", str(real_text), "--search-tokens", "512",
                     "--repair", "none"])
        return {"code": code, **(json.loads((tmp_path / name / "lmshrink.json").read_text()) if code == 0 else {})}

    never_stopped = truncate(1, "reference", "other-cache")
    kept = cut_search.write_json

    def stop_after_keeping(path, data):
        kept(path, data)
        raise KeyboardInterrupt

    monkeypatch.setattr(cut_search, "write_json", stop_after_keeping)
    assert truncate(1, "student", "cache")["code"] == 130 and not (tmp_path / "student").exists()
    monkeypatch.setattr(cut_search, "write_json", kept)
    carried_on = truncate(1, "student", "cache")
    assert carried_on["kept_layers"] == never_stopped["kept_layers"]
    assert carried_on["search"]["path"] == never_stopped["search"]["path"]  # every removal, with its candidates
    assert never_stopped["search"]["candidates_scored"] == 4 + 3 + 2 and carried_on["search"]["candidates_scored"] == 3 + 2
    assert (never_stopped["search"]["removals_read"], carried_on["search"]["removals_read"]) == (0, 1)
    shallower = truncate(3, "shallower", "cache")
    assert shallower["search"]["candidates_scored"] == 0 and shallower["search"]["path"] == carried_on["search"]["path"][:1]
    assert shallower["search"]["removals_read"] == 1
    assert shallower["kept_layers"] == [i for i in range(4) if i != carried_on["search"]["path"][0]["removed"]]
    (kept_path,) = (tmp_path / "cache" / "cut-search").glob("*.json")
    kept_path.write_text(kept_path.read_text()[:40])  # cut short (issue #43): set aside, the search starts over
    again = truncate(3, "again", "cache")
    assert again["search"]["removals_read"] == 0 and again["kept_layers"] == shallower["kept_layers"]
    assert any(p.name.startswith("damaged-") for p in kept_path.parent.iterdir())


def test_the_student_shares_the_teachers_non_block_weights_and_copies_its_blocks(arch):
    """The embeddings, final norm and head (168M of Gemma-3-270M's 268M parameters) are the teacher's
    own tensors, not a second copy; the blocks are copies; nothing is left on the meta device."""
    teacher = tiny_model(arch)
    student = truncate_model(teacher, [0, 2])
    assert student.get_input_embeddings().weight.data_ptr() == teacher.get_input_embeddings().weight.data_ptr()
    kept = dict(blocks_of(teacher)[2].named_parameters())
    for name, param in blocks_of(student)[1].named_parameters():
        assert param.data_ptr() != kept[name].data_ptr() and torch.equal(param, kept[name])
    assert not any(t.is_meta for t in (*student.parameters(), *student.buffers()))


SEQUENTIAL_CUTS = {"keep 0": ["--keep", "0,1,4,5"], "cut 0": ["--keep", "1,2,5"],
                   "importance": ["--strategy", "importance", "--num-layers", "3", "--calib-tokens", "256"],
                   "contiguous": ["--strategy", "contiguous", "--num-layers", "4", "--search-tokens", "256"],
                   "iterative": ["--strategy", "iterative", "--num-layers", "4", "--search-tokens", "256"],
                   "fit on the teacher": ["--keep", "0,1,4,5", "--repair-fit", "teacher"],
                   "downstream": ["--keep", "0,2,3,5", "--repair-downstream"],
                   "strengths": ["--keep", "0,2,3,5", "--repair-strength", "0.25,1"],
                   "bias": ["--keep", "0,1,4,5", "--repair", "bias"],
                   "epochs": ["--keep", "0,1,5", "--repair-epochs", "2", "--repair-tokens", "2048", "--repair", "replaceme"]}


def searched(record: dict) -> list[float]:
    """Every candidate's KL a search measured, in order (a contiguous span each; each removal's candidates)."""
    path = record["search"]["path"]
    return [v for step in path for v in step["candidates"].values()] if "candidates" in path[0] else \
        [c["kl"] for c in path]


@pytest.mark.parametrize("arch, cuts", [("gemma3_text", [c for c in SEQUENTIAL_CUTS if c != "bias"]),
                                        ("gpt2", ["cut 0", "bias"]), ("llama", ["contiguous", "bias", "epochs"]),
                                        ("gemma2", ["epochs"])])  # soft-capped logits: the teacher's kept as hidden states
def test_one_block_at_a_time_cuts_and_repairs_the_same_student(arch, cuts, tmp_path, gpt2_tokenizer, capsys):
    """truncate --sequential on: the teacher read block by block from a sharded checkpoint, the refit
    repair's fits made block by block, the student written shard by shard; the same student as the
    whole-model path (every weight), for a cut that keeps block 0 and one that removes it, and the
    same student scores-chosen by importance."""
    teacher = tmp_path / "teacher"
    model = tiny_model(arch, 6)
    model.config.vocab_size = len(gpt2_tokenizer)
    if hasattr(model.config, "max_position_embeddings"):  # rows of 128 tokens: several calibration rows
        model.config.max_position_embeddings = 128
    model = T.AutoModelForCausalLM.from_config(model.config).eval()
    model.save_pretrained(teacher, max_shard_size="2MB")
    gpt2_tokenizer.save_pretrained(teacher)
    common = ["truncate", "--teacher", str(teacher), "--repair-data", "python-docs/tutorial", "--repair-tokens", "512"]
    for cut in (SEQUENTIAL_CUTS[c] for c in cuts):
        students, records = {}, {}
        for mode in ("off", "on"):
            out = tmp_path / f"{mode}-{len(students)}-{'_'.join(cut)}"
            assert main([*common, *cut, "--output", str(out), "--sequential", mode]) == 0
            students[mode] = T.AutoModelForCausalLM.from_pretrained(out).state_dict()
            records[mode] = json.loads((out / "lmshrink.json").read_text())
        record = records["on"]
        method = cut[cut.index("--repair") + 1] if "--repair" in cut else "refit"
        assert record["path"] == "sequential" and record["repair"]["method"] == method
        if "search" in records["off"]:  # the search walked block by block: every candidate's KL, the same
            # choice (the whole path fits from float16 features, this one from float32: close, not equal)
            assert record["kept_layers"] == records["off"]["kept_layers"]
            got, want = (searched(r) for r in (record, records["off"]))
            assert len(got) == len(want) == (5 if "contiguous" in cut else 6 + 5)
            assert got == pytest.approx(want, rel=2e-2, abs=1e-4)
        downstream = [[s["student_block"] for s in r["repair"]["downstream"]] for r in (record, records["off"])]
        assert downstream[0] == downstream[1] == ([1, 3] if "--repair-downstream" in cut else [])
        chosen = [[(s.get("strength"), s.get("strength_kl")) for s in r["repair"]["spans"]] for r in (record, records["off"])]
        assert [c[0] for c in chosen[0]] == [c[0] for c in chosen[1]]  # each span's strength, by the same KLs
        assert ("--repair-strength" in cut) == all(kl is not None for _, kl in chosen[0])
        for (_, got), (_, want) in zip(*chosen, strict=True):
            assert (got is None and want is None) or got == pytest.approx(want, rel=1e-4)
        if "--repair-epochs" in cut:  # Adam's passes through the student, block by block: the same KLs and pass
            got, want = (r["repair"]["refine"] for r in (record, records["off"]))
            assert got["kept_epoch"] == want["kept_epoch"] == 2 and got["blocks"] == want["blocks"] == [1]
            assert got["heldout_kl"] == pytest.approx(want["heldout_kl"], rel=0, abs=1e-6)  # the whole path: E_p[W] trick
        assert students["on"].keys() == students["off"].keys()
        for name, tensor in students["off"].items():
            torch.testing.assert_close(students["on"][name], tensor, rtol=1e-5, atol=1e-6)
    assert "text the teacher writes itself" not in capsys.readouterr().out  # not asked for: not said
    if "iterative" in cuts:  # a deeper cut carries on from the kept path
        deeper = ["--strategy", "iterative", "--num-layers", "3", "--search-tokens", "256"]
        assert main([*common, *deeper, "--output", str(tmp_path / "deeper"), "--sequential", "on"]) == 0
        assert "iterative: 2 removals read from" in capsys.readouterr().out


def test_one_block_at_a_time_never_holds_two_blocks(tmp_path, gpt2_tokenizer, monkeypatch):
    """Whenever the block-by-block cut reads a block in, every other block of the teacher is still on
    the meta device (at most one block's weights in memory), through scoring, repair (its passes of Adam
    too) and writing."""
    from lmshrink.compress import sequential

    teacher = tmp_path / "teacher"
    config = TINY_CONFIGS["llama"](6)
    config.vocab_size, config.max_position_embeddings = len(gpt2_tokenizer), 128
    T.AutoModelForCausalLM.from_config(config).save_pretrained(teacher)
    gpt2_tokenizer.save_pretrained(teacher)
    original, seen = sequential.Blockwise.block, []

    def block(self, i):
        held = [j for j, b in enumerate(self.blocks) if any(p.device.type != "meta" for p in b.parameters())]
        seen.append(held)
        return original(self, i)

    monkeypatch.setattr(sequential.Blockwise, "block", block)
    common = ["truncate", "--teacher", str(teacher), "--repair-data", "python-docs/tutorial", "--repair-tokens", "512",
              "--sequential", "on", "--calib-tokens", "256", "--search-tokens", "256"]
    cuts = {"importance": ["--strategy", "importance", "--num-layers", "4"],  # block scores
            "keep": ["--keep", "0,1,4,5", "--repair-epochs", "1"],  # a span's fit, Adam through the student
            "contiguous": ["--strategy", "contiguous", "--num-layers", "4"],  # every span's fit and student walked
            "iterative": ["--strategy", "iterative", "--num-layers", "4"]}
    for name, cut in cuts.items():
        seen.clear()
        assert main([*common, *cut, "--output", str(tmp_path / name)]) == 0
        assert len(seen) >= 12 and all(held == [] for held in seen), name
    spans = json.loads((tmp_path / "keep" / "lmshrink.json").read_text())["repair"]["spans"]
    assert [s["span"] for s in spans if "heldout_error" in s] == [[2, 3]]
