"""LPO: Latent Preference Optimization with the latent reward model (docs/method.md section 3).

LPO on the step-level engine (lpo/methods/engine.py) is three choices:
- scorer: the frozen LRM scores all B x K children of a step in ONE batched forward, at the parent's t
  (official code) or the child's (``optimize.lpo.lrm_timestep``);
- selection: the best w / worst l child per prompt, kept iff pair_gap(S_w, S_l) = tanh((S_w - S_l)/2) > th(t)
  (step 2d), th(t) and the trainable steps from calibrate's thresholds.json;
- update: the clipped step-level DPO loss (``lpo.losses.step_dpo_loss``, step 4) with ``optimize.lpo.beta``
  and ``clip_eps``; the reference is the base model (LoRA adapters disabled).
To change LPO's loss, give :class:`Lpo` another ``loss`` (same arguments and stats): SPO and GRPO do not
read it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from lpo.config import Config, LpoMethodConfig
from lpo.losses import step_dpo_loss
from lpo.methods import Method, MethodInputs
from lpo.methods.engine import LrmScorer, PairwiseStepMethod, Scorer, StepPlan, check_lrm_inputs, lrm_null_encoding
from lpo.methods.engine import train_lrm_method
from lpo.policy import Policy

log = logging.getLogger(__name__)


class Lpo(PairwiseStepMethod):
    """LPO's scorer (the LRM), its pair selection and its loss."""

    name = "lpo"
    loss = staticmethod(step_dpo_loss)

    def __init__(self, settings: LpoMethodConfig, lrm: Any, num_children: int) -> None:
        self.beta, self.clip_eps, self.score_at = settings.beta, settings.clip_eps, settings.lrm_timestep
        self.lrm, self.num_children = lrm, num_children
        self.null_enc = lrm_null_encoding(lrm) if lrm is not None else None

    def make_scorer(self, prompts: list[str]) -> Scorer:
        return LrmScorer(self.lrm, prompts, self.num_children, self.null_enc)


def check_inputs(cfg: Config, inputs: MethodInputs) -> None:
    """LPO's bad-input list: K < 2, LoRA rank 0, a missing LRM folder or thresholds file, a thresholds grid that
    does not match the sampler, nothing trainable, LPO's own settings. Reads only small files."""
    check_lrm_inputs(cfg, inputs, "lpo")


def train(cfg: Config, policy: Policy, inputs: MethodInputs, workdir: Path, accelerator: Any) -> dict[str, Any]:
    """LPO (docs/method.md section 3): the LRM scores the children; thresholds from calibrate's thresholds.json."""
    ocfg = cfg.optimize

    def describe(plan: StepPlan) -> str:
        thresholds = [None if math.isinf(v) else round(v, 3) for v in plan.thresholds]
        return f"lpo: {sum(plan.train)} of {len(plan)} steps trained; thresholds {thresholds}"

    return train_lrm_method(cfg, policy, inputs, workdir, accelerator, "lpo",
                            lambda lrm: Lpo(ocfg.lpo, lrm, ocfg.num_children), describe)


METHOD = Method(check=check_inputs, train=train)
