"""SPO (Liang et al., RockeyCoss/SPO): step-level preference optimisation with a step-aware PIXEL reward.

METHOD.md section 5 ("SPO") is the specification. SPO is LPO's loop (lpo/methods/lpo.py
``step_level_loop``: the same branching sampler, tuple sharing, clipped step-level DPO update, checkpoints and
summary) with four differences, all in this module:

1. the scorer (``SpoScorer``): each of the K children gets its own CFG U-Net pass at the NEXT (the child's)
   timestep, its x0-hat is VAE-decoded and scored by the SPM at the child's timestep; the last step's children
   are x_0 and are decoded directly and scored at t = 0 (RockeyCoss/SPO multi_sample_pipeline.py). So a
   trained sampling step costs 1 + K U-Net passes, K decodes and K SPM passes per prompt, against LPO's
   1 U-Net pass and K LRM passes (the paper's Tab. 5);
2. a fixed threshold ``optimize.spo_threshold`` on pair_gap(S_w, S_l) = tanh((S_w - S_l)/2) (SPO's
   compare function is the same softmax gap of the best and worst child);
3. training only at timesteps <= ``optimize.spo_t_max`` (SPO's divert_start_step = 4 of 20 steps, t <= 750;
   METHOD.md section 6: SPO trained on [0, 950] collapses). Steps above it are plain DDIM steps: one child,
   no scorer call, as in SPO, where branching starts at step 4;
4. beta = ``optimize.spo_beta`` (10) in the same clipped loss (lpo.losses.lpo_loss).

The official pipeline reuses the chosen child's U-Net pass as the next step's trunk pass; here the trunk pass
is run again (the same input, the same output), so the wall time is that of the paper's cost model
(denoise + K x (x0-hat + decode + reward)). The child whose x0-hat is scored at t_child = 0 is taken as clean
(it is x_0 on every grid whose last step lands on -1, i.e. all DDIM grids here).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DDIMScheduler

from lpo.backbones import Backbone, PromptEmbeds
from lpo.config import Config, ConfigError, OptimizeConfig, replace
from lpo.diffusion import cfg_noise_pred, ddim_step_split, ddim_timesteps
from lpo.methods import MethodInputs
from lpo.methods.lpo import StepPlan, ThresholdTable, check_step_config, load_scheduler, step_level_loop, step_plan
from lpo.reward.pixel import CONFIG_NAME as SPM_CONFIG_NAME
from lpo.reward.pixel import StepAwarePixelModel, decode_latents
from lpo.utils import write_json

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Checks and the step plan
# --------------------------------------------------------------------------------------------------------


def spo_plan(scheduler: DDIMScheduler, cfg: OptimizeConfig) -> StepPlan:
    """LPO's StepPlan with SPO's fixed threshold at every step and training only where t <= spo_t_max
    (and inside optimize.t_min .. t_max, and sigma > 0, as LPO's plan)."""
    timesteps, _ = ddim_timesteps(scheduler, cfg.ddim_steps)
    grid = tuple(int(t) for t in timesteps)
    table = ThresholdTable(grid, (cfg.spo_threshold,) * len(grid), (True,) * len(grid), "optimize.spo_threshold")
    return step_plan(table, scheduler, dataclasses.replace(cfg, t_max=min(cfg.t_max, cfg.spo_t_max)))


def check_inputs(cfg: Config, inputs: MethodInputs) -> None:
    """SPO's bad-input list, before any model is loaded: LPO's step settings, SPO's own fields, the SPM folder,
    a plan with at least one trained step."""
    ocfg = cfg.optimize
    check_step_config(ocfg)
    if not 0.0 <= ocfg.spo_threshold < 1.0:
        raise ConfigError(f"optimize.spo_threshold: a pair gap in [0, 1) is expected, got {ocfg.spo_threshold}")
    if not ocfg.spo_beta > 0:
        raise ConfigError(f"optimize.spo_beta: must be > 0, got {ocfg.spo_beta}")
    if inputs.spm_dir is None:
        raise ConfigError("optimize: --spm is required for method spo (the train_spm model folder)")
    if not (Path(inputs.spm_dir) / SPM_CONFIG_NAME).is_file():
        raise ConfigError(f"{inputs.spm_dir}: not an SPM folder (no {SPM_CONFIG_NAME}; run the train_spm rule first)")
    plan = spo_plan(load_scheduler(inputs.base_dir), ocfg)
    if not any(plan.train):
        raise ConfigError(f"optimize.spo_t_max={ocfg.spo_t_max}, t_min={ocfg.t_min}, t_max={ocfg.t_max}: no step of "
                          f"the sampling grid {list(plan.timesteps)} would be trained")


# --------------------------------------------------------------------------------------------------------
# The scorer: SPO's difference from LPO
# --------------------------------------------------------------------------------------------------------


@dataclass
class SpoCost:
    """Work the SPO scorer did (this process, since it started): rows through each model and wall seconds."""

    iterations: int = 0  # rollouts (one scorer per rollout)
    prompts: int = 0  # prompts over those rollouts
    calls: int = 0
    unet_rows: int = 0  # children through the extra CFG U-Net pass (one row = one CFG evaluation)
    decode_rows: int = 0
    spm_rows: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"unet": 0.0, "decode": 0.0, "spm": 0.0})


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class SpoScorer:
    """Scores the B*K children of one step (the ``Scorer`` protocol of lpo/methods/lpo.py):

        x0-hat = one CFG U-Net pass at t_child (the policy, as SPO's sampler uses the trained U-Net),
        image  = VAE decode of x0-hat,       score = SPM(image, t_child, prompt)
    with t_child = 0 meaning the child is x_0 (no U-Net pass). Text encodings are computed once per prompt.
    """

    def __init__(self, spm: StepAwarePixelModel, backbone: Backbone, prompts: Sequence[str], uncond: PromptEmbeds,
                 cfg_scale: float, num_children: int, cost: SpoCost) -> None:
        device = backbone.unet.device
        rows = torch.arange(len(prompts), device=device).repeat_interleave(num_children)  # B -> B*K rows
        with torch.no_grad():
            self.text = spm.encode_text(list(prompts)).repeat_interleave(num_children)
            self.cond = backbone.encode_prompts(list(prompts)).to(device).index(rows)
        self.spm, self.backbone, self.uncond, self.cfg_scale, self.cost = spm, backbone, uncond, cfg_scale, cost
        cost.iterations += 1
        cost.prompts += len(prompts)

    @torch.no_grad()
    def __call__(self, children: torch.Tensor, t: int) -> torch.Tensor:
        bb, cost, device = self.backbone, self.cost, children.device
        start = _now(device)
        if t > 0:
            out = cfg_noise_pred(bb.unet, children.to(bb.unet.dtype), t, self.cond.hidden_states,
                                 self.uncond.hidden_states, self.cfg_scale, self.cond.added_cond_kwargs(),
                                 self.uncond.added_cond_kwargs())
            x0_hat = ddim_step_split(out, children, t, t - 1, bb.scheduler, eta=0.0).x0_hat  # (B*K, C, h, w)
            cost.unet_rows += children.shape[0]
        else:
            x0_hat = children  # the last step's children are x_0
        unet_done = _now(device)
        images = decode_latents(bb.vae, x0_hat)  # (B*K, 3, H, W) in [-1, 1]
        decoded = _now(device)
        scores = self.spm.score(images, t, self.text)  # (B*K,)
        end = _now(device)
        cost.calls += 1
        cost.decode_rows += children.shape[0]
        cost.spm_rows += children.shape[0]
        cost.seconds["unet"] += unet_done - start
        cost.seconds["decode"] += decoded - unet_done
        cost.seconds["spm"] += end - decoded
        return scores


