import numpy as np

from lpo.metrics.stats import bootstrap_ci, grouped_bootstrap_ci


def test_bootstrap_ci_covers_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = bootstrap_ci(rng.random(50) < 0.7, seed=1)
    large = bootstrap_ci(rng.random(5000) < 0.7, seed=1)
    assert small["lo"] <= small["mean"] <= small["hi"]
    assert (large["hi"] - large["lo"]) < (small["hi"] - small["lo"]) / 4
    assert large["lo"] < 0.7 < large["hi"]


def test_bootstrap_is_seeded():
    x = np.arange(20) % 3 == 0
    assert bootstrap_ci(x, seed=4) == bootstrap_ci(x, seed=4)


def test_grouped_bootstrap_is_wider_for_correlated_groups():
    # 20 prompts, 10 images each, all images of a prompt identical: the effective n is 20, not 200.
    groups = np.repeat(np.arange(20), 10)
    values = np.repeat(np.arange(20) % 2, 10).astype(float)
    grouped = grouped_bootstrap_ci(values, groups, seed=0)
    naive = bootstrap_ci(values, seed=0)
    assert grouped["groups"] == 20
    assert (grouped["hi"] - grouped["lo"]) > 2 * (naive["hi"] - naive["lo"])
