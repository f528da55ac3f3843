"""Each KD loss pinned to a reference formula and to its limits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmshrink.losses import (
    cosine_loss,
    divergence,
    forward_kl,
    generalized_jsd,
    kd_loss,
    mse_loss,
    reverse_kl,
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


def test_kd_loss_gradient_equals_unchunked(logits):
    s, t = logits
    mask = torch.ones(2, 5)
    a = s.clone().requires_grad_()
    kd_loss(divergence("gjsd"), a, t, mask, 2.0, chunk=2).backward()
    b = s.clone().requires_grad_()
    (generalized_jsd(logp(b, 2.0), logp(t, 2.0)).mean()).backward()
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
