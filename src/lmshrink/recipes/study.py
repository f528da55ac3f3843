"""`lmshrink study`: the paper's questions, answered from one config, with a verdict on each.

1. healing: the same truncated student healed with the causal-LM loss (`pretrain`, the paper's
   method) and by distillation (`distill`: the DistilGPT-2 mix, and a current LLM recipe), at an
   equal token budget and at equal wall time; held-out perplexity on two sources, the zero-shot
   suite, accuracy after downstream fine-tuning, training time and FLOPs. Each arm's learning
   rate is chosen from `lrs` on held-out loss at the first seed (the choice is recorded).
2. strategies: the paper's fixed block choices against `importance`, healed and evaluated alike.
3. finetune_kd: KD methods during downstream fine-tuning of the healed student, against the
   fine-tuned teacher.
4. cleaning: the student pre-trained on the raw corpus and on its `lmshrink clean` output.

Every stage is an ordinary lmshrink run in its own folder under `output/` (`stages.run_stage`):
re-running resumes, reusing each finished stage made with the same settings and re-running those
whose settings changed. The study hands its settings groups (`corpus`, `heal`, `finetune`,
`perplexity`, `benchmarks`) to the runs unchanged. Verdicts follow one stated rule (`verdict`).

    output/report.md, report.json, *.png, lmshrink.json, configs/STAGE.yaml (re-run any stage)
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmshrink.compress.cut import CHOICES, CutArgs
from lmshrink.config import Settings, group, setting, to_dict
from lmshrink.evaluate.args import BenchmarkArgs, PerplexityArgs, TimingArgs, two_sources
from lmshrink.evaluate.verdicts import (
    RULE,
    Items,
    interval,
    paired_bootstrap,
    verdict,
)
from lmshrink.heal.args import TrainArgs, cpu_budget
from lmshrink.heal.corpus import DataArgs, offline_corpus
from lmshrink.heal.distill import KDArgs, recipe_kd
from lmshrink.heal.kd_methods import METHODS
from lmshrink.heal.stages import run_stage
from lmshrink.heal.tasks import TASKS
from lmshrink.models import LoadArgs
from lmshrink.recipes.clean import CleanSettings
from lmshrink.recipes.clean import run as clean
from lmshrink.recipes.distill import DistillSettings
from lmshrink.recipes.distill import run as distill
from lmshrink.recipes.evaluate import EvalSettings
from lmshrink.recipes.evaluate import run as evaluate
from lmshrink.recipes.finetune import FinetuneSettings
from lmshrink.recipes.finetune import run as finetune
from lmshrink.recipes.pretrain import PretrainSettings
from lmshrink.recipes.pretrain import run as pretrain
from lmshrink.recipes.score_layers import ScoreSettings
from lmshrink.recipes.score_layers import run as score_layers
from lmshrink.recipes.truncate import TruncateSettings
from lmshrink.recipes.truncate import run as truncate
from lmshrink.records import RECORD, count, holding_output, md_table, provenance, read_record, save_figure, write_json, write_text

QUESTIONS = ("healing", "strategies", "finetune_kd", "cleaning")

# healing arms: None = the plain causal-LM loss (pretrain); else distill with this KD recipe
ARMS: dict[str, Callable[[str], KDArgs | None]] = {
    "lm": lambda teacher: None,
    "distilgpt2": lambda teacher: recipe_kd("distilgpt2", teacher=teacher),  # T 2, alpha 5/2/1 (cosine on hidden states)
    "llm_kd": lambda teacher: KDArgs(teacher=teacher, temperature=1.0, alpha_ce=1.0, alpha_clm=1.0, alpha_cos=0.0),
}
ARM_NAMES = {"lm": "truncation + LM loss (the paper)", "distilgpt2": "distillation, DistilGPT-2 mix (T 2, 5/2/1)",
             "llm_kd": "distillation, forward KL T 1 + LM loss"}


@dataclass(kw_only=True)
class StudySettings(Settings):
    """Run the paper's study (healing methods, block choice, KD fine-tuning, cleaning) and judge its claims."""

    output: str = setting("runs/study", "study folder: one folder per stage, report.md, report.json, charts")
    teacher: str = setting("smollm2-135m", "teacher: folder, Hub id, .gguf file or smollm2-135m")
    num_layers: int = setting(24, "depth of every truncated student")
    strategy: str = setting("importance", "the block choice of the student in questions 1, 3 and 4")
    strategies: list[str] = setting(["alt", "distil", "importance"], f"question 2's block choices: {', '.join(CHOICES)}")
    calib_data: str = setting("python-docs/library", "calibration text for the importance scores")
    calib_tokens: int = setting(4096, "calibration tokens")
    questions: list[str] = setting(list(QUESTIONS), f"questions to run: {', '.join(QUESTIONS)}")
    arms: list[str] = setting(list(ARMS), f"healing arms of question 1: {', '.join(ARMS)}")
    seeds: list[int] = setting([0, 1], "seeds of every healing run (at least 2 for an interval)")
    lrs: list[float] = setting([1e-4, 3e-4], "learning rates tried per arm at the first seed; the best on held-out "
                                             "loss is used for every seed (and for questions 2 and 4)")
    raw_data: list[str] = setting(["web-docs"], "question 4: the messy corpus, trained on as read and as cleaned")
    clean_workers: int = setting(2, "question 4: worker processes of lmshrink clean")
    tasks: list[str] = setting(["sentiment", "boolq-local"], "downstream tasks (offline: sentiment, boolq-local; "
                                                             "GLUE names from the Hub); question 3 uses the first")
    kd_methods: list[str] = setting(list(METHODS), "question 3's fine-tuning methods (none is the baseline)")
    ft_seeds: list[int] = setting([0, 1, 2], "question 3's seeds per method (question 1 uses the first)")
    ft_examples: int = setting(400, "training examples of each fine-tuning run")
    ft_eval_examples: int = setting(400, "test examples of each fine-tuning run")
    ft_max_length: int = setting(64, "tokens per fine-tuning example")
    generator: str | None = setting(None, "MATE-KD's generator (default: the teacher cut to 10 blocks by importance, "
                                          "a causal generator; offline there is no masked LM)")
    load: LoadArgs = group(LoadArgs, "how the models are loaded")
    corpus: DataArgs = group(offline_corpus,
                             "healing text, and the held-out text of the learning-rate choice and the curves")
    heal: TrainArgs = group(lambda: cpu_budget(eval_steps=4),
                            "the healing budget and optimiser, the same for every arm (lr from --lrs)")
    finetune: TrainArgs = group(lambda: TrainArgs(**{**FinetuneSettings.OPTIMISER, "epochs": 1.0, "batch_size": 16}),
                                "downstream fine-tuning (questions 1 and 3)")
    perplexity: PerplexityArgs = group(two_sources, "held-out perplexity of every healed model")
    benchmarks: BenchmarkArgs = group(lambda: BenchmarkArgs(tasks=["core"], limit=20),
                                      "the zero-shot suite of every healed model")
    cut: CutArgs = group(lambda: CutArgs(repair="none"),
                         "training-free repair of every truncated student (default none: the paper's plain cut)")

    def problems(self) -> list[str]:
        problems = super().problems()
        for name, values, known in (("questions", self.questions, QUESTIONS), ("arms", self.arms, ARMS),
                                    ("strategies", [*self.strategies, self.strategy], CHOICES),
                                    ("kd_methods", self.kd_methods, METHODS)):
            bad = [v for v in values if v not in known]
            if bad:
                problems.append(f"{name}: {', '.join(bad)} unknown; choose from {', '.join(known)}")
        if "lm" not in self.arms and ({"strategies", "cleaning", "finetune_kd"} & set(self.questions)):
            problems.append("arms: questions 2-4 heal with the LM arm; keep lm in --arms")
        if not self.seeds or not self.ft_seeds or not self.lrs:
            problems.append("seeds, ft_seeds, lrs: give at least one of each")
        if "none" not in self.kd_methods:
            problems.append("kd_methods: include none, the baseline every KD method is judged against")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            problems.append(f"tasks: give downstream tasks from {', '.join(TASKS)}")
        if not self.corpus.data or not self.corpus.eval_data:
            problems.append("corpus: give healing text (--corpus.data) and held-out text (--corpus.eval-data)")
        if self.heal.max_tokens is None:
            problems.append("heal.max_tokens: the arms are compared at one token budget; set it")
        if self.num_layers < 1 or min(self.ft_examples, self.ft_eval_examples, self.ft_max_length) < 1:
            problems.append("num_layers, ft_examples, ft_eval_examples, ft_max_length: must be positive")
        return problems


