"""Width pruning (Minitron, arXiv 2407.14679): score attention heads, MLP channels and hidden
channels by their activations on calibration text, keep the best, and slice the weights.

Activation importance, summed over calibration tokens (Minitron section 2.2):
  - head h of layer l:  mean over tokens of ||attn_out_{l,h}||_2, the head's output before the
    output projection;
  - MLP channel c of layer l: mean over tokens of |a_{l,c}|, the activation entering the down
    projection;
  - hidden channel d: the sum over every block norm of mean |LN(x)_d| (the normalised residual
    stream each sub-layer reads).

`WIDTH` says, per architecture, which weights hold each axis. Counts are the same in every
layer (the config stays uniform); which units are kept differs per layer. For grouped-query
attention, `kv_heads` key/value groups are kept (by the summed score of their query heads) and
`heads / kv_heads` query heads in each kept group.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmshrink.architectures import blocks_of
from lmshrink.errors import LmshrinkError
from lmshrink.records import save_figure


class WidthError(LmshrinkError, ValueError):
    """A width request the architecture cannot take; the message says what would fit."""


@dataclass(frozen=True)
class WidthLayout:
    """Where one architecture keeps each width axis.

    `heads_in` / `mlp_in` are the modules (inside a block) whose *input* is the concatenated
    head outputs / the MLP activation; `norms` the block norms whose outputs are the hidden
    channels; `fields` the config names of hidden, intermediate, heads, key/value heads;
    `slice` maps (parameter name, tensor, Plan) -> the kept part."""

    heads_in: str
    mlp_in: str
    norms: tuple[str, ...]
    fields: dict[str, str]
    slice: Callable[[str, torch.Tensor, Plan], torch.Tensor]
    fused_qkv: bool = False  # GPT-2: query, key and value share one width with the residual stream


@dataclass
class Plan:
    """The units kept: hidden channels, and per layer query heads, key/value heads and MLP channels."""

    hidden: list[int]
    heads: list[list[int]]
    kv_heads: list[list[int]]
    mlp: list[list[int]]
    head_dim: int

    def rows(self, heads: list[int]) -> torch.Tensor:
        """Indices of the weight rows (or columns) holding `heads`."""
        return torch.tensor([h * self.head_dim + i for h in heads for i in range(self.head_dim)], dtype=torch.long)


def _layer(name: str) -> int | None:
    found = re.search(r"\.(?:layers|h)\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def _llama_slice(name: str, w: torch.Tensor, plan: Plan) -> torch.Tensor:
    hidden = torch.tensor(plan.hidden, dtype=torch.long)
    i = _layer(name)
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return w[:, hidden]
    if re.search(r"(input_layernorm|post_attention_layernorm|model\.norm)\.weight$", name):
        return w[hidden]
    if i is None:
        return w
    q, kv, mlp = plan.rows(plan.heads[i]), plan.rows(plan.kv_heads[i]), torch.tensor(plan.mlp[i], dtype=torch.long)
    if ".q_proj." in name:
        return w[q][:, hidden] if w.dim() == 2 else w[q]
    if ".k_proj." in name or ".v_proj." in name:
        return w[kv][:, hidden] if w.dim() == 2 else w[kv]
    if ".o_proj." in name:
        return w[hidden][:, q] if w.dim() == 2 else w[hidden]
    if ".gate_proj." in name or ".up_proj." in name:
        return w[mlp][:, hidden] if w.dim() == 2 else w[mlp]
    if ".down_proj." in name:
        return w[hidden][:, mlp] if w.dim() == 2 else w[hidden]
    return w  # e.g. Qwen3's per-head q_norm / k_norm (head_dim wide): untouched


def _gpt2_slice(name: str, w: torch.Tensor, plan: Plan) -> torch.Tensor:
    """GPT-2's Conv1D weights are (in, out); c_attn's output is [query | key | value]."""
    hidden = torch.tensor(plan.hidden, dtype=torch.long)
    i = _layer(name)
    if name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")):
        return w[:, hidden]
    if re.search(r"(ln_1|ln_2|ln_f)\.(weight|bias)$", name):
        return w[hidden]
    if i is None:
        return w
    heads, mlp = plan.rows(plan.heads[i]), torch.tensor(plan.mlp[i], dtype=torch.long)
    if ".attn.c_attn." in name:
        width = w.shape[-1] // 3
        qkv = torch.cat([heads + k * width for k in range(3)])
        return w[hidden][:, qkv] if w.dim() == 2 else w[qkv]
    if ".attn.c_proj." in name:
        return w[heads][:, hidden] if w.dim() == 2 else w[hidden]
    if ".mlp.c_fc." in name:
        return w[hidden][:, mlp] if w.dim() == 2 else w[mlp]
    if ".mlp.c_proj." in name:
        return w[mlp][:, hidden] if w.dim() == 2 else w[hidden]
    return w


_LLAMA = WidthLayout(
    heads_in="self_attn.o_proj", mlp_in="mlp.down_proj", norms=("input_layernorm", "post_attention_layernorm"),
    fields={"hidden": "hidden_size", "intermediate": "intermediate_size", "heads": "num_attention_heads",
            "kv_heads": "num_key_value_heads"},
    slice=_llama_slice)

# model_type -> layout. Others are refused: Phi-3 fuses q/k/v and gate/up, Gemma scales the
# embeddings by sqrt(hidden) and adds norms, GPT-NeoX interleaves q/k/v per head.
WIDTH: dict[str, WidthLayout] = {
    "gpt2": WidthLayout(heads_in="attn.c_proj", mlp_in="mlp.c_proj", norms=("ln_1", "ln_2"),
                        fields={"hidden": "n_embd", "intermediate": "n_inner", "heads": "n_head"},
                        slice=_gpt2_slice, fused_qkv=True),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "smollm3": _LLAMA,
}


def layout_of(config: Any) -> WidthLayout:
    kind = getattr(config, "model_type", None)
    if kind not in WIDTH:
        raise WidthError(f"width pruning supports {', '.join(WIDTH)}, not {kind!r}; prune its depth with "
                         "`lmshrink truncate` (or `lmshrink prune --num-layers` alone)")
    return WIDTH[kind]


def shape(config: Any) -> dict[str, int]:
    """The width of a model: hidden, intermediate, heads, kv_heads, head_dim, layers."""
    layout = layout_of(config)
    f = layout.fields
    hidden, heads = getattr(config, f["hidden"]), getattr(config, f["heads"])
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return {"hidden": hidden, "intermediate": getattr(config, f["intermediate"], None) or 4 * hidden,
            "heads": heads, "kv_heads": getattr(config, f["kv_heads"]) if "kv_heads" in f else heads,
            "head_dim": head_dim, "layers": config.num_hidden_layers}


def check_target(config: Any, target: dict[str, int]) -> list[str]:
    """Problems with a target width (hidden, intermediate, heads, kv_heads), each naming the fix."""
    have, layout = shape(config), layout_of(config)
    problems = []
    for axis in ("hidden", "intermediate", "heads", "kv_heads"):
        if not 1 <= target[axis] <= have[axis]:
            problems.append(f"{axis}: {target[axis]} is not in 1..{have[axis]} (the teacher's)")
    if problems:
        return problems
    if target["heads"] % target["kv_heads"]:
        problems.append(f"num_heads: {target['heads']} query heads do not split evenly over {target['kv_heads']} "
                        "key/value heads; give a multiple of --num-kv-heads")
    elif target["heads"] // target["kv_heads"] > have["heads"] // have["kv_heads"]:
        problems.append(f"num_heads: each key/value group holds at most {have['heads'] // have['kv_heads']} query "
                        f"heads; with {target['kv_heads']} groups, keep at most "
                        f"{target['kv_heads'] * (have['heads'] // have['kv_heads'])} heads")
    if layout.fused_qkv and target["hidden"] != target["heads"] * have["head_dim"]:
        problems.append(f"hidden_size: {config.model_type} keeps heads x head_dim = hidden size, so "
                        f"{target['heads']} heads of {have['head_dim']} need --hidden-size "
                        f"{target['heads'] * have['head_dim']} (or --num-heads {target['hidden'] // have['head_dim']} "
                        f"with a multiple of {have['head_dim']})")
    if not problems and hasattr(config, "validate"):  # the architecture's own config checks
        try:
            pruned_config(config, target).validate()
        except Exception as err:  # transformers raises its own validation error types
            problems.append(f"sizes: {config.model_type} refuses this shape: {str(err).splitlines()[-1].strip()}")
    return problems


# ----------------------------------------------------------------------------- importance


class WidthSums:
    """Each head's, MLP channel's and hidden channel's activation summed over the tokens that pass a
    block while it is `watching` (the whole model at once, or one block at a time), averaged by
    `result`."""

    def __init__(self, config: Any):
        self.layout, self.dims = layout_of(config), shape(config)
        n = self.dims["layers"]
        self.heads = torch.zeros(n, self.dims["heads"], dtype=torch.float64)
        self.mlp = torch.zeros(n, self.dims["intermediate"], dtype=torch.float64)
        self.hidden = torch.zeros(self.dims["hidden"], dtype=torch.float64)

    def _head(self, i: int):
        def hook(_module, args):
            x = args[0].float()  # (B, T, heads * head_dim)
            self.heads[i] += x.unflatten(-1, (-1, self.dims["head_dim"])).norm(dim=-1).flatten(0, 1).sum(0).double().cpu()
        return hook

    def _mlp(self, i: int):
        def hook(_module, args):
            self.mlp[i] += args[0].float().abs().flatten(0, 1).sum(0).double().cpu()  # (B, T, M) -> (M,)
        return hook

    def _norm(self, _module, _args, output):
        self.hidden.add_(output.float().abs().flatten(0, 1).sum(0).double().cpu())  # (B, T, H) -> (H,)

    @contextmanager
    def watching(self, i: int, block: nn.Module) -> Iterator[None]:
        """Block i's activations added up while inside."""
        hooks = [block.get_submodule(self.layout.heads_in).register_forward_pre_hook(self._head(i)),
                 block.get_submodule(self.layout.mlp_in).register_forward_pre_hook(self._mlp(i))]
        hooks += [block.get_submodule(name).register_forward_hook(self._norm) for name in self.layout.norms]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def result(self, tokens: int) -> dict[str, Any]:
        return {"tokens": tokens, "num_layers": self.dims["layers"], "shape": self.dims,
                "heads": (self.heads / tokens).tolist(), "mlp": (self.mlp / tokens).tolist(),
                "hidden": (self.hidden / tokens).tolist()}


