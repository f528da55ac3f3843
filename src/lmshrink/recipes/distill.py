"""`lmshrink distill`: heal a student with a frozen teacher (the DistilGPT-2 recipe and modern KD losses).

loss = alpha_ce * T^2 * KD(p_t^T, p_s^T) + alpha_clm * CE(s, next token)
       + alpha_cos * (1 - cos(h_s, h_t)) on the last hidden states
       + alpha_inter * hidden-state loss over a student->teacher layer map

KD is any divergence of `lmshrink.losses.DIVERGENCES`, computed in chunks along the sequence.
Defaults are the DistilGPT-2 recipe (PAPER.md): T 2, alpha_ce 5, alpha_clm 2, alpha_cos 1,
lr 2.5e-4, warm-up 5%, Adam eps 1e-6, gradient norm 5. With `--teacher-cache DIR` (from
`lmshrink cache-teacher`) the teacher is not loaded at all: KD uses its stored top-k.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from lmshrink.architectures import blocks_of
from lmshrink.config import SettingsError, check, group, setting
from lmshrink.errors import one_of
from lmshrink.heal.args import HealSettings, TrainArgs
from lmshrink.heal.corpus import cap_heldout, prepare_data, prepare_heldout
from lmshrink.heal.cross_tokenizer import aligned_share, pair_with_teacher
from lmshrink.heal.distill import (
    DISTILGPT2_OPTIMISER,
    LOCAL_BLOCKS,
    RECIPES,
    DistillTrainer,
    KDArgs,
    LocalTrainer,
    OnPolicyArgs,
    check_vocabularies,
    layer_pairs,
    local_pairs,
    same_vocabulary,
)
from lmshrink.heal.memory import check_fits
from lmshrink.heal.runs import carry_on
from lmshrink.heal.teacher_cache import open_cache
from lmshrink.heal.training import train
from lmshrink.records import count, read_record


@dataclass(kw_only=True)
class DistillSettings(HealSettings):
    """Train a student against a frozen teacher (online, or from a teacher cache)."""

    train: TrainArgs = group(lambda: TrainArgs(**DISTILGPT2_OPTIMISER),
                             "optimiser, schedule, precision and checkpoints (defaults: DistilGPT-2's optimiser)")
    kd: KDArgs = group(KDArgs, "the teacher and the distillation loss (defaults: the DistilGPT-2 recipe)")
    policy: OnPolicyArgs = group(OnPolicyArgs, "on-policy steps (GKD): the student's own continuations, scored by "
                                               "the teacher")
    recipe: str = setting("distilgpt2", f"named healing recipe, setting the loss and optimiser settings it names "
                                        f"(each can still be given): {', '.join(RECIPES)}")
    local_steps: int = setting(0, "first train only the blocks beside each removed span (--local-blocks), on the "
                                  "teacher's residual stream, to reproduce the teacher's stream after them "
                                  "(normalised MSE), for this many steps (in OUTPUT/local); then the whole student")
    local_lr: float | None = setting(None, "learning rate of the local stage (default: --lr)")
    local_blocks: str = setting("before", "which kept blocks the local stage trains: before (the block before each "
                                          "removed span does its own work and the span's), after (the block after "
                                          "it does), or both (each on its own task)")

    PRESETS: ClassVar = ("recipe", RECIPES)

    def problems(self) -> list[str]:
        problems = super().problems()
        problems += one_of("recipe", self.recipe, RECIPES)
        if self.local_steps < 0 or (self.local_lr is not None and not self.local_lr > 0):
            problems.append("local_steps, local_lr: 0 or more steps, a positive learning rate")
        if self.local_blocks not in LOCAL_BLOCKS:
            problems.append(f"local_blocks: {self.local_blocks!r} is not one of {', '.join(LOCAL_BLOCKS)}")
        if self.local_steps and self.kd.teacher_cache:
            problems.append("local_steps: the local stage needs the teacher's hidden states; give --teacher, "
                            "not --teacher-cache")
        if self.policy.on_policy and self.kd.teacher_cache:
            problems.append("on_policy: the teacher scores the student's own continuations, which no cache holds; "
                            "give --teacher, not --teacher-cache")
        if self.policy.on_policy and self.policy.prompt_tokens + self.policy.new_tokens > self.corpus.block_size:
            problems.append(f"prompt_tokens + new_tokens: {self.policy.prompt_tokens} + {self.policy.new_tokens} is "
                            f"longer than a training block ({self.corpus.block_size} tokens); shorten either, or "
                            f"raise --block-size")
        if self.kd.teacher_cache:  # the cache holds the training blocks
            problems = [p for p in problems if not p.startswith("data:")]
        return problems


def run(settings: DistillSettings) -> dict[str, Any]:
    if (done := carry_on(settings)) is not None:  # before any model or data is loaded
        return done["metrics"]
    kd, corpus = settings.kd, settings.corpus
    # both models checked before either loads (each check read once: handed to its load)
    checked = {name: settings.load.check(name)
               for name in (settings.model, *([] if kd.teacher_cache else [kd.teacher]))}
    check_fits(checked[settings.model][1], None if kd.teacher_cache else checked[kd.teacher][1], settings)
    student = settings.load.load(settings.model, checked=checked[settings.model])
    kept = (read_record(student.source) or {}).get("kept_layers")
    if kd.teacher_cache:
        cache = open_cache(kd.teacher_cache, kd.temperature)
        if cache.record.get("sampled") and kd.loss != "forward_kl":
            check([f"loss: {kd.teacher_cache} holds sampled tokens, an unbiased estimate of the teacher only for the "
                   f"forward KL; use --loss forward_kl (not {kd.loss}), or a top-k cache"])
        teacher, vocab = None, check_vocabularies(student.tokenizer, cache.tokenizer, student.model.config,
                                                  student.model.config)
        if cache.block_size != corpus.block_size:
            check([f"block_size: the cache holds {cache.block_size}-token blocks; use --block-size {cache.block_size}"])
        train_data = cache.dataset
        # --eval-data is scored by the student itself, so it needs no teacher logits: it wins over the
        # cache's own held-out blocks
        heldout = prepare_heldout(corpus, student.tokenizer) if corpus.eval_data else cap_heldout(cache.heldout, corpus)
        if heldout is None:
            print("[lmshrink] distill: the cache holds no held-out blocks and no --eval-data was given, "
                  "so held-out perplexity is not measured", flush=True)
        teacher_name = cache.record.get("teacher")
    else:
        loaded = settings.load.load(kd.teacher, checked=checked[kd.teacher])
        teacher, teacher_name = loaded.model, kd.teacher
        if not same_vocabulary(student.tokenizer, loaded.tokenizer):  # another tokenizer: ULD on aligned text
            return cross_tokenizer(settings, student, loaded, kept)
        vocab = check_vocabularies(student.tokenizer, loaded.tokenizer, student.model.config, teacher.config)
        if kd.alpha_cos > 0 or kd.alpha_inter > 0:
            if student.model.config.hidden_size != teacher.config.hidden_size:
                check([f"alpha_cos/alpha_inter: hidden sizes differ (student {student.model.config.hidden_size}, "
                       f"teacher {teacher.config.hidden_size}); set both to 0"])
        if kd.alpha_inter > 0:  # the layer map is checked on the models once, before any data is prepared
            layer_pairs(kd.layer_map, student.model.config.num_hidden_layers, teacher.config.num_hidden_layers,
                        kept, random.Random(corpus.seed))
        train_data, heldout = prepare_data(corpus, student.tokenizer)
    if settings.local_steps:
        student = local_stage(settings, student, teacher, kept, train_data, heldout)
    return train(settings, "distill", DistillTrainer, student.model, student.tokenizer, train_data, heldout,
                 extra_record={"distill_teacher": teacher_name}, teacher=teacher, recipe=kd,
                 vocab=vocab, kept=kept, policy=settings.policy)


def cross_tokenizer(settings: DistillSettings, student, teacher, kept: list[int] | None) -> dict[str, Any]:
    """Distil from a teacher with another tokenizer: each block re-read in the teacher's tokens, ULD's
    distance where both models have read the same text (`heal.cross_tokenizer`), beside the student's CE."""
    kd, corpus = settings.kd, settings.corpus
    said = "the teacher's tokenizer is not the student's"
    problems = [] if kd.loss == "uld" else [
        f"loss: {said}, so their next-token distributions are over different tokens and {kd.loss} cannot compare "
        f"them; use --loss uld (ULD's sorted-probability distance, at positions where both have read the same text)"]
    if kd.alpha_cos > 0 or kd.alpha_inter > 0:
        problems.append(f"alpha_cos/alpha_inter: {said}, so their hidden states are at different positions; set "
                        f"both to 0")
    if kd.clm_keep < 1:
        problems.append(f"clm_keep: {said}, so the teacher's loss on the student's tokens is not defined; leave "
                        f"--clm-keep out")
    if settings.policy.on_policy:
        problems.append(f"on_policy: {said}; on-policy steps need a teacher with the student's tokenizer")
    if settings.local_steps:
        problems.append(f"local_steps: {said}; the local stage needs the teacher the student was cut from")
    check(problems)
    vocab = check_vocabularies(student.tokenizer, student.tokenizer, student.model.config, student.model.config)
    teacher_vocab = check_vocabularies(teacher.tokenizer, teacher.tokenizer, teacher.model.config, teacher.model.config)
    train_data, heldout = prepare_data(corpus, student.tokenizer)
    train_data = pair_with_teacher(train_data, student.tokenizer, teacher.tokenizer, corpus.block_size,
                                   corpus.num_proc)
    print(f"[lmshrink] {said} ({teacher_vocab:,} tokens against {vocab:,}): the teacher reads each block in its own "
          f"tokens; {aligned_share(train_data):.0%} of the student's positions have read the same text as a teacher "
          f"position and are distilled there (ULD)", flush=True)
    return train(settings, "distill", DistillTrainer, student.model, student.tokenizer, train_data, heldout,
                 extra_record={"distill_teacher": settings.kd.teacher, "cross_tokenizer": True},
                 teacher=teacher.model, recipe=kd, vocab=vocab, kept=kept, teacher_vocab=teacher_vocab)