# ----------------------------------------------------------------------------- stages


class Study:
    """The study's stages, each a lmshrink run in its own folder."""

    def __init__(self, s: StudySettings):
        self.s, self.out = s, Path(s.output)
        self.commands: dict[str, str] = {}  # stage -> the command that re-runs it alone

    def stage(self, name: str, command: str, settings: Any, run: Callable[[Any], Any],
              resumes_itself: bool = False) -> dict[str, Any]:
        config = self.out / "configs" / (name.replace("/", "_") + ".yaml")
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(settings))), sort_keys=False))
        self.commands[name] = f"lmshrink {command} --config {config}"
        return run_stage(name, settings.output, settings, run, resumes_itself)

    def scores(self) -> str:
        s = self.s
        settings = ScoreSettings(model=s.teacher, data=s.calib_data, output=str(self.out / "scores"),
                                 tokens=s.calib_tokens, seq_len=min(512, s.calib_tokens), ppl=False, width=False,
                                 load=s.load)
        self.stage("scores", "score-layers", settings, score_layers)
        return str(Path(settings.output) / "scores.json")

    def student(self, strategy: str, layers: int | None = None) -> str:
        s = self.s
        settings = TruncateSettings(output=str(self.out / "students" / f"{strategy}-{layers or s.num_layers}"),
                                    teacher=s.teacher, strategy=strategy, num_layers=layers or s.num_layers,
                                    scores=self.scores() if strategy == "importance" else None, overwrite=True,
                                    load=s.load, cut=s.cut,
                                    calib_data=s.calib_data, calib_tokens=s.calib_tokens)
        self.stage(f"student {Path(settings.output).name}", "truncate", settings, truncate)
        return settings.output

    def heal(self, arm: str, student: str, lr: float, seed: int, data: str = "main",
             corpus: DataArgs | None = None) -> dict[str, Any]:
        s = self.s
        folder = self.out / "heal" / arm / Path(student).name / data / f"lr-{lr:g}" / f"seed-{seed}"
        common = dict(model=student, output=str(folder), load=s.load,
                      corpus=dataclasses.replace(corpus or s.corpus, seed=seed),
                      train=dataclasses.replace(s.heal, lr=lr))
        kd = ARMS[arm](s.teacher)
        if kd is None:
            record = self.stage(str(folder.relative_to(self.out)), "pretrain", PretrainSettings(**common), pretrain)
        else:
            record = self.stage(str(folder.relative_to(self.out)), "distill", DistillSettings(**common, kd=kd), distill)
        return {**record, "folder": str(folder)}

    def chosen_lr(self, arm: str, student: str) -> tuple[float, dict[str, float]]:
        """The arm's learning rate: the lowest held-out perplexity at the first seed."""
        tried = {lr: self.heal(arm, student, lr, self.s.seeds[0])["metrics"]["heldout_ppl_after"] for lr in self.s.lrs}
        return min(tried, key=lambda lr: tried[lr]), tried

    def evaluate_run(self, run: dict[str, Any]) -> dict[str, Any]:
        """A healed model's evaluation, named after its healing run (so a model shared by two
        questions is evaluated once)."""
        name = "_".join(Path(run["folder"]).relative_to(self.out / "heal").parts)
        return self.evaluate(_model(run), name)

    def evaluate(self, model: str, name: str) -> dict[str, Any]:
        s = self.s
        settings = EvalSettings(models=[model], output=str(self.out / "eval" / name), load=s.load,
                                perplexity=s.perplexity,
                                benchmarks=s.benchmarks, timing=TimingArgs(speed=False))
        return self.stage(f"eval/{name}", "eval", settings, evaluate)["rows"][0]

    def finetune(self, model: str, name: str, task: str, methods: list[str], seeds: list[int],
                 teacher: str | None = None, generator: str | None = None) -> dict[str, Any]:
        s = self.s
        settings = FinetuneSettings(model=model, output=str(self.out / "finetune" / task / name), task=task,
                                    methods=methods, seeds=seeds, teacher=teacher,
                                    generator=generator or "distilroberta-base", max_train_examples=s.ft_examples,
                                    max_eval_examples=s.ft_eval_examples, max_length=s.ft_max_length,
                                    load=s.load, train=s.finetune,
                                    save_models=name == "teacher")  # the teacher teaches; the rest are scores
        return self.stage(f"finetune/{task}/{name}", "finetune", settings, finetune, resumes_itself=True)


