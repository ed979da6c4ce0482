"""train_lrm (docs/method.md sections 1, 2): timestep sampling, per-step generators, the loss split over ranks, a toy
preference set that the LRM learns, resume after a kill with identical weights, bad input, and two processes.
(The noise protocol itself is tested in test_eval_lrm.py, where it lives.)

The toy set is separable: the winner's posterior mean carries a +1 offset on every latent element, so an LRM
that looks at its input learns it within a few steps at low t. Models are tiny-sd15 (random, offline).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lpo import cli
from lpo.backbones import build_tiny_sd15, sd_scheduler
from lpo.config import from_dict
from lpo.data.shards import write_shards
from lpo.diffusion import ddim_timesteps
from lpo.losses import bradley_terry_loss, per_prompt_weights
from lpo.reward.lrm import LatentRewardModel
from lpo.stages import train_lrm as T
from lpo.training import lrm as TL
from lpo.training import trainer as TR
from lpo.training import lrm as LT

from latents_helpers import PROMPTS, run_killed, toy_samples, write_toy_latents  # noqa: F401

def toy_config(lrm: dict | None = None, **train_lrm):
    base = {"steps": 12, "batch_size": 8, "lr": 1e-3, "head_lr": 1e-2, "warmup_steps": 2, "eval_every": 6,
            "checkpoint_every": 6, "val_timesteps": 3}
    return from_dict({"experiment": {"name": "toy", "seed": 0}, "backbone": {"preset": "tiny-sd15"},
                      "lrm": lrm or {}, "train_lrm": {**base, **train_lrm}, "eval_lrm": {"bootstrap": 100}})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "base"
    build_tiny_sd15(0).save_pipeline(path)
    return path


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    return write_toy_latents(tmp_path_factory.mktemp("latents") / "latents")


def read_log(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]


def train_losses(work: Path) -> list[float]:
    return [r["loss"] for r in read_log(work) if "loss" in r]


# --------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------


def test_step_generators_are_per_step_and_rank_and_draw_independent_noise_per_image():
    draws = torch.randn((4, 2, 4, 8, 8), generator=TR.step_generator(0, 3, 0))
    assert not torch.allclose(draws[:, 0], draws[:, 1])  # winner and loser get independent noise
    assert torch.equal(draws, torch.randn((4, 2, 4, 8, 8), generator=TR.step_generator(0, 3, 0)))
    for other in (TR.step_generator(0, 4, 0), TR.step_generator(0, 3, 1), TR.step_generator(1, 3, 0)):
        assert not torch.equal(draws, torch.randn((4, 2, 4, 8, 8), generator=other))


def test_timesteps_come_from_the_grid_and_high_t_weight_shifts_mass_up():
    sched = sd_scheduler()
    grid, _ = ddim_timesteps(sched, 20)
    cands = TL.candidate_timesteps("ddim_grid", grid, 1000)
    assert cands.tolist() == list(range(1, 952, 50))
    gen = torch.Generator().manual_seed(0)
    flat = TL.sample_timesteps(20000, cands, TL.timestep_weights(cands, 1000, 1.0), gen)
    assert set(flat.tolist()) <= set(cands.tolist())
    assert abs(float((flat >= 500).float().mean()) - 0.5) < 0.02
    tilted = TL.sample_timesteps(20000, cands, TL.timestep_weights(cands, 1000, 3.0), gen)
    assert abs(float((tilted >= 500).float().mean()) - 0.75) < 0.02  # 10 x 3 / (10 x 3 + 10 x 1)
    uni = TL.candidate_timesteps("uniform", grid, 1000)
    assert uni.tolist() == list(range(1000))
    with pytest.raises(ValueError, match="high_t_weight"):
        TL.timestep_weights(cands, 1000, 0.0)


def test_validation_timesteps_include_the_lowest_and_highest():
    grid = torch.arange(999, 0, -50)  # 999 ... 49, descending like trailing spacing
    assert TL.validation_timesteps(grid, 4) == [49, 349, 699, 999]  # grid indices 0, 6, 13, 19
    assert TL.validation_timesteps(grid, 1) == [49]
    with pytest.raises(ValueError, match="val_timesteps"):
        TL.validation_timesteps(grid, 21)


def test_warmup_factor_is_linear_then_flat():
    assert [TL.warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert TL.warmup_factor(0, 0) == 1.0


def test_rank_losses_average_to_the_global_per_prompt_weighted_loss():
    """DDP averages gradients over ranks; each rank's scaled local loss must give the global loss's gradient."""
    torch.manual_seed(0)
    s0, s1 = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0]] * 5 + [[0.5, 0.5]] + [[0.0, 1.0]] * 2)
    keys = ["a", "a", "a", "b", "c", "c", "d", "a"]
    w_all = per_prompt_weights(keys)
    full = bradley_terry_loss(s0, s1, labels[:, 0], labels[:, 1], w_all)
    g_full = torch.autograd.grad(full, [s0, s1])
    parts = []
    for rank in (0, 1):
        sl = slice(4 * rank, 4 * rank + 4)
        w = w_all[sl]
        parts.append(bradley_terry_loss(s0[sl], s1[sl], labels[sl, 0], labels[sl, 1], w) * TR.local_loss_scale(w, 2))
    mean = (parts[0] + parts[1]) / 2  # what DDP's gradient averaging amounts to
    torch.testing.assert_close(mean, full)
    for a, b in zip(torch.autograd.grad(mean, [s0, s1]), g_full):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_a_loadable_best_model(base_dir, latents, tmp_path):
    work = tmp_path / "lrm"
    summary = T.run(toy_config(), latents, base_dir, work)
    losses = train_losses(work)
    assert len(losses) == 12
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1, losses
    assert summary["steps"] == 12 and summary["best_step"] in (6, 12)
    val = summary["validations"][-1]["acc_by_t"]
    assert list(val) == ["1", "501", "951"]  # 3 points of the grid 1, 51, ..., 951
    assert val["1"] >= 0.85  # separable at low noise
    # outputs
    for name in ("model/lrm_config.json", "model/scheduler/scheduler_config.json", "model/train_lrm.json",
                 "summary.json", "checkpoints/latest.json"):
        assert (work / name).is_file(), name
    assert list((work / "tb").glob("events.out.tfevents.*"))
    lrm = LatentRewardModel.from_pretrained(work / "model")
    best = torch.load(work / "checkpoints" / f"step-{summary['best_step']:07d}" / "state.pt", weights_only=False)
    assert torch.equal(lrm.visual_proj.weight, best["trainable"]["visual_proj.weight"])  # model/ = the best step
    assert summary["seconds_per_step"]["mean"] > 0 and summary["truncated_captions"] == 0


def test_resume_after_a_kill_ends_with_identical_weights(base_dir, latents, tmp_path, monkeypatch):
    """7 steps over 5 batches per epoch: a kill in step 5 resumes mid-epoch from the step-3 checkpoint."""
    cfg = toy_config(steps=7, eval_every=3, checkpoint_every=3, keep_checkpoints=3)
    straight = tmp_path / "straight"
    T.run(cfg, latents, base_dir, straight)

    killed = tmp_path / "killed"
    run_killed(monkeypatch, LT, "bradley_terry_loss", 5, lambda: T.run(cfg, latents, base_dir, killed))
    assert json.loads((killed / "checkpoints" / "latest.json").read_text())["step"] == 3
    assert not (killed / "model").exists()  # the model folder appears only at the end
    summary = T.run(cfg, latents, base_dir, killed)
    assert summary["resumed_from"] == 3

    a = torch.load(straight / "checkpoints" / "step-0000007" / "state.pt", weights_only=False)
    b = torch.load(killed / "checkpoints" / "step-0000007" / "state.pt", weights_only=False)
    assert a["data"] == b["data"] == {"epoch": 1, "batch": 2}
    assert a["trainable"].keys() == b["trainable"].keys()
    for name in a["trainable"]:
        assert torch.equal(a["trainable"][name], b["trainable"][name]), name
    assert read_log(straight) == read_log(killed)  # same losses, step by step; no duplicated records
    best_a = LatentRewardModel.from_pretrained(straight / "model").state_dict()
    best_b = LatentRewardModel.from_pretrained(killed / "model").state_dict()
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


def test_a_changed_config_does_not_resume_old_checkpoints(base_dir, latents, tmp_path, caplog):
    work = tmp_path / "lrm"
    T.run(toy_config(steps=3, eval_every=3, checkpoint_every=3), latents, base_dir, work)
    summary = T.run(toy_config(steps=3, eval_every=3, checkpoint_every=3, lr=5e-4), latents, base_dir, work)
    assert summary["resumed_from"] is None and "starting over" in caplog.text
    assert len(train_losses(work)) == 3


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(base_dir, latents, tmp_path,
                                                                               monkeypatch):
    work = tmp_path / "lrm"
    real_loss, calls = LT.bradley_terry_loss, {"n": 0}

    def nan_in_step_5(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(LT, "bradley_terry_loss", nan_in_step_5)
    cfg = toy_config(steps=8, eval_every=3, checkpoint_every=3)
    with pytest.raises(T.TrainLrmError, match=r"non-finite loss .* at step 5 .*step-0000003 \(step 3\)"):
        T.run(cfg, latents, base_dir, work)
    good = torch.load(work / "checkpoints" / "step-0000003" / "state.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in good["trainable"].values())
    assert json.loads((work / "checkpoints" / "latest.json").read_text())["step"] == 3
    assert not (work / "model").exists()
    assert read_log(work)[-1] == {"event": "nonfinite_loss", "step": 5, "epoch": 0, "batch": 4}


def test_nan_latents_are_skipped_and_long_captions_truncated_and_both_counted(base_dir, tmp_path, caplog):
    latents = write_toy_latents(tmp_path / "latents", nan_at=3, long_caption_at=5)
    summary = T.run(toy_config(steps=6, eval_every=6), latents, base_dir, tmp_path / "lrm")
    assert summary["nonfinite_skipped"]["train"] >= 1
    assert summary["truncated_captions"] == 1
    assert "non-finite latents" in caplog.text and "truncated" in caplog.text


def _write_yaml(path: Path, cfg_dict: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg_dict))
    return path


def test_empty_or_too_small_splits_are_one_line_errors(base_dir, tmp_path, capsys):
    cfg_file = _write_yaml(tmp_path / "cfg.yaml", {"experiment": {"name": "toy"}, "backbone": {"preset": "tiny-sd15"},
                                                    "train_lrm": {"steps": 2, "batch_size": 8}})
    empty = tmp_path / "empty"
    write_shards(toy_samples(16, "train", 0), empty, "train", 1)
    write_shards(iter(()), empty, "val", 1)
    rc = cli.main(["train_lrm", "--config", str(cfg_file), "--latents", str(empty), "--base", str(base_dir),
                   "--out", str(tmp_path / "w1")])
    err = capsys.readouterr().err
    assert rc == 2 and "val" in err and "empty" in err and "Traceback" not in err

    small = write_toy_latents(tmp_path / "small", n_train=4, n_val=4, n_test=4, shards=1)
    rc = cli.main(["train_lrm", "--config", str(cfg_file), "--latents", str(small), "--base", str(base_dir),
                   "--out", str(tmp_path / "w2")])
    err = capsys.readouterr().err
    assert rc == 2 and "4 pairs, fewer than train_lrm.batch_size 8" in err


def test_bad_config_values_name_the_key(base_dir, latents, tmp_path):
    with pytest.raises(ValueError, match="train_lrm.high_t_weight"):
        T.run(toy_config(high_t_weight=0.0), latents, base_dir, tmp_path / "w")
    with pytest.raises(ValueError, match="train_lrm.val_timesteps"):
        T.run(toy_config(val_timesteps=50), latents, base_dir, tmp_path / "w")


# --------------------------------------------------------------------------------------------------------
# Two processes (DDP on gloo)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss_curve(base_dir, tmp_path, repo_root):
    """What is compared: 1 process x 16 pairs vs 2 processes x 8 pairs (same global batch, same steps, same
    toy set with a small winner offset, so the curve has a shape; the data order differs because the two ranks
    read different shards). Both start near log 2 (mean of the first 3 steps within 0.15), both fall by more
    than 0.15, and the means of their last 4 steps agree within 0.15."""
    latents = write_toy_latents(tmp_path / "latents", n_train=64, shards=4, offset=0.3)
    steps = 16
    cfg = {"experiment": {"name": "toy", "seed": 0}, "backbone": {"preset": "tiny-sd15"},
           "train_lrm": {"steps": steps, "batch_size": 16, "lr": 3e-4, "head_lr": 3e-3, "warmup_steps": 2,
                         "eval_every": steps, "checkpoint_every": steps, "val_timesteps": 2}}
    T.run(from_dict(cfg), latents, base_dir, tmp_path / "one")
    cfg["train_lrm"]["batch_size"] = 8
    cfg_file = _write_yaml(tmp_path / "two.yaml", cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo_root)}
    # --multi_gpu selects accelerate's torchrun launcher; with no CUDA the stage's Accelerator(cpu=True) makes
    # it MULTI_CPU on gloo. (`--cpu` would pick the mpirun launcher, which silently runs ONE process here.)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(repo_root / "config" / "accelerate" / "cpu2.yaml"), "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "29517", "-m", "lpo", "train_lrm", "--config", str(cfg_file),
           "--latents", str(latents), "--base", str(base_dir), "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 16
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    print("loss, 1 process x 16:", np.round(one, 3).tolist(), "\nloss, 2 processes x 8:", np.round(two, 3).tolist())
    assert len(one) == len(two) == steps
    for curve in (one, two):
        assert abs(np.mean(curve[:3]) - math.log(2)) < 0.15, curve
        assert np.mean(curve[-4:]) < np.mean(curve[:3]) - 0.15, curve
    assert abs(np.mean(one[-4:]) - np.mean(two[-4:])) < 0.15, (one, two)


def test_trained_text_encoder_checkpointing_and_uniform_timesteps_run(base_dir, latents, tmp_path):
    cfg = toy_config(lrm={"train_text_encoder": True}, steps=2, eval_every=2, checkpoint_every=2,
                     timesteps="uniform", select_by="lowest_t", gradient_checkpointing=True)
    summary = T.run(cfg, latents, base_dir, tmp_path / "lrm")
    assert summary["best_metric"] == summary["validations"][-1]["acc_by_t"]["1"]  # select_by lowest_t
    trained = LatentRewardModel.from_pretrained(tmp_path / "lrm" / "model").text_encoder.state_dict()
    base = build_tiny_sd15(0).text_encoder.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base)  # the text encoder was trained
    state = torch.load(tmp_path / "lrm" / "checkpoints" / "step-0000002" / "state.pt", weights_only=False)
    assert any(k.startswith("text_encoder.") for k in state["trainable"])


def test_patience_stops_early_and_a_rerun_finishes_at_once(base_dir, latents, tmp_path):
    cfg = toy_config(steps=6, eval_every=1, checkpoint_every=3, patience=1, lr=1e-12, head_lr=1e-12)
    summary = T.run(cfg, latents, base_dir, tmp_path / "lrm")  # weights barely move: validation 2 is no better
    assert summary["stopped_early"] and summary["steps"] == 2 and summary["best_step"] == 1
    assert [v["evals_since_best"] for v in summary["validations"]] == [0, 1]
    again = T.run(cfg, latents, base_dir, tmp_path / "lrm")
    assert again["resumed_from"] == 2 and again["steps"] == 2 and len(train_losses(tmp_path / "lrm")) == 2
