"""Each KD loss pinned to a reference formula and to its limits."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lmshrink.losses import (
    DIVERGENCES,
    causal_lm_loss,
    cosine_loss,
    divergence,
    forward_kl,
    fused_head_loss,
    generalized_jsd,
    head_step,
    kd_loss,
    mse_loss,
    reverse_kl,
    sampled_kl_offset,
    selective_lm_loss,
    skew_kl,
    sparse_kd_loss,
    total_variation,
)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3


def logp(x, t=1.0):
    return F.log_softmax(x / t, -1)


def test_forward_and_reverse_kl_match_torch_kl_div(logits):
    s, t = logits
    ref_fwd = F.kl_div(logp(s), logp(t), log_target=True, reduction="none").sum(-1)  # KL(p_t || p_s)
    ref_rev = F.kl_div(logp(t), logp(s), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(forward_kl(logp(s), logp(t)), ref_fwd)
    torch.testing.assert_close(reverse_kl(logp(s), logp(t)), ref_rev)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "gjsd", "skew_kl", "tv"])
def test_identical_distributions_give_zero_and_others_positive(logits, name):
    s, t = logits
    div = divergence(name)
    assert div(logp(t), logp(t)).abs().max() < 1e-6
    assert (div(logp(s), logp(t)) > 0).all()


def test_generalized_jsd_reference_and_limits(logits):
    s, t = logits
    ps, pt = logp(s).exp(), logp(t).exp()
    m = 0.5 * (ps + pt)
    jsd = 0.5 * (pt * (pt / m).log()).sum(-1) + 0.5 * (ps * (ps / m).log()).sum(-1)
    torch.testing.assert_close(generalized_jsd(logp(s), logp(t), 0.5), jsd)
    torch.testing.assert_close(generalized_jsd(logp(s), logp(t), 0.5), generalized_jsd(logp(t), logp(s), 0.5))
    beta = 1e-6  # JSD(beta) / beta -> KL(p_t || p_s), in float64 for the small beta
    s64, t64 = s.double() / 3, t.double() / 3
    torch.testing.assert_close(generalized_jsd(logp(s64), logp(t64), beta) / beta, forward_kl(logp(s64), logp(t64)),
                               rtol=1e-3, atol=1e-4)
    assert (generalized_jsd(logp(s), logp(t), 0.5) <= torch.log(torch.tensor(2.0)) + 1e-6).all()


def test_skew_kl_reference_and_limits(logits):
    s, t = logits
    ps, pt = logp(s).exp(), logp(t).exp()
    mix = 0.3 * pt + 0.7 * ps
    torch.testing.assert_close(skew_kl(logp(s), logp(t), 0.3), (pt * (pt / mix).log()).sum(-1))
    torch.testing.assert_close(skew_kl(logp(s), logp(t), 0.0), forward_kl(logp(s), logp(t)))
    assert skew_kl(logp(s), logp(t), 1.0).abs().max() < 1e-6


def test_total_variation_reference(logits):
    s, t = logits
    ref = 0.5 * (logp(s).exp() - logp(t).exp()).abs().sum(-1)
    torch.testing.assert_close(total_variation(logp(s), logp(t)), ref)
    assert (total_variation(logp(s), logp(t)) <= 1).all()


def test_kd_loss_chunks_masks_and_temperature(logits):
    s, t = logits
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    ref = (forward_kl(logp(s, 2.0), logp(t, 2.0)) * mask).sum() / mask.sum()
    for chunk in (1, 2, 5, 64):
        torch.testing.assert_close(kd_loss(forward_kl, s, t, mask, 2.0, chunk), ref)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_gradient_equals_unchunked(logits, temperature):
    """Each chunk's gradient found with its value (uneven chunks, masked positions, the loss scaled)."""
    s, t = logits
    mask = torch.ones(2, 5)
    mask[0, 4] = 0
    a = s.clone().requires_grad_()
    (3 * kd_loss(divergence("gjsd"), a, t, mask, temperature, chunk=2)).backward()
    b = s.clone().requires_grad_()
    (3 * (generalized_jsd(logp(b, temperature), logp(t, temperature)) * mask).sum() / mask.sum()).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_sparse_kd_with_all_tokens_equals_dense(logits):
    s, t = logits
    mask = torch.ones(2, 5)
    top_logp, top_idx = logp(t, 2.0).topk(11, -1)  # k = V: the rest bucket is empty
    torch.testing.assert_close(sparse_kd_loss(forward_kl, s, top_idx, top_logp, mask, 2.0),
                               kd_loss(forward_kl, s, t, mask, 2.0), rtol=1e-4, atol=1e-5)
    # with k < V it is the KL between the (k+1)-bucket coarse distributions
    top_logp, top_idx = logp(t).topk(3, -1)
    ps = logp(s).exp()
    s_top = ps.gather(-1, top_idx)
    pt_b = torch.cat([top_logp.exp(), 1 - top_logp.exp().sum(-1, keepdim=True)], -1)
    ps_b = torch.cat([s_top, 1 - s_top.sum(-1, keepdim=True)], -1)
    ref = (pt_b * (pt_b / ps_b).log()).sum(-1).mean()
    torch.testing.assert_close(sparse_kd_loss(forward_kl, s, top_idx, top_logp, mask), ref, rtol=1e-4, atol=1e-5)


