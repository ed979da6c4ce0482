"""SPO as an optimize method (lpo/methods/spo.py; docs/method.md section 5): the step plan (fixed threshold,
t <= spo_t_max), the scorer's cost (K extra CFG U-Net evaluations, K decodes, K SPM evaluations per prompt and
step, counted), the child's timestep, bad input, and an end-to-end run at smoke size. A random shapes-tiny
base and a random small SPM, offline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lpo import backbones
from lpo.config import ConfigError, TrainSpmConfig, load_config, replace
from lpo.methods import MethodInputs
from lpo.config import LpoMethodConfig
from lpo.methods import engine as M
from lpo.methods.lpo import Lpo
from lpo.methods import spo as S
from lpo.policy import build_policy
from lpo.reward.pixel import StepAwarePixelModel

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a blue triangle on a yellow background"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("spo_assets")
    bb = backbones.build_shapes_tiny(0)
    bb.save_pipeline(root / "base")
    torch.manual_seed(0)
    spm = StepAwarePixelModel.from_backbone(bb, TrainSpmConfig(channels=[8, 16]))
    spm.save_pretrained(root / "spm")
    return {"root": root, "base": root / "base", "spm": root / "spm", "bb": bb, "spm_model": spm.eval()}


def _cfg(spo=None, **optimize):
    cfg = load_config(REPO / "config" / "config.yaml", REPO / "config" / "smoke.yaml")
    small = {"ddim_steps": 4, "prompts_per_iteration": 2, "iterations": 2, "checkpoint_every": 1}
    return replace(cfg, optimize={**small, **optimize, "spo": spo or {}})


def _inputs(assets, **kw) -> MethodInputs:
    return MethodInputs(base_dir=assets["base"], prompts=tuple(PROMPTS), spm_dir=kw.pop("spm_dir", assets["spm"]), **kw)


def test_plan_has_the_fixed_threshold_and_trains_only_up_to_spo_t_max():
    sched = backbones.shapes_scheduler()
    plan = S.spo_plan(sched, _cfg(ddim_steps=20).optimize)
    assert plan.thresholds == (0.3,) * 20
    trained = [t for t, ok in zip(plan.timesteps, plan.train) if ok]
    assert trained == list(range(749, 0, -50))  # 15 of the 20 trailing steps: 749, 699, ..., 49
    plan = S.spo_plan(sched, _cfg(t_min=300, spo={"t_max": 500, "threshold": 0.1}).optimize)
    assert plan.timesteps == (999, 749, 499, 249) and plan.train == (False, False, True, False)
    assert plan.thresholds == (0.1,) * 4


class _Counter:
    """Rows through a module's forward (a pre-hook), or through a wrapped function."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def hook(self, _module, args, kwargs=None):
        self.rows.append(int(args[0].shape[0]))


