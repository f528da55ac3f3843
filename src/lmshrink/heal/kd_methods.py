"""Knowledge-distillation methods for fine-tuning a student on a downstream task.

Every method is a class with one call signature,

    method(student, teacher, batch, progress) -> (loss, {part name: value})

where `batch` holds the student's tensors (`input_ids`, `attention_mask`, `labels`), the raw
`texts` (so a teacher with another tokenizer, or MATE-KD's generator, can re-tokenise them)
and the teacher's own tensors; `progress` is the share of training done, in [0, 1). The loss
terms themselves are pure functions below, each citing what it implements.

`METHODS` maps a name to its class: none, kd, annealing, rail, mate, combined.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lmshrink.config import SettingsError
from lmshrink.losses import forward_kl
from lmshrink.models import own_copy

# ----------------------------------------------------------------------------- pure losses


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on class logits (B, C), or MSE for regression (C == 1, float labels)."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def per_example_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_t^T || p_s^T) per example (B,) (`losses.forward_kl` on tempered log-probs); squared
    error for regression."""
    if student_logits.shape[-1] == 1:
        return (student_logits - teacher_logits).pow(2).squeeze(-1).float()
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return forward_kl(log_p_s, log_p_t)


def hinton_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. (2015): T^2 * KL(p_t^T || p_s^T), batch mean; for regression, MSE to the teacher."""
    if student_logits.shape[-1] == 1:
        return F.mse_loss(student_logits.float(), teacher_logits.float())
    return temperature**2 * per_example_divergence(student_logits, teacher_logits, temperature).mean()


def annealed_regression(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: int, tau_max: int) -> torch.Tensor:
    """Annealing-KD phase 1 (Jafari et al., EACL 2021): || z_s - z_t * tau / tau_max ||^2, the
    student regressing a softened teacher whose logits grow to full scale as tau rises to tau_max."""
    return F.mse_loss(student_logits.float(), teacher_logits.float() * (tau / tau_max))


def annealing_tau(progress: float, phase1: float, tau_max: int) -> int | None:
    """The Annealing-KD temperature step for this point of training: 1..tau_max rising through
    phase 1 (the first `phase1` share of training), None in phase 2 (gold labels only)."""
    if progress >= phase1:
        return None
    return min(tau_max, int(progress / phase1 * tau_max) + 1)


def pooled(hidden: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Each sequence's state at its last real token, L2-normalised: (B, T, H) -> (B, H)."""
    return F.normalize(hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float(), dim=-1)


def rail_loss(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
              pairs: list[tuple[int, int]], s_last: torch.Tensor, t_last: torch.Tensor) -> torch.Tensor:
    """RAIL-KD (Haidar et al., COLING 2022): mean over the (student layer, randomly drawn teacher
    layer) pairs of the squared distance ||s - t||^2 (in [0, 4]) between their pooled,
    L2-normalised sentence representations, averaged over the batch. (A mean over the hidden
    units instead would shrink the term by the hidden size and leave it without effect.)"""
    return sum((pooled(student_hidden[i], s_last) - pooled(teacher_hidden[j], t_last)).pow(2).sum(-1).mean()
               for i, j in pairs) / len(pairs)


def check_rail(n_student: int, n_teacher: int, student_width: int, teacher_width: int) -> None:
    """RAIL-KD compares each student layer with a distinct teacher layer of the same width."""
    if student_width != teacher_width:
        raise SettingsError(f"rail: student and teacher hidden sizes differ ({student_width} vs {teacher_width}); "
                            "RAIL-KD compares their layers directly (use a student truncated from the teacher)")
    if n_student > n_teacher:
        raise SettingsError(f"rail: RAIL-KD draws a distinct teacher layer for each of the student's {n_student - 1} "
                            f"intermediate layers, but the teacher has only {n_teacher - 1}; use a deeper teacher, "
                            "a shallower student, or another method / layer map")


