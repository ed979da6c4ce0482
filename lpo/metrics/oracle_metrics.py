"""Shapes-world evaluation metrics: the oracle's GenEval-like table, the annotator's reward and the win rate.

docs/method.md section 4 evaluates with external judges on fixed seeds; in the shapes world the judge is the exact
analytic oracle (lpo.world.oracle) and the simulated annotator (lpo.world.annotator). Every value here is per
image; intervals are 95% bootstraps over *prompts* (each prompt's images resampled together), so the n images
of one prompt are not treated as independent evidence.

Pure functions over numpy arrays; the evaluate stage does the sampling and the I/O.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from lpo.config import AnnotatorConfig, WorldConfig
from lpo.metrics.stats import grouped_bootstrap_ci
from lpo.world import annotator, oracle
from lpo.world.prompts import TripleLike

# Per-image oracle values, in the order the report's table shows them (exact match first, as GenEval's overall).
ORACLE_KEYS = ("exact", "fg", "bg", "shape", "has_object", "quality")
# Values compared with the base model image by image (same prompt, same seed).
PAIRED_KEYS = ("exact", "fg", "bg", "shape", "reward")


def oracle_values(
    images: np.ndarray, triples: TripleLike, world: WorldConfig, annot: AnnotatorConfig
) -> dict[str, np.ndarray]:
    """Per-image oracle judgement and annotator reward for images uint8 (N, H, W, 3) against their triples.

    Returns float64 arrays (N,): exact, fg, bg, shape, has_object (0/1), quality in [0, 1] and
    reward = alignment + lambda * quality (docs/design.md, simulated annotator; lpo.world.annotator.reward).
    """
    judgement = oracle.judge(images, triples, world)
    values = {key: np.asarray(judgement[key], dtype=np.float64) for key in ORACLE_KEYS}
    values["reward"] = annotator.reward(judgement, annot)
    return values


def expected_win_rate(reward_model: np.ndarray, reward_base: np.ndarray, temperature: float) -> np.ndarray:
    """Expected annotator preference of each model image over the base image of the same prompt and seed.

    P(model preferred) = sigmoid((r_model - r_base) / tau), the annotator's Bradley-Terry probability
    (docs/design.md, simulated annotator), with no sampling noise: deterministic, and exactly 0.5 for the base
    model against itself. Ties are not special-cased (a tie is worth half a win either way).
    """
    r_model = np.asarray(reward_model, dtype=np.float64)
    r_base = np.asarray(reward_base, dtype=np.float64)
    if r_model.shape != r_base.shape:
        raise ValueError(f"win rate: model rewards {r_model.shape} and base rewards {r_base.shape} differ in shape")
    return annotator.preference_probability(r_model, r_base, temperature)


def paired_differences(
    model: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], keys: Sequence[str] = PAIRED_KEYS
) -> dict[str, np.ndarray]:
    """Per-image differences model - base for `keys`, named "<key>_delta" (same prompt and seed per row)."""
    out = {}
    for key in keys:
        m, b = np.asarray(model[key], dtype=np.float64), np.asarray(base[key], dtype=np.float64)
        if m.shape != b.shape:
            raise ValueError(f"paired {key}: model {m.shape} and base {b.shape} differ in shape")
        out[f"{key}_delta"] = m - b
    return out


def prompt_groups(n_prompts: int, images_per_prompt: int) -> np.ndarray:
    """Group id (the prompt's position) of each image in prompt-major order: (P * n,) = 0,0,..,1,1,.."""
    return np.repeat(np.arange(n_prompts), images_per_prompt)  # (P * n,)


def interval_table(
    values: Mapping[str, np.ndarray], groups: np.ndarray, n_boot: int, seed: int
) -> dict[str, dict]:
    """{name: {mean, lo, hi, n, groups}} with a 95% bootstrap interval over prompts for each per-image array.

    The same bootstrap seed for every metric and model, so intervals of different models resample the same
    prompt draws (a paired difference, e.g. exact_delta, is resampled by prompt in the same way).
    """
    table = {}
    for name, vals in values.items():
        vals = np.asarray(vals, dtype=np.float64)
        if vals.shape != groups.shape:
            raise ValueError(f"metric {name}: {vals.shape[0]} values for {groups.shape[0]} images")
        table[name] = grouped_bootstrap_ci(vals, groups, n_boot=n_boot, seed=seed)
    return table
