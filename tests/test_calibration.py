"""lpo.calibration: the official sigma/threshold tables, measured thresholds, Wilson intervals."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from lpo.calibration import (
    above_chance,
    accuracy_ci,
    kept_share,
    rollout_threshold,
    score_gap_for_threshold,
    sigma_thresholds,
    threshold_at,
)
from lpo.diffusion import ddim_sigmas

# Kwai-Kolors/LPO lpo/lpo/preference_models/compare_funcs.py = docs/method.md §3, t = 1, 51, ..., 951.
OFFICIAL_SIGMAS = [0.0206, 0.0406, 0.1673, 0.2144, 0.2509, 0.2836, 0.3144, 0.3442, 0.3732, 0.4016,
                   0.4293, 0.4565, 0.4829, 0.5087, 0.5336, 0.5576, 0.5807, 0.6029, 0.6241, 0.6444]
METHOD_TH_SD15 = [0.350, 0.355, 0.385, 0.397, 0.405, 0.413, 0.421, 0.428, 0.435, 0.442, 0.448, 0.455,
                  0.461, 0.467, 0.473, 0.479, 0.485, 0.490, 0.495, 0.500]


def sd_scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                         steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def rounded(x: torch.Tensor, digits: int) -> list[float]:
    return [round(v, digits) for v in x.tolist()]


def sd_table() -> tuple[torch.Tensor, torch.Tensor]:
    timesteps, sigmas = ddim_sigmas(sd_scheduler(), 20, eta=1.0)
    return timesteps.flip(0), sigmas.flip(0)  # ascending t, as the official table


# ------------------------------------------------------------------------------------------------ sigma rule


def test_sd_sigma_table_equals_official_to_printed_digits():
    timesteps, sigmas = sd_table()
    assert timesteps.tolist() == list(range(1, 952, 50))
    assert rounded(sigmas, 4) == OFFICIAL_SIGMAS
    # sigma(1) uses alpha_prev = final_alpha_cumprod = alpha-bar[0] (set_alpha_to_one=False) ...
    one = DDIMScheduler(**{**sd_scheduler().config, "set_alpha_to_one": True})
    # ... with alpha_prev = 1 the last sigma would be 0 and the table's 0.0206 would not come out.
    assert ddim_sigmas(one, 20, 1.0)[1][-1].item() == 0.0


def test_sd_threshold_tables_equal_method_md():
    _, sigmas = sd_table()
    th_sd15 = sigma_thresholds(sigmas, 0.35, 0.5)
    assert rounded(th_sd15, 3) == METHOD_TH_SD15
    th_sdxl = sigma_thresholds(sigmas, 0.45, 0.6)
    assert rounded(th_sdxl, 3) == [round(v + 0.1, 3) for v in METHOD_TH_SD15]
    # from the official rounded table, identical to 3 digits
    assert rounded(sigma_thresholds(torch.tensor(OFFICIAL_SIGMAS, dtype=torch.float64), 0.35, 0.5), 3) == METHOD_TH_SD15
    # docs/method.md: score gap 0.73 -> 1.10 (SD1.5), 0.97 -> 1.39 (SDXL)
    assert [round(score_gap_for_threshold(th), 2) for th in (0.35, 0.5, 0.45, 0.6)] == [0.73, 1.10, 0.97, 1.39]


def test_threshold_at_matches_official_t_div_50_indexing():
    timesteps, sigmas = sd_table()
    th = sigma_thresholds(sigmas, 0.35, 0.5)
    t = torch.tensor([951, 1, 501, 951])
    torch.testing.assert_close(threshold_at(timesteps, th, t), th[t // 50])
    with pytest.raises(ValueError, match="not in the threshold table"):
        threshold_at(timesteps, th, torch.tensor([950]))


def test_sigma_thresholds_rejects_degenerate_input():
    with pytest.raises(ValueError, match="all equal"):
        sigma_thresholds(torch.zeros(20), 0.35, 0.5)
    with pytest.raises(ValueError, match="th_max"):
        sigma_thresholds(torch.tensor([0.1, 0.2]), 0.35, 1.0)


# ------------------------------------------------------------------------------------------------ measured rule


def _reference_threshold(gaps, agree, precision, min_pairs):
    """Brute force: every distinct cut value, keep gap > cut, smallest qualifying cut's kept set."""
    best = None
    for cut in sorted(set(gaps)) + [0.0]:  # th >= 0: zero gaps are never kept
        kept = [a for g, a in zip(gaps, agree) if g > cut]
        if len(kept) >= min_pairs and sum(kept) / len(kept) >= precision:
            if best is None or len(kept) > best:
                best = len(kept)
    return best