def _main_metric(record: dict[str, Any], method: str) -> dict[str, Any]:
    """A fine-tuning method's summary of the record's main metric (values per seed, ...)."""
    return next(r for r in record["rows"] if r["method"] == method)[record["main_metric"]]


def _accuracy(record: dict[str, Any], method: str = "none") -> list[float]:
    return _main_metric(record, method)["values"]


def _item_results(record: dict[str, Any], method: str = "none") -> Items | None:
    """A fine-tuning method's per-item results on the main metric, one list per seed (None where the
    metric is not a mean over items, or the runs predate per-item results)."""
    per_item = _main_metric(record, method).get("per_item")
    return None if per_item is None else {record["settings"]["task"]: per_item}


def _zero_shot_items(evals: list[dict[str, Any]]) -> Items | None:
    """Each zero-shot task's per-item results, one list per evaluated run (None if any run lacks them)."""
    tasks = [e.get("tasks") or {} for e in evals]
    if not tasks or not all(tasks) or any(not t[n].get("per_item") for t in tasks for n in tasks[0]):
        return None
    return {n: [t[n]["per_item"] for t in tasks] for n in tasks[0]}


def _first_runs(results: list[Items | None]) -> Items | None:
    """Per-item results of several fine-tuning records as one arm (the first seed of each)."""
    if not results or any(r is None for r in results):
        return None
    return {task: [r[task][0] for r in results] for task in results[0]}


