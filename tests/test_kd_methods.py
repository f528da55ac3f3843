"""Each KD method's loss does what its definition says (pinned to formulas and limits)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from lmshrink.heal.kd_methods import (
    METHODS,
    AnnealingKD,
    KDConfig,
    MaskedLMGenerator,
    NoKD,
    VanillaKD,
    annealed_regression,
    annealing_tau,
    hinton_kd,
    per_example_divergence,
    rail_loss,
    rail_pairs,
    reinforce_loss,
    task_loss,
)


def test_hinton_kd_is_t_squared_kl_and_zero_for_equal_logits():
    torch.manual_seed(0)
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    T = 2.0
    manual = T * T * (F.softmax(t / T, -1) * (F.log_softmax(t / T, -1) - F.log_softmax(s / T, -1))).sum(-1).mean()
    assert torch.allclose(hinton_kd(s, t, T), manual, atol=1e-6)
    assert hinton_kd(t, t, T).abs() < 1e-6
    assert torch.allclose(per_example_divergence(s, t, T).mean() * T * T, manual, atol=1e-6)
    # regression (one output): the squared error to the teacher
    assert torch.allclose(hinton_kd(s[:, :1], t[:, :1], T), F.mse_loss(s[:, :1], t[:, :1]))


def test_task_loss_is_ce_or_mse():
    logits, labels = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    assert torch.allclose(task_loss(logits, labels), F.cross_entropy(logits, labels))
    assert torch.allclose(task_loss(torch.tensor([[0.5]]), torch.tensor([2.0])), torch.tensor(2.25))


def test_annealing_schedule_and_regression_target():
    taus = [annealing_tau(p / 100, 0.75, 7) for p in range(100)]
    phase1 = [t for t in taus if t is not None]
    assert phase1[0] == 1 and phase1[-1] == 7 and phase1 == sorted(phase1)  # rising 1..tau_max
    assert len(phase1) == 75 and all(t is None for t in taus[75:])  # then gold labels only
    counts = [phase1.count(k) for k in range(1, 8)]
    assert max(counts) - min(counts) <= 1  # equal steps
    t = torch.tensor([[4.0, -2.0]])
    assert annealed_regression(t * 3 / 7, t, 3, 7) == 0  # target: teacher scaled by tau / tau_max
    assert torch.allclose(annealed_regression(torch.zeros(1, 2), t, 7, 7), F.mse_loss(torch.zeros(1, 2), t))


def test_rail_pairs_are_random_sorted_teacher_layers():
    rng = random.Random(0)
    draws = [rail_pairs(4, 12, rng) for _ in range(20)]
    for pairs in draws:
        assert [s for s, _ in pairs] == [1, 2, 3]
        teacher = [t for _, t in pairs]
        assert teacher == sorted(teacher) and len(set(teacher)) == 3 and all(1 <= t <= 11 for t in teacher)
    assert len({tuple(p) for p in draws}) > 5  # a fresh draw each step: all teacher layers teach


def test_rail_loss_compares_pooled_normalised_states_at_the_last_real_token():
    torch.manual_seed(0)
    h = tuple(torch.randn(2, 5, 8) for _ in range(4))
    last = torch.tensor([4, 2])
    assert rail_loss(h, h, [(1, 1), (2, 2)], last, last) < 1e-8
    scaled = tuple(3 * x for x in h)  # normalised: the scale does not matter
    assert rail_loss(h, scaled, [(1, 1)], last, last) < 1e-8
    padding = tuple(x.clone() for x in h)
    padding[1][1, 4] += 10  # row 1's padding (its last real token is 2): ignored
    assert rail_loss(h, padding, [(1, 1)], last, last) < 1e-8
    real = tuple(x.clone() for x in h)
    real[1][1, 2] += 10  # row 1's last real token: counted
    assert rail_loss(h, real, [(1, 1)], last, last) > 1e-3


def test_reinforce_raises_the_probability_of_rewarded_samples():
    logits = torch.zeros(2, requires_grad=True)
    log_p = F.log_softmax(logits, -1)
    reinforce_loss(log_p, torch.tensor([1.0, 0.0])).backward()
    assert logits.grad[0] < 0 < logits.grad[1]  # a descent step raises sample 0 (reward 1)


class _Linear(torch.nn.Module):
    """A classifier over mean-pooled embeddings with hidden states, enough to drive each method."""

    def __init__(self, vocab=50, classes=2, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.head = torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, classes)

    def forward(self, input_ids, attention_mask, output_hidden_states=False):
        h0 = self.emb(input_ids)
        h1 = torch.tanh(h0)
        pooled = (h1 * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True)
        out = type("Out", (), {})()
        out.logits, out.hidden_states = self.head(pooled), (h0, h1, h1)
        return out


def _batch():
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1]), "texts": ["a b c", "d e"],
            "teacher_input_ids": ids, "teacher_attention_mask": mask}


def test_methods_share_one_signature_and_mix_their_terms_as_defined():
    student, teacher, batch = _Linear(seed=0), _Linear(seed=1), _batch()
    config = KDConfig(temperature=2.0, alpha=0.25)
    loss, parts = NoKD(config)(student, teacher, batch, 0.0)
    assert torch.allclose(loss, parts["task"])
    loss, parts = VanillaKD(config)(student, teacher, batch, 0.0)
    assert torch.allclose(loss, 0.75 * parts["task"] + 0.25 * parts["kd"])
    loss, parts = AnnealingKD(config)(student, teacher, batch, 0.1)  # phase 1
    assert "annealed" in parts and float(parts["tau"]) == 1.0
    loss, parts = AnnealingKD(config)(student, teacher, batch, 0.9)  # phase 2: gold labels
    assert torch.allclose(loss, parts["task"]) and "annealed" not in parts
    loss, parts = METHODS["rail"](config)(student, teacher, batch, 0.0)
    assert torch.allclose(loss, 0.75 * parts["task"] + 0.25 * parts["kd"] + parts["rail"])


@pytest.fixture(scope="module")
def generator(gpt2_tokenizer):
    import transformers as T

    tok = T.AutoTokenizer.from_pretrained(gpt2_tokenizer.name_or_path)
    tok.add_special_tokens({"mask_token": "<mask>", "pad_token": "<pad>"})
    torch.manual_seed(0)
    model = T.BertForMaskedLM(T.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id))
    return MaskedLMGenerator(model, tok, max_length=32)


def test_generator_rewrites_a_share_of_tokens_with_differentiable_log_probs(generator):
    texts = ["the film is a quiet triumph of acting and light", "a dull and tiresome sequel"]
    new, log_p = generator.rewrite(texts, 0.3, torch.Generator().manual_seed(0))
    assert len(new) == 2 and new != texts and log_p.shape == (2,) and log_p.requires_grad
    assert all((lp < 0).item() for lp in log_p)  # at least one sampled token per text


def test_mate_trains_its_generator_against_the_student(generator):
    from lmshrink.heal.kd_methods import MateKD

    student, teacher = _Linear(vocab=len(generator.tokenizer)), _Linear(vocab=len(generator.tokenizer), seed=1)

    def encode(texts):
        enc = generator.tokenizer(texts, padding=True, return_tensors="pt")
        b = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        return b, b

    method = MateKD(KDConfig(generator_lr=1e-2), generator=generator, encode=encode)
    before = [p.detach().clone() for p in generator.model.parameters()]
    batch = _batch()
    batch["texts"] = ["the film is a quiet triumph", "a dull and tiresome sequel"]
    loss, parts = method(student, teacher, batch, 0.0)
    assert torch.allclose(loss, (parts["task"] + parts["kd"] + parts["kd_perturbed"]) / 3)
    assert parts["generator_reward"] > 0  # the student and teacher differ on the rewrites
    # the reward is the teacher-student divergence: a student identical to its teacher earns the generator nothing
    twin = MateKD(KDConfig(generator_lr=1e-2), generator=generator, encode=encode)
    assert twin(teacher, teacher, batch, 0.0)[1]["generator_reward"].abs() < 1e-6
    changed = sum(not torch.equal(a, b) for a, b in zip(before, generator.model.parameters(), strict=True))
    assert changed > 0  # the adversary took a step
    loss.backward()
    assert student.head.weight.grad is not None and teacher.head.weight.grad is None


def test_causal_generator_resamples_from_the_prefix(tiny_gpt2_dir):
    from lmshrink.heal.kd_methods import CausalLMGenerator
    from lmshrink.models import load

    loaded = load(str(tiny_gpt2_dir))
    gen = CausalLMGenerator(loaded.model, loaded.tokenizer, max_length=32)
    texts = ["the film is a quiet triumph of acting", "a dull sequel"]
    new, log_p = gen.rewrite(texts, 0.5, torch.Generator().manual_seed(0))
    assert new != texts and log_p.requires_grad and (log_p < 0).all()
    first = [t.split()[0] for t in new]
    assert first == ["the", "a"]  # the first token has no prefix: never rewritten


def test_rail_loss_is_the_squared_distance_of_unit_vectors():
    a, b = torch.zeros(1, 1, 4), torch.zeros(1, 1, 4)
    a[0, 0, 0], b[0, 0, 1] = 1.0, 1.0  # orthogonal unit vectors: ||a - b||^2 = 2
    last = torch.tensor([0])
    assert torch.allclose(rail_loss((a, a), (b, b), [(1, 1)], last, last), torch.tensor(2.0))
