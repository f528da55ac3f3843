"""Training-free repair of a cut (`lmshrink.compress.repair`) and block choice that measures the cut
(`lmshrink.compress.cut_search`), on tiny random models."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import ARCHS, VOCAB, tiny_model

import lmshrink.compress.repair as repair_module
from lmshrink.architectures import architecture_of, blocks_of, get_path, only_blocks
from lmshrink.compress.cut_search import CutSearch
from lmshrink.compress.model_gap import gap, references
from lmshrink.compress.repair import (
    BlockReplay,
    Moments,
    RepairError,
    add_bias,
    capture,
    fit_span,
    fold,
    heldout_split,
    patched,
    projection,
    refine,
    refit,
    removed_spans,
    repair,
    repair_problems,
    update_target,
)
from lmshrink.compress.truncation import truncate_model
from lmshrink.data.sources import Framing
from lmshrink.evaluate.perplexity import perplexity


def rows(n: int = 16, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_removed_spans():
    assert removed_spans(8, [0, 1, 4, 6]) == [(2, 3), (5, 5), (7, 7)]
    assert removed_spans(4, [2, 3]) == [(0, 1)]
    assert removed_spans(3, [0, 1, 2]) == []


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_identity_fold_reproduces_the_cut_exactly(kind):
    teacher = tiny_model(kind, 4)
    student = truncate_model(teacher, [0, 3])
    before = logits(student, rows(2))
    fold(projection(student, 0), torch.zeros(32, 32, dtype=torch.float64))
    assert torch.equal(logits(student, rows(2)), before)
    refit(projection(student, 0), torch.zeros(128 if kind == "gpt2" else 64, 32, dtype=torch.float64))
    assert torch.equal(logits(student, rows(2)), before)
    # patching the teacher for a while puts its weights back afterwards
    saved = {k: v.clone() for k, v in teacher.state_dict().items()}
    with patched(teacher, {1: ("replaceme", torch.randn(32, 32, dtype=torch.float64)), 2: ("bias", torch.ones(32))}):
        assert not torch.equal(projection(teacher, 1).weight, saved[next(k for k in saved if "1.mlp" in k)])
        assert projection(teacher, 2).bias is not None
    after = teacher.state_dict()
    assert after.keys() == saved.keys() and all(torch.equal(after[k], saved[k]) for k in saved)


def linear_span_teacher():
    """A 3-block GPT-2 whose block 1 adds exactly M A to the stream, M being block 0's MLP output.

    The embeddings live in the first half of the channels, block 0's attention writes nothing, so
    the stream entering block 1 is x_0 + M; block 1's attention writes nothing, its MLP is linear
    (identity activation, its layer norm replaced by the identity) and reads only the second half
    of the channels, where x_0 is zero: its update is (x_0 + M) W_fc W_proj = M A.
    """
    torch.manual_seed(0)
    config = T.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                          activation_function="linear", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                          bos_token_id=0, eos_token_id=0)
    model = T.GPT2LMHeadModel(config).eval()
    h = model.transformer.h
    with torch.no_grad():
        model.transformer.wte.weight[:, 16:] = 0
        model.transformer.wpe.weight[:, 16:] = 0
        for block in (h[0], h[1]):
            block.attn.c_proj.weight.zero_()
            block.attn.c_proj.bias.zero_()
        h[1].mlp.c_fc.weight[:16] = 0
        h[1].mlp.c_fc.bias.zero_()
        h[1].mlp.c_proj.bias.zero_()
        h[1].mlp.c_fc.weight.mul_(5)
        h[1].mlp.c_proj.weight.mul_(20)
    h[1].ln_2 = torch.nn.Identity()
    return model


@pytest.mark.parametrize("method", ["replaceme", "refit"])
@pytest.mark.parametrize("fit_on", ["teacher", "student"])
def test_a_fit_recovers_a_linear_span(method, fit_on):
    """ReplaceMe fits M T; refit fits block 0's MLP output projection from its input z, of which
    M A (M = z W + b) is an affine function that z's own constant part lets a linear map express."""
    teacher = linear_span_teacher()
    ids = rows(24, 16)
    cut = truncate_model(teacher, [0, 2])
    gap = (logits(cut, ids) - logits(teacher, ids)).abs().max()
    repaired, report = repair(teacher, truncate_model(teacher, [0, 2]), [0, 2], ids, method, fit_on)
    error = (logits(repaired, ids) - logits(teacher, ids)).abs().max()
    assert gap > 1e-2 and error < 1e-3 * gap
    assert report[0]["span"] == [1, 1] and report[0]["block"] == 0 and report[0]["heldout_error"] < 1e-6
    errors = report[0]["alpha_errors"]
    assert f"{report[0]['alpha']:g}" == min(errors, key=errors.get)