def test_hidden_losses():
    h = torch.randn(2, 4, 8)
    mask = torch.ones(2, 4)
    assert cosine_loss(h, h, mask).abs() < 1e-6 and mse_loss(h, h, mask) == 0
    assert cosine_loss(h, -h, mask) == pytest.approx(2.0)
    assert mse_loss(h, h + 1, mask) == pytest.approx(1.0)


def test_unknown_loss_lists_the_known_ones():
    with pytest.raises(ValueError, match="known: forward_kl, reverse_kl, gjsd, skew_kl, tv"):
        divergence("wasserstein")


def test_shared_ce_and_sparse_kd_equal_the_separate_computations(logits):
    from lmshrink.losses import ce_and_sparse_kd

    s, t = logits
    labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(3))
    labels[1, 2] = -100
    mask = torch.ones(2, 5)
    mask[0, :2] = 0
    top_logp, top_idx = logp(t).topk(4, -1)
    expected_ce = F.cross_entropy(s[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    for name in ("forward_kl", "gjsd", "tv"):
        div = divergence(name)
        ce, kd = ce_and_sparse_kd(div, s, labels, top_idx, top_logp, mask)
        torch.testing.assert_close(ce, expected_ce)
        torch.testing.assert_close(kd, sparse_kd_loss(div, s, top_idx, top_logp, mask, 1.0))


def _reference_and_fused(kind, div, temperature, chunk, weights=(2.0, 3.0)):
    """Loss and gradients of the fused head and of the reference path (full logits) on one tiny batch."""
    torch.manual_seed(0)
    batch, length, width, padded, vocab, k = 2, 9, 16, 41, 37, 5
    hidden = torch.randn(batch, length, width, requires_grad=True)
    weight = torch.randn(padded, width, requires_grad=True)  # 4 padding rows past the tokenizer's 37
    labels = torch.randint(0, vocab, (batch, length))
    labels[0, 4] = -100
    t_hidden, t_weight = torch.randn(batch, length, 12), torch.randn(padded, 12)
    top = F.log_softmax(torch.randn(batch, length, vocab) / temperature, -1).topk(k, -1)
    logits = hidden @ weight.T
    mask = torch.ones(batch, length)
    ce = causal_lm_loss(logits, labels)
    if kind == "ce":
        reference, teacher, t_w = ce * weights[0], (None, None), None
    elif kind == "dense":
        kd = kd_loss(div, logits[..., :vocab], (t_hidden @ t_weight.T)[..., :vocab], mask, temperature, 4)
        reference, teacher, t_w = weights[0] * ce + weights[1] * kd, (t_hidden, None), t_weight
    else:
        kd = sparse_kd_loss(div, logits[..., :vocab], top.indices, top.values, mask, temperature, 4)
        reference, teacher, t_w = weights[0] * ce + weights[1] * kd, (top.indices, top.values), None
    step = head_step(kind, div, temperature, vocab)
    fused, parts = fused_head_loss(step, hidden, weight, labels, teacher, t_w, weights if kind != "ce" else
                                   (weights[0], 0.0), chunk)
    grads = torch.autograd.grad(fused, [hidden, weight])
    reference_grads = torch.autograd.grad(reference, [hidden, weight])
    with torch.no_grad():  # evaluation takes the loss-only branch
        no_grad, _ = fused_head_loss(step, hidden, weight, labels, teacher, t_w,
                                     weights if kind != "ce" else (weights[0], 0.0), chunk)
    return (fused, grads, no_grad, parts[0]), (reference, reference_grads, reference, ce)


HEAD_CASES = [("ce", "forward_kl", 1.0)] + [(kind, name, t) for kind in ("dense", "sparse") for name in DIVERGENCES
                                             for t in (1.0, 2.0)]


@pytest.mark.parametrize("kind,name,temperature", HEAD_CASES)
def test_fused_head_equals_the_full_logits_loss_and_gradient(kind, name, temperature):
    """Every divergence and temperature, padded vocabulary, ignored labels, uneven chunks (7 rows of 18)."""
    (fused, grads, no_grad, ce), (reference, reference_grads, _, reference_ce) = _reference_and_fused(
        kind, divergence(name, 0.3, 0.2), temperature, chunk=7)
    torch.testing.assert_close(fused, reference)
    torch.testing.assert_close(no_grad, reference.detach())
    torch.testing.assert_close(ce, reference_ce.detach())
    for got, want in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["ce", "dense"])
def test_the_fused_head_computes_in_the_runs_mixed_precision(kind):
    """A bf16 run's fused head multiplies in bf16, as autocast does the full-logits head (autocast does
    not reach into torch.func's transforms): its loss is the one of bf16 logits, not of fp32 ones, and
    the head's gradient stays in the weight's fp32."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    t_hidden, t_weight = torch.randn(2, 9, 16), torch.randn(40, 16).bfloat16()
    labels = torch.randint(0, 40, (2, 9))
    div = divergence("forward_kl")
    teacher, t_w, weights = ((t_hidden, None), t_weight, (1.0, 0.5)) if kind == "dense" else ((None, None), None, (1.0, 0.0))
    loss = fused_head_loss(head_step(kind, div, 2.0, 40, dtype=torch.bfloat16), hidden, weight, labels, teacher, t_w,
                           weights, chunk=7)[0]
    bf16_logits = (hidden.bfloat16() @ weight.bfloat16().T).float()
    reference = causal_lm_loss(bf16_logits, labels)
    if kind == "dense":
        t_logits = (t_hidden.bfloat16() @ t_weight.T).float()
        reference = reference + 0.5 * kd_loss(div, bf16_logits, t_logits, torch.ones(2, 9), 2.0, 4)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    fp32 = fused_head_loss(head_step(kind, div, 2.0, 40), hidden, weight, labels, teacher, t_w, weights, chunk=7)[0]
    assert abs(fp32.item() - loss.item()) > 1e-4  # the products really ran in bf16
    assert torch.autograd.grad(loss, weight)[0].dtype == torch.float32


def test_normalised_mse_is_zero_when_equal_and_one_for_a_zero_output():
    from lmshrink.losses import normalised_mse

    target = torch.randn(2, 5, 8) * 7
    assert normalised_mse(target.clone(), target) == 0
    assert normalised_mse(torch.zeros_like(target), target).item() == pytest.approx(1.0)
    assert normalised_mse(2 * target, target).item() == pytest.approx(1.0)  # scale-free: error as large as the target
    # masked: positions left out count for neither the error nor the norm
    mask = torch.tensor([[1.0, 1, 0, 0, 1], [0, 1, 1, 0, 0]])
    student = target + torch.randn_like(target)
    wrong_elsewhere = torch.where(mask.bool()[..., None], student, torch.zeros_like(student))
    assert normalised_mse(wrong_elsewhere, target, mask) == normalised_mse(student, target, mask)
    assert normalised_mse(student, target, torch.ones(2, 5)) == pytest.approx(normalised_mse(student, target).item())
    kept = mask.bool()
    assert normalised_mse(student, target, mask).item() == pytest.approx(normalised_mse(student[kept], target[kept]).item())


def test_the_selective_lm_loss_trains_on_the_tokens_where_the_student_lags_the_teacher_most(logits):
    """Rho-1 with the teacher as reference: keep 1 is the plain CE; otherwise the mean CE of the top
    share of tokens by (student NLL - teacher NLL), written out token by token; ignored labels are
    never picked, and tokens left out get no gradient."""
    student, teacher = logits
    labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    labels[1, 3] = -100
    assert selective_lm_loss(student, teacher, labels, 1.0) == pytest.approx(causal_lm_loss(student, labels).item())
    per_token = []  # (excess, student NLL, position) of every scored next token
    for b in range(2):
        for t in range(4):
            y = labels[b, t + 1]
            if y != -100:
                s_nll, t_nll = (-logp(x[b, t])[y].item() for x in (student, teacher))
                per_token.append((s_nll - t_nll, s_nll, (b, t)))
    per_token.sort(reverse=True)
    assert len(per_token) == 7
    student = student.clone().requires_grad_(True)
    got = selective_lm_loss(student, teacher, labels, 0.43)  # round(0.43 x 7) = 3 tokens
    assert got.item() == pytest.approx(sum(nll for _, nll, _ in per_token[:3]) / 3, rel=1e-6)
    got.backward()
    touched = {(b, t) for b in range(2) for t in range(5) if student.grad[b, t].abs().sum() > 0}
    assert touched == {pos for _, _, pos in per_token[:3]}
    sparse = torch.full_like(labels, -100)
    sparse[:, 1] = 2  # one scored token a row (position 0 predicting 2): keep half picks the one lagging more
    excess = [(-logp(student[b, 0])[2] + logp(teacher[b, 0])[2]).item() for b in range(2)]
    lagging = max(range(2), key=lambda b: excess[b])
    assert selective_lm_loss(student, teacher, sparse, 0.5).item() == pytest.approx(-logp(student[lagging, 0])[2].item())


def test_a_frozen_head_gets_no_gradient_and_the_same_hidden_gradient():
    """`--freeze embeddings` with a tied head: the fused head computes no (V, H) gradient at all."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    labels = torch.randint(0, 20, (2, 9))
    step = head_step("ce")
    trained = torch.autograd.grad(fused_head_loss(step, hidden, weight, labels, chunk=5)[0], [hidden, weight])
    frozen_weight = weight.detach()

    def no_weight_gradient(*args):
        raise AssertionError("the (V, H) gradient of a frozen head was computed")

    frozen_step = dataclasses.replace(step, grad=no_weight_gradient)
    loss = fused_head_loss(frozen_step, hidden, frozen_weight, labels, chunk=5)[0]
    (frozen,) = torch.autograd.grad(loss, [hidden])
    torch.testing.assert_close(frozen, trained[0])
    torch.testing.assert_close(loss, causal_lm_loss(hidden @ weight.detach().T, labels))


def test_a_sampled_cache_is_an_unbiased_estimate_of_the_teacher():
    """K tokens drawn per position, stored as (distinct ids, log(count / K)): averaged over many draws,
    the stored distribution is the teacher's, the loss (bucket forward KL + `sampled_kl_offset`) is
    the full KL(p_t || p_s), and its gradient is the full KL's. A top-k cache of the same bytes is not."""
    from lmshrink.heal.teacher_cache import sample_counts

    torch.manual_seed(0)
    vocab, positions, k, temperature = 12, 3, 4, 2.0
    t = torch.randn(1, positions, vocab) * 2
    s = torch.randn(1, positions, vocab, requires_grad=True)
    mask = torch.ones(1, positions)
    full = kd_loss(forward_kl, s, t, mask, temperature)
    full_grad = torch.autograd.grad(full, s)[0]
    generator = torch.Generator().manual_seed(1)
    draws, losses, grads = 1500, [], []
    mean_q = torch.zeros(1, positions, vocab)
    for _ in range(draws):
        idx, logp, entropy = sample_counts(t, k, temperature, generator)
        mean_q.scatter_add_(-1, idx.long(), logp.float().exp() / draws)
        loss = sparse_kd_loss(forward_kl, s, idx, logp, mask, temperature) + sampled_kl_offset(logp, entropy)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, s)[0])
    p_t = F.softmax(t / temperature, -1)
    assert (mean_q - p_t).abs().max() < 0.02
    assert torch.stack(losses).mean().item() == pytest.approx(full.item(), abs=0.02)
    assert (torch.stack(grads).mean(0) - full_grad).abs().max() < 0.01
    top = p_t.log().topk(k, -1)  # the top-k cache's estimate leaves out the tail: its loss is biased low
    assert sparse_kd_loss(forward_kl, s, top.indices, top.values, mask, temperature).item() < full.item() - 0.05


