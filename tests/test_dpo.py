"""Diffusion-DPO as an optimize method (lpo/methods/dpo.py; docs/method.md section 5): winner/loser ordering and tie
dropping, the loss at init (log 2), implicit accuracy rising on a toy preference set, shared noise and t, the
all-ties batch, exact resume, bad input. A random shapes-tiny base and the toy latents of test_train_lrm."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from lpo import backbones
from lpo.config import ConfigError, load_config, replace
from lpo.data.loader import PairLoader
from lpo.data.shards import write_shards
from lpo.methods import MethodInputs
from lpo.methods import dpo as D
from lpo.policy import build_policy

sys.path.insert(0, str(Path(__file__).parent))
from latents_helpers import write_toy_latents  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def clear_preferences(n: int):
    """Pairs whose winner's posterior mean is near +1 and loser's near -1 on every element (no ties)."""
    rng = np.random.default_rng(0)
    std = np.full((4, 8, 8), 0.05, np.float32)
    for i in range(n):
        w = int(rng.integers(0, 2))
        means = rng.standard_normal((2, 4, 8, 8)).astype(np.float32) * 0.3
        means[w] += 1.0
        means[1 - w] -= 1.0
        yield {"key": f"train-r{i:05d}", "mean0": means[0], "std0": std, "mean1": means[1], "std1": std,
               "meta": {"caption": ["a red circle", "a blue square"][i % 2], "label_0": float(w == 0),
                        "label_1": float(w == 1), "split": "train", "prompt_key": f"p{i % 2}"}}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dpo_assets")
    backbones.build_shapes_tiny(0).save_pipeline(root / "base")
    write_toy_latents(root / "latents", n_train=48, n_val=8, n_test=8)  # with ties
    write_shards(clear_preferences(32), root / "clear", "train", 2)
    return {"base": root / "base", "latents": root / "latents", "clear": root / "clear"}


def fixed_noise_eval(policy, latents: Path, beta: float) -> tuple[float, float]:
    """Mean implicit accuracy and loss over the split's batches with fixed noise and t (no update)."""
    cache = D.CaptionCache(policy.backbone, torch.device("cpu"))
    accs, losses = [], []
    with torch.no_grad():
        for i, batch in enumerate(PairLoader(latents, "train", 8, shuffle=False).iterate(0)):
            loss, stats, _ = D.dpo_step(policy, policy.unet, batch, cache, torch.Generator().manual_seed(100 + i), beta)
            accs.append(stats["implicit_acc"])
            losses.append(loss.item())
    return float(np.mean(accs)), float(np.mean(losses))


def _cfg(**optimize):
    cfg = load_config(REPO / "config" / "config.yaml", REPO / "config" / "smoke.yaml")
    return replace(cfg, optimize={"iterations": 4, "dpo": {"batch_size": 8}, "checkpoint_every": 2, **optimize})


def _inputs(assets, **kw) -> MethodInputs:
    return MethodInputs(base_dir=assets["base"], prompts=(), latents_dir=kw.pop("latents_dir", assets["latents"]))


def _policy(assets, cfg):
    torch.manual_seed(0)
    return build_policy(backbones.load_pipeline_folder(assets["base"]), cfg.optimize)


def test_winner_loser_orders_by_label_and_drops_ties():
    x = torch.arange(8.0).view(4, 2, 1)  # pair i: images 2i, 2i+1
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.0, 1.0]])
    x_w, x_l, rows = D.winner_loser(x, labels)
    assert rows.tolist() == [0, 1, 3]
    assert x_w.flatten().tolist() == [0.0, 3.0, 7.0] and x_l.flatten().tolist() == [1.0, 2.0, 6.0]


def test_v_prediction_target_is_the_velocity():
    sched = DDPMScheduler(prediction_type="v_prediction")
    x0, noise, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([10, 900])
    assert torch.equal(D.noise_target(sched, x0, noise, t), sched.get_velocity(x0, noise, t))
    assert D.noise_target(DDPMScheduler(), x0, noise, t) is noise


