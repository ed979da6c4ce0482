"""SPO (Liang et al., RockeyCoss/SPO): step-level preference optimisation with a step-aware PIXEL reward.

docs/method.md section 5 ("SPO") is the specification. SPO runs on the step-level engine (lpo/methods/engine.py:
the same branching sampler, tuple sharing, checkpoints and summary as LPO) with the best/worst pair selection
and the clipped step-level DPO update of SPO's Eqn. 6, and four settings of its own, all in this module:

1. the scorer (``SpoScorer``): each of the K children gets its own CFG U-Net pass at the NEXT (the child's)
   timestep, its x0-hat is VAE-decoded and scored by the SPM at the child's timestep; the last step's children
   are x_0 and are decoded directly and scored at t = 0 (RockeyCoss/SPO multi_sample_pipeline.py). So a
   trained sampling step costs 1 + K U-Net passes, K decodes and K SPM passes per prompt, against LPO's
   1 U-Net pass and K LRM passes (the paper's Tab. 5);
2. a fixed threshold ``optimize.spo.threshold`` on pair_gap(S_w, S_l) = tanh((S_w - S_l)/2) (SPO's
   compare function is the same softmax gap of the best and worst child);
3. training only at timesteps <= ``optimize.spo.t_max`` (SPO's divert_start_step = 4 of 20 steps, t <= 750;
   docs/method.md section 6: SPO trained on [0, 950] collapses). Steps above it are plain DDIM steps: one child,
   no scorer call, as in SPO, where branching starts at step 4;
4. beta = ``optimize.spo.beta`` (10) in the clipped loss (``lpo.losses.step_dpo_loss``, named here: changing
   LPO's loss does not change this baseline).

The official pipeline reuses the chosen child's U-Net pass as the next step's trunk pass; here the trunk pass
is run again (the same input, the same output), so the wall time is that of the paper's cost model
(denoise + K x (x0-hat + decode + reward)). The child whose x0-hat is scored at t_child = 0 is taken as clean
(it is x_0 on every grid whose last step lands on -1, i.e. all DDIM grids here).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DDIMScheduler

from lpo.backbones import Backbone, PromptEmbeds
from lpo.branching import now
from lpo.config import Config, ConfigError, OptimizeConfig, SpoMethodConfig
from lpo.diffusion import cfg_noise_pred, ddim_step_split, ddim_timesteps
from lpo.losses import step_dpo_loss
from lpo.methods import Method, MethodInputs
from lpo.methods.engine import (
    PairwiseStepMethod,
    StepPlan,
    ThresholdTable,
    check_step_config,
    load_scheduler,
    step_level_loop,
    step_plan,
)
from lpo.reward.pixel import CONFIG_NAME as SPM_CONFIG_NAME
from lpo.reward.pixel import StepAwarePixelModel, decode_latents
from lpo.utils import write_json

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Checks and the step plan
# --------------------------------------------------------------------------------------------------------


def spo_plan(scheduler: DDIMScheduler, cfg: OptimizeConfig) -> StepPlan:
    """The engine's StepPlan with SPO's fixed threshold at every step and training only where t <= spo.t_max
    (and inside optimize.t_min .. t_max, and sigma > 0, as LPO's plan)."""
    timesteps, _ = ddim_timesteps(scheduler, cfg.ddim_steps)
    grid = tuple(int(t) for t in timesteps)
    table = ThresholdTable(grid, (cfg.spo.threshold,) * len(grid), (True,) * len(grid), "optimize.spo.threshold")
    return step_plan(table, scheduler, dataclasses.replace(cfg, t_max=min(cfg.t_max, cfg.spo.t_max)))


def check_inputs(cfg: Config, inputs: MethodInputs) -> None:
    """SPO's bad-input list, before any model is loaded: LPO's step settings, SPO's own fields, the SPM folder,
    a plan with at least one trained step."""
    ocfg = cfg.optimize
    check_step_config(ocfg)
    if not 0.0 <= ocfg.spo.threshold < 1.0:
        raise ConfigError(f"optimize.spo.threshold: a pair gap in [0, 1) is expected, got {ocfg.spo.threshold}")
    if not ocfg.spo.beta > 0:
        raise ConfigError(f"optimize.spo.beta: must be > 0, got {ocfg.spo.beta}")
    if not 0.0 < ocfg.spo.clip_eps < 1.0:
        raise ConfigError(f"optimize.spo.clip_eps: must be in (0, 1), got {ocfg.spo.clip_eps}")
    if inputs.spm_dir is None:
        raise ConfigError("optimize: --spm is required for method spo (the train_spm model folder)")
    if not (Path(inputs.spm_dir) / SPM_CONFIG_NAME).is_file():
        raise ConfigError(f"{inputs.spm_dir}: not an SPM folder (no {SPM_CONFIG_NAME}; run the train_spm rule first)")
    plan = spo_plan(load_scheduler(inputs.base_dir), ocfg)
    if not any(plan.train):
        raise ConfigError(f"optimize.spo.t_max={ocfg.spo.t_max}, t_min={ocfg.t_min}, t_max={ocfg.t_max}: no step of "
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


class SpoScorer:
    """Scores the B*K children of one step (the ``Scorer`` protocol of lpo/methods/engine.py):

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
        start = now(device)
        if t > 0:
            out = cfg_noise_pred(bb.unet, children.to(bb.unet.dtype), t, self.cond.hidden_states,
                                 self.uncond.hidden_states, self.cfg_scale, self.cond.added_cond_kwargs(),
                                 self.uncond.added_cond_kwargs())
            x0_hat = ddim_step_split(out, children, t, t - 1, bb.scheduler, eta=0.0).x0_hat  # (B*K, C, h, w)
            cost.unet_rows += children.shape[0]
        else:
            x0_hat = children  # the last step's children are x_0
        unet_done = now(device)
        images = decode_latents(bb.vae, x0_hat)  # (B*K, 3, H, W) in [-1, 1]
        decoded = now(device)
        scores = self.spm.score(images, t, self.text)  # (B*K,)
        end = now(device)
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


class Spo(PairwiseStepMethod):
    """SPO's scorer (the SPM on each child's decoded x0-hat, at the child's timestep), its pair selection and
    its loss."""

    name = "spo"
    score_at = "child"  # the loop passes max(t_prev, 0): SPO scores the child at the child's timestep
    loss = staticmethod(step_dpo_loss)

    def __init__(self, settings: SpoMethodConfig, spm: StepAwarePixelModel, backbone: Backbone,
                 uncond: PromptEmbeds, cfg_scale: float, num_children: int) -> None:
        self.beta, self.clip_eps = settings.beta, settings.clip_eps
        self.spm, self.backbone, self.uncond = spm, backbone, uncond
        self.cfg_scale, self.num_children = cfg_scale, num_children
        self.cost = SpoCost()

    def make_scorer(self, prompts: list[str]) -> SpoScorer:
        return SpoScorer(self.spm, self.backbone, prompts, self.uncond, self.cfg_scale, self.num_children, self.cost)


def train(cfg: Config, policy: Any, inputs: MethodInputs, workdir: Path, accelerator: Any) -> dict[str, Any]:
    """SPO: the engine with the SPM scorer at the child's timestep, spo.threshold, spo.t_max, spo.beta."""
    ocfg = cfg.optimize
    device = accelerator.device
    bb = policy.backbone
    plan = spo_plan(bb.scheduler, ocfg)
    spm = load_spm(Path(inputs.spm_dir), device)
    bb.vae.to(device)  # the scorer decodes every child's x0-hat
    uncond = bb.null_embeds(1).to(device)
    log.info("spo: %d of %d steps trained (t <= %d); threshold %.3f, beta %g; SPM %s (%s)", sum(plan.train),
             len(plan), min(ocfg.t_max, ocfg.spo.t_max), ocfg.spo.threshold, ocfg.spo.beta, inputs.spm_dir, spm.kind)
    method = Spo(ocfg.spo, spm, bb, uncond, ocfg.cfg, ocfg.num_children)
    summary = step_level_loop(cfg, policy, inputs.prompts, workdir, accelerator, plan, method)
    summary["cost"].update(spo_cost_summary(method.cost, len(plan)))
    summary.update({"spm": str(inputs.spm_dir), "spm_kind": spm.kind, "spo_threshold": ocfg.spo.threshold,
                    "spo_t_max": ocfg.spo.t_max})
    if accelerator.is_main_process:
        write_json(workdir / "summary.json", summary)
    return summary


def spo_cost_summary(cost: SpoCost, steps_per_rollout: int) -> dict[str, Any]:
    """SPO's per-step cost next to LPO's keys (lpo.methods.engine._summary), docs/method.md section 4 (Tab. 5).

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


METHOD = Method(check=check_inputs, train=train)