def _model(run: dict[str, Any]) -> str:
    return str(Path(run["folder"]) / "model")


def _curve(run: dict[str, Any]) -> list[tuple[float, float, float]]:
    """(tokens, wall seconds, held-out perplexity) at each evaluation of a healing run, from its
    metrics.jsonl; the first point is the student as cut (0 tokens, 0 s)."""
    metrics = run["metrics"]
    per_step = metrics["tokens_seen"] / max(1, metrics["steps"])
    points = [(0.0, 0.0, metrics["heldout_ppl_before"])]
    path = Path(run["folder"]) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        entry = json.loads(line)
        if "eval_loss" in entry and "elapsed_s" in entry and entry["step"] > 0:
            points.append((entry["step"] * per_step, entry["elapsed_s"], math.exp(entry["eval_loss"])))
    last = (float(metrics["tokens_seen"]), metrics["train_seconds"], metrics["heldout_ppl_after"])
    if points[-1][0] < last[0]:
        points.append(last)
    return points


def at_time(curve: list[tuple[float, float, float]], seconds: float) -> float:
    """Held-out perplexity at `seconds` of training, interpolated in log-perplexity."""
    for (_, t0, p0), (_, t1, p1) in zip(curve, curve[1:], strict=False):
        if t0 <= seconds <= t1:
            w = (seconds - t0) / (t1 - t0) if t1 > t0 else 1.0
            return math.exp((1 - w) * math.log(p0) + w * math.log(p1))
    return curve[-1][2]


def flops(parameters: int, tokens: float, teacher_parameters: int | None) -> float:
    """Training FLOPs: 6 N per token for the student (forward and backward), plus 2 N per token for
    an online teacher's forward pass."""
    return tokens * (6 * parameters + (2 * teacher_parameters if teacher_parameters else 0))


# ----------------------------------------------------------------------------- the questions


