"""The pure parts of the shapes diagnostics in scripts/ (their end-to-end runs are in test_smoke_dag.py)."""

import importlib.util
import json
import math

import numpy as np
import pytest

from lpo.config import ConfigError, load_config


def load_script(repo_root, name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", repo_root / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sibling_concordance_counts_only_pairs_the_judge_tells_apart(repo_root):
    sr = load_script(repo_root, "sibling_ranking")
    rewards = np.array([[1.0, 0.5, 0.52], [0.2, 0.2, 0.9]])  # (B=2, K=3); pair (1, 2) of row 0 is a tie
    right = rewards.copy()
    assert sr.concordance(right, rewards, 0.05) == (4, 4)  # 2 + 2 judged pairs, all ordered right
    assert sr.concordance(-right, rewards, 0.05) == (0, 4)
    flat = np.zeros_like(rewards)  # a scorer tie is not concordant
    assert sr.concordance(flat, rewards, 0.05) == (0, 4)


def test_sibling_best_worst_uses_the_lrm_argmax_argmin_and_the_pair_gap(repo_root):
    sr = load_script(repo_root, "sibling_ranking")
    scores = np.array([[0.0, 2.0, -1.0], [0.0, 0.1, 0.2]])  # gaps tanh(1.5) ~ 0.905 and tanh(0.1) ~ 0.100
    rewards = np.array([[0.5, 1.0, 0.0], [0.9, 0.9, 0.91]])  # row 0: best is better; row 1: a judge tie
    out = sr.best_worst_stats(scores, rewards, threshold=0.5, tie_margin=0.05)
    assert out["all"] == {"pairs": 2, "judged": 1, "agree": 1, "agreement": 1.0}
    assert out["kept"] == {"pairs": 1, "judged": 1, "agree": 1, "agreement": 1.0}
    assert "kept" not in sr.best_worst_stats(scores, rewards, None, 0.05)


def test_oracle_thresholds_keep_what_the_judge_tells_apart(repo_root, tmp_path):
    ol = load_script(repo_root, "oracle_lpo")
    cfg = load_config(repo_root / "config" / "config.yaml")
    from diffusers import DDIMScheduler

    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(
        tmp_path / "base" / "scheduler")  # a pipeline folder's scheduler/ is all it reads
    (tmp_path / "base" / "model_index.json").write_text("{}")  # what makes the folder a pipeline folder
    path = tmp_path / "th.json"
    ol.write_thresholds(cfg, tmp_path / "base", path)
    table = json.loads(path.read_text())
    assert len(table["timesteps"]) == cfg.optimize.ddim_steps and all(table["trainable"])
    assert table["thresholds"] == [pytest.approx(math.tanh(cfg.annotator.tie_margin / 2))] * cfg.optimize.ddim_steps


def test_oracle_refuses_a_world_without_a_judge(repo_root, tmp_path):
    ol = load_script(repo_root, "oracle_lpo")
    cfg = load_config(repo_root / "config" / "sd15.yaml")
    with pytest.raises(ConfigError, match="shapes world"):
        ol.check(cfg, None)