def test_fit_statistics_match_a_direct_least_squares():
    torch.manual_seed(0)
    m, a = torch.randn(4, 50, 8), torch.randn(8, 8)
    u = m @ a + 0.01 * torch.randn(4, 50, 8) + torch.arange(8.0)  # a mean update for the bias to find
    mom = Moments.of(m, u)
    delta = mom.ridge(0.0)
    direct = torch.linalg.lstsq(m.reshape(-1, 8).double(), u.reshape(-1, 8).double()).solution
    assert torch.allclose(delta, direct, atol=1e-8)
    assert mom.error(delta) == pytest.approx(float(((m.reshape(-1, 8).double() @ delta - u.reshape(-1, 8)) ** 2).sum()))
    assert mom.error(torch.zeros(8, 8, dtype=torch.float64)) == pytest.approx(mom.u_sq)
    mean, info = fit_span("bias", Moments.of(m[:3], u[:3]), Moments.of(m[3:], u[3:]))
    assert torch.allclose(mean, u.reshape(-1, 8).double().mean(0))
    fit_mean, held = u[:3].reshape(-1, 8).double().mean(0), u[3:].reshape(-1, 8).double()
    assert info["heldout_error"] == pytest.approx(float(((held - fit_mean) ** 2).sum() / (held**2).sum()))


@pytest.mark.parametrize("method", ["replaceme", "refit"])
@pytest.mark.parametrize("kind", ARCHS)
def test_each_family_folds_into_its_mlp_output_projection(kind, method, tmp_path):
    teacher = tiny_model(kind, 4)
    keep = [0, 3]
    assert repair_problems(teacher.config, method) == []  # every family in the table, Gemma's included
    cut = truncate_model(teacher, keep)
    repaired, report = repair(teacher, truncate_model(teacher, keep), keep, rows(64), method, "student")
    path = architecture_of(teacher.config).blocks + ".0." + architecture_of(teacher.config).mlp_out
    before, after = cut.state_dict(), repaired.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # ReplaceMe maps the projection's output (weights and bias); refit corrects its weights only
    assert changed and changed <= {path + ".weight", path + ".bias"}, changed
    assert method == "replaceme" or changed == {path + ".weight"}
    assert report[0]["alpha"] is not None and report[0]["heldout_error"] < 1.0
    repaired.save_pretrained(tmp_path)  # a plain transformers folder: loads without lmshrink
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(logits(reloaded, rows(2)), logits(repaired, rows(2)), atol=1e-5)


