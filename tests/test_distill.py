from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import stopped_during_step_three
from safetensors.torch import load_file

from lmshrink.cli import main
from lmshrink.config import SettingsError, build
from lmshrink.heal.distill import RECIPE_LOSSES, RECIPES, DistillTrainer, check_vocabularies, layer_pairs, local_pairs, recipe_kd
from lmshrink.losses import divergence
from lmshrink.recipes.distill import DistillSettings

TINY = ["--block-size", "64", "--batch-size", "2", "--logging-steps", "2", "--report-to", "none"]
DATA = ["--data", "python-docs/tutorial", "--heldout", "0.2", "--eval-tokens", "1024"]  # held-out text capped: a tiny run's cost


@pytest.fixture(scope="module")
def student(tiny_gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("students") / "keep-0-2"
    assert main(["truncate", "--teacher", str(tiny_gpt2_dir), "--output", str(out), "--keep", "0,2", "--repair", "none"]) == 0
    return out


def metrics_lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_distill_recipe_end_to_end(student, tiny_gpt2_dir, tmp_path, monkeypatch):
    # the teacher the trainer holds in memory, and its weights as they were before training
    held = {}
    original_init = DistillTrainer.__init__

    def spy(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        held["teacher"] = self.teacher
        held["before"] = {k: v.detach().clone() for k, v in self.teacher.state_dict().items()}

    monkeypatch.setattr(DistillTrainer, "__init__", spy)
    out = tmp_path / "run"
    assert main(["distill", "--model", str(student), "--teacher", str(tiny_gpt2_dir), "--output", str(out),
                 *DATA, *TINY, "--max-steps", "4", "--layer-map", "stream", "--alpha-inter", "1",
                 "--inter-loss", "nmse"]) == 0
    record = json.loads((out / "model" / "lmshrink.json").read_text())
    assert record["kept_layers"] == [0, 2] and record["distill_teacher"] == str(tiny_gpt2_dir)
    assert record["settings"]["train"]["lr"] == 2.5e-4 and record["settings"]["kd"]["temperature"] == 2.0  # DistilGPT-2 defaults
    logged = [line for line in metrics_lines(out) if "loss" in line][-1]
    assert {"ce", "kd", "cos", "inter", "tokens_per_s"} <= set(logged)
    card = (out / "model" / "README.md").read_text()
    assert "knowledge-distillation" in card and f"distillation from `{tiny_gpt2_dir}`" in card
    # the teacher is frozen: after training, the weights it held are exactly those it started with
    teacher = held["teacher"]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(after[k], v) for k, v in held["before"].items())


def _divergence_to_teacher(model_dir, teacher_dir, loss: str, real_text) -> float:
    """The mean `loss` divergence of a model from the teacher on held-out real text."""
    tokenizer = T.AutoTokenizer.from_pretrained(teacher_dir)
    ids = tokenizer(real_text.read_text()[:2000], return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        log_ps = torch.log_softmax(T.AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits.float() / 2, -1)
        log_pt = torch.log_softmax(T.AutoModelForCausalLM.from_pretrained(teacher_dir)(ids).logits.float() / 2, -1)
    return divergence(loss)(log_ps, log_pt).mean().item()


@pytest.fixture(scope="module")
def sharp(tmp_path_factory, gpt2_tokenizer):
    """A teacher with confident (far from uniform) predictions, and its 2-block student: KD has
    something to teach (a tiny model at the usual init predicts almost uniformly)."""
    root = tmp_path_factory.mktemp("sharp")
    torch.manual_seed(0)
    T.GPT2LMHeadModel(T.GPT2Config(n_layer=4, n_embd=32, n_head=2, n_positions=256,
                                   initializer_range=0.3)).save_pretrained(root / "teacher")
    gpt2_tokenizer.save_pretrained(root / "teacher")
    assert main(["truncate", "--teacher", str(root / "teacher"), "--output", str(root / "student"), "--keep", "0,3",
                 "--repair", "none"]) == 0
    return root / "teacher", root / "student"


@pytest.mark.parametrize("loss", ["reverse_kl", "gjsd", "skew_kl", "tv"])
def test_every_kd_loss_moves_the_student_towards_the_teacher(sharp, real_text, tmp_path, loss):
    teacher, student = sharp
    out = tmp_path / loss
    assert main(["distill", "--model", str(student), "--teacher", str(teacher), "--output", str(out),
                 *DATA, *TINY, "--max-steps", "4", "--alpha-clm", "0", "--loss", loss,
                 "--layer-map", "rail", "--alpha-inter", "0.5", "--inter-loss", "cosine"]) == 0
    logged = [line for line in metrics_lines(out) if "loss" in line][-1]
    assert logged["kd"] > 0 and logged["inter"] > 0
    before = _divergence_to_teacher(student, teacher, loss, real_text)
    after = _divergence_to_teacher(out / "model", teacher, loss, real_text)
    assert after < 0.99 * before


def test_cached_teacher_trains_without_the_teacher(student, tiny_gpt2_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["cache-teacher", "--teacher", str(tiny_gpt2_dir), "--output", str(cache), *DATA, "--block-size", "64",
            "--max-tokens", "2048", "--shard-blocks", "8", "--top-k", "8"]
    assert main(args) == 0
    meta = json.loads((cache / "cache.json").read_text())
    assert json.loads((cache / "lmshrink.json").read_text())["complete"]  # the finished cache describes itself
    assert meta["complete"] and meta["layout"]["blocks"] == 32
    assert meta["bytes_per_token"] < 4 + 6 * 8 + 8  # input id + k x (int32 id + fp16 log-prob) + header
    # resumable: a lost shard is recomputed, finished ones are kept as they are
    kept_shard = cache / "shard-00000.safetensors"
    before = kept_shard.stat().st_mtime_ns
    lost = load_file(cache / "shard-00002.safetensors")
    (cache / "shard-00002.safetensors").unlink()
    assert main(args) == 0
    assert kept_shard.stat().st_mtime_ns == before
    again = load_file(cache / "shard-00002.safetensors")
    assert torch.equal(again["top_idx"], lost["top_idx"]) and torch.equal(again["input_ids"], lost["input_ids"])
    # a shard cut short after the cache was finished: distill names it at once, and the same
    # cache-teacher command sets it aside and computes it again (issue #43)
    whole = (cache / "shard-00001.safetensors").read_bytes()
    (cache / "shard-00001.safetensors").write_bytes(whole[: len(whole) // 2])
    assert main(["distill", "--model", str(student), "--teacher-cache", str(cache), "--output", str(tmp_path / "x"),
                 *TINY, "--max-steps", "1", "--alpha-cos", "0"]) == 2
    assert "shard-00001.safetensors is damaged (its tensors need" in capsys.readouterr().err
    assert main(args) == 0
    assert "set aside as damaged-shard-00001.safetensors" in capsys.readouterr().out
    assert (cache / "shard-00001.safetensors").read_bytes() == whole and kept_shard.stat().st_mtime_ns == before

    out = tmp_path / "run"
    assert main(["distill", "--model", str(student), "--teacher-cache", str(cache), "--output", str(out), *TINY,
                 "--max-steps", "3", "--alpha-cos", "0"]) == 0
    record = json.loads((out / "lmshrink.json").read_text())
    assert record["distill_teacher"] == str(tiny_gpt2_dir) and record["metrics"]["heldout_ppl_after"] > 1
    assert [line for line in metrics_lines(out) if "loss" in line][-1]["kd"] > 0

    # --eval-data is evaluated with a cache too (the cache above was built with a held-out split of
    # its own; this one has none)
    bare = tmp_path / "cache-no-heldout"
    assert main(["cache-teacher", "--teacher", str(tiny_gpt2_dir), "--output", str(bare), "--data",
                 "python-docs/tutorial", "--heldout", "0", "--block-size", "64", "--max-tokens", "512", "--top-k", "8"]) == 0
    out = tmp_path / "run-eval-data"
    assert main(["distill", "--model", str(student), "--teacher-cache", str(bare), "--output", str(out), *TINY,
                 "--max-steps", "2", "--alpha-cos", "0", "--eval-data", "kernel-docs/process", "--eval-tokens", "256"]) == 0
    metrics = json.loads((out / "lmshrink.json").read_text())["metrics"]
    assert metrics["heldout_tokens"] == 256 and metrics["heldout_ppl_before"] > 1 and metrics["heldout_ppl_after"] > 1


def test_cached_teacher_at_temperature_one_shares_the_softmax(student, tiny_gpt2_dir, tmp_path, capsys):
    cache = tmp_path / "cache-t1"
    assert main(["cache-teacher", "--teacher", str(tiny_gpt2_dir), "--output", str(cache), *DATA, "--block-size", "64",
                 "--max-tokens", "1024", "--top-k", "8", "--temperature", "1"]) == 0
    out = tmp_path / "run"
    assert main(["distill", "--model", str(student), "--teacher-cache", str(cache), "--output", str(out), *TINY,
                 "--max-steps", "2", "--alpha-cos", "0"]) == 2  # the default T = 2 does not match the cache
    assert "--temperature 1.0" in capsys.readouterr().err
    assert main(["distill", "--model", str(student), "--teacher-cache", str(cache), "--output", str(out), *TINY,
                 "--max-steps", "2", "--alpha-cos", "0", "--temperature", "1"]) == 0
    logged = [line for line in metrics_lines(out) if "loss" in line][-1]
    assert logged["kd"] > 0 and logged["ce"] > 0


def test_cache_misuse_is_explained(student, tiny_gpt2_dir, tmp_path, capsys):
    assert main(["distill", "--model", str(student), "--teacher-cache", str(tmp_path), "--output",
                 str(tmp_path / "r"), *TINY, "--alpha-cos", "0"]) == 2
    assert "not a teacher cache" in capsys.readouterr().err
    with pytest.raises(SettingsError, match="alpha-cos 0"):
        build(DistillSettings, {"model": "m", "output": "o", "teacher_cache": "c"})


def test_tokenizer_mismatch_is_refused_and_padding_is_fine(gpt2_tokenizer):
    other = T.AutoTokenizer.from_pretrained(gpt2_tokenizer.name_or_path)
    other.add_tokens(["<new>"])
    small, padded = T.GPT2Config(vocab_size=50257), T.GPT2Config(vocab_size=50304)
    with pytest.raises(SettingsError, match="tokenizers differ"):
        check_vocabularies(gpt2_tokenizer, other, small, small)
    assert check_vocabularies(gpt2_tokenizer, gpt2_tokenizer, padded, small) == 50257


def test_padded_student_vocabulary_distils(tiny_gpt2_dir, gpt2_tokenizer, tmp_path):
    torch.manual_seed(0)
    padded = T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=256, vocab_size=50304))
    padded.save_pretrained(tmp_path / "padded")
    gpt2_tokenizer.save_pretrained(tmp_path / "padded")
    assert main(["distill", "--model", str(tmp_path / "padded"), "--teacher", str(tiny_gpt2_dir), "--output",
                 str(tmp_path / "run"), *DATA, *TINY, "--max-steps", "2"]) == 0


def test_layer_maps():
    rng = random.Random(0)
    assert layer_pairs("uniform", 4, 12, None, rng) == [(1, 3), (2, 6), (3, 9)]
    assert layer_pairs("kept", 3, 12, [0, 5, 11], rng) == [(1, 1), (2, 6)]
    # the state the next kept block reads: where a removed span ends, the state the span left
    assert layer_pairs("stream", 3, 12, [0, 5, 11], rng) == [(1, 5), (2, 11)]
    kept = [0, 1, 2, 3, 7, 8, 10, 11]  # spans 4-6 and 9 removed: the local stage's targets, in the whole student
    stream = dict(layer_pairs("stream", len(kept), 12, kept, rng))
    assert all(stream[block + 1] == target for block, _, target in local_pairs(kept, 12, "before")[0])
    assert layer_pairs("1:2,2:4", 3, 6, None, rng) == [(1, 2), (2, 4)]
    draws = {tuple(layer_pairs("rail", 4, 12, None, rng)) for _ in range(50)}
    assert len(draws) > 10  # a different mapping most steps
    for pairs in draws:
        teacher_layers = [t for _, t in pairs]
        assert teacher_layers == sorted(set(teacher_layers)) and 1 <= teacher_layers[0] and teacher_layers[-1] < 12
    with pytest.raises(SettingsError, match="out of range"):
        layer_pairs("1:20", 3, 12, None, rng)


def test_distill_settings_are_checked():
    with pytest.raises(SettingsError) as err:
        build(DistillSettings, {"model": "m", "output": "o", "data": ["x"], "loss": "kl", "layer_map": "zigzag",
                                "alpha_inter": 1.0, "temperature": 0})
    message = str(err.value)
    assert "loss" in message and "layer_map" in message and "temperature" in message


def test_fused_head_distils_like_full_logits(student, tiny_gpt2_dir, tmp_path):
    """Online (with the cosine term), cached teachers and on-policy steps: the fused head's loss parts
    equal the full-logits path's, step for step."""
    cache = tmp_path / "cache"
    assert main(["cache-teacher", "--teacher", str(tiny_gpt2_dir), "--output", str(cache), *DATA, "--block-size", "64",
                 "--max-tokens", "512", "--top-k", "8"]) == 0
    setups = {"online": ["--teacher", str(tiny_gpt2_dir), *DATA, "--loss", "gjsd"],
              "cached": ["--teacher-cache", str(cache), "--alpha-cos", "0"],
              "on-policy": ["--teacher", str(tiny_gpt2_dir), *DATA, "--on-policy", "1", "--prompt-tokens", "8",
                            "--new-tokens", "12", "--policy-loss", "reverse_kl", "--alpha-cos", "0"]}
    for name, setup in setups.items():
        logged = {}
        for choice in ("off", "on"):
            out = tmp_path / f"{name}-{choice}"
            assert main(["distill", "--model", str(student), "--output", str(out), *setup, *TINY, "--max-steps", "3",
                         "--logging-steps", "1", "--fused-head", choice]) == 0
            logged[choice] = [line for line in metrics_lines(out) if "loss" in line]
            assert json.loads((out / "lmshrink.json").read_text())["metrics"]["speed"]["fused_head"] == (choice == "on")
        keys = {"online": ("loss", "ce", "kd", "cos"), "cached": ("loss", "ce", "kd"), "on-policy": ("loss", "on_policy_kd")}
        for key in keys[name]:
            assert [x[key] for x in logged["on"]] == pytest.approx([x[key] for x in logged["off"]], rel=1e-4), (name, key)


def test_a_named_recipe_sets_what_it_names_and_every_setting_can_still_be_given(tmp_path):
    from lmshrink.config import from_args

    base = ["--model", "m", "--output", "o", "--data", "d"]
    minitron = from_args(DistillSettings, [*base, "--recipe", "minitron"], "d", "")
    assert (minitron.kd.temperature, minitron.kd.alpha_ce, minitron.kd.alpha_clm, minitron.kd.alpha_cos) == (1, 1, 0, 0)
    assert (minitron.train.lr, minitron.train.scheduler) == (2e-4, "cosine")
    mine = from_args(DistillSettings, [*base, "--recipe", "minitron", "--temperature", "2", "--lr", "1e-4"], "d", "")
    assert (mine.kd.temperature, mine.train.lr, mine.kd.alpha_clm) == (2, 1e-4, 0)  # given beats the recipe
    config = tmp_path / "heal.yaml"
    config.write_text("recipe: minitron\nalpha_clm: 0.5\n")
    filed = from_args(DistillSettings, [*base, "--config", str(config)], "d", "")
    assert (filed.recipe, filed.kd.alpha_clm, filed.kd.temperature) == ("minitron", 0.5, 1)
    default = from_args(DistillSettings, base, "d", "")
    assert (default.recipe, default.kd.alpha_ce, default.kd.alpha_cos, default.train.lr) == ("distilgpt2", 5, 1, 2.5e-4)
    assert set(RECIPE_LOSSES) == set(RECIPES)  # every recipe says in words what it trains on
    assert recipe_kd("minitron", teacher="t") == dataclasses.replace(minitron.kd, teacher="t")
    kl_ce = from_args(DistillSettings, [*base, "--recipe", "kl-ce"], "d", "")
    assert (kl_ce.kd.temperature, kl_ce.kd.alpha_ce, kl_ce.kd.alpha_clm, kl_ce.kd.alpha_cos) == (1, 1, 1, 0)
    assert (kl_ce.train.lr, kl_ce.train.scheduler, kl_ce.train.freeze) == (3e-4, "linear", ["embeddings"])
    kl_ce.train.freeze.append("blocks:0-1")  # a run's list is its own, not the recipe table's
    again = from_args(DistillSettings, [*base, "--recipe", "kl-ce"], "d", "")
    assert again.train.freeze == ["embeddings"]
    unfrozen = from_args(DistillSettings, [*base, "--recipe", "kl-ce", "--freeze", ""], "d", "")
    assert unfrozen.train.freeze == []  # given beats the recipe, an empty list too
    with pytest.raises(SettingsError, match="recipe: 'best' is unknown"):
        from_args(DistillSettings, [*base, "--recipe", "best"], "d", "")


@pytest.mark.parametrize("recipe", ["distilgpt2", "minitron", "kl-ce"])
def test_each_recipe_builds_the_loss_it_names(recipe, student, tiny_gpt2_dir, tmp_path):
    """The Trainer's loss under each named recipe equals that recipe written out by hand with
    torch's own functions: minitron = KL(p_t || p_s) at T 1 alone; kl-ce = that + next-token CE;
    distilgpt2 = 5 T^2 KL at T 2 + 2 next-token CE + 1 (1 - cos) of the last hidden states."""
    import torch.nn.functional as F

    settings = build(DistillSettings, {"model": str(student), "output": str(tmp_path), "data": ["d"],
                                       "recipe": recipe})
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}  # two forward passes that agree
    model = T.AutoModelForCausalLM.from_pretrained(student, **no_dropout).train()
    teacher = T.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    args = T.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = DistillTrainer(model=model, args=args, teacher=teacher, recipe=settings.kd,
                             vocab=model.config.vocab_size)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    got = trainer.compute_loss(model, {"input_ids": ids, "labels": ids})

    s, t = model(ids, output_hidden_states=True), teacher(ids, output_hidden_states=True)

    def kl(temperature: float) -> torch.Tensor:  # mean over positions of sum_v p_t (log p_t - log p_s)
        log_pt, log_ps = (F.log_softmax(x.logits / temperature, -1) for x in (t, s))
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()

    ce = F.cross_entropy(s.logits[:, :-1].reshape(-1, s.logits.shape[-1]), ids[:, 1:].reshape(-1))
    cos = (1 - F.cosine_similarity(s.hidden_states[-1], t.hidden_states[-1], dim=-1)).mean()
    expected = {"minitron": kl(1.0), "kl-ce": kl(1.0) + ce, "distilgpt2": 5 * 2**2 * kl(2.0) + 2 * ce + 1 * cos}[recipe]
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_clm_keep_trains_the_ce_on_the_tokens_where_the_student_lags_the_teacher_most(student, tiny_gpt2_dir, tmp_path):
    """--clm-keep 0.25 (Rho-1, the teacher as reference): the Trainer's loss is the mean CE of the quarter
    of next tokens with the largest student-minus-teacher NLL, written out by hand; it asks for full
    logits, so the run turns a fused head off for it."""
    import torch.nn.functional as F

    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    model = T.AutoModelForCausalLM.from_pretrained(student, **no_dropout).train()
    teacher = T.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    args = T.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    kd = dataclasses.replace(recipe_kd("kl-ce"), alpha_ce=0.0, clm_keep=0.25)
    assert "--clm-keep" in DistillTrainer.head_problem(recipe=kd)  # the run turns the fused head off for it
    assert DistillTrainer.head_problem(recipe=recipe_kd("kl-ce")) is None
    trainer = DistillTrainer(model=model, args=args, teacher=teacher, recipe=kd, vocab=model.config.vocab_size)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    got = trainer.compute_loss(model, {"input_ids": ids, "labels": ids})

    def nll(m):  # (2 x 15) next-token NLLs
        logits = m(ids).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")

    s_nll, t_nll = nll(model), nll(teacher)
    top = sorted(range(30), key=lambda i: (s_nll[i] - t_nll[i]).item(), reverse=True)[:8]  # round(0.25 x 30)
    assert got.item() == pytest.approx(s_nll[top].mean().item(), rel=1e-5)
    assert got.item() != pytest.approx(s_nll.mean().item(), rel=1e-3)  # not the plain CE


def test_the_kl_ce_recipe_heals_with_the_token_embeddings_kept_as_they_were(student, tiny_gpt2_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["distill", "--model", str(student), "--teacher", str(tiny_gpt2_dir), "--output", str(out), *DATA,
                 *TINY, "--max-steps", "2", "--recipe", "kl-ce", "--clm-keep", "0.5", "--fused-head", "on"]) == 0
    before, after = load_file(student / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and not changed & {"transformer.wte.weight", "transformer.wpe.weight"}
    record = json.loads((out / "lmshrink.json").read_text())
    assert record["settings"]["recipe"] == "kl-ce" and record["settings"]["train"]["freeze"] == ["embeddings"]
    assert record["metrics"]["speed"]["fused_head"] is False  # --clm-keep needs full logits: turned off for it
    logged = [line for line in metrics_lines(out) if "loss" in line][-1]
    assert {"ce", "kd"} <= set(logged) and "cos" not in logged


def test_the_local_stage_trains_only_the_blocks_before_the_cuts_then_the_whole_student(tiny_gpt2_dir, tmp_path):
    student = tmp_path / "keep-0-1-3"
    assert main(["truncate", "--teacher", str(tiny_gpt2_dir), "--output", str(student), "--keep", "0,1,3",
                 "--repair", "none"]) == 0
    out = tmp_path / "run"
    command = ["distill", "--model", str(student), "--teacher", str(tiny_gpt2_dir), "--output", str(out), *DATA,
               *TINY, "--logging-steps", "1", "--local-steps", "6", "--local-lr", "1e-3", "--max-steps", "2",
               "--recipe", "minitron"]
    assert main(command) == 0
    before, local = load_file(student / "model.safetensors"), load_file(out / "local" / "model" / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], local[name])}
    assert changed and all(name.startswith("transformer.h.1.") for name in changed)  # block 1: teacher block 1, before 2
    losses = [line["local"] for line in metrics_lines(out / "local") if "local" in line]
    assert len(losses) == 6 and losses[-1] < losses[0]
    record = json.loads((out / "lmshrink.json").read_text())
    assert record["settings"]["local_steps"] == 6 and record["metrics"]["steps"] == 2
    assert main(command) == 0  # finished: the same command has nothing to do

    both = tmp_path / "both"  # block 1 before the cut and block 2 (teacher block 3) after it, each on its task
    assert main([*command[:6], str(both), *DATA, *TINY, "--local-steps", "2", "--max-steps", "1",
                 "--local-blocks", "both"]) == 0
    local = load_file(both / "local" / "model" / "model.safetensors")
    assert {name.split(".")[2] for name in before if not torch.equal(before[name], local[name])} == {"1", "2"}


def test_local_tasks_beside_each_removed_span():
    kept = [0, 1, 2, 5, 7, 8]  # of 10 teacher blocks: spans 3-4, 6 and 9 removed
    # (student block, teacher state fed, teacher state to reproduce); state k enters teacher block k
    assert local_pairs(kept, 10, "before") == [[(2, 2, 5), (3, 5, 7), (5, 8, 10)]]
    assert local_pairs(kept, 10, "after") == [[(3, 3, 6), (4, 6, 8)]]  # nothing after the last span
    assert local_pairs(kept, 10, "both") == [[(2, 2, 5), (3, 5, 7), (5, 8, 10)], [(3, 3, 6), (4, 6, 8)]]
    assert local_pairs([3, 4], 5, "before") == [] and local_pairs([3, 4], 5, "after") == [[(0, 0, 4)]]


def test_the_memory_a_run_needs_is_counted_from_the_configs(tiny_gpt2_dir):
    """Weights and gradients in the loaded dtype, AdamW's two fp32 moments for what trains, the
    teacher in 2 bytes on a GPU run in bf16; parameters counted on the meta device, a tied head once."""
    from lmshrink.heal.memory import engine_plans, parameter_counts, run_memory

    config = T.AutoConfig.from_pretrained(tiny_gpt2_dir)
    model = T.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    total = sum(p.numel() for p in model.parameters())
    tables = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert parameter_counts(config) == (total, total)
    assert parameter_counts(config, ["embeddings"]) == (total, total - tables)
    need = run_memory(config, config, "float32", [], half_teacher=False)
    assert (need.weights, need.gradients, need.optimizer, need.teacher) == (4 * total, 4 * total, 8 * total, 4 * total)
    frozen = run_memory(config, config, "bfloat16", ["embeddings"], half_teacher=True)
    assert (frozen.weights, frozen.gradients, frozen.optimizer, frozen.teacher) == (
        2 * total, 2 * (total - tables), 8 * (total - tables), 2 * total)
    plans = engine_plans(config, config, gpus=4)  # the docs' table of engine settings, same arithmetic
    assert plans == {"one GPU": (18 * total, 0), "one GPU, --teacher-cache": (16 * total, 0),
                     "one GPU, --freeze embeddings": (4 * total + 12 * (total - tables) + 2 * total, 0),
                     "one GPU, ZeRO-2 + CPU optimizer": (6 * total, 16 * total),
                     "FSDP2 over 4 GPUs": (4 * total + 2 * total, 0)}


def test_a_run_that_cannot_fit_its_device_is_refused_before_loading(tiny_gpt2_dir, real_text, tmp_path, monkeypatch,
                                                                     capsys):
    import lmshrink.heal.memory as memory
    from lmshrink.heal.memory import fit_problem, run_memory

    config = T.AutoConfig.from_pretrained(tiny_gpt2_dir)
    settings = build(DistillSettings, {"model": str(tiny_gpt2_dir), "output": str(tmp_path / "run"), "data": ["d"]})
    need = run_memory(config, config, "float32", [], half_teacher=False)
    cpu = torch.device("cpu")
    assert fit_problem(config, config, settings, cpu, available=need.total) is None
    short = fit_problem(config, config, settings, cpu, available=need.total - 1)
    assert short.startswith("memory: this run needs") and "--teacher-cache" in short and "--freeze embeddings" in short
    assert "a smaller student" in fit_problem(config, None, settings, cpu, available=need.weights)
    # a config transformers cannot build here (a model with custom code, say) is not counted: the load says why
    assert fit_problem(T.PretrainedConfig(), None, settings, cpu, available=1) is None
    # sharded or offloaded runs are the engines' to place
    assert fit_problem(config, config, dataclasses.replace(settings, train=dataclasses.replace(
        settings.train, fsdp="on")), cpu, available=1) is None
    # the command: one line, exit 2, and neither model loaded
    monkeypatch.setattr(memory, "device_memory", lambda device: need.total - 1)
    monkeypatch.setattr("lmshrink.models.load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["distill", "--model", str(tiny_gpt2_dir), "--teacher", str(tiny_gpt2_dir), "--data", str(real_text),
                 "--output", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "memory: this run needs" in err and "--teacher-cache" in err and "Traceback" not in err


def test_a_sampled_cache_trains_on_the_forward_kl(student, tiny_gpt2_dir, tmp_path, capsys):
    """cache-teacher --sampled K: K draws per position stored as distinct tokens with their counts and
    the teacher's entropy; distill trains on it with the forward KL (logged as the KL from the teacher)
    and refuses a divergence the samples cannot estimate without bias."""
    cache = tmp_path / "sampled"
    args = ["cache-teacher", "--teacher", str(tiny_gpt2_dir), "--output", str(cache), *DATA, "--block-size", "64",
            "--max-tokens", "512", "--sampled", "6", "--temperature", "1"]
    assert main(args) == 0
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["layout"]["sampled"] == 6 and meta["bytes_per_token"] < 4 + 6 * 6 + 2 + 8
    assert "cached the teacher's 6 samples" in capsys.readouterr().out
    shard = load_file(cache / "shard-00000.safetensors")
    mass = shard["top_logp"].float().exp()
    torch.testing.assert_close(mass.sum(-1), torch.ones(mass.shape[:-1]), rtol=0, atol=2e-3)  # shares of the draws
    counts = mass * 6
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-2)  # whole counts out of 6 (fp16 log-probs)
    assert shard["entropy"].shape == shard["input_ids"].shape and (shard["entropy"].float() > 0).all()
    common = ["distill", "--model", str(student), "--teacher-cache", str(cache), *TINY, "--max-steps", "2",
              "--alpha-cos", "0", "--temperature", "1"]
    assert main([*common, "--output", str(tmp_path / "reverse"), "--loss", "reverse_kl"]) == 2
    assert "an unbiased estimate of the teacher only for the forward KL" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main([*common, "--output", str(out)]) == 0
    assert [line for line in metrics_lines(out) if "loss" in line][-1]["kd"] > 0


def test_an_online_run_on_the_first_blocks_reads_what_a_cache_of_them_holds(student, tiny_gpt2_dir, tmp_path,
                                                                             monkeypatch):
    """--data-tokens N: the online teacher's run trains on the blocks `cache-teacher --max-tokens N` holds,
    batch for batch in the same order (a fair comparison of a cache with the teacher online); without
    it the run draws from the whole text."""
    seen: dict[str, list[torch.Tensor]] = {}
    original = DistillTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        if model.training:
            seen.setdefault(Path(self.args.output_dir).parent.name, []).append(inputs["input_ids"].detach().clone())
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(DistillTrainer, "compute_loss", spy)
    cache = tmp_path / "cache"
    assert main(["cache-teacher", "--teacher", str(tiny_gpt2_dir), "--output", str(cache), *DATA, "--block-size", "64",
                 "--max-tokens", "512", "--top-k", "8", "--temperature", "1", "--seed", "3"]) == 0
    common = ["distill", "--model", str(student), *DATA, *TINY, "--max-steps", "4", "--alpha-cos", "0",
              "--temperature", "1", "--seed", "3"]  # the seed the cache split its held-out documents with
    runs = {name: tmp_path / name for name in ("cached", "first", "all")}
    assert main([*common, "--teacher-cache", str(cache), "--output", str(runs["cached"])]) == 0
    assert main([*common, "--teacher", str(tiny_gpt2_dir), "--data-tokens", "512", "--output", str(runs["first"])]) == 0
    assert main([*common, "--teacher", str(tiny_gpt2_dir), "--output", str(runs["all"])]) == 0
    batches = {name: seen[name] for name in runs}
    assert len(batches["cached"]) == 4
    assert all(torch.equal(a, b) for a, b in zip(batches["cached"], batches["first"], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(batches["cached"], batches["all"], strict=True))
    assert json.loads((runs["first"] / "lmshrink.json").read_text())["settings"]["corpus"]["data_tokens"] == 512


POLICY = ["--prompt-tokens", "8", "--new-tokens", "12"]


def test_on_policy_steps_train_on_the_students_own_samples_scored_by_the_teacher(sharp, tmp_path, monkeypatch):
    """--on-policy 1: every step's batch is each block's first 8 tokens and the student's own 12-token
    continuation (at a temperature near 0: its greedy continuation, as transformers' `generate` writes
    it), the teacher scores exactly those tokens, and the logged loss is the divergence on the student's
    12 tokens computed here from both models; the samples are kept and the sampling time recorded."""
    import shutil

    teacher_dir, student_dir = sharp[0], tmp_path / "student"
    shutil.copytree(sharp[1], student_dir)  # without dropout, so the trained forward pass is the one computed here
    config = json.loads((student_dir / "config.json").read_text())
    (student_dir / "config.json").write_text(json.dumps({**config, "resid_pdrop": 0, "embd_pdrop": 0, "attn_pdrop": 0}))
    seen, fed = [], []
    original = DistillTrainer.student_continuations

    def spy(self, model, ids, seed):
        before = {k: v.detach().clone() for k, v in self.accelerator.unwrap_model(model).state_dict().items()}
        rows = original(self, model, ids, seed)
        seen.append({"ids": ids.clone(), "rows": rows.clone(), "student": before})
        return rows

    def spy_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.teacher.register_forward_pre_hook(lambda _m, _a, kw: fed.append(kw["input_ids"].clone()), with_kwargs=True)

    original_init = DistillTrainer.__init__
    monkeypatch.setattr(DistillTrainer, "student_continuations", spy)
    monkeypatch.setattr(DistillTrainer, "__init__", spy_init)
    out = tmp_path / "run"
    assert main(["distill", "--model", str(student_dir), "--teacher", str(teacher_dir), "--output", str(out), *DATA,
                 *TINY, "--max-steps", "2", "--logging-steps", "1", "--on-policy", "1", *POLICY,
                 "--sample-temperature", "1e-4", "--loss", "forward_kl", "--policy-loss", "reverse_kl",
                 "--temperature", "1", "--alpha-cos", "0", "--fused-head", "off"]) == 0
    assert len(seen) == 2 and [f.shape[1] for f in fed] == [20, 20]  # the teacher saw only the sampled rows
    logged = [line for line in metrics_lines(out) if "loss" in line]
    tokenizer = T.AutoTokenizer.from_pretrained(student_dir)
    teacher = T.AutoModelForCausalLM.from_pretrained(teacher_dir)
    for step, (got, to_teacher, line) in enumerate(zip(seen, fed, logged, strict=True)):
        student = T.AutoModelForCausalLM.from_pretrained(student_dir)
        student.load_state_dict(got["student"])
        prompts = got["ids"][:, :8]
        greedy = student.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                  max_new_tokens=12, min_new_tokens=12, pad_token_id=tokenizer.eos_token_id)
        assert torch.equal(got["rows"], greedy), step  # the student's own continuation
        assert torch.equal(to_teacher, got["rows"])  # and what the teacher scored
        with torch.no_grad():
            log_ps = torch.log_softmax(student(got["rows"]).logits[:, 7:-1], -1)
            log_pt = torch.log_softmax(teacher(got["rows"]).logits[:, 7:-1], -1)
        assert line["on_policy_kd"] == pytest.approx(divergence("reverse_kl")(log_ps, log_pt).mean().item(), rel=1e-4)
        assert "kd" not in line and "ce" not in line  # no off-policy step ran
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 2]
    assert samples[-1]["samples"][0]["continuation"] == tokenizer.decode(seen[-1]["rows"][0, 8:])
    generation = json.loads((out / "lmshrink.json").read_text())["metrics"]["generation"]
    assert generation["tokens"] == 2 * 2 * 12 and generation["seconds"] > 0


