"""`lmshrink pretrain`: heal a truncated student with the plain causal-LM loss (the paper's method).

The authors continued pre-training their 6-block GPT-2 on cleaned OpenWebText with the
ordinary next-token loss and no teacher: block 1024, 4 epochs, lr 5e-5 (the HF default),
DeepSpeed ZeRO-2. `configs/paper-gpt2-alt6-pretrain.yaml` is that recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmshrink.heal.args import HealSettings
from lmshrink.heal.corpus import prepare_data
from lmshrink.heal.memory import check_fits
from lmshrink.heal.runs import carry_on
from lmshrink.heal.training import LMTrainer, train


@dataclass(kw_only=True)
class PretrainSettings(HealSettings):
    """Continue pre-training a (truncated) student with the causal-LM loss."""


class CausalLMTrainer(LMTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
        loss = self.lm_loss(outputs.logits, inputs["labels"])
        return (loss, outputs) if return_outputs else loss


def run(settings: PretrainSettings) -> dict[str, Any]:
    if (done := carry_on(settings)) is not None:  # before any model or data is loaded
        return done["metrics"]
    checked = settings.load.check(settings.model)
    check_fits(checked[1], None, settings)  # before the model loads
    student = settings.load.load(settings.model, checked=checked)
    train_data, heldout = prepare_data(settings.corpus, student.tokenizer)
    return train(settings, "pretrain", CausalLMTrainer, student.model, student.tokenizer, train_data, heldout)
