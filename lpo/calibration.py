"""Pure functions of the ``calibrate`` stage: per-timestep pair thresholds and accuracy intervals.

Two ways to get th(t), the minimum ``pair_gap`` = p_w - p_l = tanh((S_w - S_l)/2) for a pair of children
to be kept (docs/method.md §3 step 2d):
- "sigma": the paper's rule, linear in the DDIM sigma of the step (``sigma_thresholds``, Eq. 11);
- "rollout": measured, the smallest gap at which the LRM's best/worst choice agrees with a judge often
  enough (``rollout_threshold``), with ``accuracy_ci`` / ``above_chance`` to gate untrustworthy timesteps.

Thresholds are strict everywhere, as in the official compare_funcs.py: a pair is kept iff gap > th.

Which sigma the official table lists (checked to all 4 printed digits by tests/test_calibration.py):
``compare_funcs.py`` hard-codes sigma for SD's scaled-linear schedule (beta 0.00085 -> 0.012, 1000 steps,
``steps_offset=1``, ``set_alpha_to_one=False``), DDIM 20 steps ("leading": t = 951, 901, ..., 1), eta = 1,
and indexes it with t // 50. Entry t is the sigma of the step FROM t to t - 50, i.e. the noise of the
children drawn from a parent at t (``lpo.diffusion.ddim_sigmas``): sigma(951) uses alpha_prev =
alpha-bar[901] (0.6444), sigma(51) uses alpha-bar[1] (0.0406), and sigma(1) uses alpha_prev =
``final_alpha_cumprod`` = alpha-bar[0] = 0.99915 (set_alpha_to_one=False; with alpha_prev = 1 it would be
0, not 0.0206). The jump 0.0406 -> 0.1673 between t = 51 and 101 is real: sigma^2 carries the factor
(1 - a_prev) / (1 - a_t), which is 0.0017 / 0.049 for the step 51 -> 1 but 0.049 / 0.107 for 101 -> 51.
SDXL reuses the same table (same betas).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

ArrayLike = Union[torch.Tensor, Sequence[float], Sequence[bool]]

WILSON_Z95 = 1.959963984540054  # two-sided 95% normal quantile

__all__ = [
    "sigma_thresholds",
    "threshold_at",
    "score_gap_for_threshold",
    "rollout_threshold",
    "kept_share",
    "accuracy_ci",
    "above_chance",
]


def sigma_thresholds(sigmas: torch.Tensor, th_min: float, th_max: float) -> torch.Tensor:
    """Dynamic threshold linear in sigma, docs/method.md §3 (paper Eq. 11, compare_funcs.py "sigma").

    th(t) = th_min + (sigma_t - sigma_min) / (sigma_max - sigma_min) * (th_max - th_min),
    sigma_min / sigma_max = the extremes of the given table (``lpo.diffusion.ddim_sigmas``).
    SD1.5: [0.35, 0.5]; SDXL: [0.45, 0.6]. th_min > th_max (inverted ablation) is allowed.

    Args:
        sigmas: (N,) per-timestep sigma table, not all equal.
        th_min, th_max: in [0, 1) (gaps lie in [0, 1)).

    Returns:
        (N,) thresholds, same dtype as sigmas.
    """
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D table with >= 2 entries, got shape {tuple(sigmas.shape)}")
    for name, th in (("th_min", th_min), ("th_max", th_max)):
        if not 0.0 <= th < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {th}")
    s_min, s_max = sigmas.min(), sigmas.max()
    if not bool(s_max > s_min):
        raise ValueError("sigmas are all equal (eta = 0?); the sigma rule needs a range")
    return th_min + (sigmas - s_min) / (s_max - s_min) * (th_max - th_min)


def threshold_at(table_timesteps: torch.Tensor, thresholds: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Look up per-sample thresholds for timesteps t by exact match in the table (any device).

    The official code indexes with t // 50, which only works for the leading 20-step grid; an exact
    lookup works for every grid and raises on a timestep outside it.

    Args:
        table_timesteps: (N,) int timesteps; thresholds: (N,). t: (B,) int.

    Returns:
        (B,) thresholds.
    """
    if table_timesteps.shape != thresholds.shape or table_timesteps.ndim != 1:
        raise ValueError(
            f"table_timesteps {tuple(table_timesteps.shape)} and thresholds {tuple(thresholds.shape)} "
            "must be equal 1-D shapes"
        )
    table_timesteps = table_timesteps.to(t.device)
    match = t.reshape(-1, 1) == table_timesteps.reshape(1, -1)  # (B, N)
    found = match.any(dim=1)
    if not bool(found.all()):
        missing = sorted(set(t[~found].tolist()))
        raise ValueError(f"timesteps {missing} are not in the threshold table {table_timesteps.tolist()}")
    return thresholds.to(t.device)[match.to(torch.int64).argmax(dim=1)]  # (B,)


