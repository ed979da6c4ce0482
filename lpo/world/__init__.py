"""The embedded `shapes` world: a small text-to-image world whose ground truth is computable.

- prompts:   grammar (Triple, format_prompt, parse_prompt), the seeded train/val/test split of triples
- render:    seeded, vectorised renderer with the pretraining corpus's flaws (blur, noise, low contrast)
- oracle:    analytic detectors on pixels (detect, judge): colours, shape, "no object", quality
- annotator: simulated Bradley-Terry annotator with ties (Pick-a-Pic style labels)
- auxiliary: auxiliary scorers for MPCF (aesthetic, clip, vqa stand-ins)
"""

from lpo.world.annotator import agreement_with_noiseless, alignment, annotate, annotate_images, reward
from lpo.world.auxiliary import AUX_NAMES, aux_scores
from lpo.world.oracle import detect, judge
from lpo.world.prompts import (
    Triple,
    all_triples,
    format_prompt,
    parse_prompt,
    pretrain_triples,
    split_triples,
    triple_indices,
    triples_from_indices,
)
from lpo.world.render import FLAWS, render, render_indices

__all__ = [
    "AUX_NAMES",
    "FLAWS",
    "Triple",
    "agreement_with_noiseless",
    "alignment",
    "all_triples",
    "annotate",
    "annotate_images",
    "aux_scores",
    "detect",
    "format_prompt",
    "judge",
    "parse_prompt",
    "pretrain_triples",
    "render",
    "render_indices",
    "reward",
    "split_triples",
    "triple_indices",
    "triples_from_indices",
]
