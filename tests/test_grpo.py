"""Step-level GRPO (lpo.methods.grpo, lpo.losses.grpo_loss): advantages, the loss's sign and clipping, the KL,
the first update at the reference, the engine end to end on a tiny random model, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lpo import backbones
from lpo.config import ConfigError, GrpoMethodConfig, LrmConfig, load_config, replace
from lpo.losses import gaussian_step_kl, group_advantages, grpo_loss
from lpo.methods import MethodInputs
from lpo.methods import engine as E
from lpo.methods import grpo as G
from lpo.policy import build_policy
from lpo.reward.lrm import LatentRewardModel
from lpo.stages import optimize
from lpo.utils import read_json, write_json

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a blue triangle on a yellow background"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------


def test_group_advantages_are_normalised_per_group():
    scores = torch.tensor([[1.0, 2.0, 3.0, 6.0], [-5.0, -5.0, 0.0, 10.0]])
    adv = group_advantages(scores)
    assert torch.allclose(adv.mean(dim=1), torch.zeros(2), atol=1e-6)
    assert torch.allclose(adv.std(dim=1, unbiased=False), torch.ones(2), atol=1e-6)
    assert adv[0].argsort().tolist() == [0, 1, 2, 3]  # the order of the scores is kept
    assert torch.allclose(group_advantages(scores * 7 + 3), adv, atol=1e-5)  # scale- and shift-free
    with pytest.raises(ValueError, match="no spread"):
        group_advantages(torch.tensor([[1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="K >= 2"):
        group_advantages(torch.tensor([1.0, 2.0]))


def test_grpo_loss_pushes_up_children_with_positive_advantage():
    adv = group_advantages(torch.tensor([[0.1, 0.5, 0.2, 0.9], [3.0, 1.0, 2.0, 0.0]]))
    logp_old = torch.randn(2, 4)
    logp = logp_old.clone().requires_grad_(True)
    loss, stats = grpo_loss(logp, logp_old, adv, torch.zeros(2), clip_eps=0.2, kl_beta=0.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # ratio 1, zero-mean advantages
    loss.backward()
    # d loss / d log p_k = -A_k / (N K) inside the clip range: gradient descent raises log p where A > 0
    assert torch.allclose(logp.grad, -adv / adv.numel(), atol=1e-7)
    assert stats["clipped_frac"].item() == 0.0 and stats["ratio_dev"].item() == pytest.approx(0.0, abs=1e-7)


def test_grpo_loss_clips_the_ratio_on_the_side_that_already_gained():
    adv = torch.tensor([[1.0, -1.0]])
    logp_old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)  # both moved in A's favour, far
    loss, stats = grpo_loss(logp, logp_old, adv, torch.zeros(1), clip_eps=0.2, kl_beta=0.0)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))  # the pessimistic bound is the clipped, constant term
    assert loss.item() == pytest.approx(-(1.2 * 1.0 - 0.8 * 1.0) / 2)
    assert stats["clipped_frac"].item() == 1.0
    # moved against the advantage: not clipped, the gradient still pushes back
    logp = torch.tensor([[math.log(0.5), math.log(1.5)]], requires_grad=True)
    grpo_loss(logp, logp_old, adv, torch.zeros(1), clip_eps=0.2, kl_beta=0.0)[0].backward()
    assert logp.grad[0, 0] < 0 < logp.grad[0, 1]


def test_grpo_loss_adds_the_weighted_kl_and_rejects_bad_settings():
    z = torch.zeros(2, 3)
    loss, stats = grpo_loss(z, z, z, torch.tensor([0.5, 1.5]), clip_eps=0.2, kl_beta=0.1)
    assert loss.item() == pytest.approx(0.1) and stats["kl"].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="clip_eps"):
        grpo_loss(z, z, z, torch.zeros(2), clip_eps=1.0, kl_beta=0.0)
    with pytest.raises(ValueError, match="kl_beta"):
        grpo_loss(z, z, z, torch.zeros(2), clip_eps=0.2, kl_beta=-1.0)
    with pytest.raises(ValueError, match="one"):
        grpo_loss(z, torch.zeros(2, 4), z, torch.zeros(2), clip_eps=0.2, kl_beta=0.0)


def test_gaussian_step_kl_hand_values():
    mean = torch.zeros(2, 4, 2, 2)
    sigma = torch.tensor([0.5, 2.0])
    assert torch.equal(gaussian_step_kl(mean, mean.clone(), sigma, "sum"), torch.zeros(2))
    shifted = mean + 1.0  # 16 elements, each (1)^2 / (2 sigma^2)
    assert torch.allclose(gaussian_step_kl(shifted, mean, sigma, "sum"), 16 / (2 * sigma**2))
    assert torch.allclose(gaussian_step_kl(shifted, mean, sigma, "mean"), 1 / (2 * sigma**2))


def test_children_log_probs_sum_is_the_mean_times_the_elements():
    children = torch.randn(2, 3, 4, 2, 2)
    mean, sigma = torch.randn(2, 4, 2, 2), torch.tensor([0.3, 0.7])
    mean_lp = G.children_log_probs(children, mean, sigma, "mean")
    assert mean_lp.shape == (2, 3)
    assert torch.allclose(G.children_log_probs(children, mean, sigma, "sum"), mean_lp * 16)
    exact = torch.distributions.Normal(mean[1], sigma[1]).log_prob(children[1, 2]).sum()
    assert G.children_log_probs(children, mean, sigma, "sum")[1, 2].item() == pytest.approx(exact.item(), rel=1e-5)


# --------------------------------------------------------------------------------------------------------
# On a tiny random model
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("grpo_assets")
    bb = backbones.build_shapes_tiny(0)
    bb.save_pipeline(root / "base")
    LatentRewardModel.from_backbone(bb, LrmConfig()).save_pretrained(root / "lrm")
    write_json(root / "world" / "prompts.json", {"train": {"prompts": PROMPTS, "triples": []}})
    ts, _ = E.ddim_timesteps(bb.scheduler, 4)
    write_json(root / "th4.json", {"timesteps": ts.tolist(), "thresholds": [0.9] * 4,
                                   "trainable": [False, True, True, True]})
    return {"root": root, "base": root / "base", "lrm": root / "lrm", "world": root / "world", "th4": root / "th4.json"}


def _cfg(grpo=None, **optimize_changes):
    cfg = load_config(REPO / "config" / "config.yaml", REPO / "config" / "smoke.yaml")
    small = {"ddim_steps": 4, "prompts_per_iteration": 2, "iterations": 2, "checkpoint_every": 1}
    return replace(cfg, optimize={**small, **optimize_changes, "grpo": grpo or {}})


def test_groups_are_kept_whole_and_the_first_update_sits_at_the_reference(assets):
    from accelerate import Accelerator

    ocfg = _cfg().optimize
    bb = backbones.load_pipeline_folder(assets["base"])
    policy = build_policy(bb, ocfg)
    lrm = E.load_lrm(assets["lrm"], torch.device("cpu"))
    method = G.Grpo(GrpoMethodConfig(), lrm, ocfg.num_children)
    plan = E.step_plan(E.read_thresholds(assets["th4"]), bb.scheduler, ocfg)
    gen = torch.Generator().manual_seed(0)
    cond, uncond = bb.encode_prompts(PROMPTS), bb.null_embeds(1)
    x_T = torch.randn((len(PROMPTS), 4, 8, 8), generator=gen)
    tuples, records = E.branching_rollout(policy.unet, bb.scheduler, cond, uncond, x_T, plan, ocfg.cfg, ocfg.eta,
                                          ocfg.num_children, method.make_scorer(PROMPTS), gen, method)
    # every trained step keeps every group (a random LRM spreads its scores); the 0.9 threshold is not used
    assert [r.kept for r in records] == [0, 3, 3, 3] and len(tuples) == 9
    K = ocfg.num_children
    assert tuples.data["children"].shape == (9, K, 4, 8, 8) and tuples.data["advantages"].shape == (9, K)
    assert torch.allclose(tuples.data["advantages"].mean(dim=1), torch.zeros(9), atol=1e-5)

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-3)
    train_unet, optimizer = accelerator.prepare(policy.unet, optimizer)
    first = method.update(policy, train_unet, tuples, uncond, optimizer, accelerator, ocfg)
    assert first["kl"] == 0.0  # LoRA starts at zero: the policy's step is the reference's
    # the stored log-probs of the sampler are the policy's: the ratios are 1 up to float32 rounding of the
    # U-Net pass (another batch), which the summed log-density multiplies by the 256 latent elements
    assert first["ratio_dev"] < 5e-3
    assert first["loss"] == pytest.approx(method.loss_reference, abs=5e-3)
    second = method.update(policy, train_unet, tuples, uncond, optimizer, accelerator, ocfg)
    assert second["kl"] > 0.0 and second["ratio_dev"] > first["ratio_dev"]  # the step moved the policy


def test_train_end_to_end_and_resume(assets, tmp_path):
    run = lambda cfg, name: optimize.run(cfg, "grpo", assets["base"], tmp_path / name, tmp_path / f"{name}-out",  # noqa: E731
                                         world_dir=assets["world"], lrm_dir=assets["lrm"], thresholds=assets["th4"])
    summary = run(_cfg(), "straight")
    assert summary["method"] == "grpo" and summary["logprob"] == "sum" and summary["loss_reference"] == 0.0
    assert summary["tuples_kept"] == 2 * 2 * 3  # 2 iterations x 2 prompts x 3 trained steps
    assert summary["loss_first_update"] == pytest.approx(0.0, abs=5e-3)
    assert {"policy_loss", "kl", "clipped_frac"} <= set(summary["history"][-1])
    assert read_json(tmp_path / "straight" / "summary.json")["plan"]["trained"] == [False, True, True, True]
    backbones.load_pipeline_folder(tmp_path / "straight-out")

    run(_cfg(iterations=1), "resumed")  # killed after one iteration, then run to the end
    again = run(_cfg(), "resumed")
    assert again["history"] == summary["history"] or [h["loss"] for h in again["history"]] == pytest.approx(
        [h["loss"] for h in summary["history"]], abs=0)


@pytest.mark.parametrize("grpo,kw,message", [
    ({"clip_eps": 0.0}, {}, "optimize.grpo.clip_eps"),
    ({"kl_beta": -0.1}, {}, "optimize.grpo.kl_beta"),
    ({"std_floor": -1.0}, {}, "optimize.grpo.std_floor"),
    ({}, {"lrm_dir": None}, "--lrm is required for method grpo"),
    ({}, {"thresholds": None}, "--thresholds is required for method grpo"),
])
def test_bad_input_is_a_config_error(assets, grpo, kw, message):
    inputs = MethodInputs(base_dir=assets["base"], prompts=tuple(PROMPTS), lrm_dir=assets["lrm"],
                          thresholds=assets["th4"], world_dir=assets["world"])
    inputs = MethodInputs(**{**vars(inputs), **kw})
    with pytest.raises(ConfigError, match=message):
        G.check_inputs(_cfg(grpo=grpo), inputs)