@pytest.mark.parametrize("kind", ["gemma3_text", "gemma2"])
def test_a_fit_through_the_norm_points_the_stream_at_the_teachers(kind):
    """Gemma's MLP output passes through an RMSNorm before the residual add: the update asked of the
    projection makes the normed output point where the teacher's stream needs it, and the fold makes
    the student's stream closer to the teacher's than the plain cut leaves it."""
    teacher, keep = tiny_model(kind, 4), [0, 3]
    with torch.no_grad():  # a norm whose gain differs by channel (a fresh model's is 1 everywhere)
        for layer in teacher.model.layers:
            layer.post_feedforward_layernorm.weight.uniform_(-0.5, 1.5)
    data = rows(64)
    states, projs = capture(teacher, data, {1, 3}, {0}, proj_input=True)
    z, out, target = projs[0], states[1], states[3]
    u = update_target(teacher, 0, z, target, out, proj_input=True)
    layer = teacher.model.layers[0]
    with torch.no_grad():
        y = layer.mlp.down_proj(z)
        moved = layer.post_feedforward_layernorm(y + u) - layer.post_feedforward_layernorm(y)
    wanted = target - out  # the stream's change, which only the normed output can make
    normed_new = layer.post_feedforward_layernorm(y + u)
    needed = wanted + layer.post_feedforward_layernorm(y)
    cos = torch.nn.functional.cosine_similarity(normed_new, needed, dim=-1)
    assert cos.min() > 0.999 and moved.abs().max() > 0
    student, report = repair(teacher, truncate_model(teacher, keep), keep, data, "refit", "student")
    assert report[0]["alpha"] is not None and report[0]["heldout_error"] < 1.0
    plain = capture(truncate_model(teacher, keep), data, {1}, set())[0][1]
    fitted = capture(student, data, {1}, set())[0][1]
    assert (fitted - target).pow(2).sum() < (plain - target).pow(2).sum()