def rail_pairs(n_student: int, n_teacher: int, rng: random.Random) -> list[tuple[int, int]]:
    """Student intermediate layers 1..n_student-1, each with a teacher layer from a fresh random,
    sorted draw of n_student-1 of the teacher's intermediate layers (RAIL-KD's random selection)."""
    students = list(range(1, n_student))
    if len(students) > n_teacher - 1:
        check_rail(n_student, n_teacher, 0, 0)
    return list(zip(students, sorted(rng.sample(range(1, n_teacher), len(students))), strict=True))


def reinforce_loss(log_probs: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """Policy-gradient loss that raises the probability of samples with above-average reward:
    -mean((r - mean r) * log p(sample)). MATE-KD's generator maximises the teacher-student
    divergence this way when its tokens cannot carry gradients into a student with another vocabulary."""
    return -((reward - reward.mean()).detach() * log_probs).mean()


def right_padded(tokenizer):
    """A copy of a decoder tokenizer padding on the right, with EOS as its pad token where it has
    none (so the last real token of each row is found after the padding is added); the tokenizer
    given is left as it was (`models.load_tokenizer` shares one per process)."""
    tokenizer = own_copy(tokenizer, "right-padded")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def last_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (right padding)."""
    return attention_mask.sum(-1) - 1


# ----------------------------------------------------------------------------- methods


@dataclass
class KDConfig:
    temperature: float = 2.0
    alpha: float = 0.5
    tau_max: int = 7
    phase1: float = 0.75
    rail_weight: float = 1.0
    mask_prob: float = 0.3
    generator_lr: float = 5e-7
    seed: int = 0


class NoKD:
    """`none`: the task loss on gold labels (also how the teacher is fine-tuned)."""

    needs_teacher = False

    def __init__(self, config: KDConfig, **_: Any):
        self.config = config

    def __call__(self, student, teacher, batch: dict[str, Any], progress: float):
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = task_loss(logits, batch["labels"])
        return loss, {"task": loss}


class VanillaKD(NoKD):
    """`kd`: (1 - alpha) * task loss + alpha * T^2 * KL(p_t^T || p_s^T)."""

    needs_teacher = True

    def __call__(self, student, teacher, batch, progress):
        c = self.config
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with torch.no_grad():
            t_logits = teacher_logits(teacher, batch)
        task, kd = task_loss(logits, batch["labels"]), hinton_kd(logits, t_logits, c.temperature)
        return (1 - c.alpha) * task + c.alpha * kd, {"task": task, "kd": kd}


class AnnealingKD(NoKD):
    """`annealing`: phase 1 regresses the student's logits on the teacher's scaled by tau/tau_max,
    tau rising 1..tau_max; phase 2 trains on gold labels alone."""

    needs_teacher = True

    def __call__(self, student, teacher, batch, progress):
        c = self.config
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        tau = annealing_tau(progress, c.phase1, c.tau_max)
        if tau is None:
            task = task_loss(logits, batch["labels"])
            return task, {"task": task}
        with torch.no_grad():
            t_logits = teacher_logits(teacher, batch)
        loss = annealed_regression(logits, t_logits, tau, c.tau_max)
        return loss, {"annealed": loss, "tau": torch.tensor(float(tau))}


class RailKD(NoKD):
    """`rail`: vanilla KD plus RAIL-KD's loss on randomly paired intermediate layers."""

    needs_teacher = True

    def __init__(self, config: KDConfig, **kwargs: Any):
        super().__init__(config)
        self.rng = random.Random(config.seed)

    def __call__(self, student, teacher, batch, progress):
        c = self.config
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        with torch.no_grad():
            t_out = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                            output_hidden_states=True)
        check_rail(len(out.hidden_states) - 1, len(t_out.hidden_states) - 1, out.hidden_states[0].shape[-1],
                   t_out.hidden_states[0].shape[-1])
        pairs = rail_pairs(len(out.hidden_states) - 1, len(t_out.hidden_states) - 1, self.rng)
        task, kd = task_loss(out.logits, batch["labels"]), hinton_kd(out.logits, t_out.logits, c.temperature)
        rail = rail_loss(out.hidden_states, t_out.hidden_states, pairs, last_token(batch["attention_mask"]),
                         last_token(batch["teacher_attention_mask"]))
        return (1 - c.alpha) * task + c.alpha * kd + c.rail_weight * rail, {"task": task, "kd": kd, "rail": rail}