def score_gap_for_threshold(th: float) -> float:
    """Score difference S_w - S_l at which pair_gap = th: 2 artanh(th) (docs/method.md §3 step 2d)."""
    if not 0.0 <= th < 1.0:
        raise ValueError(f"th must be in [0, 1), got {th}")
    return 2.0 * math.atanh(th)


# --------------------------------------------------------------------------------------------------------
# Measured thresholds
# --------------------------------------------------------------------------------------------------------


def _as_1d(x: ArrayLike, name: str, dtype: torch.dtype) -> torch.Tensor:
    # Python lists go straight to `dtype` (not through float32, which would shift 0.2 to 0.2000000030).
    x = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=dtype)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    return x.to(dtype)


def rollout_threshold(gaps: ArrayLike, agree: ArrayLike, precision: float, min_pairs: int) -> Optional[float]:
    """Smallest gap threshold whose kept pairs agree with the judge at least ``precision`` of the time.

    For one timestep: ``gaps`` (N,) are the LRM's pair gaps of many best/worst choices and ``agree`` (N,)
    whether the judge ranked the same child higher. Among candidate thresholds, keeping {gap > th}, pick
    the smallest (= the most pairs kept) whose kept set has >= ``min_pairs`` pairs and agreement >=
    ``precision``. Agreement need not be monotone in th; the answer is the largest qualifying kept set.

    Gaps are p_w - p_l of the best and worst child, so they lie in [0, 1]. The returned th is the midpoint
    between the smallest kept gap and the largest dropped gap (or 0 when every pair is kept), so
    "gap > th" and "gap >= th" keep the same pairs on these data; th >= 0, so pairs with gap 0 (equal
    scores, nothing to learn) are never kept.

    Returns:
        th as a float, or None when no threshold reaches the precision with >= min_pairs kept pairs.
    """
    gaps_t = _as_1d(gaps, "gaps", torch.float64)
    agree_t = _as_1d(agree, "agree", torch.float64)
    if gaps_t.shape != agree_t.shape:
        raise ValueError(f"gaps {tuple(gaps_t.shape)} and agree {tuple(agree_t.shape)} differ in shape")
    if not bool(((agree_t == 0) | (agree_t == 1)).all()):
        raise ValueError("agree must be boolean (0/1)")
    if not 0.0 < precision <= 1.0:
        raise ValueError(f"precision must be in (0, 1], got {precision}")
    if min_pairs < 1:
        raise ValueError(f"min_pairs must be >= 1, got {min_pairs}")
    if not bool(((gaps_t >= 0) & (gaps_t <= 1)).all()):
        raise ValueError("gaps must lie in [0, 1] (p_w - p_l of the best and worst child; no NaN)")
    n = gaps_t.numel()
    if n < min_pairs:
        return None

    order = torch.argsort(gaps_t, descending=True, stable=True)
    g = gaps_t[order]  # (N,) descending
    kept_agree = torch.cumsum(agree_t[order], dim=0)  # (N,) agreements among the top k = index + 1
    k = torch.arange(1, n + 1, dtype=torch.float64)
    # Cutting after the top k is possible only where the next gap is strictly smaller (ties stay together)
    # and the kept gaps are > 0 (th >= 0). 0 acts as the dropped gap below the last one.
    below = torch.cat([g[1:], torch.zeros(1, dtype=torch.float64)])  # (N,) next gap down, 0 at the end
    boundary = g > below
    # 1e-12: 18/20 >= 0.9 must hold despite float rounding
    ok = boundary & (k >= min_pairs) & (kept_agree / k >= precision - 1e-12)
    if not bool(ok.any()):
        return None
    last = int(torch.nonzero(ok).max())  # largest qualifying kept set: the top last + 1 pairs
    return 0.5 * (float(g[last]) + float(below[last]))


def kept_share(gaps: ArrayLike, threshold: float) -> float:
    """Share of pairs kept by the strict rule gap > threshold."""
    gaps_t = _as_1d(gaps, "gaps", torch.float64)
    if gaps_t.numel() == 0:
        raise ValueError("gaps is empty")
    return float((gaps_t > threshold).double().mean())


def accuracy_ci(correct: ArrayLike) -> tuple[float, float, float]:
    """Accuracy and its Wilson 95% score interval: (mean, lo, hi).

    Wilson rather than the normal approximation: it stays inside [0, 1] and is honest near 0/1 and for
    the small per-timestep counts of a calibration run.
    """
    c = _as_1d(correct, "correct", torch.float64)
    n = c.numel()
    if n == 0:
        raise ValueError("correct is empty")
    if not bool(((c == 0) | (c == 1)).all()):
        raise ValueError("correct must be boolean (0/1)")
    p = float(c.mean())
    z2 = WILSON_Z95**2
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = WILSON_Z95 / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return p, max(0.0, center - half), min(1.0, center + half)


def above_chance(correct: ArrayLike, margin: float = 0.0) -> bool:
    """True iff the Wilson 95% lower bound of the accuracy exceeds 0.5 + margin (CalibrateConfig.chance_margin)."""
    return accuracy_ci(correct)[1] > 0.5 + margin