def test_an_on_policy_run_resumes_to_the_same_samples_and_weights(student, tiny_gpt2_dir, tmp_path, monkeypatch):
    """Half the steps on-policy (chosen from the seed and step), stopped by a signal during step 3 and
    run again: the same steps sample the same tokens and the weights end as an uninterrupted run's."""
    def distill(out):
        return main(["distill", "--model", str(student), "--teacher", str(tiny_gpt2_dir), "--output", str(out), *DATA,
                     *TINY, "--max-steps", "4", "--logging-steps", "1", "--save-steps", "1", "--on-policy", "0.5",
                     *POLICY, "--loss", "gjsd", "--alpha-cos", "0"])

    assert distill(tmp_path / "whole") == 0
    assert stopped_during_step_three(monkeypatch, lambda: distill(tmp_path / "resumed")) == 130
    assert distill(tmp_path / "resumed") == 0
    whole, resumed = ([json.loads(x) for x in (tmp_path / o / "samples.jsonl").read_text().splitlines()]
                      for o in ("whole", "resumed"))
    assert resumed == whole and 0 < len(whole) < 4  # some steps on-policy, some not
    kinds = [("on_policy_kd" in x, "kd" in x) for x in metrics_lines(tmp_path / "whole") if "loss" in x]
    assert {(True, False), (False, True)} == set(kinds)
    a, b = (load_file(tmp_path / o / "model" / "model.safetensors") for o in ("whole", "resumed"))
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=1e-6)


def test_on_policy_settings_are_checked(tmp_path):
    base = {"model": "m", "output": str(tmp_path / "o"), "corpus": {"data": "python-docs/tutorial", "block_size": 64}}
    for given, says in [({"on_policy": 1.5}, "on_policy: 1.5 is not a share"),
                        ({"on_policy": 1, "prompt_tokens": 40, "new_tokens": 40}, "longer than a training block"),
                        ({"on_policy": 1, "policy_loss": "kl"}, "policy_loss"),
                        ({"on_policy": 1, "kd.teacher_cache": "c"}, "no cache holds")]:
        settings = {**base, "policy": {k: v for k, v in given.items() if "." not in k},
                    "kd": {"teacher_cache": given["kd.teacher_cache"]} if "kd.teacher_cache" in given else {}}
        with pytest.raises(SettingsError, match=says):
            build(DistillSettings, settings)
