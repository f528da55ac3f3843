"""`lmshrink finetune`: fine-tune a teacher or a student on a downstream task, with KD methods.

The paper's first direction: a fine-tuned teacher helps a small student learn a task. The
teacher is fine-tuned by this same command (method `none`); students then train with any of
`lmshrink.heal.kd_methods.METHODS` against it, over several seeds, and the report gives each
method's metric as mean and spread, with training time.

Tasks: GLUE (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli) and SuperGLUE (boolq, cb,
rte, wic) from the Hub; `sentiment`, Pang & Lee's sentence polarity fetched offline; local
CSV / JSONL files (`task: file`); and `lm`, causal-LM fine-tuning reported by test
perplexity (the paper's WikiText-103 protocol), which runs `pretrain` (method none) or
`distill` (method kd). Decoder models classify from their last real token's state
(`AutoModelForSequenceClassification`, as GPT2ForSequenceClassification does); a model
without a pad token gets its EOS token as one.

    out/METHOD/seed-N/model/   the fine-tuned model (+ tokenizer + lmshrink.json with metrics)
    out/report.{md,json,png}   every method: metric mean +- std over seeds, train time
A finished (method, seed) run is not redone when the command is run again.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from lmshrink.config import Settings, SettingsError, group, setting, to_dict
from lmshrink.errors import one_of
from lmshrink.heal.args import TrainArgs, trainer_arguments, training_arguments
from lmshrink.heal.callbacks import MetricsFile, RecordCheckpoints, StopOnSignal
from lmshrink.heal.corpus import DataArgs
from lmshrink.heal.distill import KDArgs
from lmshrink.heal.kd_methods import (
    METHODS,
    CausalLMGenerator,
    KDConfig,
    MaskedLMGenerator,
    check_rail,
    right_padded,
    task_loss,
)
from lmshrink.heal.runs import carry_on, checkpoint_step, drop_checkpoints, last_checkpoint, trained
from lmshrink.heal.tasks import TASKS, Collator, Task, item_scores, load_task, scores
from lmshrink.heal.training import LMTrainer, freeze, save_trained
from lmshrink.models import LoadArgs, load, pick_device, resolve
from lmshrink.recipes.distill import DistillSettings
from lmshrink.recipes.distill import run as distill
from lmshrink.recipes.pretrain import PretrainSettings
from lmshrink.recipes.pretrain import run as pretrain
from lmshrink.records import RECORD, holding_output, md_table, provenance, read_record, save_figure, write_json, write_text

# ----------------------------------------------------------------------------- tasks


@dataclass(kw_only=True)
class FinetuneSettings(Settings):
    """Fine-tune a teacher or student on a downstream task, with KD methods over several seeds."""

    # run_glue's recipe (3 epochs, batch 8, lr 5e-5) with 10% warm-up and weight decay 0.01; checkpoints
    # every 200 steps so that a killed run resumes; no loggers beyond metrics.jsonl
    # compile off: padded batches of varying length would make torch.compile trace again and again
    OPTIMISER: ClassVar[dict[str, Any]] = dict(epochs=3.0, batch_size=8, lr=5e-5, warmup=0.1, weight_decay=0.01,
                                               save_steps=200, save_total_limit=1, report_to=["none"], compile="off")

    model: str = setting(help="model to fine-tune: folder (e.g. from lmshrink truncate), Hub id, .gguf or smollm2-135m")
    output: str = setting(help="output folder: METHOD/seed-N/model and report.md", how_to_run=True)
    task: str = setting("sentiment", f"task: {', '.join(TASKS)}, file (local CSV/JSONL) or lm")
    methods: list[str] = setting(["none"], f"methods to run: {', '.join(METHODS)}")
    seeds: list[int] = setting([42], "seeds; each method runs once per seed")
    teacher: str | None = setting(None, "fine-tuned teacher (a folder written by `lmshrink finetune`) for KD methods")
    generator: str = setting("distilroberta-base", "MATE-KD's masked-LM generator: any Hub masked LM or a local folder")
    # local files (task: file)
    train_file: str | None = setting(None, "task file: training CSV or JSONL")
    eval_file: str | None = setting(None, "task file: evaluation CSV or JSONL (if none, --heldout of the training "
                                          "file is held out for evaluation, with a fixed seed)")
    heldout: float = setting(0.2, "task file without --eval-file: share of the training rows held out for evaluation")
    text_columns: list[str] = setting(["text"], "task file: columns joined (by newlines) into the input, e.g. text,text_pair")
    label_column: str = setting("label", "task file: the label column (numbers or class names; floats = regression)")
    max_length: int = setting(128, "tokens per example (run_glue: 128)")
    max_train_examples: int | None = setting(None, "use at most this many training examples")
    max_eval_examples: int | None = setting(None, "evaluate on at most this many examples")
    load: LoadArgs = group(LoadArgs, "how the models are loaded")
    save_models: bool = setting(True, "save each fine-tuned model in METHOD/seed-N/model (off: keep its scores "
                                      "and record only, in METHOD/seed-N/lmshrink.json)", how_to_run=True)
    train: TrainArgs = group(lambda: TrainArgs(**FinetuneSettings.OPTIMISER),
                             "optimiser, schedule, precision and checkpoints (defaults: run_glue's)")
    corpus: DataArgs = group(DataArgs, "task lm: training and test text (test perplexity is the metric)")
    # methods
    temperature: float = setting(2.0, "KD temperature T (kd, rail, mate)")
    alpha: float = setting(0.5, "KD weight: (1 - alpha) * task loss + alpha * T^2 * KL (kd, rail)")
    tau_max: int = setting(7, "Annealing-KD: the last temperature step (PAPER.md: 7)")
    phase1: float = setting(0.75, "Annealing-KD: share of training in phase 1 (PAPER.md: 14 of 18 epochs)")
    rail_weight: float = setting(1.0, "RAIL-KD: weight of the intermediate-layer loss")
    mask_prob: float = setting(0.3, "MATE-KD: share of tokens the generator rewrites")
    generator_lr: float = setting(5e-7, "MATE-KD: generator learning rate (PAPER.md: 5e-7)")

    def problems(self) -> list[str]:
        problems = super().problems()
        problems += one_of("task", self.task, [*TASKS, "file", "lm"])
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            problems.append(f"methods: {', '.join(unknown)} unknown; choose from {', '.join(METHODS)}")
        if not self.methods or not self.seeds:
            problems.append("methods, seeds: give at least one of each")
        if any(m != "none" for m in self.methods) and not self.teacher:
            problems.append("teacher: KD methods need a fine-tuned teacher (run this command with --methods none first)")
        if self.task == "file" and not self.train_file:
            problems.append("train_file: task 'file' needs --train-file (and --eval-file, or --heldout)")
        if not 0 < self.heldout < 1:
            problems.append("heldout: a share of the training rows, in (0, 1)")
        if self.task == "lm":
            if not self.corpus.data:
                problems.append("data: task lm needs training text (--data)")
            if set(self.methods) - {"none", "kd"}:
                problems.append("methods: task lm runs none (pretrain) or kd (distill); the others are classification methods")
        if not 0 <= self.alpha <= 1 or not 0 < self.phase1 <= 1 or not 0 < self.mask_prob < 1:
            problems.append("alpha in [0, 1], phase1 in (0, 1], mask_prob in (0, 1)")
        if self.temperature <= 0 or self.tau_max < 1:
            problems.append("temperature > 0 and tau_max >= 1")
        return problems

    def kd_config(self, seed: int) -> KDConfig:
        return KDConfig(self.temperature, self.alpha, self.tau_max, self.phase1, self.rail_weight,
                        self.mask_prob, self.generator_lr, seed)


# ----------------------------------------------------------------------------- data


def with_pad_token(model, tokenizer):
    """Decoder tokenizers often lack a pad token: use EOS, so the classifier finds the last real token."""
    tokenizer = right_padded(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_classifier(name: str, task: Task, how: LoadArgs):
    kind = "regression" if task.num_labels == 1 else "single_label_classification"
    loaded = how.load(name, head="classifier", num_labels=task.num_labels, problem_type=kind)
    if loaded.model.config.num_labels != task.num_labels:
        raise SettingsError(f"{name} predicts {loaded.model.config.num_labels} classes; the task has {task.num_labels}")
    return (*with_pad_token(loaded.model, loaded.tokenizer), loaded.source)


def load_generator(name: str, trust_remote_code: bool = False, max_length: int = 128) -> MaskedLMGenerator:
    """MATE-KD's generator: a masked LM (Hub id or folder), or a causal LM such as the embedded
    `smollm2-135m` (resampling tokens from their prefix; for machines without a masked LM)."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    try:
        source = resolve(name)
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        if config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            loaded = load(name, trust_remote_code=trust_remote_code)
            return CausalLMGenerator(loaded.model, loaded.tokenizer, max_length)
        model = AutoModelForMaskedLM.from_pretrained(source, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise SettingsError(
            f"MATE-KD needs a masked-LM generator and {name!r} could not be loaded ({str(err).splitlines()[0]}). "
            "Give --generator a Hub masked LM (e.g. distilroberta-base, bert-base-uncased) with network access, "
            "a local folder holding one, or, offline, a causal LM such as smollm2-135m (it resamples tokens "
            "from their left context); or leave mate and combined out of --methods.") from None
    return MaskedLMGenerator(model, tokenizer, max_length)


# ----------------------------------------------------------------------------- training


def _trainer_class():
    class FinetuneTrainer(LMTrainer):
        """The Trainer with the loss of one KD method; evaluation is the plain task loss."""

        def __init__(self, *args: Any, method=None, teacher=None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.method, self.teacher = method, teacher
            if teacher is not None:
                teacher.eval().requires_grad_(False)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
                loss = task_loss(outputs.logits, inputs["labels"])
                return (loss, outputs) if return_outputs else loss
            if self.teacher is not None:
                self.teacher.to(inputs["input_ids"].device)
            progress = self.state.global_step / max(1, self.state.max_steps)
            loss, parts = self.method(model, self.teacher, inputs, progress)
            self.record(**parts)
            return loss

    return FinetuneTrainer


def _method(s: FinetuneSettings, method: str, seed: int, tokenizer, teacher_tokenizer, collate: Collator,
            generator: MaskedLMGenerator | None):
    """The loss of `method`; MATE-KD's gets its own copy of `generator`, so every run starts from the same one."""
    if not getattr(METHODS[method], "needs_generator", False):
        return METHODS[method](s.kd_config(seed), generator=None, encode=None)
    generator = type(generator)(copy.deepcopy(generator.model), generator.tokenizer, s.max_length)
    device = pick_device("auto")
    generator.model.to(device)

    def encode(texts: list[str]):
        student = {k: v.to(device) for k, v in collate.encode(tokenizer, texts).items()}
        return student, {k: v.to(device) for k, v in collate.encode(teacher_tokenizer, texts).items()}

    return METHODS[method](s.kd_config(seed), generator=generator, encode=encode)


def train_one(s: FinetuneSettings, task: Task, train: list[dict], test: list[dict], method: str, seed: int,
              folder: Path, generator: MaskedLMGenerator | None = None) -> dict[str, Any]:
    """Fine-tune `s.model` with one method and seed (carrying on from the folder's last checkpoint,
    as heal's runs do); save model/ and return its record."""
    from datasets import Dataset
    from transformers import set_seed

    set_seed(seed)
    model, tokenizer, source = load_classifier(s.model, task, s.load)
    if frozen := freeze(model, s.train.freeze):
        print(f"[lmshrink] {method} seed {seed}: {frozen}", flush=True)
    teacher = teacher_tokenizer = None
    if METHODS[method].needs_teacher:
        teacher, teacher_tokenizer, _ = load_classifier(s.teacher, task, s.load)
    collate = Collator(tokenizer, teacher_tokenizer, s.max_length, task.num_labels == 1)
    kd = _method(s, method, seed, tokenizer, teacher_tokenizer, collate, generator)
    # examples are padded per batch, so no token budget; every training example is used
    args = training_arguments(s.train, folder, seed, dataloader_drop_last=False, eval_strategy="no")
    test_set = Dataset.from_list(test)
    checkpoint = last_checkpoint(folder / "checkpoints")  # check_folders checked it is this run's
    stop, metrics_file = StopOnSignal(), MetricsFile(folder / "metrics.jsonl", checkpoint_step(checkpoint))
    trainer = _trainer_class()(model=model, args=args, train_dataset=Dataset.from_list(train),
                               eval_dataset=test_set, data_collator=collate, processing_class=tokenizer,
                               callbacks=[metrics_file, stop, RecordCheckpoints(provenance(
                                   "finetune", to_dict(s), method=method, seed=seed))],
                               method=kd, teacher=teacher)
    if checkpoint:
        mate = getattr(kd, "generator", None) is not None
        restarts = " (the MATE-KD generator restarts from its initial weights)" if mate else ""
        print(f"finetune {method} seed {seed}: resuming from {Path(checkpoint).name}{restarts}")
    _, seconds = trained(trainer, checkpoint, metrics_file, stop, "run the same command to carry on (finished "
                                                                  "seeds are kept)")
    prediction = trainer.predict(test_set)
    labels = [e["label"] for e in test]
    metrics = scores(task, prediction.predictions, labels)
    record = provenance("finetune", to_dict(s), method=method, seed=seed, model_source=source, metrics=metrics,
                        per_item=item_scores(task, prediction.predictions, labels),
                        train_seconds=seconds, train_examples=len(train), eval_examples=len(test),
                        task_spec=to_dict(task))
    if s.save_models:
        save_trained(trainer, folder / "model", record, f"{Path(s.output).name}-{method}-seed-{seed}")
    write_json(folder / RECORD, record)
    drop_checkpoints(trainer, folder / "checkpoints", s.train)
    print(f"finetune {method} seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
          + f" in {seconds:.0f}s")
    return record


# which runs the command makes, not what each one computes: a method's or seed's own folder is
# checked without them
RUN_INDEPENDENT = ("methods", "seeds")


def check_folders(s: FinetuneSettings) -> dict[tuple[str, int], dict[str, Any]]:
    """Before any work: --overwrite clears the output folder; otherwise each method's and seed's folder
    is a heal run's (`heal.runs.carry_on`): a finished run with these settings is kept (its record
    returned, by (method, seed)), an unfinished one carried on, one made with other settings refused.
    The LM task's runs are pretrain / distill runs that check themselves."""
    out = Path(s.output)
    if s.train.overwrite:
        for path in out.iterdir():
            if path.name != ".lmshrink.lock":  # held by this run
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return {}
    if s.task == "lm":
        return {}
    done = {(method, seed): carry_on(s, out / method / f"seed-{seed}", RUN_INDEPENDENT, s.save_models)
            for method in s.methods for seed in s.seeds}
    return {key: record for key, record in done.items() if record}


def evaluate_teacher(s: FinetuneSettings, task: Task, test: list[dict]) -> dict[str, float]:
    """The teacher's metrics on the same evaluation examples."""
    from datasets import Dataset

    model, tokenizer, _ = load_classifier(s.teacher, task, s.load)
    args = trainer_arguments(Path(s.output) / ".teacher-eval", "fp32", per_device_eval_batch_size=s.train.batch_size)
    collate = Collator(tokenizer, None, s.max_length, task.num_labels == 1)
    # the fine-tuning trainer's evaluation path: the plain task loss, no method
    trainer = _trainer_class()(model=model, args=args, data_collator=collate)
    prediction = trainer.predict(Dataset.from_list(test))
    return scores(task, prediction.predictions, [e["label"] for e in test])


# ----------------------------------------------------------------------------- LM task


def run_lm(s: FinetuneSettings) -> list[dict[str, Any]]:
    """Causal-LM fine-tuning reported by test perplexity (WikiText-103 protocol): `pretrain` (method
    none) or `distill` (method kd, with the KD mix below), each handed this command's `corpus` and
    `train` groups with the seed set; each run's folder keeps its own record."""
    records = []
    for method in s.methods:
        for seed in s.seeds:
            folder = Path(s.output) / method / f"seed-{seed}"
            common = dict(model=s.model, output=str(folder), load=s.load,
                          corpus=dataclasses.replace(s.corpus, seed=seed), train=s.train)
            # each run carries on or is kept if finished with the same settings, and refuses other settings
            if method == "kd":  # (1 - alpha) * CE + alpha * T^2 * KL, as the classification KD method
                distill(DistillSettings(**common, kd=KDArgs(teacher=s.teacher, temperature=s.temperature,
                                                            alpha_ce=s.alpha, alpha_clm=1 - s.alpha, alpha_cos=0.0)))
            else:
                pretrain(PretrainSettings(**common))
            done = read_record(folder)
            records.append({**done, "method": method, "seed": seed, "train_seconds": done["metrics"]["train_seconds"],
                            "metrics": {"perplexity": done["metrics"]["heldout_ppl_after"]}})
    return records


# ----------------------------------------------------------------------------- report


def summarize(records: list[dict[str, Any]], teacher: dict[str, float] | None) -> dict[str, Any]:
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    rows = []
    for method, runs in by_method.items():
        names = list(runs[0]["metrics"])
        row = {"method": method, "seeds": [r["seed"] for r in runs],
               "train_seconds": statistics.mean(r["train_seconds"] for r in runs)}
        for name in names:
            values = [r["metrics"][name] for r in runs]
            row[name] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "values": values}
            if all(name in r.get("per_item", {}) for r in runs):  # one list of item scores per seed
                row[name]["per_item"] = [r["per_item"][name] for r in runs]
        rows.append(row)
    return {"rows": rows, "teacher": teacher}


def markdown(summary: dict[str, Any], s: FinetuneSettings, main: str) -> str:
    rows, teacher = summary["rows"], summary["teacher"]
    names = [k for k in rows[0] if k not in ("method", "seeds", "train_seconds")]
    lines = [f"# Fine-tuning `{s.model}` on `{s.task}`", "",
             f"Methods over seeds {', '.join(map(str, s.seeds))}: mean +- std (sample std over seeds); "
             f"teacher `{s.teacher}`." if s.teacher else f"Seeds {', '.join(map(str, s.seeds))}.", "",
]
    table = [("teacher", *(f"{teacher[n]:.4f}" if n in teacher else "-" for n in names), "-")] if teacher else []
    table += [(r["method"], *(f"{r[n]['mean']:.4f} +- {r[n]['std']:.4f}" for n in names), f"{r['train_seconds']:.0f}")
              for r in rows]
    lines += md_table(("method", *names, "train s (mean)"), table, "l" + "r" * (len(names) + 1))
    best_none = next((r[main]["mean"] for r in rows if r["method"] == "none"), None)
    if best_none is not None and len(rows) > 1:
        lower_better = main == "perplexity"
        better = [r["method"] for r in rows if r["method"] != "none"
                  and (r[main]["mean"] < best_none if lower_better else r[main]["mean"] > best_none)]
        lines += ["", f"Against `none` on {main} (mean over seeds): "
                  + (f"{', '.join(better)} did better." if better else "no KD method did better on this run.")]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], main: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 3, 4))
    means = [r[main]["mean"] for r in rows]
    ax.bar([r["method"] for r in rows], means, yerr=[r[main]["std"] for r in rows], capsize=6, color="tab:blue")
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r[main]["values"]), r[main]["values"], color="black", s=12, zorder=3)
    if summary["teacher"] and main in summary["teacher"]:
        ax.axhline(summary["teacher"][main], color="tab:red", linestyle="--", label="teacher")
        ax.legend()
    low = min(min(r[main]["values"]) for r in rows)
    high = max([max(r[main]["values"]) for r in rows] + [(summary["teacher"] or {}).get(main, -math.inf)])
    ax.set_ylim(max(0.0, low - 0.15 * (high - low + 1e-9)), high + 0.1 * (high - low + 1e-9))
    ax.set(ylabel=main, title=title)
    save_figure(fig, path)
    plt.close(fig)


