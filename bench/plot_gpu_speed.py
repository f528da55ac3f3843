"""The healing benchmark's GPU run as a chart: tokens/s and MFU of each path, at GPT-2's and
SmolLM2's shapes, from the raw results `bench/heal_speed.py` wrote (docs/bench-heal-gpu-h200.json).

    python bench/plot_gpu_speed.py docs/bench-heal-gpu-h200.json docs/gpu_speed.png
"""

from __future__ import annotations

import json
import sys

from lmshrink.records import save_figure


def main(source: str, target: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(open(source).read())
    shapes = list(data["results"])
    fig, axes = plt.subplots(len(shapes), 1, figsize=(8, 2.2 * len(shapes) + 0.6), squeeze=False)
    for ax, shape in zip(axes[:, 0], shapes, strict=True):
        paths = data["results"][shape]
        names = list(paths)
        speeds = [paths[n]["tokens_per_s"] / 1e3 for n in names]
        bars = ax.barh(names, speeds, color=["grey" if n.startswith("bare") else "C0" for n in names])
        for bar, n in zip(bars, names, strict=True):
            ax.annotate(f"{100 * paths[n]['mfu']:.0f}% MFU", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                        xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set(xlabel="thousand tokens/s (bf16, one H200)", title=f"healing at {shape} shapes")
        ax.set_xlim(0, max(speeds) * 1.3)
    fig.tight_layout()
    save_figure(fig, target)
    plt.close(fig)


if __name__ == "__main__":
    main(*sys.argv[1:3])
