"""Distillation's library: the `kd` settings group (`KDArgs`) and the named healing recipes, the
layer maps, the vocabulary check, `DistillTrainer` (the KD mix of `lmshrink distill`), and the
local stage's trainer, which fits the blocks beside each cut to the teacher's residual stream.

loss = alpha_ce * T^2 * KD(p_t^T, p_s^T) + alpha_clm * CE(s, next token)
       + alpha_cos * (1 - cos(h_s, h_t)) on the last hidden states
       + alpha_inter * hidden-state loss over a student->teacher layer map
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmshrink.architectures import blocks_of
from lmshrink.compress.repair import StopForward, capture, removed_spans
from lmshrink.config import SettingsError, setting
from lmshrink.data.teacher_text import continue_rows
from lmshrink.errors import one_of
from lmshrink.heal.callbacks import MetricsFile
from lmshrink.heal.kd_methods import rail_pairs
from lmshrink.heal.runs import checkpoint_step
from lmshrink.heal.training import LMTrainer, real_heads
from lmshrink.losses import (
    DIVERGENCES,
    HIDDEN_LOSSES,
    aligned_kd_loss,
    causal_lm_loss,
    ce_and_sparse_kd,
    cosine_loss,
    divergence,
    fused_head_loss,
    head_step,
    kd_loss,
    normalised_mse,
    sampled_kl_offset,
    selective_lm_loss,
    sparse_kd_loss,
)

LAYER_MAPS = ("none", "uniform", "kept", "stream", "rail")


# The DistilGPT-2 optimiser (PAPER.md), distill's default in place of the plain-LM one
DISTILGPT2_OPTIMISER = dict(lr=2.5e-4, warmup=0.05, adam_eps=1e-6, max_grad_norm=5.0)

# Named healing recipes: the settings each one sets. A setting given by flag or config file wins
# over its recipe's value (`--recipe minitron --lr 1e-4`); the run's record names the recipe.
RECIPES: dict[str, dict[str, Any]] = {
    # the paper's baseline (PAPER.md): KD at T 2 (x5) + next-token CE (x2) + hidden-state cosine (x1)
    "distilgpt2": {"kd.loss": "forward_kl", "kd.temperature": 2.0, "kd.alpha_ce": 5.0, "kd.alpha_clm": 2.0,
                   "kd.alpha_cos": 1.0, "train.scheduler": "linear",
                   **{f"train.{k}": v for k, v in DISTILGPT2_OPTIMISER.items()}},
    # Minitron (arXiv 2407.14679, 2408.11796): logit-only forward KL at T 1 over the full
    # vocabulary, no CE or cosine term, lr 2e-4 with cosine decay
    "minitron": {"kd.loss": "forward_kl", "kd.temperature": 1.0, "kd.alpha_ce": 1.0, "kd.alpha_clm": 0.0,
                 "kd.alpha_cos": 0.0, "train.lr": 2e-4, "train.scheduler": "cosine", "train.warmup": 0.05,
                 "train.adam_eps": 1e-8, "train.max_grad_norm": 1.0},
    # the healing bench's best distillation at 102,400 tokens of documentation (bench-heal-quality.md):
    # Minitron's KL at T 1 beside the next-token CE (1:1), the token embeddings (and a head tied to
    # them) kept as the teacher left them, lr 3e-4 with linear decay
    "kl-ce": {"kd.loss": "forward_kl", "kd.temperature": 1.0, "kd.alpha_ce": 1.0, "kd.alpha_clm": 1.0,
              "kd.alpha_cos": 0.0, "train.lr": 3e-4, "train.scheduler": "linear", "train.warmup": 0.05,
              "train.adam_eps": 1e-8, "train.max_grad_norm": 1.0, "train.freeze": ["embeddings"]},
}


RECIPE_LOSSES = {"distilgpt2": "the DistilGPT-2 loss mix (KD at T 2 x5 + next-token CE x2 + hidden-state cosine x1)",
                 "minitron": "logit-only forward KL at T 1 (Minitron)",
                 "kl-ce": "forward KL at T 1 + next-token CE (1:1), token embeddings frozen"}


def recipe_kd(name: str, **given: Any) -> KDArgs:
    """The `kd` group of the recipe called `name` (its loss settings; `given` ones win), for callers
    that bring their own optimiser settings (the demo and the study heal every arm alike)."""
    return KDArgs(**{**{k.split(".", 1)[1]: v for k, v in RECIPES[name].items() if k.startswith("kd.")}, **given})


@dataclass(kw_only=True)
class KDArgs:
    """The teacher and the distillation loss (the `kd` group; defaults: the DistilGPT-2 recipe)."""

    teacher: str = setting("smollm2-135m", "teacher: folder, Hub id, .gguf file or smollm2-135m")
    teacher_cache: str | None = setting(None, "folder from `lmshrink cache-teacher`: train on it without the teacher")
    loss: str = setting("forward_kl", f"KD divergence: {', '.join(DIVERGENCES)}")
    temperature: float = setting(2.0, "softmax temperature T of the KD term")
    beta: float = setting(0.5, "beta of the generalised JSD (gjsd)")
    skew: float = setting(0.1, "lambda of the skew KL (skew_kl)")
    alpha_ce: float = setting(5.0, "weight of the KD term (scaled by T^2)")
    alpha_clm: float = setting(2.0, "weight of the next-token cross-entropy")
    clm_keep: float = setting(1.0, "share of each batch's tokens the next-token CE trains on: those where the "
                                   "student's loss exceeds the teacher's most (Rho-1's selective language "
                                   "modelling, the teacher as reference model); 1: every token")
    alpha_cos: float = setting(1.0, "weight of the last-hidden-state cosine loss")
    layer_map: str = setting("none", "intermediate-layer map: none, uniform, kept (the truncated blocks' "
                                     "teacher layers), stream (the teacher's state each next kept block reads: "
                                     "a removed span's end), rail (RAIL-KD: a random sorted teacher subset each step), "
                                     "or explicit student:teacher pairs, e.g. 1:2,2:4")
    alpha_inter: float = setting(0.0, "weight of the intermediate hidden-state loss")
    inter_loss: str = setting("mse", f"intermediate loss: {', '.join(HIDDEN_LOSSES)}")
    kd_chunk: int | None = setting(None, "sequence positions per loss chunk, bounding its fp32 batch x chunk x vocab "
                                         "memory (default: from free GPU memory; 128 on CPU)", how_to_run=True)

    def problems(self) -> list[str]:
        problems = []
        problems += one_of("loss", self.loss, DIVERGENCES)
        if self.temperature <= 0:
            problems.append("temperature: must be positive")
        if not 0 <= self.beta <= 1 or not 0 <= self.skew <= 1:
            problems.append("beta and skew: must be in [0, 1]")
        problems += one_of("inter_loss", self.inter_loss, HIDDEN_LOSSES)
        if self.layer_map not in LAYER_MAPS and not _is_pairs(self.layer_map):
            problems.append(f"layer_map: {self.layer_map!r} is not {', '.join(LAYER_MAPS)} or pairs like 1:2,2:4")
        if not 0 < self.clm_keep <= 1:
            problems.append(f"clm_keep: {self.clm_keep} is not a share of the tokens; give one in (0, 1]")
        elif self.clm_keep < 1 and self.teacher_cache:
            problems.append("clm_keep: the selective CE ranks tokens by the teacher's own loss on them, which a "
                            "top-k teacher cache does not hold; give --teacher, or leave --clm-keep out")
        if self.alpha_inter > 0 and self.layer_map == "none":
            problems.append("alpha_inter: an intermediate loss needs --layer-map")
        if self.teacher_cache and (self.alpha_cos > 0 or self.alpha_inter > 0):
            problems.append("teacher_cache: a cache holds logits only; set --alpha-cos 0 and --alpha-inter 0")
        if self.kd_chunk is not None and self.kd_chunk < 1:
            problems.append("kd_chunk: must be positive")
        return problems


@dataclass(kw_only=True)
class OnPolicyArgs:
    """On-policy distillation (GKD, arXiv 2306.13649): a share of the steps train on the student's own
    continuations of the training text's prompts, each token of them scored by the teacher (the
    `policy` group)."""

    on_policy: float = setting(0.0, "share of the steps (GKD's lambda) that train on the student's own continuations "
                                    "of their blocks' first --prompt-tokens tokens, scored by the teacher on every "
                                    "token the student wrote; 0: off, 1: every step")
    policy_loss: str | None = setting(None, f"divergence on those continuations (default: --loss): "
                                            f"{', '.join(DIVERGENCES)}; GKD's are gjsd (with --beta) and reverse_kl")
    prompt_tokens: int = setting(64, "tokens at the start of each training block that the student continues")
    new_tokens: int = setting(64, "tokens the student writes after each prompt (sampled with its KV cache; EOS "
                                  "is a token like any other, as in the packed training text)")
    sample_temperature: float = setting(1.0, "temperature the student samples at (1: its own distribution)")

    def problems(self) -> list[str]:
        problems = one_of("policy_loss", self.policy_loss, DIVERGENCES) if self.policy_loss else []
        if not 0 <= self.on_policy <= 1:
            problems.append(f"on_policy: {self.on_policy:g} is not a share of the steps; give one in [0, 1]")
        if self.prompt_tokens < 1 or self.new_tokens < 1:
            problems.append("prompt_tokens, new_tokens: at least 1 each")
        if not self.sample_temperature > 0:
            problems.append("sample_temperature: must be positive")
        return problems


def _is_pairs(text: str) -> bool:
    try:
        return all(len(p.split(":")) == 2 and all(x.strip().isdigit() for x in p.split(":")) for p in text.split(","))
    except ValueError:
        return False


def layer_pairs(kind: str, n_student: int, n_teacher: int, kept: list[int] | None,
                rng: random.Random) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices to align; index i is the output of block i-1.

    Only intermediate states (1..n-1) are mapped: the last one is after the final norm in most
    models and is aligned by the cosine term instead.
    """
    students = list(range(1, n_student))
    if kind == "uniform":
        return [(i, round(i * n_teacher / n_student)) for i in students]
    if kind in ("kept", "stream"):
        if kept is None:
            raise SettingsError(f"layer_map: {kind!r} needs a student made by lmshrink truncate (kept_layers in lmshrink.json)")
        if kind == "kept":  # each block's output with that of the teacher block it was copied from
            return [(i, kept[i - 1] + 1) for i in students]
        # each block's output with the teacher's state where the next kept block reads it: after a
        # removed span, the state the span left (what a repair, and the local stage, make the block before it give)
        return [(i, kept[i]) for i in students]
    if kind == "rail":  # RAIL-KD: a fresh random sorted subset of teacher layers every step
        return rail_pairs(n_student, n_teacher, rng)
    pairs = [tuple(int(x) for x in p.split(":")) for p in kind.split(",")]
    bad = [p for p in pairs if not (1 <= p[0] <= n_student and 1 <= p[1] <= n_teacher)]
    if bad:
        raise SettingsError(f"layer_map: pair {bad[0]} is out of range (student 1..{n_student}, teacher 1..{n_teacher})")
    return pairs  # type: ignore[return-value]


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers map the same tokens to the same ids (one object, as `load_tokenizer`
    gives for the same files, without building both maps)."""
    return a is b or a.get_vocab() == b.get_vocab()


def check_vocabularies(student_tokenizer, teacher_tokenizer, student_config, teacher_config) -> int:
    """The number of real tokens both share; refuses different tokenizers.

    Vocabularies that differ only by padding rows (e.g. 50257 vs 50304) are fine: KD runs over
    the tokenizer's tokens only.
    """
    if not same_vocabulary(student_tokenizer, teacher_tokenizer):
        raise SettingsError(
            "teacher and student tokenizers differ, so their next-token distributions are over different "
            "tokens; distil from a teacher with the same tokenizer (e.g. the model the student was truncated from), "
            "or from an online teacher (--teacher) with --loss uld")
    n = len(student_tokenizer)
    for name, config in (("student", student_config), ("teacher", teacher_config)):
        if config.vocab_size < n:
            raise SettingsError(f"the {name}'s vocab_size {config.vocab_size} is smaller than its tokenizer ({n})")
    return n


def in_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """The logits of the tokenizer's `vocab` tokens (a head padded to a round size has more rows): the
    tensor itself where there is no padding, so that its gradient is not copied into a zeroed one."""
    return logits if logits.shape[-1] == vocab else logits[..., :vocab]


class DistillTrainer(LMTrainer):
    def __init__(self, *args: Any, teacher=None, recipe: KDArgs, vocab: int,
                 kept: list[int] | None = None, policy: OnPolicyArgs | None = None, teacher_vocab: int | None = None,
                 **kwargs: Any):
        super().__init__(*args, kd_chunk=recipe.kd_chunk, **kwargs)
        self.recipe, self.vocab, self.kept = recipe, vocab, kept
        self.teacher_vocab = teacher_vocab  # a teacher with another tokenizer: its token count
        self.div = divergence(recipe.loss, recipe.beta, recipe.skew)
        self.policy = policy or OnPolicyArgs()
        self.policy_div = divergence(self.policy.policy_loss or recipe.loss, recipe.beta, recipe.skew)
        self._micro = (-1, 0)  # (step, micro-batches of it so far): the samples' seeds
        self._generated = [0.0, 0]  # seconds and tokens of sampling since the last log line
        self.samples: MetricsFile | None = None
        self._samples: dict[str, Any] | None = None  # the last on-policy batch's, until the next log line
        if self.policy.on_policy:  # its steps train on other tokens than they read, and sample some: no
            self.flops_per_token = 0.0  # FLOP count per token read would give a true MFU
        self.rng = random.Random(self.args.seed)
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False).to(self.args.device)
            if self.args.bf16 or self.args.fp16:  # frozen: no fp32 master weights needed
                teacher.to(torch.bfloat16 if self.args.bf16 else torch.float16)
            if self.args.torch_compile:
                self.teacher = torch.compile(teacher)
        if self.fused_head:
            kind = "dense" if teacher is not None else "sparse"
            self.kd_step = head_step(kind, self.div, recipe.temperature, vocab, compiled=self.args.torch_compile,
                                     dtype=self.head_dtype)
            self.teacher_weight = teacher.get_output_embeddings().weight if teacher is not None else None
            if teacher is not None and self.policy.on_policy:
                self.policy_step = head_step("dense", self.policy_div, recipe.temperature, vocab,
                                             compiled=self.args.torch_compile, dtype=self.head_dtype)
        self._teacher = teacher  # uncompiled, for its head

    @staticmethod
    def head_problem(recipe: KDArgs | None = None, teacher_vocab: int | None = None, **trainer_kwargs: Any) -> str | None:
        if recipe is not None and recipe.clm_keep < 1:
            return "--clm-keep ranks the tokens by the teacher's loss, from full logits"
        if teacher_vocab is not None:
            return "a teacher with another tokenizer is compared at aligned positions, from full logits"
        return None

    def head_models(self) -> list:
        return super().head_models() + ([self._teacher] if self.fused_head and self._teacher is not None else [])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        s = self.recipe
        ids, labels = inputs["input_ids"], inputs["labels"]
        if model.training and (seed := self.on_policy_seed()) is not None:
            loss, outputs = self.on_policy_loss(model, ids, seed)
            return (loss, outputs) if return_outputs else loss
        if model.training and "teacher_ids" in inputs:
            loss, outputs = self.cross_tokenizer_loss(model, inputs)
            return (loss, outputs) if return_outputs else loss
        want_hidden = s.alpha_cos > 0 or s.alpha_inter > 0
        outputs = model(input_ids=ids, output_hidden_states=want_hidden and model.training, use_cache=False)
        if not model.training:  # held-out evaluation reports the plain LM loss (-> perplexity)
            ce = self.lm_loss(outputs.logits, labels)
            return (ce, outputs) if return_outputs else ce
        t_out = None
        if "teacher_idx" not in inputs:
            with torch.no_grad():
                t_out = self.teacher(input_ids=ids, output_hidden_states=want_hidden, use_cache=False)
        weights = (s.alpha_clm, s.alpha_ce * s.temperature**2)
        if self.fused_head:  # logits are final hidden states: head, CE and KD in one chunked pass
            teacher = (t_out.logits, None) if t_out is not None else (inputs["teacher_idx"], inputs["teacher_logp"])
            loss, (ce, kd) = fused_head_loss(self.kd_step, outputs.logits, self.head_weight, labels, teacher,
                                             self.teacher_weight, weights, self.chunk_rows(labels.numel(), self.vocab))
            parts = {"kd": kd}
        else:
            ce, parts = self.unfused_ce_and_kd(outputs.logits, labels, inputs, t_out)
            loss = weights[0] * ce + weights[1] * parts.get("kd", 0.0)
        mask = torch.ones(ids.shape, device=ids.device)  # every position of a full block
        if s.alpha_cos > 0:
            parts["cos"] = cosine_loss(outputs.hidden_states[-1], t_out.hidden_states[-1], mask)
        if s.alpha_inter > 0:
            pairs = layer_pairs(s.layer_map, len(outputs.hidden_states) - 1, len(t_out.hidden_states) - 1,
                                self.kept, self.rng)
            hidden = HIDDEN_LOSSES[s.inter_loss]
            parts["inter"] = sum(hidden(outputs.hidden_states[i], t_out.hidden_states[j], mask)
                                 for i, j in pairs) / len(pairs)
        loss = loss + s.alpha_cos * parts.get("cos", 0.0) + s.alpha_inter * parts.get("inter", 0.0)
        if "teacher_entropy" in inputs:  # a sampled cache: log the KL from the teacher, not from its samples
            parts["kd"] = parts["kd"] + sampled_kl_offset(inputs["teacher_logp"], inputs["teacher_entropy"])
        self.record(ce=ce, **parts)
        return (loss, outputs) if return_outputs else loss

    # --------------------------------------------------------------------- on-policy steps (GKD)

    def on_policy_seed(self) -> int | None:
        """The seed of this micro-batch's samples if its step trains on-policy, else None. Both come
        from the run's seed and the step (the same on every process, and in a resumed run)."""
        share, step, seed = self.policy.on_policy, self.state.global_step, self.args.seed
        self._micro = (step, self._micro[1] + 1 if self._micro[0] == step else 0)
        if not share or random.Random(f"on-policy {seed} {step}").random() >= share:
            return None
        return random.Random(f"samples {seed} {step} {self._micro[1]} {self.args.process_index}").getrandbits(63)

    def student_continuations(self, model, ids: torch.Tensor, seed: int) -> torch.Tensor:
        """Each block's first prompt_tokens tokens and the student's own continuation of them,
        sampled with its KV cache at the sample temperature, from `seed`."""
        p, student = self.policy, self.accelerator.unwrap_model(model)
        started, training = time.perf_counter(), student.training
        student.eval()  # no dropout; its KV cache on (gradient checkpointing is for training only)
        devices = [ids.device] if ids.device.type == "cuda" else []
        try:
            with real_heads(*self.head_models()), torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                rows = continue_rows(student, self.processing_class, ids[:, : p.prompt_tokens], p.new_tokens,
                                     p.sample_temperature)
        finally:
            student.train(training)
        self._generated[0] += time.perf_counter() - started
        self._generated[1] += rows.shape[0] * p.new_tokens
        self._samples = {"step": self.state.global_step + 1,  # as the step's log line counts it
                         "samples": [{"prompt": self.processing_class.decode(row[: p.prompt_tokens]),
                                      "continuation": self.processing_class.decode(row[p.prompt_tokens:])}
                                     for row in rows]}
        return rows.clone().to(ids.device)  # a plain tensor (sampled in inference mode), on the batch's device

    def on_policy_loss(self, model, ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, Any]:
        """alpha_ce x T^2 x the policy divergence between teacher and student on every token the student
        wrote (GKD); no next-token CE (the tokens are the student's own), no hidden-state terms."""
        s, start = self.recipe, self.policy.prompt_tokens - 1  # position start predicts the first sampled token
        rows = self.student_continuations(model, ids, seed)
        outputs = model(input_ids=rows, use_cache=False)
        with torch.no_grad():
            t_out = self.teacher(input_ids=rows, use_cache=False)
        student, teacher = outputs.logits[:, start:-1], t_out.logits[:, start:-1]
        weight = s.alpha_ce * s.temperature**2
        chunk = self.chunk_rows(student.shape[0] * student.shape[1], self.vocab)
        if self.fused_head:  # hidden states: the heads applied chunk by chunk
            unlabelled = torch.full(student.shape[:2], -100, device=rows.device)
            loss, (_, kd) = fused_head_loss(self.policy_step, student, self.head_weight, unlabelled, (teacher, None),
                                            self.teacher_weight, (0.0, weight), chunk)
        else:
            kd = kd_loss(self.policy_div, in_vocab(student, self.vocab), in_vocab(teacher, self.vocab),
                         torch.ones(student.shape[:2], device=rows.device), s.temperature,
                         max(1, chunk // student.shape[0]))
            loss = weight * kd
        self.record(on_policy_kd=kd)
        return loss, outputs

    def cross_tokenizer_loss(self, model, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """A teacher with another tokenizer (`heal.cross_tokenizer`): alpha_clm x the student's next-token CE
        + alpha_ce x T^2 x the divergence (ULD) between the two models' distributions where both have read
        the same text."""
        s, ids = self.recipe, inputs["input_ids"]
        outputs = model(input_ids=ids, use_cache=False)
        # the teacher's rows are padded to twice the block: it reads them up to the last aligned position
        length = max(1, int(inputs["align_teacher"].max()) + 1)
        with torch.no_grad():
            teacher = self.teacher(input_ids=inputs["teacher_ids"][:, :length], use_cache=False).logits
        teacher = teacher[..., : self.teacher_vocab]
        ce = causal_lm_loss(outputs.logits, inputs["labels"])
        kd = aligned_kd_loss(self.div, in_vocab(outputs.logits, self.vocab), teacher, inputs["align_student"],
                             inputs["align_teacher"], s.temperature, self.chunk_rows(ids.numel(), self.teacher_vocab))
        self.record(ce=ce, kd=kd)
        return s.alpha_clm * ce + s.alpha_ce * s.temperature**2 * kd, outputs

    def train(self, resume_from_checkpoint=None, **kwargs: Any):
        if self.policy.on_policy and self.is_world_process_zero():  # the samples kept up to the checkpoint
            self.samples = MetricsFile(Path(self.args.output_dir).parent / "samples.jsonl",
                                       checkpoint_step(resume_from_checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Training log lines carry the sampling's seconds and tokens since the last one; the last
        on-policy batch's samples go to samples.jsonl."""
        if "loss" in logs and self.policy.on_policy:
            logs["generation_s"], logs["generated_tokens"] = round(self._generated[0], 3), self._generated[1]
            self._generated = [0.0, 0]
            if self.samples is not None and self._samples:
                self.samples.add(self._samples)
            self._samples = None
        super().log(logs, *args, **kwargs)

    def run_metrics(self, logged: list[dict[str, Any]]) -> dict[str, Any]:
        """An on-policy run's sampling cost beside its training time (summed over every log line)."""
        if not self.policy.on_policy:
            return {}
        return {"generation": {"seconds": sum(r.get("generation_s", 0.0) for r in logged),
                               "tokens": sum(r.get("generated_tokens", 0) for r in logged)}}

    def unfused_ce_and_kd(self, logits, labels, inputs, t_out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CE and KD from the full (B, T, V) logits (where the fused head is off)."""
        s = self.recipe
        mask = torch.ones(labels.shape, device=labels.device)
        chunk = max(1, self.chunk_rows(labels.numel(), self.vocab) // labels.shape[0])
        if "teacher_idx" in inputs and s.temperature == 1.0:
            # T = 1: the KD term shares the CE's log-softmax: one full-vocabulary softmax, not two
            ce, kd = ce_and_sparse_kd(self.div, logits, labels, inputs["teacher_idx"], inputs["teacher_logp"], mask)
        elif "teacher_idx" in inputs:  # cached teacher: top-k log-probs at the cache's temperature
            ce = causal_lm_loss(logits, labels)
            kd = sparse_kd_loss(self.div, in_vocab(logits, self.vocab), inputs["teacher_idx"], inputs["teacher_logp"],
                                mask, s.temperature, chunk)
        else:
            ce = selective_lm_loss(logits, in_vocab(t_out.logits, self.vocab), labels, s.clm_keep)
            if not s.alpha_ce:  # no KD term: its full-vocabulary softmaxes are not computed
                return ce, {}
            kd = kd_loss(self.div, in_vocab(logits, self.vocab), in_vocab(t_out.logits, self.vocab), mask, s.temperature,
                         chunk)
        return ce, {"kd": kd}


# ----------------------------------------------------------------------------- the local stage


LOCAL_BLOCKS = ("before", "after", "both")


def local_pairs(kept: list[int], n_teacher: int, side: str = "before") -> list[list[tuple[int, int, int]]]:
    """The local stage's tasks, (student block, teacher state it is fed, teacher state it must
    reproduce), grouped in passes where no block appears twice. Teacher state k enters teacher
    block k. For a removed span first..last: the kept block before it (teacher first - 1) is fed
    state first - 1 and must reproduce state last + 1 (after the span); the kept block after it
    (teacher last + 1) is fed state first (entering the span) and must reproduce state last + 2."""
    spans = removed_spans(n_teacher, kept)
    before = [(kept.index(first - 1), first - 1, last + 1) for first, last in spans if first > 0]
    after = [(kept.index(last + 1), first, last + 2) for first, last in spans if last + 1 < n_teacher]
    passes = {"before": [before], "after": [after], "both": [before, after]}[side]
    return [p for p in passes if p]


def block_outputs(model, ids: torch.Tensor, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Each block j of `inputs` run on inputs[j] in place of its own input, in one forward pass of
    `model` stopped after the last of them: {j: block j's output}."""
    blocks, got, last = blocks_of(model), {}, max(inputs)

    def swap(j: int):
        def hook(_module, args, kwargs):
            if args:
                return (inputs[j].to(args[0].dtype), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": inputs[j].to(kwargs["hidden_states"].dtype)}
        return hook

    def keep(j: int):
        def hook(_module, _args, output):
            got[j] = output[0] if isinstance(output, tuple) else output
            if j == last:
                raise StopForward
        return hook

    hooks = [blocks[j].register_forward_pre_hook(swap(j), with_kwargs=True) for j in inputs]
    hooks += [blocks[j].register_forward_hook(keep(j)) for j in inputs]
    try:
        model(input_ids=ids, use_cache=False)
    except StopForward:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return got


class LocalTrainer(LMTrainer):
    """The local stage (LLM-Streamline, Puzzle): each block beside a removed span learns, from the
    teacher's residual stream, to reproduce the teacher's stream after it (normalised MSE; the
    tasks of `local_pairs`, one forward pass per group); all other weights are frozen. Held-out
    evaluation is the plain LM loss."""

    def __init__(self, *args: Any, teacher, passes: list[list[tuple[int, int, int]]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.teacher, self.passes = teacher.eval().requires_grad_(False).to(self.args.device), passes

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        if not model.training:
            outputs = model(input_ids=ids, use_cache=False)
            loss = self.lm_loss(outputs.logits, inputs["labels"])
            return (loss, outputs) if return_outputs else loss
        wanted = {k for pairs in self.passes for _, fed, target in pairs for k in (fed, target)}
        states, _ = capture(self.teacher, ids, wanted, set(), ids.shape[0], on_device=True)
        losses = []
        for pairs in self.passes:
            outputs = block_outputs(model, ids, {j: states[fed] for j, fed, _ in pairs})
            losses += [normalised_mse(outputs[j], states[target]) for j, _, target in pairs]
        loss = sum(losses) / len(losses)
        self.record(local=loss)
        return loss