def question_healing(study: Study, results: dict[str, Any]) -> None:
    s = study.s
    student = study.student(s.strategy)
    arms = {}
    for arm in s.arms:
        lr, tried = study.chosen_lr(arm, student)
        runs = [study.heal(arm, student, lr, seed) for seed in s.seeds]
        evals = [study.evaluate_run(r) for r in runs]
        tuned = {task: [study.finetune(_model(r), f"heal-{arm}-seed-{seed}", task, ["none"], s.ft_seeds[:1])
                        for r, seed in zip(runs, s.seeds, strict=False)] for task in s.tasks}
        downstream = {task: [_accuracy(record)[0] for record in records] for task, records in tuned.items()}
        arms[arm] = {"lr": lr, "lr_tried": tried, "runs": [r["folder"] for r in runs],
                     "train_seconds": [r["metrics"]["train_seconds"] for r in runs],
                     "tokens": runs[0]["metrics"]["tokens_seen"],
                     "ppl": {src: [e["perplexity"][src] for e in evals] for src in s.perplexity.data},
                     "zero_shot": [e.get("task_average") for e in evals], "zero_shot_items": _zero_shot_items(evals),
                     "downstream": downstream, "curves": [_curve(r) for r in runs],
                     "downstream_items": {task: _first_runs([_item_results(x) for x in records])
                                          for task, records in tuned.items()},
                     "parameters": evals[0]["parameters"]}
    teacher = study.evaluate(s.teacher, "teacher")
    fastest = min(t for a in arms.values() for t in a["train_seconds"])
    for arm in arms.values():
        arm["ppl_at_equal_time"] = [at_time(c, fastest) for c in arm["curves"]]
        arm["flops"] = flops(arm["parameters"], arm["tokens"], None)
    for name, arm in arms.items():
        if ARMS[name](s.teacher) is not None:
            arm["flops"] = flops(arm["parameters"], arm["tokens"], teacher["parameters"])
    claims = []
    if "lm" in arms:
        for kd in [a for a in arms if a != "lm"]:
            lm, other = arms["lm"], arms[kd]
            claims.append(_claim(f"LM trains faster than {kd} (wall time at equal tokens)",
                                 lm["train_seconds"], other["train_seconds"], False))
            for src in s.perplexity.data:
                claims.append(_claim(f"LM reaches lower perplexity on {src} than {kd} at equal tokens",
                                     lm["ppl"][src], other["ppl"][src], False))
            claims.append(_claim(f"LM reaches lower held-out perplexity than {kd} at equal wall time ({fastest:.0f} s)",
                                 lm["ppl_at_equal_time"], other["ppl_at_equal_time"], False))
            if all(v is not None for v in lm["zero_shot"] + other["zero_shot"]):
                claims.append(_claim(f"LM scores higher on the zero-shot suite than {kd}",
                                     lm["zero_shot"], other["zero_shot"], True,
                                     (lm["zero_shot_items"], other["zero_shot_items"])))
            for task in s.tasks:
                claims.append(_claim(f"LM fine-tunes better on {task} than {kd}", lm["downstream"][task],
                                     other["downstream"][task], True,
                                     (lm["downstream_items"][task], other["downstream_items"][task])))
    results["healing"] = {"student": student, "arms": arms, "teacher": teacher, "equal_time_seconds": fastest,
                          "claims": claims}


def question_strategies(study: Study, results: dict[str, Any]) -> None:
    s = study.s
    lr = results["healing"]["arms"]["lm"]["lr"] if "healing" in results else s.lrs[0]
    rows = {}
    for strategy in s.strategies:
        student = study.student(strategy)
        runs = [study.heal("lm", student, lr, seed) for seed in s.seeds]
        evals = [study.evaluate_run(r) for r in runs]
        rows[strategy] = {"kept": read_record(student)["kept_layers"],
                          "ppl_before": runs[0]["metrics"]["heldout_ppl_before"],
                          "ppl": {src: [e["perplexity"][src] for e in evals] for src in s.perplexity.data},
                          "zero_shot": [e.get("task_average") for e in evals],
                          "zero_shot_items": _zero_shot_items(evals)}
    claims = []
    main = s.perplexity.data[0]
    pairs = [("alt", "distil", "the paper's alt beats DistilGPT-2's distil choice"),
             ("importance", "alt", "importance-chosen blocks beat alt (beyond the paper)"),
             ("importance", "distil", "importance-chosen blocks beat distil (beyond the paper)")]
    for a, b, text in pairs:
        if a in rows and b in rows:
            for src in s.perplexity.data:
                claims.append(_claim(f"{text}: perplexity on {src} after healing", rows[a]["ppl"][src],
                                     rows[b]["ppl"][src], False))
            if all(v is not None for v in rows[a]["zero_shot"] + rows[b]["zero_shot"]):
                claims.append(_claim(f"{text}: zero-shot average", rows[a]["zero_shot"], rows[b]["zero_shot"], True,
                                     (rows[a]["zero_shot_items"], rows[b]["zero_shot_items"])))
    results["strategies"] = {"lr": lr, "rows": rows, "claims": claims, "main_source": main}


def question_finetune_kd(study: Study, results: dict[str, Any]) -> None:
    s = study.s
    task = s.tasks[0]
    lr = results["healing"]["arms"]["lm"]["lr"] if "healing" in results else s.lrs[0]
    healed = _model(study.heal("lm", study.student(s.strategy), lr, s.seeds[0]))
    teacher_run = study.finetune(s.teacher, "teacher", task, ["none"], s.ft_seeds[:1])
    teacher = str(Path(teacher_run["settings"]["output"]) / "none" / f"seed-{s.ft_seeds[0]}" / "model")
    generator = s.generator
    if generator is None and any(getattr(METHODS[m], "needs_generator", False) for m in s.kd_methods):
        generator = study.student("importance", layers=min(10, s.num_layers))
    record = study.finetune(healed, "student-kd", task, s.kd_methods, s.ft_seeds, teacher=teacher, generator=generator)
    rows = {r["method"]: interval(_accuracy(record, r["method"])) | {"train_seconds": r["train_seconds"]}
            for r in record["rows"]}
    claims = [_claim(f"{m} beats fine-tuning without a teacher ({record['main_metric']})", rows[m]["values"],
                     rows["none"]["values"], True,
                     (_item_results(record, m), _item_results(record, "none")))
              for m in s.kd_methods if m != "none"]
    results["finetune_kd"] = {"task": task, "metric": record["main_metric"], "rows": rows,
                              "teacher": _accuracy(teacher_run)[0], "claims": claims}


