"""DDIM sampling math for step-level preference optimisation (docs/method.md §3).

Pure functions over a diffusers ``UNet2DConditionModel`` and ``DDIMScheduler``: the DDIM timestep grid,
one batched classifier-free-guidance U-Net pass, the DDIM step split into its Gaussian mean and standard
deviation (so K children of one parent cost one U-Net pass), child sampling and the per-step Gaussian
log-density of the LPO / SPO loss.

The step split follows diffusers' ``DDIMScheduler.step`` (formulas (12) and (16) of the DDIM paper), and
LPO's ``ddim_seperate.py`` / SPO's ``ddim_with_logprob.py`` (Kwai-Kolors/LPO, RockeyCoss/SPO), written here
as separate pure functions so that timesteps may differ per sample (kept tuples mix timesteps in one
minibatch).

Dtypes: the scheduler stores ``alphas_cumprod`` in float32. Coefficients and results are computed in
``promote_types(input dtype, float32)``, i.e. float32 for fp16/bf16 inputs (log-ratios of nearly equal
log-densities need it), float64 for float64 inputs. Cast children back to the U-Net dtype before the
next U-Net pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

Timesteps = Union[int, torch.Tensor]

__all__ = [
    "StepSplit",
    "ddim_timesteps",
    "ddim_sigma",
    "ddim_sigmas",
    "alphas_at",
    "cfg_noise_pred",
    "ddim_step_split",
    "sample_children",
    "step_log_prob",
]


# --------------------------------------------------------------------------------------------------------
# Timestep grid and the DDIM standard deviation
# --------------------------------------------------------------------------------------------------------


def _check_scheduler(scheduler: DDIMScheduler) -> None:
    if not isinstance(scheduler, DDIMScheduler):
        raise TypeError(f"expected a diffusers DDIMScheduler, got {type(scheduler).__name__}")


def ddim_timesteps(scheduler: DDIMScheduler, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDIM sampling grid and, for each timestep, the timestep the step lands on.

    The grid is diffusers' own ``set_timesteps(num_steps)`` on a fresh copy of the scheduler (the given
    scheduler is not mutated), so ``timestep_spacing`` ("leading", "trailing", "linspace") and
    ``steps_offset`` are respected exactly. SD1.5 (leading, offset 1, 20 steps): 951, 901, ..., 1;
    trailing, 20 steps: 999, 949, ..., 49.

    ``prev_timesteps[i]`` is the next entry of the grid and -1 for the last step, which means
    ``final_alpha_cumprod`` (``alphas_cumprod[0]`` when ``set_alpha_to_one=False``, else 1).
    This equals diffusers' ``t - num_train_timesteps // num_steps`` whenever the grid is evenly spaced
    (leading always; trailing when num_steps divides num_train_timesteps). For uneven grids (linspace, or
    e.g. trailing with 30 steps) diffusers' ``step`` uses ``t - T // N``, which is not the next grid point;
    here the true next grid point is used (a proper DDIM sub-sequence).

    Returns:
        timesteps: (N,) int64, descending.
        prev_timesteps: (N,) int64, descending, last = -1.
    """
    _check_scheduler(scheduler)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    fresh = DDIMScheduler.from_config(scheduler.config)
    fresh.set_timesteps(num_steps)
    timesteps = fresh.timesteps.to(torch.int64).clone()  # (N,)
    if not bool((timesteps[:-1] > timesteps[1:]).all()):
        raise ValueError(f"DDIM grid is not strictly descending for num_steps={num_steps}: {timesteps.tolist()}")
    prev = torch.cat([timesteps[1:], torch.tensor([-1], dtype=torch.int64)])  # (N,)
    return timesteps, prev


