"""The branching sampler's step: one trunk, K children per step (docs/method.md section 3 step 2).

Every step-level user of the sampler (the optimize engine of lpo/methods/engine.py, calibrate's rollout
mode, sibling_lrm, scripts/sibling_ranking.py and scripts/oracle_lpo.py) walks the same trunk:

    for each step of the grid:
        one batched CFG U-Net pass on the trunk x          -> the DDIM mean and sigma (lpo.diffusion)
        branched step:     K children = mean + sigma eps_k  (one draw of B*K noises from `generator`)
                           ... the caller looks at the children (scores, rollouts, kept tuples) ...
                           the trunk goes on from a uniformly random child (one draw of B indices)
        plain step:        one child = the next trunk state (one draw of B noises)

:func:`branching_steps` is that walk as a generator: it yields a :class:`BranchStep` per step and continues
when the caller asks for the next one, so the caller's work sits between the children's draw and the pick,
and the random draws keep this order whatever the caller does (no caller draws from `generator`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import torch

from lpo.diffusion import StepSplit, cfg_noise_pred, ddim_step_split, sample_children

if TYPE_CHECKING:  # type only: lpo.backbones is a higher layer
    from lpo.backbones import PromptEmbeds


def now(device: torch.device) -> float:
    """Wall clock after the device has finished its queued work (CUDA is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class BranchStep:
    """One step of the walk, as the caller sees it.

    index: position in the grid; t, t_prev: the parent's timestep and where the step lands (-1 = x_0);
    x: the parent trunk state (B, C, h, w); split: the step's Gaussian (mean, sigma, x0-hat);
    children: (B, K, C, h, w) on a branched step, (B, 1, C, h, w) on a plain one; unet_s: wall seconds of
    the U-Net pass and the split.
    """

    index: int
    t: int
    t_prev: int
    branched: bool
    x: torch.Tensor
    split: StepSplit
    children: torch.Tensor
    unet_s: float


def branching_steps(
    unet: Any,
    scheduler: Any,
    cond: "PromptEmbeds",
    uncond: "PromptEmbeds",
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    prev: Sequence[int],
    cfg_scale: float,
    eta: float,
    num_children: int,
    generator: torch.Generator,
    branch: Optional[Sequence[bool]] = None,
) -> Iterator[BranchStep]:
    """Walk the grid from x_T, yielding every step; `branch[i]` False makes step i plain (all True if None).

    cond: the B prompts' conditioning; uncond: the null prompt (1 row, broadcast). The trunk keeps x_T's
    dtype; the children keep the split's. All randomness comes from `generator`.
    """
    device = x_T.device
    batch = x_T.shape[0]
    rows = torch.arange(batch, device=device)
    added_cond, added_uncond = cond.added_cond_kwargs(), uncond.added_cond_kwargs()
    x = x_T
    for i, (t, t_prev) in enumerate(zip(timesteps, prev)):
        t, t_prev = int(t), int(t_prev)
        start = now(device)
        out = cfg_noise_pred(unet, x, t, cond.hidden_states, uncond.hidden_states, cfg_scale, added_cond, added_uncond)
        split = ddim_step_split(out, x, t, t_prev, scheduler, eta)
        unet_s = now(device) - start
        if branch is not None and not branch[i]:
            children = sample_children(split, 1, generator)  # (B, 1, C, h, w)
            yield BranchStep(i, t, t_prev, False, x, split, children, unet_s)
            x = children[:, 0].to(x.dtype)  # a plain DDIM step
            continue
        children = sample_children(split, num_children, generator)  # (B, K, C, h, w)
        yield BranchStep(i, t, t_prev, True, x, split, children, unet_s)
        pick = torch.randint(num_children, (batch,), generator=generator).to(device)  # (B,)
        x = children[rows, pick].to(x.dtype)  # (B, C, h, w): a uniformly random child goes on
