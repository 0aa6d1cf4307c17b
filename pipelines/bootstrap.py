"""The 95% confidence interval of a run's main metric: a percentile bootstrap over the evaluated examples, with
each task's `bootstrap_statistic` (pipelines/recipe.py) giving the metric on a resample. Written into the
evaluation report (pipelines/report.py)."""

from __future__ import annotations

import math
import sys

CONFIDENCE = 0.95


def bootstrap_ci(statistic, n: int, resamples: int = 1000, seed: int = 0, confidence: float = CONFIDENCE):
    """Percentile bootstrap interval of `statistic(indices)` over `resamples` draws of n indices with
    replacement from numpy's default_rng(seed). Returns (low, high), or None with fewer than 2 examples
    or no resamples."""
    import numpy as np

    if resamples <= 0 or n < 2:
        return None
    rng = np.random.default_rng(seed)
    values = np.empty(resamples, dtype=np.float64)
    for b in range(resamples):
        values[b] = statistic(rng.integers(0, n, size=n))
    tail = (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [100.0 * tail, 100.0 * (1.0 - tail)])
    return float(low), float(high)


def headline_interval(recipe, gathered: dict, cfg, metrics: dict, split: str | None = None) -> dict | None:
    """The bootstrap CI of the recipe's main metric, with how it was made."""
    import numpy as np

    name = recipe.main_metric
    resamples = getattr(cfg, "bootstrap_samples", 1000)
    n = recipe.example_count(gathered, split)  # examples, which may be fewer than the gathered rows
    if name not in metrics or not resamples or n < 2:
        return None
    statistic = recipe.bootstrap_statistic(gathered, cfg, split)
    # The statistic on all examples must be the reported value, or the interval describes another number.
    full = statistic(np.arange(n))
    if not math.isclose(full, metrics[name], rel_tol=1e-6, abs_tol=1e-9):
        print(f"warning: {recipe.name}.bootstrap_statistic gives {name} {full:.6g} on all examples but the "
              f"evaluation reported {metrics[name]:.6g}; the interval may not match the reported value", file=sys.stderr)
    interval = bootstrap_ci(_timed(statistic, resamples, recipe.name), n, resamples, cfg.seed)
    if interval is None:
        return None
    return {"metric": name, "estimate": metrics[name], "low": interval[0], "high": interval[1],
            "confidence": CONFIDENCE, "resamples": resamples, "seed": cfg.seed,
            "method": "percentile bootstrap over examples"}


def _timed(statistic, resamples: int, recipe_name: str, budget_s: float = 120.0):
    """`statistic`, with one warning when the first resamples say the whole bootstrap will be slow."""
    import time

    state = {"calls": 0, "started": None}

    def timed(indices):
        if state["started"] is None:
            state["started"] = time.perf_counter()
        value = statistic(indices)
        state["calls"] += 1
        if state["calls"] == 10:
            projected = (time.perf_counter() - state["started"]) / 10 * resamples
            if projected > budget_s:
                print(f"warning: the bootstrap interval will take about {projected:.0f} s ({resamples} resamples); "
                      f"lower --bootstrap-samples, or give the {recipe_name} recipe a cheaper bootstrap_statistic",
                      file=sys.stderr)
        return value

    return timed