def question_cleaning(study: Study, results: dict[str, Any]) -> None:
    s = study.s
    lr = results["healing"]["arms"]["lm"]["lr"] if "healing" in results else s.lrs[0]
    student = study.student(s.strategy)
    arms = {}
    for name, options in (("raw", CleanSettings.PASS_THROUGH), ("clean", {})):
        settings = CleanSettings(data=s.raw_data, output=str(study.out / "corpus" / name), workers=s.clean_workers,
                                 **options)
        cleaned = study.stage(f"corpus/{name}", "clean", settings, clean, resumes_itself=True)
        corpus = dataclasses.replace(s.corpus, data=[str(Path(settings.output) / "kept")])
        runs = [study.heal("lm", student, lr, seed, data=name, corpus=corpus) for seed in s.seeds]
        evals = [study.evaluate_run(r) for r in runs]
        kept = (cleaned.get("summary") or {}).get("kept") or {}
        arms[name] = {"documents": kept.get("documents"), "mb": (kept.get("bytes") or 0) / 1e6,
                      "ppl": {src: [e["perplexity"][src] for e in evals] for src in s.perplexity.data}}
    claims = [_claim(f"cleaning lowers perplexity on {src}", arms["clean"]["ppl"][src], arms["raw"]["ppl"][src], False)
              for src in s.perplexity.data]
    results["cleaning"] = {"arms": arms, "claims": claims, "lr": lr}


def _claim(text: str, a: list[float], b: list[float], higher_is_better: bool,
           items: tuple[Items | None, Items | None] = (None, None)) -> dict[str, Any]:
    """A claim judged item by item where both arms have per-item results, else on the runs' values."""
    paired = all(items)
    judged = paired_bootstrap(*items, higher_is_better) if paired else verdict(a, b, higher_is_better)
    return {"claim": text, "a": interval(a), "b": interval(b), **judged, "higher_is_better": higher_is_better,
            "method": "paired bootstrap over items and seeds" if paired else "Welch interval over seeds"}


QUESTION_RUNS = {"healing": question_healing, "strategies": question_strategies,
                 "finetune_kd": question_finetune_kd, "cleaning": question_cleaning}


# ----------------------------------------------------------------------------- report


def _fmt(i: dict[str, Any], digits: int = 2) -> str:
    if i["low"] is None:
        return f"{i['mean']:,.{digits}f} (n={i['n']})"
    return f"{i['mean']:,.{digits}f} [{i['low']:,.{digits}f}, {i['high']:,.{digits}f}]"


def _claims_table(claims: list[dict[str, Any]]) -> list[str]:
    return md_table(("claim (A better than B)", "A", "B", "difference, 95% interval", "interval over", "verdict"), [
        (c["claim"], _fmt(c["a"], 3), _fmt(c["b"], 3),
         "-" if c["low"] is None else f"{c['difference']:+,.3f} [{c['low']:+,.3f}, {c['high']:+,.3f}]",
         "items and seeds (paired)" if c.get("method", "").startswith("paired") else "seeds", f"**{c['verdict']}**")
        for c in claims], "lrrrll")