@holding_output
def run(s: FinetuneSettings) -> dict[str, Any]:
    out = Path(s.output)
    finished = check_folders(s)
    for name in filter(None, (s.model, s.teacher)):  # every model named, checked before the first loads
        s.load.check(name)
    if s.task == "lm":
        records, teacher, main = run_lm(s), None, "perplexity"
    else:
        task, train, test = load_task(s)
        main = task.metrics[0]
        # Everything that can fail is loaded before the first run: the teacher (evaluated on the
        # same examples) and MATE-KD's generator.
        teacher = evaluate_teacher(s, task, test) if s.teacher else None
        if "rail" in s.methods:
            check_rail(*(s.load.config(name).num_hidden_layers for name in (s.model, s.teacher)),
                       *(s.load.config(name).hidden_size for name in (s.model, s.teacher)))
        needs_generator = any(getattr(METHODS[m], "needs_generator", False) for m in s.methods)
        generator = load_generator(s.generator, s.load.trust_remote_code, s.max_length) if needs_generator else None
        records = []
        for method in s.methods:
            for seed in s.seeds:
                done = finished.get((method, seed))  # made with these settings (check_folders)
                records.append(done or train_one(s, task, train, test, method, seed, out / method / f"seed-{seed}",
                                                 generator))
    summary = summarize(records, teacher)
    report = markdown(summary, s, main)
    record = provenance("finetune", to_dict(s), main_metric=main, **summary)
    write_json(out / "report.json", record)
    write_json(out / RECORD, record)
    write_text(out / "report.md", report)
    plot(summary, main, out / "report.png", f"{s.task}: {main} by method (bars: mean +- std, dots: seeds)")
    print(report)
    return summary