def ddim_sigma(alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """DDIM standard deviation, docs/method.md §3 step 2a (DDIM paper Eq. 16).

    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev), with a = alpha-bar (cumulative).
    """
    return eta * ((1 - alpha_prev) / (1 - alpha_t)).sqrt() * (1 - alpha_t / alpha_prev).sqrt()


def _as_batch_timesteps(t: Timesteps, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """Integer timesteps as a (B,) int64 tensor; a scalar is broadcast to the batch."""
    t = torch.as_tensor(t, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name}: DDIM timesteps must be integers, got dtype {t.dtype}")
    t = t.to(torch.int64)
    if t.ndim == 0:
        return t.expand(batch)  # (B,)
    if t.shape != (batch,):
        raise ValueError(f"{name}: expected a scalar or shape ({batch},), got {tuple(t.shape)}")
    return t


def alphas_at(scheduler: DDIMScheduler, t: torch.Tensor, t_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha-bar at t and at t_prev (t_prev = -1 means ``final_alpha_cumprod``), float32, same shape as t."""
    num_train = scheduler.config.num_train_timesteps
    if bool(((t < 0) | (t >= num_train)).any()):
        raise ValueError(f"t out of range [0, {num_train - 1}]: {t.tolist()}")
    if bool(((t_prev < -1) | (t_prev >= num_train)).any()):
        raise ValueError(f"t_prev out of range [-1, {num_train - 1}]: {t_prev.tolist()}")
    if bool((t_prev >= t).any()):
        raise ValueError(f"t_prev must be < t for every sample, got t={t.tolist()} t_prev={t_prev.tolist()}")
    alphas = scheduler.alphas_cumprod.to(device=t.device, dtype=torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=t.device, dtype=torch.float32)
    alpha_t = alphas[t]
    alpha_prev = torch.where(t_prev >= 0, alphas[t_prev.clamp(min=0)], final)
    return alpha_t, alpha_prev


def ddim_sigmas(scheduler: DDIMScheduler, num_steps: int, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma_t of every step of the DDIM grid (docs/method.md §3, the table of the threshold rule).

    The sigma listed at timestep t is the standard deviation of the step *from* t to the next grid point
    (``ddim_timesteps``), i.e. the noise of the children that LPO samples from a parent at t; at the last
    step alpha_prev = ``final_alpha_cumprod``. Computed in float64 from the scheduler's float32 alphas.

    Returns:
        timesteps: (N,) int64, descending.
        sigmas: (N,) float64.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    timesteps, prev = ddim_timesteps(scheduler, num_steps)
    alpha_t, alpha_prev = alphas_at(scheduler, timesteps, prev)
    return timesteps, ddim_sigma(alpha_t.double(), alpha_prev.double(), eta)


# --------------------------------------------------------------------------------------------------------
# One CFG U-Net pass
# --------------------------------------------------------------------------------------------------------


def _expand_batch(x: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Broadcast a leading dimension of 1 to the batch (one null-prompt embedding for all samples)."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise ValueError(f"{name}: leading dimension must be 1 or the batch size {batch}, got {tuple(x.shape)}")


def cfg_noise_pred(
    unet: UNet2DConditionModel,
    x_t: torch.Tensor,
    t: Timesteps,
    cond_embeds: torch.Tensor,
    uncond_embeds: Optional[torch.Tensor],
    guidance_scale: float,
    added_cond: Optional[dict[str, torch.Tensor]] = None,
    added_uncond: Optional[dict[str, torch.Tensor]] = None,
) -> torch.Tensor:
    """Classifier-free-guided model output from ONE batched U-Net pass (docs/method.md §3 step 2a).

    out = out_uncond + guidance_scale * (out_cond - out_uncond), with the U-Net run once on the batch
    [uncond; cond] of size 2B. With guidance_scale == 1 the combination equals out_cond, so only the cond
    half is run (uncond_embeds may then be None).

    Args:
        x_t: (B, C, h, w) noisy latents.
        t: scalar or (B,) timesteps (kept tuples mix timesteps).
        cond_embeds: (B, L, D) prompt hidden states.
        uncond_embeds: (B, L, D) or (1, L, D) null-prompt hidden states.
        added_cond / added_uncond: SDXL ``added_cond_kwargs`` dicts ({"text_embeds": (B|1, P),
            "time_ids": (B|1, 6)}) for the cond / uncond halves; None for SD1.5-style U-Nets.

    Returns:
        (B, C, h, w) guided model output (epsilon or v, whatever the U-Net predicts). Gradients flow.
    """
    batch = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device)
    if t.ndim == 0:
        t = t.expand(batch)  # (B,)
    if t.shape != (batch,):
        raise ValueError(f"t: expected a scalar or shape ({batch},), got {tuple(t.shape)}")
    cond_embeds = _expand_batch(cond_embeds, batch, "cond_embeds")

    if guidance_scale == 1.0:
        added_1 = None
        if added_cond is not None:
            added_1 = {k: _expand_batch(v, batch, f"added_cond[{k!r}]") for k, v in added_cond.items()}
        return unet(x_t, t, encoder_hidden_states=cond_embeds, added_cond_kwargs=added_1, return_dict=False)[0]

    if uncond_embeds is None:
        raise ValueError(f"uncond_embeds is required when guidance_scale != 1 (got {guidance_scale})")
    if (added_cond is None) != (added_uncond is None):
        raise ValueError("added_cond and added_uncond must be given together (SDXL) or both be None")
    uncond_embeds = _expand_batch(uncond_embeds, batch, "uncond_embeds")
    added: Optional[dict[str, torch.Tensor]] = None
    if added_cond is not None and added_uncond is not None:
        if set(added_cond) != set(added_uncond):
            raise ValueError(f"added_cond keys {sorted(added_cond)} != added_uncond keys {sorted(added_uncond)}")
        added = {
            k: torch.cat([_expand_batch(added_uncond[k], batch, f"added_uncond[{k!r}]"),
                          _expand_batch(added_cond[k], batch, f"added_cond[{k!r}]")])  # (2B, ...)
            for k in added_cond
        }
    out = unet(
        torch.cat([x_t, x_t]),  # (2B, C, h, w)
        torch.cat([t, t]),  # (2B,)
        encoder_hidden_states=torch.cat([uncond_embeds, cond_embeds]),  # (2B, L, D)
        added_cond_kwargs=added,
        return_dict=False,
    )[0]
    out_uncond, out_cond = out.chunk(2)  # (B, C, h, w) each
    return out_uncond + guidance_scale * (out_cond - out_uncond)


# --------------------------------------------------------------------------------------------------------
# The DDIM step, split into mean and sigma
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSplit:
    """One DDIM step from x_t, before its noise is drawn (docs/method.md §3 step 2a).

    x0_hat, eps_hat, mean: (B, C, h, w); sigma: (B,) per-sample standard deviation of x_{t-1}.
    """

    x0_hat: torch.Tensor
    eps_hat: torch.Tensor
    mean: torch.Tensor
    sigma: torch.Tensor


def _x0_eps_from_epsilon(out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 = (x_t - sqrt(1-a) eps) / sqrt(a)  (DDIM Eq. 12)."""
    return (x_t - (1 - a).sqrt() * out) / a.sqrt(), out


def _x0_eps_from_v(out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v-prediction: x0 = sqrt(a) x_t - sqrt(1-a) v,  eps = sqrt(a) v + sqrt(1-a) x_t."""
    return a.sqrt() * x_t - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x_t


def _x0_eps_from_sample(out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x0-prediction: eps = (x_t - sqrt(a) x0) / sqrt(1-a)."""
    return out, (x_t - a.sqrt() * out) / (1 - a).sqrt()


_X0_EPS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "epsilon": _x0_eps_from_epsilon,
    "v_prediction": _x0_eps_from_v,
    "sample": _x0_eps_from_sample,
}


def ddim_step_split(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: Timesteps,
    t_prev: Timesteps,
    scheduler: DDIMScheduler,
    eta: float,
) -> StepSplit:
    """x0-hat, eps-hat, mean and sigma of p(x_{t_prev} | x_t), docs/method.md §3 step 2a.

    mean  = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat
    sigma = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t/a_prev)
    so that mean + sigma * noise is exactly diffusers' ``DDIMScheduler.step(..., eta, variance_noise=noise)``
    (``use_clipped_model_output=False``; ``clip_sample`` clamps x0_hat as diffusers does, eps_hat stays the
    model's). ``prediction_type`` "epsilon", "v_prediction" and "sample" are supported.

    Args:
        model_output: (B, C, h, w) (guided) U-Net output.
        x_t: (B, C, h, w).
        t, t_prev: scalars or (B,) int timesteps; t_prev = -1 means ``final_alpha_cumprod``
            (see ``ddim_timesteps``).
        eta: in [0, 1]; 0 = deterministic DDIM (sigma = 0).
    """
    _check_scheduler(scheduler)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if model_output.shape != x_t.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and x_t {tuple(x_t.shape)} differ in shape")
    if scheduler.config.thresholding:
        raise ValueError("DDIMScheduler.config.thresholding=True (dynamic thresholding) is not supported")
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in _X0_EPS:
        raise ValueError(f"scheduler prediction_type {prediction_type!r} not in {sorted(_X0_EPS)}")

    batch = x_t.shape[0]
    t = _as_batch_timesteps(t, batch, x_t.device, "t")
    t_prev = _as_batch_timesteps(t_prev, batch, x_t.device, "t_prev")
    dtype = torch.promote_types(torch.promote_types(x_t.dtype, model_output.dtype), torch.float32)
    alpha_t, alpha_prev = alphas_at(scheduler, t, t_prev)  # (B,) each, float32
    alpha_t, alpha_prev = alpha_t.to(dtype), alpha_prev.to(dtype)
    sigma = ddim_sigma(alpha_t, alpha_prev, eta)  # (B,)

    def bcast(v: torch.Tensor) -> torch.Tensor:
        return v.view(batch, *([1] * (x_t.ndim - 1)))  # (B, 1, 1, 1)

    x0_hat, eps_hat = _X0_EPS[prediction_type](model_output.to(dtype), x_t.to(dtype), bcast(alpha_t))
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        x0_hat = x0_hat.clamp(-limit, limit)
    # 1 - a_prev - sigma^2 = (1 - a_prev)^2 a_t / (a_prev (1 - a_t)) >= 0 for eta <= 1; clamp only float
    # rounding below 0 (a_prev -> 1 with set_alpha_to_one=True), where diffusers would return NaN.
    direction = (1 - alpha_prev - sigma**2).clamp(min=0).sqrt()  # (B,)
    mean = bcast(alpha_prev.sqrt()) * x0_hat + bcast(direction) * eps_hat  # (B, C, h, w)
    return StepSplit(x0_hat=x0_hat, eps_hat=eps_hat, mean=mean, sigma=sigma)


def sample_children(split: StepSplit, num_children: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """K children of each parent: x_{t-1}^k = mean + sigma eps_k, eps_k ~ N(0, I) (docs/method.md §3 step 2b).

    The noise is drawn on the generator's device (CPU generators work for CUDA tensors) and moved.

    Returns:
        (B, K, C, h, w) in the dtype of ``split.mean``.
    """
    if num_children < 1:
        raise ValueError(f"num_children must be >= 1, got {num_children}")
    mean = split.mean
    batch = mean.shape[0]
    gen_device = generator.device if generator is not None else mean.device
    noise = torch.randn(
        (batch, num_children, *mean.shape[1:]), generator=generator, device=gen_device, dtype=mean.dtype
    ).to(mean.device)  # (B, K, C, h, w)
    sigma = split.sigma.view(batch, 1, *([1] * (mean.ndim - 1)))  # (B, 1, 1, 1, 1)
    return mean.unsqueeze(1) + sigma * noise  # (B, K, C, h, w)


def step_log_prob(x_prev: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian log-density of x_prev under N(mean, sigma^2 I), MEAN over elements (docs/method.md §3 step 4).

    log p = mean_elements[ -(x_prev - mean)^2 / (2 sigma^2) - log sigma - log sqrt(2 pi) ], as
    SPO's ``ddim_with_logprob.py`` / LPO's loss (the mean, not the sum, sets the scale that beta = 500
    and the ratio clip 0.1 were tuned for). x_prev is not detached here: pass a stored sample.
    Computed in ``promote_types(dtype, float32)``.

    Args:
        x_prev, mean: (B, ...) same shape.
        sigma: (B,) per-sample standard deviation, > 0 (eta = 0 steps have no density).

    Returns:
        (B,) log-densities.
    """
    if x_prev.shape != mean.shape:
        raise ValueError(f"x_prev {tuple(x_prev.shape)} and mean {tuple(mean.shape)} differ in shape")
    batch = x_prev.shape[0]
    if sigma.shape != (batch,):
        raise ValueError(f"sigma must have shape ({batch},), got {tuple(sigma.shape)}")
    if bool((sigma <= 0).any()):
        raise ValueError(f"sigma must be > 0 for a log-density (eta = 0 or a zero-noise last step?): {sigma.tolist()}")
    dtype = torch.promote_types(torch.promote_types(x_prev.dtype, mean.dtype), torch.float32)
    sigma = sigma.to(dtype).view(batch, *([1] * (x_prev.ndim - 1)))  # (B, 1, 1, 1)
    log_p = (
        -((x_prev.to(dtype) - mean.to(dtype)) ** 2) / (2 * sigma**2)
        - sigma.log()
        - 0.5 * math.log(2 * math.pi)
    )  # (B, C, h, w)
    return log_p.flatten(1).mean(dim=1)  # (B,)


# --------------------------------------------------------------------------------------------------------
# Noising: the reward models' pair protocol (docs/method.md section 2), shared by train_lrm, eval_lrm and bench
# --------------------------------------------------------------------------------------------------------

import zlib  # noqa: E402
from typing import Sequence  # noqa: E402

import numpy as np  # noqa: E402


def q_sample(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion, docs/method.md section 2 "Noising": x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (DDPM add_noise).

    x0, eps: (B, ...); t: (B,) integer timesteps; alphas_cumprod: (T,) the scheduler's alpha-bar.
    """
    a = alphas_cumprod.to(device=x0.device, dtype=torch.float32)[t.to(x0.device)]  # (B,)
    a = a.view(-1, *([1] * (x0.ndim - 1)))  # (B, 1, ...)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * eps.float()).to(x0.dtype)


def noisy_pair(
    mean: torch.Tensor,
    std: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    eps_posterior: torch.Tensor,
    eps: torch.Tensor,
) -> torch.Tensor:
    """Both latents of each pair at the SAME t with INDEPENDENT noise (docs/method.md section 2).

    x0 = mean + std * eps_posterior (a VAE posterior sample, as the official code's ``latent_dist.sample()``);
    x_t = q_sample(x0, eps, t). mean, std, eps_*: (B, 2, C, h, w); t: (B,). Returns (B, 2, C, h, w).
    """
    x0 = mean + std * eps_posterior  # (B, 2, C, h, w)
    b, two = x0.shape[:2]
    flat = q_sample(x0.flatten(0, 1), eps.flatten(0, 1), t.repeat_interleave(two), alphas_cumprod)  # (2B, C, h, w)
    return flat.view(b, two, *x0.shape[2:])


def key_noise(seed: int, key: str, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation noise of one pair (posterior, diffusion), each (2, *shape): a pure function of (seed, key).

    Independent of batch, rank and order, and the same at every t (common random numbers across the curve)."""
    state = np.random.SeedSequence([seed, 0xE7A1, zlib.crc32(key.encode("utf-8"))]).generate_state(2, np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn((2, *shape), generator=gen), torch.randn((2, *shape), generator=gen)
