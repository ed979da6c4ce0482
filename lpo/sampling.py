"""Plain (non-branching) DDIM sampling with classifier-free guidance, seeded per sample, and VAE decoding.

``ddim_sample`` is used wherever images are drawn from noise: the shapes preference pairs, pretraining metrics
and evaluation. Each sample's initial noise comes from its own seed, so sample i is the same whatever batch it
lands in and whichever model draws it (evaluation compares models on the same seeds).

``ddim_rollout`` finishes a trajectory from the middle of the branching sampler's grid (a child at grid index
i, lpo.branching) deterministically; it uses the same step split as the branching sampler (lpo.diffusion),
so a rollout lands exactly where the grid says. The two agree on even grids up to float rounding; on uneven
grids diffusers' step (``ddim_sample``) takes the previous timestep as t - T / steps, not the grid's next.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler

from lpo.diffusion import cfg_noise_pred, ddim_step_split


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
    """x_T for each seed: (N, *shape), independent of batching."""
    out = torch.empty((len(seeds), *shape), dtype=dtype)
    for i, seed in enumerate(seeds):
        out[i] = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)), dtype=dtype)
    return out


@torch.no_grad()
def ddim_sample(
    unet,
    scheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    x_T: torch.Tensor,
    steps: int,
    guidance: float | torch.Tensor,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    added_cond: dict | None = None,
    added_uncond: dict | None = None,
) -> torch.Tensor:
    """DDIM from x_T to x_0 with CFG; one batched U-Net pass [uncond; cond] per step.

    `guidance` is a float or a per-sample (B,) tensor (the shapes pairs mix CFG scales like Pick-a-Pic mixes
    models). Returns the final latents (B, C, h, w).
    """
    sched = DDIMScheduler.from_config(scheduler.config)  # private copy: set_timesteps mutates state
    sched.set_timesteps(steps)
    x = x_T * sched.init_noise_sigma
    b = x.shape[0]
    g = torch.as_tensor(guidance, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))  # (B|1, 1, 1, 1)
    context = torch.cat([uncond, cond])  # (2B, L, D)
    added = None
    if added_cond is not None:
        added = {k: torch.cat([added_uncond[k], added_cond[k]]) for k in added_cond}
    for t in sched.timesteps:
        x_in = sched.scale_model_input(torch.cat([x, x]), t)  # (2B, C, h, w)
        kwargs = {"added_cond_kwargs": added} if added is not None else {}
        out = unet(x_in, t, encoder_hidden_states=context, **kwargs).sample
        out_u, out_c = out[:b], out[b:]
        noise_pred = out_u + g * (out_c - out_u)
        x = sched.step(noise_pred, t, x, eta=eta, generator=generator).prev_sample
    return x


@torch.no_grad()
def ddim_rollout(
    unet,
    scheduler,
    x: torch.Tensor,
    start: int,
    timesteps: Sequence[int],
    prev: Sequence[int],
    cond,
    null,
    guidance: float,
) -> torch.Tensor:
    """Deterministic DDIM (eta 0) with CFG from grid index `start` to the end: x (N, C, h, w) at level
    timesteps[start] -> x_0 (N, C, h, w). start == len(timesteps) means x already is x_0.

    cond: PromptEmbeds of the N rows; null: PromptEmbeds of the null prompt (1 row, broadcast).
    """
    for j in range(start, len(timesteps)):
        t, t_prev = int(timesteps[j]), int(prev[j])
        out = cfg_noise_pred(unet, x, t, cond.hidden_states, null.hidden_states, guidance,
                             cond.added_cond_kwargs(), null.added_cond_kwargs())
        x = ddim_step_split(out, x, t, t_prev, scheduler, eta=0.0).mean.to(x.dtype)
    return x


@torch.no_grad()
def decode_images(vae, latents: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Latents (scaled by the VAE's scaling factor) -> uint8 images (N, H, W, 3)."""
    images = []
    for start in range(0, latents.shape[0], batch_size):
        z = latents[start : start + batch_size] / vae.config.scaling_factor
        x = vae.decode(z.to(vae.dtype)).sample  # (b, 3, H, W) in [-1, 1]
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        images.append(x.permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(images) if images else np.zeros((0, 0, 0, 3), np.uint8)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0