def load_spm(spm_dir: Path, device: torch.device) -> StepAwarePixelModel:
    """The frozen SPM (eval, no grad) on `device`; a folder that does not load is a ConfigError naming it."""
    try:
        spm = StepAwarePixelModel.from_pretrained(spm_dir)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{spm_dir}: cannot load the SPM ({type(err).__name__}: {err})") from None
    spm.requires_grad_(False)
    return spm.to(device).eval()


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------


def train(cfg: Config, policy: Any, inputs: MethodInputs, workdir: Path, accelerator: Any) -> dict[str, Any]:
    """SPO: LPO's step_level_loop with the SPM scorer at the child's timestep, spo_threshold, spo_t_max, spo_beta."""
    ocfg = cfg.optimize
    device = accelerator.device
    bb = policy.backbone
    plan = spo_plan(bb.scheduler, ocfg)
    spm = load_spm(Path(inputs.spm_dir), device)
    bb.vae.to(device)  # the scorer decodes every child's x0-hat
    uncond = bb.null_embeds(1).to(device)
    cost = SpoCost()
    log.info("spo: %d of %d steps trained (t <= %d); threshold %.3f, beta %g; SPM %s (%s)", sum(plan.train),
             len(plan), min(ocfg.t_max, ocfg.spo_t_max), ocfg.spo_threshold, ocfg.spo_beta, inputs.spm_dir, spm.kind)

    def make_scorer(prompts: list[str]) -> SpoScorer:
        return SpoScorer(spm, bb, prompts, uncond, ocfg.cfg, ocfg.num_children, cost)

    # SPO scores the child at the child's timestep: the loop's "child" mode passes max(t_prev, 0).
    spo_cfg = replace(cfg, optimize={"lrm_timestep": "child"})
    summary = step_level_loop(spo_cfg, policy, inputs.prompts, workdir, accelerator, plan, make_scorer,
                              ocfg.spo_beta, "spo")
    summary["cost"].update(spo_cost_summary(cost, len(plan)))
    summary.update({"spm": str(inputs.spm_dir), "spm_kind": spm.kind, "spo_threshold": ocfg.spo_threshold,
                    "spo_t_max": ocfg.spo_t_max})
    if accelerator.is_main_process:
        write_json(workdir / "summary.json", summary)
    return summary