def test_uld_compares_distributions_over_different_vocabularies_by_their_sorted_probabilities():
    """ULD: the sorted-probability L1 distance (the shorter vocabulary padded with zeros), blind to which
    token is which; over the top tokens only, a lower bound that is exact once they cover the vocabulary."""
    from lmshrink.losses import universal_logit_distance

    g = torch.Generator().manual_seed(0)
    log_ps = torch.log_softmax(torch.randn(3, 5, 40, generator=g) * 3, -1)
    log_pt = torch.log_softmax(torch.randn(3, 5, 70, generator=g) * 3, -1)
    a = log_ps.exp().sort(-1, descending=True).values
    b = log_pt.exp().sort(-1, descending=True).values
    exact = (torch.nn.functional.pad(a, (0, 30)) - b).abs().sum(-1)
    torch.testing.assert_close(universal_logit_distance(log_ps, log_pt, top=70), exact)
    for top in (1, 8, 39):
        cut = universal_logit_distance(log_ps, log_pt, top=top)
        assert (cut <= exact + 1e-6).all() and (cut >= 0).all()
    shuffled = log_pt[..., torch.randperm(70, generator=g)]
    torch.testing.assert_close(universal_logit_distance(log_ps, shuffled, top=70), exact)
    assert universal_logit_distance(log_pt, shuffled).abs().max() < 1e-6  # the same distribution, tokens reordered
