"""Checks on the real SmolLM2-135M teacher (marked slow: about a minute on 2 cores)."""

from __future__ import annotations

import pytest
import torch

from lmshrink.architectures import blocks_of
from lmshrink.compress.importance import score
from lmshrink.compress.truncation import select_layers, truncate_model
from lmshrink.data.sources import Framing, calibration_rows, token_stream
from lmshrink.evaluate.measure import count_parameters
from lmshrink.evaluate.perplexity import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher():
    from lmshrink.models import load

    return load("smollm2-135m")


def test_embedded_teacher_loads_from_the_gguf(teacher):
    assert teacher.model.config.model_type == "llama"
    assert len(blocks_of(teacher.model)) == 30
    assert round(count_parameters(teacher.model) / 1e6, 1) == 134.5
    assert teacher.source.endswith(tuple("0123456789abcdef"))  # the cached safetensors folder


def test_real_teacher_truncation_invariants(teacher):
    ids = torch.tensor([teacher.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        full = teacher.model(input_ids=ids).logits
        assert torch.equal(truncate_model(teacher.model, list(range(30)))(input_ids=ids).logits, full)


def test_importance_beats_alt_and_bottom_before_training(teacher):
    rows = calibration_rows("python-docs/library", teacher.tokenizer, 1024, 512)
    scores = score(teacher.model, rows, batch_size=2, ppl=False)
    heldout = token_stream("kernel-docs/process", teacher.tokenizer, 1024)
    ppl = {}
    for strategy in ("importance", "alt", "bottom"):
        keep = select_layers(30, strategy, 24, scores=scores)
        ppl[strategy] = perplexity(truncate_model(teacher.model, keep), heldout, 512, 512, 2,
                                   framing=Framing.of(teacher.tokenizer))
    assert ppl["importance"] < ppl["alt"] / 5 and ppl["importance"] < ppl["bottom"] / 5, ppl