def local_stage(settings: DistillSettings, student, teacher, kept: list[int] | None, train_data, heldout):
    """Run (or reuse, if finished with the same settings) the local stage in OUTPUT/local; the student
    it wrote, loaded, is where the global stage starts."""
    if teacher.config.hidden_size != student.model.config.hidden_size or not kept:
        raise SettingsError("local_steps: the local stage matches residual streams block by block, so it needs a "
                            "student cut from this teacher by `lmshrink truncate` (same hidden size, its kept blocks "
                            "in its record); leave --local-steps out")
    passes = local_pairs(kept, teacher.config.num_hidden_layers, settings.local_blocks)
    trained = sorted({j for pairs in passes for j, _, _ in pairs})
    if not trained:
        raise SettingsError(f"local_steps: no removed span has a kept block to train on that side (--local-blocks "
                            f"{settings.local_blocks}); choose another side or leave --local-steps out")
    folder = Path(settings.output) / "local"
    local = dataclasses.replace(settings, output=str(folder), local_steps=0, train=dataclasses.replace(
        settings.train, max_steps=settings.local_steps, max_tokens=None, lr=settings.local_lr or settings.train.lr,
        compile="off", freeze=[]))  # the stage's hooks stop the forward pass midway; it chooses what trains
    if carry_on(local) is None:
        student.model.requires_grad_(False)
        for j in trained:
            blocks_of(student.model)[j].requires_grad_(True)
        print(f"[lmshrink] local stage: blocks {', '.join(map(str, trained))} of the student ({settings.local_blocks} "
              f"each removed span) learn the teacher's residual stream, {count(settings.local_steps, 'step')}",
              flush=True)
        train(local, "distill (local stage)", LocalTrainer, student.model, student.tokenizer, train_data, heldout,
              teacher=teacher, passes=passes)
    return settings.load.load(str(folder / "model"))