def report(s: StudySettings, results: dict[str, Any], commands: dict[str, str], seconds: float) -> str:
    lines = [f"# The study: `{s.teacher}` -> {s.num_layers} blocks", "",
             f"Seeds {s.seeds} per healing run, {s.heal.max_tokens:,} tokens of {', '.join(s.corpus.data)} each "
             f"(block {s.corpus.block_size}, batch {s.heal.batch_size}); perplexity on {s.perplexity.max_tokens:,} "
             f"tokens of {', '.join(s.perplexity.data)}; zero-shot {', '.join(s.benchmarks.tasks)}"
             + (f" (first {count(s.benchmarks.limit, 'item')} per task)" if s.benchmarks.limit else "")
             + f"; fine-tuning on {s.ft_examples} examples, tested on {s.ft_eval_examples} "
             f"(sentiment: Pang & Lee split 80/20 with seed 0; boolq-local: BoolQ's 3,270 validation questions "
             f"split 80/20 with seed 0). Wall time {seconds / 60:.1f} min.", "", RULE, ""]
    for name, section in SECTIONS.items():
        if name in results:
            lines += section(s, results[name])
    lines += ["## Re-running one stage", "", "Every stage is an ordinary lmshrink run; its settings are in "
              "`configs/` under the study folder:", "", "```bash", *sorted(set(commands.values())), "```", ""]
    return "\n".join(lines)


def _healing_section(s: StudySettings, h: dict[str, Any]) -> list[str]:
    lines = ["## 1. Truncation + LM loss vs distillation", "",
             "The paper's claim: truncation + plain LM pre-training trains far faster than distillation and "
             "fine-tunes better.", ""]
    rows = []
    for name, a in h["arms"].items():
        tried = ", ".join(f"{lr:g}: {ppl:.2f}" for lr, ppl in a["lr_tried"].items())
        zero = [v for v in a["zero_shot"] if v is not None]
        rows.append((ARM_NAMES[name], f"{a['lr']:g} ({tried})", _fmt(interval(a["train_seconds"]), 0),
                     f"{a['flops'] / 1e12:,.1f}", *(_fmt(interval(a["ppl"][src])) for src in s.perplexity.data),
                     _fmt(interval(a["ppl_at_equal_time"])), _fmt(interval(zero), 3) if zero else "-",
                     *(_fmt(interval(a["downstream"][t]), 3) for t in s.tasks)))
    header = ("arm", "lr (chosen from)", "train s", "TFLOPs", *(f"ppl {src}" for src in s.perplexity.data),
              f"ppl at {h['equal_time_seconds']:.0f} s", "zero-shot avg", *(f"{t} acc" for t in s.tasks))
    lines += md_table(header, rows, "llrr" + "r" * (len(header) - 4))
    t = h["teacher"]
    return lines + ["", "Teacher: " + ", ".join(f"ppl {src} {t['perplexity'][src]:.2f}" for src in s.perplexity.data)
                    + (f", zero-shot average {t['task_average']:.3f}" if t.get("task_average") is not None else "") + ".",
                    "", *_claims_table(h["claims"]), "", "![perplexity vs tokens and wall time](healing.png)", ""]


def _strategies_section(s: StudySettings, q: dict[str, Any]) -> list[str]:
    lines = ["## 2. Which blocks to keep", "",
             f"Each student healed with the LM arm (lr {q['lr']:g}) at the same budget.", ""]
    rows = []
    for name, r in q["rows"].items():
        zero = [v for v in r["zero_shot"] if v is not None]
        rows.append((name, r["kept"], f"{r['ppl_before']:,.1f}",
                     *(_fmt(interval(r["ppl"][src])) for src in s.perplexity.data),
                     _fmt(interval(zero), 3) if zero else "-"))
    lines += md_table(("strategy", "kept blocks", "ppl as cut", *(f"ppl {src}" for src in s.perplexity.data),
                       "zero-shot avg"), rows, "llr" + "r" * (len(s.perplexity.data) + 1))
    return lines + ["", *_claims_table(q["claims"]), "", "![perplexity by strategy](strategies.png)", ""]


def _finetune_kd_section(s: StudySettings, q: dict[str, Any]) -> list[str]:
    lines = ["## 3. KD during fine-tuning", "",
             f"The healed LM-arm student fine-tuned on `{q['task']}` with each method, seeds {s.ft_seeds}; "
             f"the fine-tuned teacher scores {q['teacher']:.3f}.", ""]
    lines += md_table(("method", f"{q['metric']} (mean, 95% interval)", "train s"),
                      [(m, _fmt(r, 3), f"{r['train_seconds']:.0f}") for m, r in q["rows"].items()], "lrr")
    return lines + ["", *_claims_table(q["claims"]), "", "![accuracy by KD method](finetune_kd.png)", ""]