def test_step_shares_noise_and_t_and_starts_at_log2(assets, monkeypatch):
    cfg = _cfg()
    policy = _policy(assets, cfg)
    batch = next(PairLoader(assets["latents"], "train", 8, shuffle=False).iterate(0))
    seen = {}
    real_add_noise = policy.backbone.train_scheduler.add_noise

    def spy(x0, noise, t):
        seen.update(noise=noise, t=t)
        return real_add_noise(x0, noise, t)

    monkeypatch.setattr(policy.backbone.train_scheduler, "add_noise", spy)
    loss, stats, n = D.dpo_step(policy, policy.unet, batch, D.CaptionCache(policy.backbone, torch.device("cpu")),
                                torch.Generator().manual_seed(0), 5000.0)
    assert n == int((batch["labels"][:, 0] != batch["labels"][:, 1]).sum()) > 0
    assert torch.equal(seen["noise"][:n], seen["noise"][n:]) and torch.equal(seen["t"][:n], seen["t"][n:])
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference
    assert stats["implicit_acc"] == 0.0 and stats["model_mse"] == pytest.approx(stats["ref_mse"])
    # a batch of ties only: zero loss, still a forward pass (so DDP would synchronise)
    ties = dict(batch, labels=torch.full((len(batch["keys"]), 2), 0.5))
    loss, _, n = D.dpo_step(policy, policy.unet, ties, D.CaptionCache(policy.backbone, torch.device("cpu")),
                            torch.Generator().manual_seed(0), 5000.0)
    assert n == 0 and loss.item() == 0.0 and loss.requires_grad


def test_implicit_accuracy_rises_on_a_toy_preference_set(assets, tmp_path):
    cfg = _cfg(iterations=16, checkpoint_every=100, lr=1e-3)
    policy = _policy(assets, cfg)
    assert fixed_noise_eval(policy, assets["clear"], 5000.0) == (0.0, pytest.approx(math.log(2), abs=1e-6))
    summary = D.train(cfg, policy, _inputs(assets, latents_dir=assets["clear"]), tmp_path / "work",
                      Accelerator(cpu=True))
    acc, loss = fixed_noise_eval(policy, assets["clear"], 5000.0)
    assert acc > 0.8 and loss < math.log(2) - 0.2, (acc, loss)
    hist = summary["history"]
    assert len(hist) == 16 and summary["loss_first"] == pytest.approx(math.log(2), abs=1e-6)
    assert np.mean([h["implicit_acc"] for h in hist[-6:]]) > 0.6, [h["implicit_acc"] for h in hist]
    assert summary["ties_skipped"] == 0 and summary["pairs_trained"] == 16 * 8
    assert summary["cost"]["seconds_per_update"] > 0 and summary["beta"] == 5000.0
    assert (tmp_path / "work" / "summary.json").is_file()


def test_ties_are_skipped_and_counted(assets, tmp_path):
    cfg = _cfg(iterations=3, checkpoint_every=100)
    summary = D.train(cfg, _policy(assets, cfg), _inputs(assets), tmp_path / "work", Accelerator(cpu=True))
    assert summary["ties_skipped"] > 0 and summary["ties_skipped"] + summary["pairs_trained"] == 3 * 8


def test_resume_continues_exactly(assets, tmp_path):
    cfg = _cfg(iterations=4, checkpoint_every=2)
    straight = _policy(assets, cfg)
    D.train(cfg, straight, _inputs(assets), tmp_path / "straight", Accelerator(cpu=True))
    half = _policy(assets, cfg)
    D.train(_cfg(iterations=2, checkpoint_every=2), half, _inputs(assets), tmp_path / "resumed", Accelerator(cpu=True))
    resumed = _policy(assets, cfg)
    summary = D.train(cfg, resumed, _inputs(assets), tmp_path / "resumed", Accelerator(cpu=True))
    assert summary["iterations"] == 4
    a, b = straight.trainable_state_dict(), resumed.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change,kw,message", [
    ({"dpo": {"beta": 0.0}}, {}, "optimize.dpo.beta"),
    ({"dpo": {"batch_size": 0}}, {}, "optimize.dpo.batch_size"),
    ({"dpo": {"batch_size": 100}}, {}, "fewer than optimize.dpo.batch_size 100"),
    ({"lora": {"rank": 0}}, {}, "optimize.lora.rank"),
    ({}, {"latents_dir": None}, "--latents is required"),
    ({}, {"latents_dir": Path("/nonexistent")}, "no index for split 'train'"),
])
def test_bad_input_is_a_config_error(assets, change, kw, message):
    with pytest.raises(ConfigError, match=message):
        D.check_inputs(_cfg(**change), _inputs(assets, **kw))