def test_rollout_threshold_hand_cases():
    gaps = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    agree = [True, True, True, False, False, False]
    assert rollout_threshold(gaps, agree, 0.75, 1) == pytest.approx(0.55)  # top 4: 3/4 agree
    assert rollout_threshold(gaps, agree, 1.0, 1) == pytest.approx(0.65)  # top 3 only
    assert rollout_threshold(gaps, agree, 0.75, 5) is None  # 5 pairs reach only 3/5
    assert rollout_threshold(gaps[:2], agree[:2], 0.5, 3) is None  # too few pairs
    # tied gaps are kept or dropped together
    assert rollout_threshold([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0], 0.75, 1) == pytest.approx(0.7)
    assert rollout_threshold([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0], 0.66, 1) == pytest.approx(0.3)
    # everything qualifies: the threshold is half the smallest gap (0 is the floor), so gap > th keeps all
    th = rollout_threshold([0.3, 0.2], [1, 1], 0.9, 1)
    assert th == pytest.approx(0.1) and kept_share([0.3, 0.2], th) == 1.0
    # a zero gap (equal scores) is never kept: th >= 0
    assert rollout_threshold([0.3, 0.0], [1, 1], 0.9, 1) == pytest.approx(0.15)
    assert rollout_threshold([0.0, 0.0], [1, 1], 0.9, 1) is None
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        rollout_threshold([0.3, -0.1], [1, 1], 0.9, 1)


def test_rollout_threshold_matches_brute_force_on_synthetic_data():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        gaps = torch.rand(60, generator=gen).round(decimals=2)  # rounding creates ties
        agree = torch.rand(60, generator=gen) < 0.4 + 0.6 * gaps  # judge agrees more on clear pairs
        for precision, min_pairs in ((0.8, 5), (0.9, 10), (0.95, 1)):
            th = rollout_threshold(gaps, agree, precision, min_pairs)
            n_best = _reference_threshold(gaps.tolist(), agree.tolist(), precision, min_pairs)
            if n_best is None:
                assert th is None
            else:
                kept = gaps > th
                assert int(kept.sum()) == n_best
                assert agree[kept].double().mean().item() >= precision - 1e-12
                assert int((gaps >= th).sum()) == n_best  # > and >= agree on these data


def test_rollout_threshold_finds_the_planted_cut():
    # The judge agrees on every pair with gap > 0.5 and on none below: the 100%-precision cut is 0.5.
    gaps = torch.linspace(0.005, 0.995, 100)
    agree = gaps > 0.5
    th = rollout_threshold(gaps, agree, 1.0, 10)
    assert 0.49 < th < 0.51
    assert kept_share(gaps, th) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ intervals


def test_accuracy_ci_wilson_values():
    mean, lo, hi = accuracy_ci([1] * 80 + [0] * 20)
    assert mean == pytest.approx(0.8)
    assert (lo, hi) == (pytest.approx(0.7112, abs=1e-4), pytest.approx(0.8666, abs=1e-4))
    mean, lo, hi = accuracy_ci(torch.ones(10, dtype=torch.bool))
    assert mean == 1.0 and hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=1e-4)
    with pytest.raises(ValueError, match="empty"):
        accuracy_ci([])


def test_above_chance():
    assert above_chance([1] * 60 + [0] * 40)  # Wilson lower bound 0.502
    assert not above_chance([1] * 60 + [0] * 40, margin=0.01)
    assert not above_chance([1] * 55 + [0] * 45)
    assert not above_chance([1, 1, 1])  # 3/3 is not enough evidence (lower bound 0.44)
    assert math.isclose(accuracy_ci([1, 1, 1])[1], 0.4385, abs_tol=1e-4)
