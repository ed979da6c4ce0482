"""The LRM's training step (docs/method.md section 2), shared by the train_lrm stage and the bench tool.

Timesteps come from the backbone's DDIM grid (official code) or uniformly from [0, T), with the upper half
up-weighted by ``train_lrm.high_t_weight`` (docs/prototype.md, trap 4: the prototype's LRM was blind at high t).
Each step draws both latents of a pair from their stored VAE posterior (mean + std * noise) and noises them to
the SAME timestep with INDEPENDENT noise (lpo.diffusion.noisy_pair), then scores them with the LRM
(lpo.reward.pairs.PairScorer) and takes the weighted Bradley-Terry loss (``LrmStep``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch

from lpo.config import ConfigError
from lpo.diffusion import noisy_pair
from lpo.losses import bradley_terry_loss
from lpo.reward.lrm import LatentRewardModel
from lpo.training.trainer import StepResult


def candidate_timesteps(mode: str, grid: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Training timesteps, docs/method.md section 2: the DDIM grid (official code, {1, 51, ..., 951} for SD1.5) or
    every t in [0, T) (the paper's U(0, T)). Returns (N,) int64, ascending."""
    if mode == "ddim_grid":
        return torch.sort(grid.to(torch.int64)).values
    if mode == "uniform":
        return torch.arange(num_train_timesteps, dtype=torch.int64)
    raise ConfigError(f"train_lrm.timesteps: unknown mode {mode!r}")


def timestep_weights(candidates: torch.Tensor, num_train_timesteps: int, high_t_weight: float) -> torch.Tensor:
    """Sampling weights of the candidates: 1, times high_t_weight for t >= T/2 (the upper half of the range)."""
    if high_t_weight <= 0:
        raise ConfigError(f"train_lrm.high_t_weight must be > 0, got {high_t_weight}")
    upper = candidates >= num_train_timesteps / 2
    return torch.where(upper, float(high_t_weight), 1.0).to(torch.float64)  # (N,)


def sample_timesteps(
    n: int, candidates: torch.Tensor, weights: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """n timesteps drawn with replacement from `candidates` with probability proportional to `weights`; (n,)."""
    idx = torch.multinomial(weights, n, replacement=True, generator=generator)
    return candidates[idx]


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup to the peak learning rate over `warmup_steps` steps, then constant (a multiplier)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def validation_timesteps(grid: torch.Tensor, n: int) -> list[int]:
    """n points of the DDIM grid, evenly spaced by index, the lowest and highest t included; ascending."""
    ordered = torch.sort(grid).values.tolist()
    if n < 1 or n > len(ordered):
        raise ConfigError(f"train_lrm.val_timesteps must be in 1..{len(ordered)} (the grid size), got {n}")
    if n == 1:
        return [int(ordered[0])]
    picks = np.unique(np.round(np.linspace(0, len(ordered) - 1, n)).astype(int))
    return [int(ordered[i]) for i in picks]


def set_frozen_eval(lrm: LatentRewardModel, train_text_encoder: bool) -> None:
    """Frozen text encoders stay in eval mode (no dropout), so their cached encodings are exact."""
    if not train_text_encoder:
        for encoder in lrm.text_encoders():
            encoder.eval()


@dataclasses.dataclass
class LrmStep:
    """The loss of one training step on a batch of latent pairs (a lpo.training.trainer.StepFn).

    scorer: (x_t (N, C, h, w), t (N,), captions) -> scores (N,): a PairScorer, or its DDP wrapper;
    candidates, weights: the timesteps and their sampling weights (``candidate_timesteps``,
    ``timestep_weights``); alphas_cumprod: the scheduler's alpha-bar. The generator draws, in this order, the
    timesteps (B,), the posterior noise and the diffusion noise, each (B, 2, C, h, w).
    """

    scorer: Callable[[torch.Tensor, torch.Tensor, list[str]], torch.Tensor]
    candidates: torch.Tensor
    weights: torch.Tensor
    alphas_cumprod: torch.Tensor
    device: torch.device

    def __call__(self, batch: dict[str, Any], gen: torch.Generator, w: torch.Tensor) -> StepResult:
        device = self.device
        b = len(batch["keys"])
        t = sample_timesteps(b, self.candidates, self.weights, gen)  # (B,)
        eps_post = torch.randn(batch["mean"].shape, generator=gen)  # (B, 2, C, h, w)
        eps = torch.randn(batch["mean"].shape, generator=gen)  # (B, 2, C, h, w)
        mean, std, labels = batch["mean"].to(device), batch["std"].to(device), batch["labels"].to(device)
        t, eps_post, eps = t.to(device), eps_post.to(device), eps.to(device)
        x_t = noisy_pair(mean, std, t, self.alphas_cumprod, eps_post, eps)  # (B, 2, C, h, w)
        scores = self.scorer(torch.cat([x_t[:, 0], x_t[:, 1]]), torch.cat([t, t]), batch["captions"] * 2)  # (2B,)
        s0, s1 = scores[:b], scores[b:]
        loss = bradley_terry_loss(s0, s1, labels[:, 0], labels[:, 1], w)
        return StepResult(loss, s0, s1, labels, {"t_mean": float(t.float().mean())})
