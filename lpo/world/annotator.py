"""The shapes world's simulated annotator: a noisy Bradley-Terry labeller over the oracle's judgement.

Reward r = alignment + lambda * quality (docs/design.md, "The shapes world"), with
alignment = mean of the three *hard* attribute correctnesses (fg colour, shape, bg colour) in {0, 1/3, 2/3, 1}.
Hard, not soft (the oracle's confidences), because:
  - it is what a person answers ("is it a red circle?"), and what the evaluation stage reports, so labels and
    metrics measure the same thing;
  - the oracle's hard decisions are the part that is tested (>= 99% right on clean renders), its confidences
    depend on an arbitrary softness constant;
  - it leaves the soft, graded scores to the auxiliary MPCF scorers (aux.py), which then correlate with the
    annotator without being the same function.
Quality (in [0, 1]) stays continuous, so equal-alignment pairs are still ranked by quality, with ties when
the rewards are within the tie margin.

Labels (Pick-a-Pic style): P(A preferred) = sigmoid((r_A - r_B) / tau), sampled with a seeded Generator;
|r_A - r_B| < delta gives a tie (0.5, 0.5).
"""

from __future__ import annotations

import numpy as np

from lpo.config import AnnotatorConfig, ConfigError, WorldConfig
from lpo.world.oracle import judge
from lpo.world.prompts import TripleLike


def check_annotator(cfg: AnnotatorConfig) -> None:
    """Raise ConfigError naming the annotator.<field> that makes no sense."""
    if not cfg.temperature > 0:
        raise ConfigError(f"annotator.temperature: expected > 0, got {cfg.temperature}")
    if cfg.tie_margin < 0:
        raise ConfigError(f"annotator.tie_margin: expected >= 0, got {cfg.tie_margin}")
    if cfg.quality_weight < 0:
        raise ConfigError(f"annotator.quality_weight: expected >= 0, got {cfg.quality_weight}")


def alignment(judgement: dict[str, np.ndarray]) -> np.ndarray:
    """Mean of the hard fg / shape / bg correctnesses of an oracle judgement, (N,) in {0, 1/3, 2/3, 1}."""
    return (judgement["fg"].astype(np.float64) + judgement["shape"] + judgement["bg"]) / 3.0


def reward(judgement: dict[str, np.ndarray], cfg: AnnotatorConfig) -> np.ndarray:
    """r = alignment + lambda * quality (docs/design.md, simulated annotator), (N,)."""
    return alignment(judgement) + cfg.quality_weight * np.asarray(judgement["quality"], dtype=np.float64)


def preference_probability(r_a: np.ndarray, r_b: np.ndarray, temperature: float) -> np.ndarray:
    """Bradley-Terry P(A preferred over B) = sigmoid((r_A - r_B) / tau)."""
    z = (np.asarray(r_a, dtype=np.float64) - np.asarray(r_b, dtype=np.float64)) / temperature
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = sigmoid(z), without overflow


def annotate(
    r_a: np.ndarray, r_b: np.ndarray, cfg: AnnotatorConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sample Pick-a-Pic labels (label_0, label_1) for pairs (A = image 0, B = image 1).

    (1, 0): A preferred, (0, 1): B preferred, (0.5, 0.5): tie where |r_A - r_B| < tie_margin. One uniform
    draw per pair, ties included, so the labels of a pair depend only on the seed and the pair's position.
    """
    check_annotator(cfg)
    r_a, r_b = np.asarray(r_a, dtype=np.float64), np.asarray(r_b, dtype=np.float64)
    if r_a.shape != r_b.shape or r_a.ndim != 1:
        raise ValueError(f"annotate: rewards must be two (N,) arrays, got {r_a.shape} and {r_b.shape}")
    u = rng.random(r_a.shape[0])
    a_wins = u < preference_probability(r_a, r_b, cfg.temperature)
    tie = np.abs(r_a - r_b) < cfg.tie_margin
    label_0 = np.where(tie, 0.5, a_wins.astype(np.float64))
    return label_0, 1.0 - label_0


def agreement_with_noiseless(
    labels: tuple[np.ndarray, np.ndarray], r_a: np.ndarray, r_b: np.ndarray
) -> float:
    """Share of decided pairs (label not a tie, r_A != r_B) whose winner has the higher noiseless reward.

    NaN when no pair is decided.
    """
    label_0 = np.asarray(labels[0], dtype=np.float64)
    diff = np.asarray(r_a, dtype=np.float64) - np.asarray(r_b, dtype=np.float64)
    decided = (label_0 != 0.5) & (diff != 0)
    if not decided.any():
        return float("nan")
    return float(np.mean((label_0[decided] == 1.0) == (diff[decided] > 0)))


def annotate_images(
    images_0: np.ndarray,
    images_1: np.ndarray,
    triples: TripleLike,
    world: WorldConfig,
    cfg: AnnotatorConfig,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Judge both images of each pair against its prompt triple and sample labels.

    Returns label_0, label_1, reward_0, reward_1 (N,) and the judgements' exact_0, exact_1 (bool).
    """
    j0, j1 = judge(images_0, triples, world), judge(images_1, triples, world)
    r0, r1 = reward(j0, cfg), reward(j1, cfg)
    label_0, label_1 = annotate(r0, r1, cfg, rng)
    return {"label_0": label_0, "label_1": label_1, "reward_0": r0, "reward_1": r1,
            "exact_0": j0["exact"], "exact_1": j1["exact"]}
