"""Next-token NLL and KL a chunk of positions at a time equal the same from whole logits."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, tiny_model

from lmshrink import next_token
from lmshrink.losses import forward_kl, next_token_nll


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 positions (128-token vocabulary), and pieces of 5 positions x 24 tokens of it (the
    last rows' slices wider), so every test crosses chunk, piece and slice boundaries."""
    monkeypatch.setattr(next_token, "LOGIT_BYTES", 4 * 128 * 6)
    monkeypatch.setattr(next_token, "PIECE_ROWS", 5)
    monkeypatch.setattr(next_token, "PIECE_BYTES", {"cpu": 4 * 5 * 24})


@pytest.mark.parametrize("cap", [None, 3.0])
def test_vocabulary_slices_give_the_whole_log_sum_exp_and_target_logits(small_chunks, cap, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(13, 8, generator=gen), torch.randn(128, 8, generator=gen), torch.randn(128, generator=gen)
    targets = torch.randint(0, 128, (13,), generator=gen)
    targets[:3] = torch.tensor([0, 127, 24])  # the first and last token, and a slice's first
    logits = x @ weight.T + bias
    logits = torch.tanh(logits / cap) * cap if cap else logits
    lse, picked = next_token.vocab_logsumexp(x, weight, bias, cap, targets)
    assert torch.allclose(lse, torch.logsumexp(logits, -1), atol=1e-5)
    assert torch.allclose(picked, logits.gather(1, targets[:, None])[:, 0], atol=1e-6)
    assert next_token.vocab_logsumexp(x, weight)[1] is None
    # a head stored in bfloat16, computed in float32 a slice at a time, as `compress.sequential` reads it
    linear = torch.nn.Linear(8, 128, bias=False).to(torch.bfloat16)
    head = next_token.Head(linear, cap, torch.float32)
    whole = x @ linear.weight.float().T
    whole = torch.tanh(whole / cap) * cap if cap else whole
    assert torch.allclose(head(x), whole, atol=1e-5)
    assert torch.allclose(head.logsumexp(x.view(1, 13, 8))[0], torch.logsumexp(whole, -1).view(1, 13), atol=1e-5)
    # a decoding step's few positions, the table's rows times them by slices of 24 rows (bias and cap as above)
    monkeypatch.setattr(next_token, "FEW_ROWS", 24)
    full = torch.nn.Linear(8, 128)
    with torch.no_grad():
        want = next_token.Head(full, cap)(x[:3])
        assert torch.allclose(next_token.Head(full, cap).few(x[:3]), want, atol=1e-6)


@pytest.mark.parametrize("kind", ARCHS)
def test_chunked_nll_and_kl_equal_whole_logits(kind, ids, small_chunks):
    teacher, student = tiny_model(kind, 4, seed=0), tiny_model(kind, 2, seed=1)
    assert next_token.split(student) is not None  # every family splits into body and head
    with torch.no_grad():
        logits = student(input_ids=ids).logits.float()
        t_logits = teacher(input_ids=ids).logits.float()
    assert torch.allclose(next_token.nll(student, ids), next_token_nll(logits, ids), atol=1e-5)
    expected = forward_kl(torch.log_softmax(logits, -1), torch.log_softmax(t_logits, -1))
    ref = next_token.reference(teacher, ids)
    # the student's own head differs from the teacher's: the teacher's head is recomputed
    assert torch.allclose(next_token.kl(student, ids, ref), expected, atol=1e-5)
    # the teacher cut, which shares its head: the shared-head formula where the head is linear
    assert ref.shares_head(teacher) == (kind != "gemma2")  # Gemma 2 soft-caps: not linear in the hidden state
    assert torch.allclose(next_token.kl(teacher, ids, ref), torch.zeros(ids.shape), atol=1e-4)
    skipped = next_token.kl(student, ids, ref)  # and a model sharing the head, with other blocks:
    student_cut = tiny_model(kind, 4, seed=0)
    with torch.no_grad():
        for p in student_cut.base_model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        cut_logits = student_cut(input_ids=ids).logits.float()
    want = forward_kl(torch.log_softmax(cut_logits, -1), torch.log_softmax(t_logits, -1))
    assert torch.allclose(next_token.kl(student_cut, ids, ref), want, atol=1e-4)
    assert skipped.shape == ids.shape


def test_soft_capped_logits_are_split_with_their_cap(ids, small_chunks):
    model = tiny_model("gemma2", 2)
    model.config.final_logit_softcapping = 0.05  # a cap the tiny model's logits reach: capping matters
    with torch.no_grad():
        uncapped = model.lm_head(model.model(ids).last_hidden_state)
    assert uncapped.abs().max() > 0.1
    assert next_token.split(model) is not None  # the split applies the cap (else it falls back to whole logits)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    assert torch.allclose(next_token.nll(model, ids), next_token_nll(logits, ids), atol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_the_mean_kl_has_the_whole_logits_gradient(ids, small_chunks, shared):
    teacher, student = tiny_model("llama", 4, seed=0), tiny_model("llama", 2, seed=1)
    if shared:  # a student cut from the teacher keeps its head: the shared-head formula
        student.lm_head.weight = teacher.lm_head.weight
    ref = next_token.reference(teacher, ids)
    assert ref.shares_head(student) == shared
    weight = student.model.layers[0].mlp.down_proj.weight
    next_token.mean_kl(student, ids, ref).backward()
    chunked = weight.grad.clone()
    weight.grad = None
    with torch.no_grad():
        t_logp = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1)
    whole = forward_kl(torch.log_softmax(student(input_ids=ids).logits.float(), -1), t_logp).mean()
    whole.backward()
    assert torch.allclose(chunked, weight.grad, atol=1e-6)
    assert next_token.mean_kl(student, ids, ref).item() == pytest.approx(whole.item(), rel=1e-4)


def test_a_model_whose_logits_are_not_its_head_is_scored_whole(ids, capsys):
    model = tiny_model("llama", 2)
    head = model.get_output_embeddings()
    original = head.forward
    head.forward = lambda h: original(h) * 2.0  # a logit scale the split does not know ...
    model.forward_scale = 2.0
    calls = []
    base_forward = model.forward

    def forward(*args, **kwargs):  # ... that the model's own forward pass does not apply
        calls.append(1)
        out = base_forward(*args, **kwargs)
        out.logits = out.logits / 2.0
        return out

    model.forward = forward
    assert next_token.split(model) is None
    assert "full logits" in capsys.readouterr().err
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    assert torch.allclose(next_token.nll(model, ids), next_token_nll(logits, ids), atol=1e-5)