def test_an_unnormed_update_is_the_streams_difference():
    teacher = tiny_model("llama", 4)
    states, projs = capture(teacher, rows(8), {1, 3}, {0}, proj_input=True)
    u = update_target(teacher, 0, projs[0], states[3], states[1], proj_input=True)
    assert torch.equal(u, states[3] - states[1])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_bias_repair_is_a_plain_model(kind, tmp_path):
    teacher = tiny_model(kind, 4)
    repaired, report = repair(teacher, truncate_model(teacher, [0, 3]), [0, 3], rows(64), "bias", "teacher")
    assert projection(repaired, 0).bias is not None and "alpha" not in report[0] and "heldout_error" in report[0]
    add_bias(projection(repaired, 0), torch.linspace(-1, 1, 32))  # whatever the fit found, a bias to carry
    repaired.save_pretrained(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(logits(reloaded, rows(2)), logits(repaired, rows(2)), atol=1e-5)


def test_bias_is_refused_where_the_architecture_has_no_bias():
    assert "replaceme" in repair_problems(tiny_model("qwen2", 2).config, "bias")[0]


def test_span_at_the_start_is_skipped_with_the_reason():
    teacher = tiny_model("gpt2", 4)
    _, report = repair(teacher, truncate_model(teacher, [2, 3]), [2, 3], rows(), "replaceme")
    assert report == [{"span": [0, 1], "skipped": "no kept block before it to fold a fit into"}]


def test_capture_matches_the_hidden_states():
    model = tiny_model("llama", 4)
    ids = rows(3)
    states, _ = capture(model, ids, {0, 2, 4}, {1}, batch_size=2)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.allclose(states[0], hidden[0]) and torch.allclose(states[2], hidden[2])
    assert states[2].shape == (3, 24, 32)
    # the last entry of hidden_states is after the final norm; x_4 is the last block's output
    assert torch.allclose(model.model.norm(states[4]), hidden[4], atol=1e-5)


def test_block_replay_reproduces_the_forward_pass(arch):
    """Blocks run one at a time over kept hidden states (with the masks, positions and rotary
    embeddings recorded once per batch size) give the forward pass's streams and the MLP output
    projections' outputs (or their inputs, which refit fits on)."""
    model = tiny_model(arch, 4)
    ids = rows(5)
    with_proj = architecture_of(model.config).mlp_out is not None
    for proj_input in (False, True):
        states, projs = capture(model, ids, {1, 2, 3, 4}, {1, 2, 3} if with_proj else set(), batch_size=2,
                                proj_input=proj_input)
        replay = BlockReplay(model, ids, range(1, 4), batch_size=2, proj_input=proj_input)  # batches of 2, 2, 1
        stream = states[1]
        for i in (1, 2, 3):
            stream, proj = replay.run(i, stream)
            torch.testing.assert_close(stream, states[i + 1], atol=1e-5, rtol=1e-4)
            if with_proj:
                torch.testing.assert_close(proj, projs[i], atol=1e-5, rtol=1e-4)
                width = (model.config.hidden_size if not proj_input else
                         get_path(blocks_of(model)[i], architecture_of(model.config).mlp_out).weight.numel()
                         // model.config.hidden_size)
                assert proj.shape == (5, 24, width)
            else:
                assert proj is None


@pytest.mark.parametrize("kind,keep", [("llama", [0, 1, 4, 6, 7]), ("gpt2", [0, 1, 4, 6, 7]),
                                       ("qwen2", [0, 1, 4, 6, 7]), ("llama", [1, 2, 4, 6, 7])])
def test_student_fit_span_by_span_equals_fitting_on_whole_forward_passes(kind, keep):
    """The layer-by-layer student fit gives the weights the plain recipe gives: for each span in
    turn, a whole forward pass of the partly repaired student, a fit, a fold (spans 2-3 and 5; and
    with block 0 cut too, where the student's stream leaves the teacher's from the start)."""
    teacher = tiny_model(kind, 8)
    ids = rows(16)
    repaired, _ = repair(teacher, truncate_model(teacher, keep), keep, ids, "replaceme", "student")
    expected = truncate_model(teacher, keep)
    held = heldout_split(ids)
    target, _ = capture(teacher, ids, {4, 6}, set())
    for a, b in removed_spans(8, keep):
        if a == 0:
            continue
        j = keep.index(a - 1)
        state, proj = capture(expected, ids, {j + 1}, {j})
        u = target[b + 1] - state[j + 1]
        delta, _ = fit_span("replaceme", Moments.of(proj[j][:-held], u[:-held]), Moments.of(proj[j][-held:], u[-held:]))
        fold(projection(expected, j), delta)
    for (name, got), want in zip(repaired.state_dict().items(), expected.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_downstream_fits_each_later_block_to_the_teacher_stream_where_it_ends(kind):
    """With `downstream`, every kept block after the first repaired one is fitted in turn, as the
    plain recipe would: a whole forward pass of the partly repaired student, the stream leaving the
    block fitted to the teacher's leaving the same teacher block, a fold; the span fits as without."""
    teacher = tiny_model(kind, 8)
    keep = [0, 1, 4, 5, 7]  # spans 2-3 and 6
    ids = rows(64)  # enough random rows that some downstream fit beats none on the held-out ones
    repaired, report = repair(teacher, truncate_model(teacher, keep), keep, ids, "refit", "student", downstream=True)
    assert [(r.get("span"), r["block"], r.get("downstream", False)) for r in report] == [
        ([2, 3], 1, False), (None, 4, True), ([6, 6], 5, False), (None, 7, True)]
    expected, held = truncate_model(teacher, keep), heldout_split(ids)
    target, _ = capture(teacher, ids, set(range(9)), set())
    for j, t in [(1, 4), (2, 5), (3, 7), (4, 8)]:  # student block, the teacher stream it is fitted to
        state, proj = capture(expected, ids, {j + 1}, {j}, proj_input=True)
        u = target[t] - state[j + 1]
        delta, _ = fit_span("refit", Moments.of(proj[j][:-held], u[:-held]), Moments.of(proj[j][-held:], u[-held:]))
        refit(projection(expected, j), delta)
    for (name, got), want in zip(repaired.state_dict().items(), expected.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)
    plain, _ = repair(teacher, truncate_model(teacher, keep), keep, ids, "refit", "student")
    moved = [j for j in range(5) if not torch.equal(projection(plain, j).weight, projection(repaired, j).weight)]
    fitted = [r["student_block"] for r in report if r.get("downstream") and r["heldout_error"] < 1]
    assert fitted and set(fitted) <= set(moved) <= {2, 3, 4}  # and block 3's span fit, after a fitted block 2
    with pytest.raises(RepairError, match="student's own stream"):
        repair(teacher, truncate_model(teacher, keep), keep, ids, "refit", "teacher", downstream=True)
    # a cut only at block 0 has no repaired block to fit after: nothing downstream, nothing refused
    _, at_start = repair(teacher, truncate_model(teacher, [2, 3, 4, 5, 6, 7]), [2, 3, 4, 5, 6, 7], ids, "refit",
                         "student", downstream=True)
    assert [r.get("skipped") is not None for r in at_start] == [True]


@pytest.mark.parametrize("repair_method", ["none", "replaceme"])
def test_iterative_removes_a_silenced_block_first(repair_method):
    teacher = tiny_model("llama", 6)
    with torch.no_grad():  # block 3 writes nothing to the stream: removing it changes nothing
        blocks_of(teacher)[3].self_attn.o_proj.weight.zero_()
        blocks_of(teacher)[3].mlp.down_proj.weight.zero_()
    search = CutSearch(teacher, rows(8), repair_method, "kl")
    keep, path = search.iterative(4)
    assert path[0]["removed"] == 3 and path[0]["kl"] < 1e-6 and 3 not in keep and len(keep) == 4
    assert len(path) == 2 and all(len(step["candidates"]) == 6 - i for i, step in enumerate(path))


def test_a_candidate_runs_from_its_first_changed_block_on_the_teachers_stream(monkeypatch):
    """A candidate's measure equals the student's own, built whole; its blocks before the first
    one the cut changes are not run again (the teacher's stream enters there); and the teacher's
    body/head split is checked on the whole teacher, not under a skipped prefix (where its probe
    would be given the batch's stream: tokens x vocabulary logits)."""
    from lmshrink import architectures, next_token
    from lmshrink.compress import cut_search
    from lmshrink.compress.model_gap import gap, references

    teacher, ids = tiny_model("llama", 6), rows(8)
    firsts, original = [], architectures.from_block

    def watched(model, keep, first, stream):
        assert model in next_token._CHECKED
        firsts.append(first)
        return original(model, keep, first, stream)

    monkeypatch.setattr(cut_search, "from_block", watched)
    search = CutSearch(teacher, ids, "none", "kl")
    keep = [0, 1, 2, 5]
    student = truncate_model(teacher, keep)
    assert search.score(keep) == pytest.approx(gap(student, ids, "kl", references(teacher, ids)), rel=1e-5)
    assert firsts[-1] == 3 and set(firsts[:-2]) == {6}  # the teacher's references: its last stream into the final norm


def test_contiguous_picks_the_silent_span():
    teacher = tiny_model("gpt2", 6)
    with torch.no_grad():
        for i in (2, 3):
            block = blocks_of(teacher)[i]
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
    keep, candidates = CutSearch(teacher, rows(8), "none", "kl").contiguous(4)
    assert keep == [0, 1, 4, 5] and len(candidates) == 5 and candidates[2]["kl"] < 1e-6


@pytest.mark.parametrize("method", ["replaceme", "refit"])
def test_a_search_fits_its_repairs_on_their_own_rows_and_measures_on_others(method):
    """Given the repair's calibration rows, a candidate's fit comes from them and is measured on the
    search rows: a linear span is still recovered there, from fits on text it never measured."""
    teacher = linear_span_teacher()
    measured, fitted = rows(4, 16, seed=1), rows(24, 16, seed=2)
    search = CutSearch(teacher, measured, method, "kl", fit_rows=fitted)
    assert search.states[0].shape[0] == 24 and search.rows is measured
    plain = CutSearch(teacher, measured, "none", "kl")
    assert search.score([0, 2]) < 1e-5 < plain.score([0, 2])
    # the candidate's repair, outside `score` (what a caller runs other measures with): the teacher's outputs
    assert plain.edits([0, 2]) == {}
    with torch.no_grad():
        want = teacher(input_ids=measured, use_cache=False).logits
        with patched(teacher, search.edits([0, 2])), only_blocks(teacher, [0, 2]):
            got = teacher(input_ids=measured, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("method", ["replaceme", "refit"])
def test_a_repair_reuses_the_teacher_activations_a_search_captured(monkeypatch, method):
    teacher = tiny_model("llama", 8)
    ids, keep = rows(16), [0, 1, 4, 6, 7]
    search = CutSearch(teacher, rows(4, seed=3), method, "kl", fit_rows=ids)
    passes = []
    with monkeypatch.context() as patch:  # no teacher pass when its activations are given
        patch.setattr(repair_module, "capture", lambda model, *a, **k: passes.append(model) or capture(model, *a, **k))
        again, _ = repair(teacher, truncate_model(teacher, keep), keep, ids, method,
                          captured=(search.states, search.projs))
    assert teacher not in passes
    alone, _ = repair(teacher, truncate_model(teacher, keep), keep, ids, method)
    for got, want in zip(again.state_dict().values(), alone.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want)


def test_perplexity_measure_is_the_perplexity():
    teacher = tiny_model("gpt2", 4)
    ids = rows(4)
    measured = CutSearch(teacher, ids, "none", "ppl").score([0, 1, 2, 3])
    assert measured == pytest.approx(perplexity(teacher, ids.flatten(), 24, 24, framing=Framing()), rel=1e-5)


def test_strength_is_chosen_by_the_output_on_held_out_rows():
    teacher = linear_span_teacher()
    ids = rows(24, 16)
    # the exact fit is the best strength: the choice must find it among others
    repaired, report = repair(teacher, truncate_model(teacher, [0, 2]), [0, 2], ids, "replaceme", "teacher",
                              strengths=(0.5, 1.0, 1.5))
    kls = report[0]["strength_kl"]
    assert report[0]["strength"] == 1.0 and kls["1"] < min(kls["0.5"], kls["1.5"])
    assert (logits(repaired, ids) - logits(teacher, ids)).abs().max() < 1e-3
    # with one strength nothing is measured, and the record says which was used
    _, plain = repair(teacher, truncate_model(teacher, [0, 2]), [0, 2], ids, "bias", "teacher")
    assert plain[0]["strength"] == 1.0 and "strength_kl" not in plain[0]
    # one strength other than 1 is the one applied: half the fit's change to the projection
    cut = projection(truncate_model(teacher, [0, 2]), 0).weight
    (full, _), (half, record) = (repair(teacher, truncate_model(teacher, [0, 2]), [0, 2], ids, "refit", "teacher",
                                        strengths=(s,)) for s in (1.0, 0.5))
    full, half = projection(full, 0).weight, projection(half, 0).weight
    assert record[0]["strength"] == 0.5 and not torch.equal(full, cut)
    torch.testing.assert_close(half - cut, 0.5 * (full - cut))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_refine_fits_only_the_repaired_projections_on_the_output(kind):
    teacher = tiny_model(kind, 4)
    with torch.no_grad():  # a removed block that matters
        for p in blocks_of(teacher)[2].mlp.parameters():
            p.mul_(8)
    ids = rows(8, 16).repeat(2, 1)  # the held-out rows repeat fit rows: random tokens have nothing else to learn
    student = truncate_model(teacher, [0, 1, 3])  # any cut: the plain one is furthest from its teacher
    before = {k: v.clone() for k, v in student.state_dict().items()}
    record = refine(teacher, student, [1], ids, epochs=3, lr=1e-2)
    kl = record["heldout_kl"]
    assert len(kl) == 4 and record["kept_epoch"] == min(range(4), key=kl.__getitem__)
    assert kl[record["kept_epoch"]] < 0.9 * kl[0]  # the output fit brought the student closer
    # the kept pass is the one in the model, and nothing but block 1's MLP output projection moved
    held = ids[-heldout_split(ids):]
    refs = references(teacher, held)
    kept = gap(student, held, "kl", refs)
    assert kept == pytest.approx(kl[record["kept_epoch"]], rel=1e-5)
    prefix = f"{'transformer.h' if kind == 'gpt2' else 'model.layers'}.1.mlp.{'c_proj' if kind == 'gpt2' else 'down_proj'}."
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(prefix) for k in changed)
    assert all(p.requires_grad for p in student.parameters())  # as they were
    # no repaired block (every span started at block 0): nothing to fit, said so
    assert refine(teacher, student, [], ids, epochs=2, lr=1e-2)["skipped"]
    # no passes: nothing moves
    untouched = refine(teacher, student, [1], ids, epochs=0, lr=1e-2)
    assert untouched["heldout_kl"] == [pytest.approx(kl[record["kept_epoch"]], rel=1e-5)]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fold_makes_the_projection_output_y_times_t(kind):
    torch.manual_seed(0)
    proj = torch.nn.Linear(8, 6) if kind == "linear" else T.pytorch_utils.Conv1D(6, 8)
    torch.nn.init.normal_(proj.bias)
    x, delta = torch.randn(5, 8), 0.1 * torch.randn(6, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = proj(x) @ (torch.eye(6) + delta.float())
        fold(proj, delta)
        assert torch.allclose(proj(x), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_refit_adds_its_correction_to_the_weights(kind):
    torch.manual_seed(0)
    proj = torch.nn.Linear(8, 6) if kind == "linear" else T.pytorch_utils.Conv1D(6, 8)
    torch.nn.init.normal_(proj.bias)
    x, delta = torch.randn(5, 8), 0.1 * torch.randn(8, 6, dtype=torch.float64)  # (in, out)
    with torch.no_grad():
        expected = proj(x) + x @ delta.float()
        refit(proj, delta)
        assert torch.allclose(proj(x), expected, atol=1e-5)


def test_the_ridge_fit_is_the_closed_form_and_meets_its_limits():
    """D = (M^T M + lambda I)^-1 M^T U with lambda = alpha tr(M^T M) / F (so alpha means the same at
    any width), from moments summed in chunks; alpha -> 0 is least squares, alpha -> inf no change."""
    from lmshrink.compress.repair import Moments

    torch.manual_seed(0)
    m, u = torch.randn(300, 12, dtype=torch.float64), torch.randn(300, 5, dtype=torch.float64)
    moments = Moments.of(m, u, chunk=64)
    for alpha in (0.01, 0.3):
        lam = alpha * float((m * m).sum()) / m.shape[1]
        direct = torch.linalg.solve(m.T @ m + lam * torch.eye(12, dtype=torch.float64), m.T @ u)
        torch.testing.assert_close(moments.ridge(alpha), direct)
    torch.testing.assert_close(moments.ridge(1e-12), torch.linalg.lstsq(m, u).solution)
    assert moments.ridge(1e9).abs().max() < 1e-6
    assert moments.error(torch.zeros(12, 5, dtype=torch.float64)) == pytest.approx(float((u * u).sum()))


def test_the_dual_ridge_fit_is_the_primal_one_for_fewer_tokens_than_features():
    """Fewer calibration tokens than MLP channels (Llama-3.1-8B's refit on 1,024 tokens): the N x N dual
    form gives the primal F x F form's fit, lambda and held-out errors."""
    from lmshrink.compress.repair import Moments, fit_span, fit_span_dual

    g = torch.Generator().manual_seed(0)
    for rows in (5, 7):  # 40 and 56 tokens, 64 features
        m = torch.randn(rows, 8, 64, generator=g)
        u = m @ torch.randn(64, 16, generator=g) + 0.1 * torch.randn(rows, 8, 16, generator=g)
        primal, said = fit_span("refit", Moments.of(m[:-1], u[:-1]), Moments.of(m[-1:], u[-1:]))
        dual, told = fit_span_dual(1, m, u)
        torch.testing.assert_close(dual, primal, rtol=1e-6, atol=1e-8)  # (alpha 1e-6: conditioning)
        assert told["alpha"] == said["alpha"] and told["heldout_error"] == pytest.approx(said["heldout_error"], rel=1e-8)
        assert told["alpha_errors"] == pytest.approx(said["alpha_errors"], rel=1e-8)