def _cleaning_section(s: StudySettings, q: dict[str, Any]) -> list[str]:
    lines = ["## 4. Data cleaning", "",
             f"The same student pre-trained (LM arm, lr {q['lr']:g}) on `{', '.join(s.raw_data)}` as read and "
             "as `lmshrink clean` left it, at the same token budget.", ""]
    lines += md_table(("corpus", "documents", "MB", *(f"ppl {src}" for src in s.perplexity.data)),
                      [(name, a["documents"], f"{a['mb']:.1f}", *(_fmt(interval(a["ppl"][src])) for src in s.perplexity.data))
                       for name, a in q["arms"].items()], "lrr" + "r" * len(s.perplexity.data))
    return lines + ["", *_claims_table(q["claims"]), "", "![raw vs clean](cleaning.png)", ""]


SECTIONS = {"healing": _healing_section, "strategies": _strategies_section, "finetune_kd": _finetune_kd_section,
            "cleaning": _cleaning_section}
"""The report's sections, in the order the paper's findings come (each written where its stage ran)."""


def charts(s: StudySettings, results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bars(ax, names: list[str], groups: list[list[float]], ylabel: str, log: bool = False) -> None:
        stats = [interval(g) for g in groups]
        err = [[st["mean"] - (st["low"] if st["low"] is not None else st["mean"]) for st in stats],
               [(st["high"] if st["high"] is not None else st["mean"]) - st["mean"] for st in stats]]
        ax.bar(names, [st["mean"] for st in stats], yerr=err, capsize=5, color="tab:blue", alpha=0.8)
        for i, g in enumerate(groups):
            ax.scatter([i] * len(g), g, color="black", s=12, zorder=3)
        ax.set(ylabel=ylabel)
        if log:
            ax.set_yscale("log")

    if "healing" in results:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for name, arm in results["healing"]["arms"].items():
            for i, curve in enumerate(arm["curves"]):
                tokens, seconds, ppl = zip(*curve, strict=False)
                label = ARM_NAMES[name] if i == 0 else None
                color = {"lm": "tab:blue", "distilgpt2": "tab:red", "llm_kd": "tab:green"}[name]
                axes[0].plot(tokens, ppl, marker="o", color=color, label=label, alpha=0.8)
                axes[1].plot(seconds, ppl, marker="o", color=color, label=label, alpha=0.8)
        for ax, xlabel in zip(axes, ("training tokens", "wall seconds"), strict=False):
            ax.set(xlabel=xlabel, ylabel=f"held-out perplexity ({s.corpus.eval_data[0]})", yscale="log")
        axes[0].legend(fontsize=8)
        fig.suptitle("healing the truncated student: one line per seed")
        save_figure(fig, out / "healing.png")
        plt.close(fig)
    for key, title in (("strategies", "perplexity by block choice"), ("cleaning", "raw vs cleaned corpus")):
        if key in results:
            rows = results[key]["rows"] if key == "strategies" else results[key]["arms"]
            src = s.perplexity.data[-1]
            fig, ax = plt.subplots(figsize=(2 + 1.5 * len(rows), 4))
            bars(ax, list(rows), [r["ppl"][src] for r in rows.values()], f"perplexity on {src} after healing",
                 log=True)
            ax.set(title=f"{title} (bars: mean, 95% interval; dots: seeds)")
            save_figure(fig, out / f"{key}.png")
            plt.close(fig)
    if "finetune_kd" in results:
        q = results["finetune_kd"]
        fig, ax = plt.subplots(figsize=(2 + 1.3 * len(q["rows"]), 4))
        bars(ax, list(q["rows"]), [r["values"] for r in q["rows"].values()], q["metric"])
        ax.axhline(q["teacher"], color="tab:red", linestyle="--", label="teacher")
        ax.legend()
        ax.set(title=f"{q['task']}: KD methods (bars: mean, 95% interval; dots: seeds)")
        save_figure(fig, out / "finetune_kd.png")
        plt.close(fig)


@holding_output
def run(s: StudySettings) -> dict[str, Any]:
    import time

    started = time.perf_counter()
    s.load.check(s.teacher)  # before the first stage: cleaning a corpus takes minutes
    study, results = Study(s), {}
    for question in QUESTIONS:  # in order: questions 2-4 use the LM arm's chosen learning rate
        if question in s.questions:
            print(f"[study] question: {question}")
            QUESTION_RUNS[question](study, results)
    seconds = time.perf_counter() - started
    out = study.out
    text = report(s, results, study.commands, seconds)
    charts(s, results, out)
    record = provenance("study", to_dict(s), results=results, commands=study.commands, wall_seconds=seconds)
    write_json(out / "report.json", record)
    write_json(out / RECORD, record)
    write_text(out / "report.md", text)
    print(text)
    return record
