"""Why the mean-update bias repairs the residual stream yet not the model: the blocks after a cut
make up for part of what it removed, so the full mean update over-corrects.

The real SmolLM2-135M cut 30 -> 24 by Block Influence (drops 13, 14, 15, 17, 25, 26). Fits on
16,384 tokens of python-docs/library (teacher activations); the forward KL from the teacher,
per token, on 4,096 held-out tokens of python-docs/tutorial, for: the plain cut; each span's
mean update as a bias, alone and all together, at full and reduced strength; ReplaceMe at full
and reduced strength. Also the residual-stream error where each span ends, per token.

    python bench/bias_shrink.py > docs/bench-bias-shrink.txt
"""

from __future__ import annotations

import torch

from lmshrink.compress.cut_search import CutSearch
from lmshrink.compress.repair import Moments, capture, fit_span, patched, removed_spans
from lmshrink.data.sources import calibration_rows
from lmshrink.models import load

DROPPED = (13, 14, 15, 17, 25, 26)


def main() -> None:
    teacher = load("smollm2-135m")
    model, tokenizer = teacher.model, teacher.tokenizer
    n = len(model.model.layers)
    keep = [i for i in range(n) if i not in DROPPED]
    held_out = CutSearch(model, calibration_rows("python-docs/tutorial", tokenizer, 4096, 512), "none", "kl")
    calib = calibration_rows("python-docs/library", tokenizer, 16384, 512)
    spans = removed_spans(n, keep)
    states, projs = capture(model, calib, {a for a, _ in spans} | {b + 1 for _, b in spans}, {a - 1 for a, _ in spans})

    def kl(edits: dict) -> float:
        with patched(model, edits):
            return held_out.score(keep)

    means = {a - 1: (states[b + 1] - states[a]).reshape(-1, states[a].shape[-1]).double().mean(0) for a, b in spans}
    print(f"forward KL from the teacher, per token, on {held_out.rows.numel():,} tokens of python-docs/tutorial")
    print(f"  plain cut                     {kl({}):.4f}")
    for scale in (1.0, 0.75, 0.5, 0.25):
        print(f"  mean-update bias x {scale:<4}      {kl({i: ('bias', m * scale) for i, m in means.items()}):.4f}")
    for i, m in means.items():
        print(f"  bias after block {i} only       {kl({i: ('bias', m)}):.4f}")
    held = calib.shape[0] // 8
    deltas = {}
    for a, b in spans:
        u, m = states[b + 1] - states[a], projs[a - 1]
        deltas[a - 1], _ = fit_span("replaceme", Moments.of(m[:-held], u[:-held]), Moments.of(m[-held:], u[-held:]))
    for scale in (1.0, 0.75, 0.5):
        print(f"  ReplaceMe x {scale:<4}             {kl({i: ('replaceme', d * scale) for i, d in deltas.items()}):.4f}")
    print("residual stream where each span ends (calibration tokens): per-token |error| / |teacher's stream|")
    for a, b in spans:
        u = (states[b + 1] - states[a]).reshape(-1, states[a].shape[-1])
        x = states[b + 1].reshape(-1, u.shape[-1])
        cut, bias = u.norm(dim=-1) / x.norm(dim=-1), (u - u.mean(0)).norm(dim=-1) / x.norm(dim=-1)
        print(f"  span {a}-{b}: median cut {cut.median():.3f}, with the bias {bias.median():.3f}; "
              f"tokens the bias makes worse {(bias > cut).float().mean():.1%}; "
              f"|mean update| / median |update| {u.mean(0).norm() / u.norm(dim=-1).median():.2f}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
