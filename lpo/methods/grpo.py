"""Step-level GRPO with the latent reward model (docs/method.md section 9).

The method family that flow-model users run today (Flow-GRPO, DanceGRPO), on this project's step-level engine
(lpo/methods/engine.py) and LRM, with three choices of its own:
- scorer: the frozen LRM on all B x K children of a step, as LPO (``optimize.grpo.lrm_timestep``);
- selection: the whole group of K children of every trained step, with group-normalised advantages
  A_k = (S_k - mean S) / std S (``lpo.losses.group_advantages``) and each child's log-density under the
  policy that sampled it; groups whose scores do not spread (std <= ``std_floor``) carry no signal and are
  not kept. LPO's thresholds are not used; calibrate's trainable flags are (the same gate as LPO's);
- update: the clipped-ratio policy gradient on every child's step log-density plus ``kl_beta`` x the KL of
  the policy's step to the reference's (the base model: LoRA adapters disabled), ``lpo.losses.grpo_loss``.

The step log-density is summed over latent elements by default (``optimize.grpo.logprob``): the exact
Gaussian log-density, whose ratio moves about as fast per update as LPO's beta-500 loss on the mean; with
``mean`` (DDPO's and Flow-GRPO's reduction) the same learning rate moves the policy ~(C h w) times less.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from lpo.backbones import PromptEmbeds
from lpo.branching import BranchStep
from lpo.config import Config, ConfigError, GrpoMethodConfig, OptimizeConfig
from lpo.diffusion import step_log_prob
from lpo.losses import gaussian_step_kl, group_advantages, grpo_loss
from lpo.methods import Method, MethodInputs
from lpo.methods.engine import (
    LrmScorer,
    Scorer,
    Selection,
    StepMethod,
    StepPlan,
    Tuples,
    check_lrm_inputs,
    lrm_null_encoding,
    optimizer_step,
    policy_step,
    train_lrm_method,
)
from lpo.policy import Policy

log = logging.getLogger(__name__)


def children_log_probs(children: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor, reduce: str) -> torch.Tensor:
    """log p(x_k | x_t) of K children that share one step Gaussian: children (N, K, C, h, w), mean (N, C, h, w),
    sigma (N,) -> (N, K), averaged (``mean``) or summed (``sum``) over the latent elements."""
    n, k = children.shape[:2]
    logp = step_log_prob(children.flatten(0, 1), mean.repeat_interleave(k, dim=0), sigma.repeat_interleave(k))
    if reduce == "sum":
        logp = logp * math.prod(children.shape[2:])
    return logp.view(n, k)


class Grpo(StepMethod):
    """GRPO's scorer (the LRM), its group selection with advantages and its clipped policy-gradient update."""

    name = "grpo"
    stat_names = ("loss", "policy_loss", "kl", "clipped_frac", "ratio_dev", "adv_abs")
    loss_reference = 0.0  # ratio 1 and zero-mean advantages in every group, KL 0: the first update's loss

    def __init__(self, settings: GrpoMethodConfig, lrm: Any, num_children: int) -> None:
        self.settings_, self.score_at = settings, settings.lrm_timestep
        self.lrm, self.num_children = lrm, num_children
        self.null_enc = lrm_null_encoding(lrm) if lrm is not None else None

    def make_scorer(self, prompts: list[str]) -> Scorer:
        return LrmScorer(self.lrm, prompts, self.num_children, self.null_enc)

    def fields(self, latent_shape: Sequence[int], num_children: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"children": ((num_children, *latent_shape), torch.float32),
                "logp_old": ((num_children,), torch.float32),
                "advantages": ((num_children,), torch.float32)}

    def select(self, step: BranchStep, scores: torch.Tensor, threshold: float) -> Selection:
        std = scores.double().std(dim=1, unbiased=False)  # (B,)
        kept = (std > self.settings_.std_floor).nonzero().squeeze(1)  # (n,)
        children = step.children[kept].float()  # (n, K, C, h, w)
        logp_old = children_log_probs(children, step.split.mean[kept], step.split.sigma[kept], self.settings_.logprob)
        adv = group_advantages(scores[kept]) if kept.numel() else scores[kept]
        return Selection(kept, {"children": children, "logp_old": logp_old.float(), "advantages": adv.float()},
                         float(std.mean()))

    def update(self, policy: Policy, train_unet: Any, batch: Tuples, uncond: PromptEmbeds,
               optimizer: torch.optim.Optimizer, accelerator: Any, cfg: OptimizeConfig) -> dict[str, float]:
        s, scheduler, d = self.settings_, policy.backbone.scheduler, batch.data
        with policy.reference() as ref:
            ref_split = policy_step(ref, batch, uncond, scheduler, cfg.cfg, cfg.eta)
        split = policy_step(train_unet, batch, uncond, scheduler, cfg.cfg, cfg.eta)
        logp = children_log_probs(d["children"], split.mean, split.sigma, s.logprob)  # (N, K)
        kl = gaussian_step_kl(split.mean, ref_split.mean.detach(), split.sigma, s.logprob)  # (N,)
        loss, stats = grpo_loss(logp, d["logp_old"], d["advantages"], kl, s.clip_eps, s.kl_beta)
        optimizer_step(loss, policy, optimizer, accelerator, cfg)
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in stats.items()},
                "adv_abs": float(d["advantages"].abs().mean())}

    def settings(self) -> dict[str, Any]:
        s = self.settings_
        return {"clip_eps": s.clip_eps, "kl_beta": s.kl_beta, "logprob": s.logprob, "std_floor": s.std_floor,
                "lrm_timestep": s.lrm_timestep}


def check_inputs(cfg: Config, inputs: MethodInputs) -> None:
    """GRPO's bad-input list: the LRM method checks (as LPO's) and GRPO's own settings."""
    g = cfg.optimize.grpo
    if not 0.0 < g.clip_eps < 1.0:
        raise ConfigError(f"optimize.grpo.clip_eps: must be in (0, 1), got {g.clip_eps}")
    if not g.kl_beta >= 0:
        raise ConfigError(f"optimize.grpo.kl_beta: must be >= 0, got {g.kl_beta}")
    if not g.std_floor >= 0:
        raise ConfigError(f"optimize.grpo.std_floor: must be >= 0, got {g.std_floor}")
    check_lrm_inputs(cfg, inputs, "grpo")


def train(cfg: Config, policy: Policy, inputs: MethodInputs, workdir: Path, accelerator: Any) -> dict[str, Any]:
    """Step-level GRPO: the LRM scores the children; calibrate's trainable flags choose the steps."""
    ocfg = cfg.optimize
    g = ocfg.grpo

    def describe(plan: StepPlan) -> str:
        trained = [t for t, ok in zip(plan.timesteps, plan.train) if ok]
        return (f"grpo: {sum(plan.train)} of {len(plan)} steps trained (t = {trained}); clip {g.clip_eps}, "
                f"kl_beta {g.kl_beta}, log-density {g.logprob}")

    return train_lrm_method(cfg, policy, inputs, workdir, accelerator, "grpo",
                            lambda lrm: Grpo(g, lrm, ocfg.num_children), describe)


METHOD = Method(check=check_inputs, train=train)
