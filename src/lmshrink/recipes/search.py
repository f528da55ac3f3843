"""`lmshrink search`: for one target size, which student is best: shallower, narrower, or both?

The Minitron procedure (arXiv 2407.14679, section 2.3), sized for a CPU by default: score the
teacher once (`score-layers`: blocks, heads, MLP and hidden channels), build one candidate per
axis with `prune` at the same parameter count, heal each with the same short `distill` budget
(this command's `corpus`, `train` and `kd` groups, handed to every run unchanged), rank them by
held-out perplexity, and name the winner for full healing.

    output/scores/                  score-layers (scores.json, width_scores.json, charts)
    output/AXIS/student/            the pruned candidate (prune)
    output/AXIS/heal/model/         the candidate after the short healing (distill)
    output/report.{md,json,png}, lmshrink.json

Re-running resumes: finished stages with the same settings are reused, others re-run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmshrink.compress.cut import CHOICES, CutArgs
from lmshrink.compress.width import AXES
from lmshrink.config import Settings, group, setting, to_dict
from lmshrink.heal.args import TrainArgs, cpu_budget
from lmshrink.heal.corpus import DataArgs, offline_corpus
from lmshrink.heal.distill import KDArgs
from lmshrink.heal.stages import run_stage
from lmshrink.models import LoadArgs
from lmshrink.recipes.distill import DistillSettings
from lmshrink.recipes.distill import run as distill
from lmshrink.recipes.prune import PruneSettings
from lmshrink.recipes.prune import run as prune
from lmshrink.recipes.score_layers import ScoreSettings
from lmshrink.recipes.score_layers import run as score_layers
from lmshrink.records import RECORD, holding_output, md_table, provenance, save_figure, write_json, write_text


@dataclass(kw_only=True)
class SearchSettings(Settings):
    """Build depth, width and depth+width students of one size, heal each briefly, rank them."""

    output: str = setting(help="folder for the candidates, their healing runs and report.md")
    target_params: float | None = setting(None, "parameters of every candidate, e.g. 100e6")
    ratio: float | None = setting(None, "parameters of every candidate as a fraction of the teacher's, e.g. 0.75")
    axes: list[str] = setting(["depth", "width", "both"], f"candidates, one per axis: {', '.join(AXES)}")
    strategy: str = setting("importance", f"which blocks the shallower candidates keep: {', '.join(CHOICES)}")
    calib_data: str = setting("python-docs/library", "calibration text for the importance scores")
    calib_tokens: int = setting(4096, "calibration tokens")
    load: LoadArgs = group(LoadArgs, "how the models are loaded")
    corpus: DataArgs = group(offline_corpus, "healing text, and the held-out text the candidates are ranked on")
    train: TrainArgs = group(cpu_budget, "the short healing budget, the same for every candidate")
    kd: KDArgs = group(lambda: KDArgs(temperature=1.0, alpha_ce=1.0, alpha_clm=0.0, alpha_cos=0.0),
                       "the teacher (pruned, then distilled from) and the healing loss (default: Minitron's "
                       "logit-only forward KL at T = 1; a narrower student has no hidden states to align)")
    cut: CutArgs = group(CutArgs, "training-free repair of the shallower candidates (and measured block choice)")

    def problems(self) -> list[str]:
        problems = super().problems()
        if (self.target_params is None) == (self.ratio is None):
            problems.append("target_params, ratio: give one of them (e.g. --ratio 0.75)")
        if self.ratio is not None and not 0 < self.ratio < 1:
            problems.append("ratio: a fraction of the teacher's parameters, in (0, 1)")
        if not self.axes or any(a not in AXES for a in self.axes) or len(set(self.axes)) < len(self.axes):
            problems.append(f"axes: give distinct axes from {', '.join(AXES)}")
        if not self.corpus.data:
            problems.append("data: healing needs training text (--data)")
        if not self.corpus.eval_data and self.corpus.heldout == 0:
            problems.append("eval_data: the candidates are ranked on held-out text; give --eval-data or --heldout")
        if self.kd.alpha_cos > 0 or self.kd.alpha_inter > 0:
            problems.append("alpha_cos, alpha_inter: narrower candidates have other hidden sizes; set both to 0")
        return problems


@holding_output
def run(s: SearchSettings) -> dict[str, Any]:
    out, teacher = Path(s.output), s.kd.teacher
    scores = ScoreSettings(model=teacher, data=s.calib_data, output=str(out / "scores"), tokens=s.calib_tokens,
                           seq_len=min(512, s.calib_tokens), ppl=False, width=True, load=s.load)
    run_stage("scores", scores.output, scores, score_layers)
    rows = []
    for axis in s.axes:
        student = PruneSettings(output=str(out / axis / "student"), teacher=teacher, target_params=s.target_params,
                                ratio=s.ratio, axes=axis, strategy=s.strategy, scores=scores.output, load=s.load,
                                overwrite=True, cut=s.cut,
                                calib_data=s.calib_data, calib_tokens=s.calib_tokens)
        pruned = run_stage(f"{axis}: prune", student.output, student, prune)
        heal = DistillSettings(model=student.output, output=str(out / axis / "heal"), load=s.load,
                               corpus=s.corpus, train=s.train,
                               kd=s.kd)
        healed = run_stage(f"{axis}: heal", heal.output, heal, distill)
        metrics = healed["metrics"]
        rows.append({"axis": axis, "student": student.output, "healed": str(Path(heal.output) / "model"),
                     "layers": len(pruned["kept_layers"]), **pruned["width"], "parameters": pruned["parameters"],
                     "ppl_before": metrics["heldout_ppl_before"], "ppl_after": metrics["heldout_ppl_after"],
                     "train_seconds": metrics["train_seconds"], "tokens": metrics["tokens_seen"]})
    rows.sort(key=lambda r: r["ppl_after"] if r["ppl_after"] is not None else math.inf)
    teacher_params = pruned["teacher_parameters"]
    text = report(s, rows, teacher_params)
    record = provenance("search", to_dict(s), rows=rows, winner=rows[0], teacher_parameters=teacher_params)
    write_json(out / "report.json", record)
    write_json(out / RECORD, record)
    write_text(out / "report.md", text)
    chart(rows, out / "report.png", s)
    print(text)
    return record


def report(s: SearchSettings, rows: list[dict[str, Any]], teacher_params: int) -> str:
    budget = f"{rows[0]['tokens']:,} tokens" if rows else "-"
    lines = [f"# Depth x width search: `{s.kd.teacher}` at "
             + (f"{s.target_params / 1e6:.0f}M" if s.target_params else f"{s.ratio:.0%}") + " parameters", "",
             f"Each candidate pruned by activation importance, then healed with the same `distill` budget ({budget} "
             f"of {', '.join(s.corpus.data)}, block {s.corpus.block_size}, batch {s.train.batch_size}, lr "
             f"{s.train.lr:g}; KD {s.kd.loss} at T = {s.kd.temperature:g}, alpha_ce {s.kd.alpha_ce:g}, alpha_clm "
             f"{s.kd.alpha_clm:g}), ranked by perplexity on {', '.join(s.corpus.eval_data) or 'held-out documents'}.",
             ""]
    lines += md_table(("rank", "axis", "blocks", "hidden", "MLP", "heads (kv)", "parameters", "held-out ppl as cut",
                       "after healing", "healing time"), [
        (i, r["axis"], r["layers"], r["hidden"], r["intermediate"], f"{r['heads']} ({r['kv_heads']})",
         f"{r['parameters'] / 1e6:.1f}M ({r['parameters'] / teacher_params:.0%})", f"{r['ppl_before']:,.1f}",
         f"**{r['ppl_after']:,.2f}**", f"{r['train_seconds']:.0f} s") for i, r in enumerate(rows, 1)], "rlrrrlrrrr")
    if rows:
        best = rows[0]
        lines += ["", f"Winner: **{best['axis']}** (`{best['student']}`). Heal it fully, e.g.:", "", "```bash",
                  f"lmshrink distill --model {best['student']} --output {Path(s.output) / 'final'} "
                  f"--data {','.join(s.corpus.data)} --eval-data {','.join(s.corpus.eval_data)} --max-tokens "
                  f"{10 * s.train.max_tokens if s.train.max_tokens else 'N'} --temperature {s.kd.temperature:g} "
                  f"--alpha-ce {s.kd.alpha_ce:g} --alpha-clm {s.kd.alpha_clm:g} --alpha-cos 0", "```"]
    lines += ["", "![ranking](report.png)", ""]
    return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: Path, s: SearchSettings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(rows), 4))
    names = [f"{r['axis']}\n{r['layers']} blocks, h {r['hidden']}\nMLP {r['intermediate']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["ppl_before"] for r in rows], 0.4, label="as cut", color="tab:gray")
    bars = ax.bar([i + 0.2 for i in x], [r["ppl_after"] for r in rows], 0.4, label="after healing", color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_yscale("log")
    ax.set(ylabel="held-out perplexity (log)", title="candidates at the same size, same healing budget")
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)
