"""Verdicts that hold up: is A better than B, judged with a 95% interval of the difference.

Claims over runs' values (perplexity, time) get the Welch interval of the difference of the means
over seeds (`verdict`); accuracy claims, where both arms answered the same items, a paired
bootstrap over items and seeds (`paired_bootstrap`). `RULE` says it in a report's words.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive at this budget"


def interval(values: list[float]) -> dict[str, Any]:
    """Mean and 95% t-interval over runs (no interval from one run)."""
    from scipy.stats import t

    n, mean = len(values), statistics.fmean(values)
    half = t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n) if n > 1 else None
    return {"mean": mean, "low": None if half is None else mean - half, "high": None if half is None else mean + half,
            "n": n, "values": values}


def verdict(a: list[float], b: list[float], higher_is_better: bool) -> dict[str, Any]:
    """Is A better than B? The rule: the 95% Welch interval of the difference of means (signed so
    that > 0 favours A) above 0: supported; below 0: contradicted; containing 0, or fewer than two
    runs a side: inconclusive at this budget."""
    from scipy.stats import t

    sign = 1.0 if higher_is_better else -1.0
    diff = sign * (statistics.fmean(a) - statistics.fmean(b))
    if len(a) < 2 or len(b) < 2:
        return {"verdict": INCONCLUSIVE, "difference": diff, "low": None, "high": None, "reason": "fewer than 2 runs"}
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        low = high = diff
    else:
        df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else len(a) + len(b) - 2
        half = t.ppf(0.975, df) * se
        low, high = diff - half, diff + half
    return {"verdict": _word(low, high), "difference": diff, "low": low, "high": high}


def _word(low: float, high: float) -> str:
    """The verdict of a 95% interval of a difference signed so that > 0 favours A."""
    return SUPPORTED if low > 0 else CONTRADICTED if high < 0 else INCONCLUSIVE


Items = dict[str, list[list[float]]]  # task -> one list of item scores (1 right, 0 wrong) per run


def paired_bootstrap(a: Items, b: Items, higher_is_better: bool, draws: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Is A better than B on a score averaged over tasks of per-item results? Both arms answered the
    same items, so items are resampled together (paired), and each arm's runs (seeds) are
    resampled too: the 95% percentile interval of the difference of the two averages, over
    `draws` resamples of items and runs, signed so that > 0 favours A; the verdict words as in
    `verdict`. Judges on the items' noise and the seeds' together, where a Welch interval over a
    few averages sees only the seeds'."""
    import numpy as np

    if sorted(a) != sorted(b) or not a:
        raise ValueError(f"both arms need the same tasks ({sorted(a)} vs {sorted(b)})")
    rng = np.random.default_rng(seed)
    sign = 1.0 if higher_is_better else -1.0
    diff, draws_diff = 0.0, np.zeros(draws)
    for task in a:
        ra, rb = np.asarray(a[task], dtype=float), np.asarray(b[task], dtype=float)  # (runs, items)
        if ra.ndim != 2 or rb.ndim != 2 or ra.shape[1] != rb.shape[1] or ra.shape[1] == 0:
            raise ValueError(f"{task}: both arms need per-item results on the same items")
        n = ra.shape[1]
        items = rng.multinomial(n, np.full(n, 1 / n), size=draws) / n  # (draws, items): each item's weight
        runs = [rng.multinomial(len(r), np.full(len(r), 1 / len(r)), size=draws) / len(r) for r in (ra, rb)]
        means = [((items @ r.T) * w).sum(1) for r, w in zip((ra, rb), runs, strict=True)]  # (draws,) per arm
        draws_diff += sign * (means[0] - means[1]) / len(a)
        diff += sign * (ra.mean() - rb.mean()) / len(a)
    low, high = (float(x) for x in np.percentile(draws_diff, [2.5, 97.5]))
    return {"verdict": _word(low, high), "difference": diff, "low": low, "high": high}


RULE = ("Each claim \"A is better than B\" gets a 95% interval of the difference, signed so that positive favours "
        "A. Entirely above 0: **supported**; entirely below 0: **contradicted**; containing 0: **inconclusive at "
        "this budget**. Accuracy claims (zero-shot, fine-tuning) are judged item by item: both arms answered the "
        "same questions, so the interval is a paired bootstrap that resamples the questions (together for both "
        "arms) and each arm's seeds (10,000 draws), and it counts how few questions a task had. Other claims "
        "(perplexity, time) are judged on the runs' values: the Welch interval of the difference of the means over "
        "seeds (fewer than two runs a side: inconclusive).")