@torch.no_grad()
def width_scores(model: nn.Module, rows: torch.Tensor, batch_size: int = 4) -> dict[str, Any]:
    """Activation importance of every head, MLP channel and hidden channel on calibration `rows` (N, T)."""
    sums = WidthSums(model.config)
    device = next(model.parameters()).device
    with ExitStack() as stack:
        for i, block in enumerate(blocks_of(model)):
            stack.enter_context(sums.watching(i, block))
        for start in range(0, rows.shape[0], batch_size):
            model.base_model(input_ids=rows[start : start + batch_size].to(device), use_cache=False)  # no logits
    return sums.result(rows.numel())


@torch.no_grad()
def width_scores_blockwise(runner) -> dict[str, Any]:
    """`width_scores` of a model read one block at a time (`compress.sequential.Blockwise`): the rows'
    stream passes each block once; one stream (rows x T x H x 4 bytes) held."""
    sums = WidthSums(runner.model.config)
    stream = runner.entering()
    n = len(runner.blocks)
    for i in range(n):
        with runner.block(i) as block, sums.watching(i, block):
            stream = runner.run(i, stream)
        print(f"  block {i:>2} of {n} scored", flush=True)
    return sums.result(runner.rows.numel())


SCORE_KEYS = ("tokens", "num_layers", "shape", "heads", "mlp", "hidden")


