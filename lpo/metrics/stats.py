"""Bootstrap confidence intervals (over prompts or samples), plain and paired."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Mean and percentile-bootstrap (1 - alpha) interval of `values` (1-D; one entry per resampling unit)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))
    means = values[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(values.mean()), "lo": float(lo), "hi": float(hi), "n": int(values.size)}


def grouped_bootstrap_ci(values, groups, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Bootstrap over groups (e.g. prompts, each with several images): resample groups, average their samples."""
    values = np.asarray(values, dtype=np.float64)
    groups = np.asarray(groups)
    _, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values)
    counts = np.bincount(inverse)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, sums.size, size=(n_boot, sums.size))
    means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(values.mean()), "lo": float(lo), "hi": float(hi), "n": int(values.size), "groups": int(sums.size)}