def test_a_sampling_step_costs_k_extra_unet_evaluations_and_k_decodes(assets, monkeypatch):
    bb, spm, K, B = assets["bb"], assets["spm_model"], 4, 3
    plan = S.spo_plan(bb.scheduler, _cfg(spo={"t_max": 1000}).optimize)  # all 4 steps trained: 999 749 499 249
    unet_rows, decode_rows, spm_times = _Counter(), [], []
    handle = bb.unet.register_forward_pre_hook(unet_rows.hook)
    real_decode = bb.vae.decode
    monkeypatch.setattr(bb.vae, "decode", lambda z, *a, **k: decode_rows.append(z.shape[0]) or real_decode(z, *a, **k))
    real_score = spm.score
    monkeypatch.setattr(spm, "score", lambda images, t, text: spm_times.append((int(t), images.shape[0]))
                        or real_score(images, t, text))
    cond, uncond = bb.encode_prompts(PROMPTS), bb.null_embeds(1)
    cost = S.SpoCost()
    scorer = S.SpoScorer(spm, bb, PROMPTS, uncond, 4.0, K, cost)
    g = torch.Generator().manual_seed(0)
    try:
        tuples, records = M.branching_rollout(bb.unet, bb.scheduler, cond, uncond, torch.randn(B, 4, 8, 8), plan,
                                              4.0, 1.0, K, scorer, g, S.Spo(_cfg().optimize.spo, spm, bb, uncond, 4.0, K))
    finally:
        handle.remove()
    # U-Net: per step one CFG pass of the prompt batch (2B rows), plus one CFG pass of the B*K children at the
    # child's timestep, except at the last step, whose children are x_0.
    assert unet_rows.rows == [2 * B, 2 * B * K, 2 * B, 2 * B * K, 2 * B, 2 * B * K, 2 * B]
    assert decode_rows == [B * K] * 4  # every trained step decodes its K children per prompt
    assert spm_times == [(749, B * K), (499, B * K), (249, B * K), (0, B * K)]  # the CHILD's timestep
    assert len(records) == 4 and all(r.trained for r in records)
    summary = S.spo_cost_summary(cost, len(plan))
    assert summary["unet_evals_per_prompt_step"] == pytest.approx(1 + K * 3 / 4)
    assert summary["decodes_per_prompt_step"] == summary["reward_evals_per_prompt_step"] == pytest.approx(K)

    # LPO's scorer on the same grid: the trunk pass only, no decode.
    unet_rows.rows.clear()
    decode_rows.clear()
    handle = bb.unet.register_forward_pre_hook(unet_rows.hook)
    lrm_calls = []
    try:
        M.branching_rollout(bb.unet, bb.scheduler, cond, uncond, torch.randn(B, 4, 8, 8), plan, 4.0, 1.0, K,
                            lambda x, t: lrm_calls.append(t) or torch.randn(x.shape[0]), g, Lpo(LpoMethodConfig(), None, K))
    finally:
        handle.remove()
    assert unet_rows.rows == [2 * B] * 4 and decode_rows == [] and lrm_calls == [999, 749, 499, 249]


@pytest.mark.parametrize("change,kw,message", [
    ({"spo": {"threshold": 1.0}}, {}, "optimize.spo.threshold"),
    ({"spo": {"beta": 0.0}}, {}, "optimize.spo.beta"),
    ({"spo": {"clip_eps": 1.0}}, {}, "optimize.spo.clip_eps"),
    ({"num_children": 1}, {}, "optimize.num_children"),
    ({"spo": {"t_max": 100}}, {}, "no step of the sampling grid"),
    ({}, {"spm_dir": None}, "--spm is required"),
    ({}, {"spm_dir": Path("/nonexistent")}, "not an SPM folder"),
])
def test_bad_input_is_a_config_error(assets, change, kw, message):
    with pytest.raises(ConfigError, match=message):
        S.check_inputs(_cfg(**change), _inputs(assets, **kw))


def test_train_end_to_end_at_smoke_size(assets, tmp_path):
    from accelerate import Accelerator

    cfg = _cfg(spo={"threshold": 0.0})  # keep every pair: the loop must train
    S.check_inputs(cfg, _inputs(assets))
    torch.manual_seed(0)
    policy = build_policy(backbones.load_pipeline_folder(assets["base"]), cfg.optimize)
    work = tmp_path / "work"
    summary = S.train(cfg, policy, _inputs(assets), work, Accelerator(cpu=True))
    assert summary["method"] == "spo" and summary["beta"] == 10.0 and summary["lrm_timestep"] == "child"
    assert summary["plan"]["trained"] == [False, True, True, True]  # 999 > spo_t_max = 750
    assert summary["tuples_kept"] == 2 * 2 * 3 and summary["tuples_trained"] == 12
    assert summary["loss_first"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    assert summary["kept_by_bucket"]["t750-999"]["scored_prompt_steps"] == 0
    cost = summary["cost"]
    assert cost["unet_evals_per_prompt_step"] == pytest.approx(1 + 4 * 2 / 4)  # children passes at 749, 499
    assert cost["decodes_per_prompt_step"] == pytest.approx(4 * 3 / 4)
    assert cost["seconds_decode_per_scored_step"] > 0 and cost["rollouts_measured"] == 2
    assert (work / "summary.json").is_file() and (work / "checkpoints" / "state.pt").is_file()
    # LoRA moved away from the reference (only the adapters train)
    lora = [p for n, p in policy.unet.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for p in lora)
    # rerunning the same command resumes at the end: nothing more to do
    again = S.train(cfg, policy, _inputs(assets), work, Accelerator(cpu=True))
    assert again["iterations"] == 2 and again["cost"]["rollouts_measured"] == 0