class MateKD(NoKD):
    """`mate`: MATE-KD (Rashid et al., ACL 2021). A masked-LM generator rewrites a share of each
    input's tokens; it is trained to *maximise* the teacher-student divergence on its rewrites
    (adversarial, by policy gradient: its text is re-tokenised by both models), while the
    student minimises KD on the original and the rewritten inputs plus the task loss."""

    needs_teacher = True
    needs_generator = True

    def __init__(self, config: KDConfig, generator=None, encode=None, **kwargs: Any):
        super().__init__(config)
        if generator is None:
            raise SettingsError("mate/combined need a generator (a masked LM): give --generator")
        self.generator, self.encode = generator, encode  # encode(texts) -> (student batch, teacher batch)
        self.optimizer = torch.optim.Adam(generator.model.parameters(), lr=config.generator_lr)
        self.rng = torch.Generator().manual_seed(config.seed)

    def perturb(self, texts: list[str]) -> tuple[list[str], torch.Tensor]:
        """Rewritten texts and the log-probability of each rewrite under the generator (B,)."""
        return self.generator.rewrite(texts, self.config.mask_prob, self.rng)

    def adversary_step(self, student, teacher, texts: list[str]) -> tuple[dict, dict, torch.Tensor]:
        """One generator update; returns the rewritten inputs for the student and the mean divergence."""
        student.eval()  # the reward is a measurement, not a student training step
        new_texts, log_probs = self.perturb(texts)
        s_batch, t_batch = self.encode(new_texts)
        with torch.no_grad():
            s_logits = student(**s_batch).logits
            t_logits = teacher(**t_batch).logits
            reward = per_example_divergence(s_logits, t_logits, self.config.temperature)
        student.train()
        self.optimizer.zero_grad(set_to_none=True)
        reinforce_loss(log_probs, reward).backward()
        self.optimizer.step()
        return s_batch, t_batch, reward.mean()

    def rewritten_views(self, student, teacher, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """After one generator step: the student's logits on the rewrites (with grad), the
        teacher's on the originals and on the rewrites, and the generator's mean reward."""
        s_batch, t_batch, adversarial = self.adversary_step(student, teacher, batch["texts"])
        p_logits = student(**s_batch).logits
        with torch.no_grad():
            t_logits, tp_logits = teacher_logits(teacher, batch), teacher(**t_batch).logits
        return p_logits, t_logits, tp_logits, adversarial

    def __call__(self, student, teacher, batch, progress):
        c = self.config
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        p_logits, t_logits, tp_logits, adversarial = self.rewritten_views(student, teacher, batch)
        task = task_loss(logits, batch["labels"])
        kd = hinton_kd(logits, t_logits, c.temperature)
        kd_perturbed = hinton_kd(p_logits, tp_logits, c.temperature)
        loss = (task + kd + kd_perturbed) / 3  # MATE-KD's equal thirds (PAPER.md)
        return loss, {"task": task, "kd": kd, "kd_perturbed": kd_perturbed, "generator_reward": adversarial}


class CombinedKD(MateKD):
    """`combined`: MATE-KD's adversarial rewrites with Annealing-KD's schedule: phase 1 regresses
    the annealed teacher logits on original and rewritten inputs, phase 2 uses gold labels."""

    def __call__(self, student, teacher, batch, progress):
        c = self.config
        tau = annealing_tau(progress, c.phase1, c.tau_max)
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if tau is None:
            task = task_loss(logits, batch["labels"])
            return task, {"task": task}
        p_logits, t_logits, tp_logits, adversarial = self.rewritten_views(student, teacher, batch)
        annealed = annealed_regression(logits, t_logits, tau, c.tau_max)
        annealed_perturbed = annealed_regression(p_logits, tp_logits, tau, c.tau_max)
        loss = (annealed + annealed_perturbed) / 2
        return loss, {"annealed": annealed, "annealed_perturbed": annealed_perturbed,
                      "generator_reward": adversarial, "tau": torch.tensor(float(tau))}


def teacher_logits(teacher, batch: dict[str, Any]) -> torch.Tensor:
    return teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits


METHODS: dict[str, type[NoKD]] = {
    "none": NoKD,
    "kd": VanillaKD,
    "annealing": AnnealingKD,
    "rail": RailKD,
    "mate": MateKD,
    "combined": CombinedKD,
}


# ----------------------------------------------------------------------------- MATE-KD's generator


class MaskedLMGenerator:
    """Rewrites texts: a share of the (non-special) tokens is masked and each masked position is
    sampled from a masked LM's distribution given the rest (MATE-KD's generator); works with
    any Hub masked LM."""

    def __init__(self, model, tokenizer, max_length: int = 128):
        if tokenizer.mask_token_id is None:
            raise SettingsError("the generator's tokenizer has no mask token: MATE-KD needs a masked LM (--generator)")
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    def can_rewrite(self, enc) -> torch.Tensor:
        return (enc["special_tokens_mask"] == 0) & (enc["attention_mask"] == 1)

    def log_probs(self, ids: torch.Tensor, attention: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """(B, T, V) log-distribution of each position's replacement."""
        inputs = ids.masked_fill(masked, self.tokenizer.mask_token_id)
        return F.log_softmax(self._logits(inputs, attention), dim=-1)

    def _logits(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=ids, attention_mask=attention).logits.float()
        logits[..., self.tokenizer.all_special_ids] = float("-inf")  # rewrite into words, not markers
        return logits

    def rewrite(self, texts: list[str], mask_prob: float, rng: torch.Generator) -> tuple[list[str], torch.Tensor]:
        """Rewritten texts and each rewrite's log-probability under the generator (B,), differentiable."""
        tok = self.tokenizer
        enc = tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
                  return_special_tokens_mask=True)
        ids, attention = enc["input_ids"], enc["attention_mask"]
        can = self.can_rewrite(enc)
        masked = (torch.rand(ids.shape, generator=rng) < mask_prob) & can
        for row in (~masked.any(-1) & can.any(-1)).nonzero().flatten().tolist():  # >= 1 rewrite per text
            choices = can[row].nonzero().flatten()
            masked[row, choices[torch.randint(len(choices), (1,), generator=rng)]] = True
        device = next(self.model.parameters()).device
        ids, attention, masked = ids.to(device), attention.to(device), masked.to(device)
        self.model.train()
        log_p = self.log_probs(ids, attention, masked)  # (B, T, V)
        sampled = torch.multinomial(log_p[masked].exp(), 1).squeeze(-1)
        new_ids = ids.clone()
        new_ids[masked] = sampled
        token_logp = torch.zeros(ids.shape, device=device)
        token_logp[masked] = log_p[masked].gather(-1, sampled[:, None]).squeeze(-1)
        out = tok.batch_decode(new_ids.masked_fill(attention == 0, tok.pad_token_id), skip_special_tokens=True)
        return [t.strip() or s for t, s in zip(out, texts, strict=True)], token_logp.sum(-1)


class CausalLMGenerator(MaskedLMGenerator):
    """The same rewriting with a causal LM (e.g. the offline `smollm2-135m`): each chosen token
    is resampled from the model's next-token distribution given the original text before it.
    An adaptation for where no masked LM is at hand; MATE-KD itself uses a masked LM."""

    def __init__(self, model, tokenizer, max_length: int = 128):
        self.model, self.tokenizer, self.max_length = model, right_padded(tokenizer), max_length

    def can_rewrite(self, enc) -> torch.Tensor:
        can = super().can_rewrite(enc)
        can[:, 0] = False  # the first token has no prefix to predict it from
        return can

    def log_probs(self, ids: torch.Tensor, attention: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        logits = self._logits(ids, attention)  # position t predicts token t + 1
        return F.log_softmax(torch.cat([logits[:, :1], logits[:, :-1]], dim=1), dim=-1)