def _top(values: list[float] | torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest values, in ascending index order (ties: the lower index)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    return sorted(torch.sort(-values, stable=True).indices[:k].tolist())


def plan(scores: dict[str, Any], target: dict[str, int], layers: list[int] | None = None) -> Plan:
    """The highest-scoring units for `target` (hidden, intermediate, heads, kv_heads); `layers`:
    the teacher layers the student keeps (depth pruning), default all."""
    layers = list(range(scores["num_layers"])) if layers is None else layers
    dims = scores["shape"]
    per_group = dims["heads"] // dims["kv_heads"]
    keep_heads, keep_kv, keep_mlp = [], [], []
    for i in layers:
        head = torch.tensor(scores["heads"][i], dtype=torch.float64)
        groups = _top(head.view(dims["kv_heads"], per_group).sum(1), target["kv_heads"])
        q_per_group = target["heads"] // target["kv_heads"]
        keep_kv.append(groups)
        keep_heads.append([g * per_group + j for g in groups
                           for j in _top(head[g * per_group : (g + 1) * per_group], q_per_group)])
        keep_mlp.append(_top(scores["mlp"][i], target["intermediate"]))
    return Plan(hidden=_top(scores["hidden"], target["hidden"]), heads=keep_heads, kv_heads=keep_kv, mlp=keep_mlp,
                head_dim=dims["head_dim"])


# ----------------------------------------------------------------------------- slicing


def pruned_config(config: Any, target: dict[str, int]) -> Any:
    """A copy of `config` at the target width; head_dim kept explicit where the model reads it."""
    layout, have = layout_of(config), shape(config)
    new = copy.deepcopy(config)
    for axis, field in layout.fields.items():
        setattr(new, field, target[axis])
    if not layout.fused_qkv:
        new.head_dim = have["head_dim"]  # no longer hidden // heads once either is pruned
    return new


def prune_width(model: nn.Module, p: Plan, target: dict[str, int]) -> nn.Module:
    """A new model of the target width holding the kept slices of `model`'s weights (tied
    embeddings stay tied: one sliced tensor for both)."""
    from transformers import AutoModelForCausalLM

    layout = layout_of(model.config)
    config = pruned_config(model.config, target)
    state = {name: layout.slice(name, w, p).clone() for name, w in model.state_dict().items()}
    student = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise WidthError(f"pruned weights do not fit the pruned config (missing {missing}, unexpected {unexpected})")
    if tied:
        student.tie_weights()
    return student.eval()


def count_parameters_of(config: Any) -> int:
    """Parameters of a model of `config` (built on the meta device: no memory, no time)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors once


def _round(value: float, quantum: int, ceiling: int) -> int:
    return int(min(ceiling, max(quantum, quantum * round(value / quantum))))


def width_for(config: Any, params: int, layers: int | None = None) -> dict[str, int]:
    """The width whose model at `layers` depth is nearest `params`: hidden and intermediate scaled
    by one factor (Minitron's choice), the intermediate size then adjusted to the nearest step;
    heads kept (GPT-2: as many as the hidden size holds)."""
    have, layout = shape(config), layout_of(config)
    # hidden: whole heads on GPT-2; elsewhere a multiple of 8 and of the head count (transformers'
    # Llama config requires hidden % heads == 0 even with an explicit head_dim)
    quantum = have["head_dim"] if layout.fused_qkv else math.lcm(8, have["heads"])
    step = 64 if have["intermediate"] >= 512 else 8

    def target(scale: float, intermediate: int | None = None) -> dict[str, int]:
        hidden = _round(have["hidden"] * scale, quantum, have["hidden"])
        heads = hidden // have["head_dim"] if layout.fused_qkv else have["heads"]
        return {"hidden": hidden,
                "intermediate": intermediate or _round(have["intermediate"] * scale, step, have["intermediate"]),
                "heads": heads, "kv_heads": heads if layout.fused_qkv else have["kv_heads"]}

    def size(t: dict[str, int]) -> int:
        new = pruned_config(config, t)
        if layers is not None:
            new.num_hidden_layers = layers
        return count_parameters_of(new)

    lo, hi = 0.0, 1.0
    for _ in range(20):  # bisection on the scale: parameters grow with it
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if size(target(mid)) < params else (lo, mid)
    # the two hidden sizes around the target, each with every intermediate step
    candidates = [target(s, m) for s in (lo, hi) for m in [None, *range(step, have["intermediate"] + 1, step)]]
    return min(candidates, key=lambda t: (abs(size(t) - params), -t["hidden"]))


def depth_for(config: Any, params: int) -> int:
    """The depth whose model (full width) is nearest `params`."""
    def size(k: int) -> int:
        new = copy.deepcopy(config)
        new.num_hidden_layers = k
        return count_parameters_of(new)

    n = config.num_hidden_layers
    per_layer = (size(n) - size(1)) / max(1, n - 1)
    k = round((params - size(1)) / per_layer) + 1 if per_layer else n
    return int(min(n, max(1, k)))


def split_target(config: Any, params: int, axes: str) -> tuple[int, dict[str, int]]:
    """(depth, width) reaching `params` along `axes`: depth only, width only, or both (depth takes
    the square root of the reduction, width the rest)."""
    full = count_parameters_of(config)
    if axes == "depth":
        return depth_for(config, params), {k: v for k, v in shape(config).items() if k != "layers"}
    layers = config.num_hidden_layers
    if axes == "both":
        layers = max(1, round(layers * math.sqrt(params / full)))
    return layers, width_for(config, params, layers)


def plot_scores(scores: dict[str, Any], path: str | Path, title: str) -> None:
    """Heads (layer x head), MLP channels (per layer, sorted) and hidden channels (sorted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    image = axes[0].imshow(torch.tensor(scores["heads"]).T.numpy(), aspect="auto", cmap="viridis")
    axes[0].set(xlabel="layer", ylabel="head", title="attention heads: mean ||output||")
    fig.colorbar(image, ax=axes[0])
    mlp = torch.tensor(scores["mlp"])
    for i in range(mlp.shape[0]):
        axes[1].plot(torch.sort(mlp[i], descending=True).values.numpy(), color=plt.cm.viridis(i / max(1, mlp.shape[0] - 1)),
                     linewidth=0.8)
    axes[1].set(xlabel="MLP channel (sorted)", ylabel="mean |activation|", yscale="log",
                title="MLP channels per layer (dark: first)")
    axes[2].plot(torch.sort(torch.tensor(scores["hidden"]), descending=True).values.numpy())
    axes[2].set(xlabel="hidden channel (sorted)", ylabel="sum over norms of mean |x|", yscale="log",
                title="hidden (embedding) channels")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


AXES = ("width", "depth", "both")
"""What `lmshrink prune` (and `search`) can shrink: the width, the depth, or both."""
