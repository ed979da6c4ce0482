"""The shapes world's judge of images: the oracle's detections scored by the annotator's noiseless reward.

Used where the truth about a sampled image is wanted (calibrate's rollout mode, sibling_lrm, the LPO
diagnostics in scripts/): reward(images, prompt indices) -> r = alignment + lambda quality (DESIGN notes,
docs/design.md "simulated annotator"); two rewards closer than the annotator's tie margin are a tie.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from lpo.config import Config
from lpo.world.annotator import check_annotator, reward
from lpo.world.oracle import judge


@dataclass(frozen=True)
class Judge:
    """Scores decoded images against their prompts: reward(images uint8 (N, H, W, 3), prompt indices (N,)) -> (N,).

    Rewards closer than tie_margin are a tie.
    """

    name: str
    reward: Callable[[np.ndarray, np.ndarray], np.ndarray]
    tie_margin: float


def shapes_judge(cfg: Config, triples: Sequence[Sequence[str]]) -> Judge:
    """The shapes oracle + the simulated annotator's noiseless reward r = alignment + lambda quality."""
    check_annotator(cfg.annotator)
    table = [list(t) for t in triples]

    def score(images: np.ndarray, prompt_idx: np.ndarray) -> np.ndarray:
        return reward(judge(images, [table[i] for i in prompt_idx], cfg.world), cfg.annotator)

    return Judge("shapes oracle + annotator reward", score, cfg.annotator.tie_margin)


def judge_agreement(r_w: np.ndarray, r_l: np.ndarray, tie_margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(agree, tie) of a reward model's best (w) and worst (l) child, (B,) bool each.

    tie: |r_w - r_l| < tie_margin or r_w == r_l; agree: r_w > r_l and no tie (ties are never agreement).
    """
    diff = np.asarray(r_w, dtype=np.float64) - np.asarray(r_l, dtype=np.float64)
    tie = (np.abs(diff) < tie_margin) | (diff == 0)
    return (diff > 0) & ~tie, tie
