"""A student made of a subset of the teacher's blocks: which blocks to keep, and the cut itself.

Embeddings, position embeddings, final norm and LM head are copied from the teacher (tied
weights stay tied); block i of the student is the teacher's block keep[i]. The student is
built from the teacher's config with the depth and per-layer fields re-indexed (see
`lmshrink.architectures`), so its blocks carry their new indices.

Strategies (n teacher blocks, k kept), as in the paper's code and generalised to any depth:
  alt        every (n/k)-th block from the bottom: 12 -> 6 keeps 0,2,4,6,8,10
  distil     evenly spread, first and last kept (DistilGPT-2's init): 0,2,4,7,9,11
  bottom     the first k blocks            top   the last k blocks
  importance drop the least important blocks by a score of `lmshrink.compress.importance`
  keep       an explicit list
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from lmshrink.architectures import architecture_of, blocks_of, get_path, set_path, student_config
from lmshrink.compress.importance import METRICS
from lmshrink.errors import LmshrinkError


class LayerSelectionError(LmshrinkError, ValueError):
    pass


def _alt(n: int, k: int, scores: dict | None) -> list[int]:
    return [i * n // k for i in range(k)]


def _distil(n: int, k: int, scores: dict | None) -> list[int]:
    if k == 1:
        return [0]
    return [int(i * (n - 1) / (k - 1) + 0.5) for i in range(k)]


def _bottom(n: int, k: int, scores: dict | None) -> list[int]:
    return list(range(k))


def _top(n: int, k: int, scores: dict | None) -> list[int]:
    return list(range(n - k, n))


def importance_keep(scores: dict[str, Any], k: int, metric: str = "block_influence") -> list[int]:
    """Blocks to keep by importance: drop the n-k lowest-scoring blocks, or for
    `angular_distance` the run of n-k consecutive blocks whose input and output differ least."""
    n = scores["num_layers"]
    if metric == "angular_distance":
        if k == n:
            return list(range(n))
        runs = scores["angular_distance"][str(n - k)]
        start = min(range(len(runs)), key=runs.__getitem__)
        return [i for i in range(n) if not start <= i < start + n - k]
    if metric not in scores:
        raise LayerSelectionError(
            f"the scores hold no {metric!r}; known metrics: {', '.join(m for m in METRICS if m in scores)} "
            "(ppl_increase needs score-layers run with --ppl)")
    ranked = sorted(range(n), key=lambda i: scores[metric][i], reverse=True)
    return sorted(ranked[:k])


STRATEGIES: dict[str, Callable[[int, int, dict | None], list[int]]] = {
    "alt": _alt,
    "distil": _distil,
    "bottom": _bottom,
    "top": _top,
    "importance": lambda n, k, scores: importance_keep(scores, k),  # metric chosen in select_layers
}


def select_layers(n: int, strategy: str, num_layers: int | None = None, keep: list[int] | None = None,
                  scores: dict | None = None, metric: str = "block_influence") -> list[int]:
    """The sorted teacher block indices a student keeps."""
    if keep is not None:
        validate_keep(keep, n)
        return list(keep)
    if strategy not in STRATEGIES:
        raise LayerSelectionError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}, or give --keep")
    k = num_layers if num_layers is not None else max(1, n // 2)
    if not 1 <= k <= n:
        raise LayerSelectionError(f"cannot keep {k} blocks of a {n}-block teacher; choose 1..{n}")
    if strategy == "importance":
        if scores is None:
            raise LayerSelectionError("strategy 'importance' needs scores (from `lmshrink score-layers`)")
        if scores["num_layers"] != n:
            raise LayerSelectionError(f"the scores are for a {scores['num_layers']}-block model, the teacher has {n}")
        chosen = importance_keep(scores, k, metric)
    else:
        chosen = STRATEGIES[strategy](n, k, scores)
    validate_keep(chosen, n)
    return chosen


def validate_keep(keep: list[int], n: int) -> None:
    if not keep:
        raise LayerSelectionError("keep at least one block")
    bad = [i for i in keep if not 0 <= i < n]
    if bad:
        raise LayerSelectionError(f"block index {bad[0]} is out of range: the teacher has blocks 0..{n - 1}")
    dup = sorted({i for i in keep if keep.count(i) > 1})
    if dup:
        raise LayerSelectionError(f"block {dup[0]} is listed twice; list each block once")
    if keep != sorted(keep):
        raise LayerSelectionError(f"list the blocks in increasing order (got {keep}); reordering blocks is not supported")


def truncate_model(teacher, keep: list[int]):
    """A new model holding copies of the teacher's blocks `keep`, and the teacher's non-block weights
    themselves (the embeddings, final norm and head: no repair edits them, and on a large vocabulary
    they are most of the model: 168M of Gemma-3-270M's 268M parameters). Built on the meta device,
    so no random weights are made only to be overwritten."""
    arch = architecture_of(teacher.config)
    n = len(blocks_of(teacher))
    validate_keep(keep, n)
    config = student_config(teacher.config, keep)
    with torch.device("meta"):
        student = type(teacher)(config)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    # Rename teacher block keep[j] -> student block j; everything else keeps its name.
    prefix = arch.blocks + "."
    new_index = {old: new for new, old in enumerate(keep)}

    def renamed(key: str) -> str | None:
        """The student's name of a teacher's parameter, buffer or module (None: in a dropped block)."""
        if not key.startswith(prefix):
            return key
        index, *rest = key[len(prefix):].split(".", 1)
        return ".".join([f"{prefix}{new_index[int(index)]}", *rest]) if int(index) in new_index else None

    state = {new: value.clone() if new.startswith(prefix) else value  # (state_dict's tensors are detached)
             for key, value in teacher.state_dict().items() if (new := renamed(key)) is not None}
    student.load_state_dict(state, strict=True, assign=True)
    own = dict(student.named_buffers())  # buffers kept out of the state dict (rotary frequencies), which may be
    for name, buffer in teacher.named_buffers():  # fewer (Gemma 3 keeps one per attention kind its blocks use)
        if (new := renamed(name)) in own and own[new].is_meta:
            set_path(student, new, buffer.clone())
    own_modules = dict(student.named_modules())
    for path, module in teacher.named_modules():  # plain tensor attributes too (a rotary's original_inv_freq)
        target = own_modules.get(renamed(path))
        for attr, value in vars(target).items() if target is not None else ():
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(target, attr, getattr(module, attr).clone())
    if meta := [name for name, t in [*student.named_parameters(), *student.named_buffers()] if t.is_meta]:
        raise RuntimeError(f"the student's {', '.join(meta)} have no teacher counterpart")
    student.tie_weights()
    student.eval()
    for j, block in enumerate(blocks_of(student)):
        for attr in arch.layer_index:
            if get_path(block, attr) != j:
                raise RuntimeError(f"block {j} of the student has {attr} = {get_path(block, attr)}")
    return student
