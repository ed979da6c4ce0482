"""Stage sibling_lrm's pure parts and its bad-input errors (its end-to-end run is in test_smoke_dag.py)."""

import numpy as np
import pytest

from lpo.config import ConfigError, load_config, replace
from lpo.stages import sibling_lrm as sl


def test_pairs_are_judged_ordered_and_split_by_prompt():
    rewards = np.array([[[1.0, 0.5, 0.52], [0.2, 0.2, 0.9]],
                        [[0.0, 0.0, 0.0], [0.3, 0.1, 0.2]]])  # (N=2 steps, B=2 prompts, K=3)
    rows = sl.preference_pairs(rewards, np.array([True, True]), 0.05)
    assert rows.shape == (2 + 2 + 0 + 3, 4)
    for step, prompt, w, l in rows:  # every row's winner beats its loser by at least the tie margin
        assert rewards[step, prompt, w] - rewards[step, prompt, l] >= 0.05
    assert (0, 0, 1, 2) not in {tuple(r) for r in rows} and (0, 0, 2, 1) not in {tuple(r) for r in rows}  # a tie
    held_out = sl.preference_pairs(rewards, np.array([False, True]), 0.05)
    assert set(held_out[:, 1]) == {1} and len(held_out) == 2 + 3
    assert sl.preference_pairs(rewards, np.array([False, False]), 0.05).shape == (0, 4)


def test_annotator_labels_swap_only_where_the_annotator_disagrees(repo_root):
    cfg = load_config(repo_root / "config" / "config.yaml")
    rewards = np.zeros((1, 1, 3))
    rewards[0, 0] = [2.0, 0.0, 1.94]  # pairs (0, 1) and (2, 1) far apart; (0, 2) just past the tie margin
    rows = sl.preference_pairs(rewards, np.array([True]), cfg.annotator.tie_margin)
    many = np.repeat(rows, 2000, axis=0)
    out, swapped = sl.annotator_labels(rewards, many, cfg.annotator, np.random.default_rng(0))
    assert {tuple(sorted(r[2:])) for r in out} == {tuple(sorted(r[2:])) for r in many}  # same pairs, maybe reordered
    far = many[:, 3] == 1
    assert (out[far] == many[far]).all()  # reward gaps of ~2 at temperature 0.1: never swapped
    near = (many[:, 2] == 0) & (many[:, 3] == 2)
    share = (out[near, 2] == 2).mean()  # sigmoid(-0.06 / 0.1) = 0.354 of these swapped
    assert 0.30 < share < 0.41 and 0.0 < swapped < 1.0


def test_concordance_by_bucket_counts_per_timestep_quarter():
    right = np.array([True, False, True, True])
    out = sl.concordance_by_bucket(right, np.array([999, 800, 300, 49]), 1000)
    assert out["all"] == {"value": 0.75, "pairs": 4}
    assert out["t750-999"] == {"value": 0.5, "pairs": 2}
    assert out["t500-749"] == {"value": None, "pairs": 0}
    assert out["t0-249"] == {"value": 1.0, "pairs": 1}


def test_bad_input_fails_before_any_compute(repo_root, tmp_path):
    cfg = load_config(repo_root / "config" / "config.yaml")
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "prompts.json").write_text("{}")
    with pytest.raises(ConfigError, match="not an LRM folder"):
        sl.check(cfg, tmp_path / "nowhere", tmp_path / "world")
    with pytest.raises(ConfigError, match="sibling_lrm.children"):
        sl.check(replace(cfg, sibling_lrm=replace(cfg.sibling_lrm, children=1)), tmp_path, tmp_path / "world")
    with pytest.raises(ConfigError, match="shapes world"):
        sl.check(load_config(repo_root / "config" / "sd15.yaml"), tmp_path, tmp_path / "world")


def test_config_rejects_unknown_sibling_lrm_keys(tmp_path, repo_root):
    over = tmp_path / "over.yaml"
    over.write_text("sibling_lrm:\n  enabeld: true\n")
    with pytest.raises(ConfigError, match="enabeld"):
        load_config(repo_root / "config" / "config.yaml", over)