def spo_cost_summary(cost: SpoCost, steps_per_rollout: int) -> dict[str, Any]:
    """SPO's per-step cost next to LPO's keys (lpo.methods.lpo._summary), METHOD.md section 4 (Tab. 5).

    ``unet_passes_per_sampling_step`` keeps LPO's unit (one CFG forward over the prompt batch; the K children
    are K such passes): 1 + K x (share of steps with a child pass). ``lrm_passes_per_sampling_step`` (one
    batched reward call over all B x K children per scored step) is the loop's and means SPM calls here.
    The ``*_per_prompt_step`` keys count evaluations per prompt and sampling step (LPO: 1 U-Net, K LRM, 0
    decodes; SPO: 1 + K U-Net, K decodes, K SPM on trained steps). Counts and seconds cover the rollouts this
    process ran since it started (a resumed run counts only its own).
    """
    prompt_steps = cost.prompts * steps_per_rollout  # sum over rollouts of B x steps

    def per_prompt_step(rows: int) -> float:
        return rows / prompt_steps if prompt_steps else 0.0

    calls = max(cost.calls, 1)
    child_unet = per_prompt_step(cost.unet_rows)
    return {
        "unet_passes_per_sampling_step": 1.0 + child_unet,
        "unet_evals_per_prompt_step": 1.0 + child_unet,
        "decodes_per_prompt_step": per_prompt_step(cost.decode_rows),
        "reward_evals_per_prompt_step": per_prompt_step(cost.spm_rows),
        "seconds_child_unet_per_scored_step": cost.seconds["unet"] / calls,
        "seconds_decode_per_scored_step": cost.seconds["decode"] / calls,
        "seconds_spm_per_scored_step": cost.seconds["spm"] / calls,
        "scorer_calls": cost.calls,
        "rollouts_measured": cost.iterations,
    }
