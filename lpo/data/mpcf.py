"""Multi-Preference Consistent Filtering (MPCF), docs/method.md section 2 (paper section 4.2, Tab. 1).

A win-lose pair is kept when its winner is not worse than its loser on the auxiliary rewards: with gaps
``G_* = S_*(I_w) - S_*(I_l)`` (A = aesthetic, C = CLIP score, V = VQA score)

| strategy | rule                          |
|----------|-------------------------------|
| 1        | G_A >= 0,    G_C >= 0, G_V >= 0 |
| 2        | G_A >= -0.5, G_C >= 0, G_V >= 0 |   (the paper's choice)
| 3        | G_A >= -1,   G_C >= 0, G_V >= 0 |

and a tie pair when its images score alike: ``|G_A| <= 0.2, |G_C| <= 0.03, |G_V| <= 0.07`` (absolute gaps,
whatever the strategy). Strategy "none" keeps every pair. A missing (NaN) score fails its rule.

The bounds are inclusive, as the paper's table writes them; the official code
(Kwai-Kolors/LPO:lrm/lrm_15/trainer/datasets/step_sd_hf_dataset.py) compares strictly (``gap > -0.5``,
``gap < 0.2``). The two differ only for gaps exactly on a bound, e.g. two images with equal CLIP scores.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

# Lower bounds on the winner-minus-loser gaps (aesthetic, clip, vqa) per strategy; "none" has no rule.
WIN_LOSE_MIN_GAP: dict[str, Optional[tuple[float, float, float]]] = {
    "none": None,
    "1": (0.0, 0.0, 0.0),
    "2": (-0.5, 0.0, 0.0),
    "3": (-1.0, 0.0, 0.0),
}
# Upper bounds on the absolute gaps (aesthetic, clip, vqa) of a tie pair.
TIE_MAX_ABS_GAP: tuple[float, float, float] = (0.2, 0.03, 0.07)
SCORERS = ("aesthetic", "clip", "vqa")


def _check_strategy(strategy: str) -> None:
    if strategy not in WIN_LOSE_MIN_GAP:
        raise ValueError(f"latents.mpcf.strategy: {strategy!r} is not one of {', '.join(WIN_LOSE_MIN_GAP)}")


def _passes(gaps: np.ndarray, is_tie: np.ndarray, strategy: str) -> np.ndarray:
    """Per pair and scorer, whether the gap passes its rule (docs/method.md section 2 table). (N, 3) bool."""
    win_lose_ok = gaps >= np.asarray(WIN_LOSE_MIN_GAP[strategy])  # (N, 3); NaN -> False
    tie_ok = np.abs(gaps) <= np.asarray(TIE_MAX_ABS_GAP)  # (N, 3); NaN -> False
    return np.where(is_tie[:, None], tie_ok, win_lose_ok)


def _stack(gap_aesthetic, gap_clip, gap_vqa, is_tie) -> tuple[np.ndarray, np.ndarray]:
    gaps = np.stack([np.asarray(g, dtype=np.float64) for g in (gap_aesthetic, gap_clip, gap_vqa)], axis=1)  # (N, 3)
    tie = np.asarray(is_tie, dtype=bool).reshape(-1)  # (N,)
    if gaps.ndim != 2 or gaps.shape[0] != tie.shape[0]:
        raise ValueError(f"mpcf: gaps and is_tie must be 1-D of one length, got {gaps.shape} and {tie.shape}")
    return gaps, tie


def mpcf_keep(
    gap_aesthetic: np.ndarray,
    gap_clip: np.ndarray,
    gap_vqa: np.ndarray,
    is_tie: np.ndarray,
    strategy: str,
    keep_ties: bool,
) -> np.ndarray:
    """MPCF keep mask (docs/method.md section 2, MPCF table). (N,) bool.

    Gaps are winner-minus-loser for win-lose pairs; for ties either order (only |gap| is used).
    strategy: "none", "1", "2" or "3". keep_ties=False drops every tie, whatever its gaps.
    """
    _check_strategy(strategy)
    gaps, tie = _stack(gap_aesthetic, gap_clip, gap_vqa, is_tie)
    if strategy == "none":
        keep = np.ones(len(tie), dtype=bool)
    else:
        keep = _passes(gaps, tie, strategy).all(axis=1)
    if not keep_ties:
        keep &= ~tie
    return keep


def mpcf_breakdown(
    gap_aesthetic: np.ndarray,
    gap_clip: np.ndarray,
    gap_vqa: np.ndarray,
    is_tie: np.ndarray,
    strategy: str,
    keep_ties: bool,
) -> dict[str, int]:
    """Counts for the log: kept / dropped per part, and per scorer how many pairs failed its rule.

    Keys: win_lose_kept, win_lose_dropped, tie_kept, tie_dropped, and (strategy != "none")
    win_lose_fail_<scorer>, tie_fail_<scorer> (a pair failing two rules counts in both), missing_score
    (pairs with a NaN gap), ties_dropped_by_config (keep_ties=False).
    """
    keep = mpcf_keep(gap_aesthetic, gap_clip, gap_vqa, is_tie, strategy, keep_ties)
    gaps, tie = _stack(gap_aesthetic, gap_clip, gap_vqa, is_tie)
    out = {
        "win_lose_kept": int((keep & ~tie).sum()),
        "win_lose_dropped": int((~keep & ~tie).sum()),
        "tie_kept": int((keep & tie).sum()),
        "tie_dropped": int((~keep & tie).sum()),
        "ties_dropped_by_config": 0 if keep_ties else int(tie.sum()),
    }
    if strategy != "none":
        failed = ~_passes(gaps, tie, strategy)  # (N, 3)
        for j, name in enumerate(SCORERS):
            out[f"win_lose_fail_{name}"] = int((failed[:, j] & ~tie).sum())
            out[f"tie_fail_{name}"] = int((failed[:, j] & tie).sum())
        out["missing_score"] = int(np.isnan(gaps).any(axis=1).sum())
    return out


def pair_gaps(aux: dict[str, float], label_0: float, label_1: float) -> tuple[float, float, float]:
    """(G_A, G_C, G_V) of one pair from its aux scores: winner minus loser; image 0 minus image 1 for a tie."""
    sign = -1.0 if label_1 > label_0 else 1.0
    return tuple(sign * (aux[f"aux_{name}_0"] - aux[f"aux_{name}_1"]) for name in SCORERS)  # type: ignore[return-value]
