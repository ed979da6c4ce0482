"""MPCF: every row of docs/method.md section 2's table, the tie rule, 'none', keep_ties and the breakdown."""

import numpy as np
import pytest

from lpo.data.mpcf import mpcf_breakdown, mpcf_keep, pair_gaps

NAN = float("nan")


def keep(gaps, strategy, tie=False, keep_ties=True):
    """Keep mask for a list of (G_A, G_C, G_V) triples, all win-lose (tie=False) or all ties."""
    g = np.array(gaps, dtype=float).reshape(-1, 3)
    return mpcf_keep(g[:, 0], g[:, 1], g[:, 2], np.full(len(g), tie), strategy, keep_ties).tolist()


# (strategy, aesthetic lower bound) of the win-lose rows; CLIP and VQA must be >= 0 in every strategy.
WIN_LOSE_ROWS = [("1", 0.0), ("2", -0.5), ("3", -1.0)]


@pytest.mark.parametrize("strategy,min_aesthetic", WIN_LOSE_ROWS)
def test_win_lose_rows_of_the_table(strategy, min_aesthetic):
    eps = 1e-6
    assert keep([(min_aesthetic, 0.0, 0.0)], strategy) == [True]  # bounds are inclusive
    assert keep([(min_aesthetic - eps, 0.0, 0.0)], strategy) == [False]
    assert keep([(3.0, -eps, 0.0)], strategy) == [False]  # CLIP gap must be >= 0
    assert keep([(3.0, 0.0, -eps)], strategy) == [False]  # VQA gap must be >= 0
    assert keep([(3.0, 0.2, 0.1)], strategy) == [True]


def test_strategies_are_nested_as_in_the_table():
    gaps = [(-0.3, 0.1, 0.1), (-0.7, 0.1, 0.1), (0.1, 0.1, 0.1), (-1.5, 0.1, 0.1)]
    assert keep(gaps, "1") == [False, False, True, False]
    assert keep(gaps, "2") == [True, False, True, False]
    assert keep(gaps, "3") == [True, True, True, False]


@pytest.mark.parametrize("strategy", ["1", "2", "3"])
def test_tie_row_uses_absolute_gaps_whatever_the_strategy(strategy):
    assert keep([(0.2, 0.03, 0.07), (-0.2, -0.03, -0.07), (0.0, 0.0, 0.0)], strategy, tie=True) == [True] * 3
    assert keep([(0.21, 0.0, 0.0), (0.0, -0.031, 0.0), (0.0, 0.0, 0.071)], strategy, tie=True) == [False] * 3
    # A large positive aesthetic gap passes every win-lose rule but not the tie rule.
    assert keep([(0.5, 0.0, 0.0)], strategy, tie=True) == [False]


def test_keep_ties_false_drops_every_tie():
    assert keep([(0.0, 0.0, 0.0)], "2", tie=True, keep_ties=False) == [False]
    assert keep([(0.0, 0.0, 0.0)], "none", tie=True, keep_ties=False) == [False]
    assert keep([(0.0, 0.0, 0.0)], "2", tie=False, keep_ties=False) == [True]


def test_none_keeps_everything_and_nan_fails_a_rule():
    assert keep([(-9.0, -9.0, -9.0), (NAN, NAN, NAN)], "none") == [True, True]
    assert keep([(NAN, 0.1, 0.1)], "2") == [False]
    assert keep([(0.0, NAN, 0.0)], "2", tie=True) == [False]


def test_mixed_batch_and_breakdown_counts():
    g_a = np.array([0.1, -0.7, 0.1, 0.0, 0.5, NAN])
    g_c = np.array([0.1, 0.1, -0.1, 0.0, 0.0, 0.1])
    g_v = np.array([0.1, -0.1, 0.1, 0.0, 0.0, 0.1])
    tie = np.array([False, False, False, True, True, False])
    mask = mpcf_keep(g_a, g_c, g_v, tie, "2", True)
    assert mask.tolist() == [True, False, False, True, False, False]
    counts = mpcf_breakdown(g_a, g_c, g_v, tie, "2", True)
    assert counts["win_lose_kept"] == 1 and counts["win_lose_dropped"] == 3
    assert counts["tie_kept"] == 1 and counts["tie_dropped"] == 1
    assert counts["win_lose_fail_aesthetic"] == 2  # the -0.7 and the NaN
    assert counts["win_lose_fail_clip"] == 1 and counts["win_lose_fail_vqa"] == 1
    assert counts["tie_fail_aesthetic"] == 1 and counts["missing_score"] == 1
    assert mpcf_breakdown(g_a, g_c, g_v, tie, "none", False)["ties_dropped_by_config"] == 2


def test_pair_gaps_are_winner_minus_loser():
    aux = {"aux_aesthetic_0": 6.0, "aux_aesthetic_1": 5.0, "aux_clip_0": 0.2, "aux_clip_1": 0.3,
           "aux_vqa_0": 0.5, "aux_vqa_1": 0.5}
    assert pair_gaps(aux, 1.0, 0.0) == pytest.approx((1.0, -0.1, 0.0))
    assert pair_gaps(aux, 0.0, 1.0) == pytest.approx((-1.0, 0.1, 0.0))
    assert pair_gaps(aux, 0.5, 0.5) == pytest.approx((1.0, -0.1, 0.0))


def test_unknown_strategy_and_bad_shapes_raise():
    with pytest.raises(ValueError, match="latents.mpcf.strategy: '4'"):
        keep([(0.0, 0.0, 0.0)], "4")
    with pytest.raises(ValueError, match="one length"):
        mpcf_keep(np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(3, bool), "2", True)
