"""Auxiliary per-image scorers for MPCF (docs/method.md section 2), stand-ins for the paper's three:

- "aesthetic" (LAION aesthetic predictor), 0..10: technical quality plus a composition taste that the
  annotator does not have: 10 * (0.7 quality + 0.3 composition), composition = centring x size preference.
  Prompt-blind, like the real predictor. MPCF gaps: G_A >= -0.5, tie |G_A| <= 0.2.
- "clip" (CLIP score), 0..1: colour agreement with the prompt, blind to shape:
  mean of the soft probabilities that the object is the prompt's fg colour and the background its bg colour
  (a softer likelihood than the oracle's, as CLIP is less crisp). Tie |G_C| <= 0.03.
- "vqa" (VQAScore), 0..1: question answering on shape and background, TIFA-style: mean P(yes) of
  "is there a <shape>?" and "is the background <bg>?". Tie |G_V| <= 0.07.

Each is computed from the oracle's detection with soft likelihoods, while the annotator uses hard
correctness and quality: correlated with the annotator's reward, but not the same function, so MPCF filters
some pairs and keeps others, as in the paper.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from lpo.config import WorldConfig
from lpo.world.oracle import colour_distances, detect, shape_distances, shape_prototypes, soft_probs
from lpo.world.prompts import TripleLike, triple_indices
from lpo.world.render import palette

AUX_NAMES = ("aesthetic", "clip", "vqa")
AESTHETIC_QUALITY_SHARE = 0.7
PREFERRED_AREA = 0.2  # the aesthetic "taste": objects covering ~20% of the image look best
AREA_TOLERANCE = 0.8  # std of log(area / PREFERRED_AREA)
CLIP_COLOUR_SOFTNESS = 0.15
VQA_COLOUR_SOFTNESS = 0.12
VQA_SHAPE_SOFTNESS = 0.12


def composition(det: dict[str, np.ndarray]) -> np.ndarray:
    """(N,) in [0, 1]: centring (1 at the centre, 0 at a distance of half the side) x size preference."""
    offset = np.linalg.norm(np.nan_to_num(det["centre"], nan=0.5) - 0.5, axis=1)
    centring = np.clip(1.0 - 2.0 * offset, 0.0, 1.0)
    log_ratio = np.log(np.maximum(det["area"], 1e-6) / PREFERRED_AREA)
    size = np.exp(-0.5 * (log_ratio / AREA_TOLERANCE) ** 2)
    return np.where(det["has_object"], centring * size, 0.0)


def aux_from_detection(det: dict[str, np.ndarray], target: np.ndarray, world: WorldConfig) -> dict[str, np.ndarray]:
    """The three scores (N,) from an oracle detection and (N, 3) [fg, shape, bg] prompt indices."""
    n = len(target)
    rows = np.arange(n)
    pal = palette(world)
    d_fg = colour_distances(np.nan_to_num(det["fg_rgb"]), pal)
    d_bg = colour_distances(det["bg_rgb"], pal)
    has = det["has_object"]
    p_fg = np.where(has, soft_probs(d_fg, CLIP_COLOUR_SOFTNESS)[rows, target[:, 0]], 0.0)
    p_bg_clip = soft_probs(d_bg, CLIP_COLOUR_SOFTNESS)[rows, target[:, 2]]
    p_bg_vqa = soft_probs(d_bg, VQA_COLOUR_SOFTNESS)[rows, target[:, 2]]
    d_shape = shape_distances(det["shape_features"], shape_prototypes(world))
    p_shape = np.where(has, soft_probs(d_shape, VQA_SHAPE_SOFTNESS)[rows, target[:, 1]], 0.0)
    aesthetic = 10.0 * (AESTHETIC_QUALITY_SHARE * det["quality"] + (1 - AESTHETIC_QUALITY_SHARE) * composition(det))
    return {
        "aesthetic": aesthetic.astype(np.float64),
        "clip": (0.5 * (p_fg + p_bg_clip)).astype(np.float64),
        "vqa": (0.5 * (p_shape + p_bg_vqa)).astype(np.float64),
    }


def aux_scores(
    images: np.ndarray,
    triples: TripleLike,
    world: WorldConfig,
    detection: Optional[dict[str, np.ndarray]] = None,
) -> dict[str, np.ndarray]:
    """aesthetic (0..10), clip (0..1), vqa (0..1) per image for its prompt triple.

    Pass `detection` (oracle.detect of the same images) to skip detecting twice.
    """
    target = triple_indices(triples, world)
    if len(target) != len(images):
        raise ValueError(f"aux_scores: {len(images)} images but {len(target)} triples")
    det = detect(images, world) if detection is None else detection
    return aux_from_detection(det, target, world)
