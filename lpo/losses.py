"""Losses: the LRM's Bradley-Terry loss, the step-level DPO loss (LPO, SPO), step-level GRPO and Diffusion-DPO.

Pure functions on per-sample tensors; each docstring names its docs/method.md section. The stats dicts hold
detached 0-d tensors (no host sync), ready for ``accelerator.reduce`` or ``.item()`` by the caller.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "bradley_terry_loss",
    "per_prompt_weights",
    "pair_gap",
    "step_dpo_loss",
    "group_advantages",
    "gaussian_step_kl",
    "grpo_loss",
    "per_sample_mse",
    "diffusion_dpo_loss",
]


def _check_same_1d(name_shapes: Mapping[str, torch.Tensor]) -> int:
    """All tensors 1-D with the same length; returns the length."""
    shapes = {name: tuple(x.shape) for name, x in name_shapes.items()}
    lengths = {s for s in shapes.values()}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise ValueError(f"expected 1-D tensors of one length (B,), got {shapes}")
    return next(iter(lengths))[0]


# --------------------------------------------------------------------------------------------------------
# LRM training (docs/method.md §2)
# --------------------------------------------------------------------------------------------------------


def bradley_terry_loss(
    score_0: torch.Tensor,
    score_1: torch.Tensor,
    label_0: torch.Tensor,
    label_1: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Bradley-Terry / PickScore pair loss of the LRM, docs/method.md §2 ("Loss").

    L_i = -sum_k y_k log softmax([s0, s1])_k + sum_k y_k log y_k,   L = sum_i w_i L_i / sum_i w_i
    The second term is the official code's "+ log 0.5 if tie" (step_clip_criterion.py): zero for strict
    labels (1, 0) / (0, 1), log 0.5 for a tie (0.5, 0.5), so L_i = KL(y || p) >= 0 with the cross-entropy's
    gradient. Strict pairs give -log sigmoid(s_w - s_l). Without weights L is the plain mean.

    Args:
        score_0, score_1: (B,) scores S(p, x^0), S(p, x^1).
        label_0, label_1: (B,) soft labels, >= 0 with label_0 + label_1 = 1 (ties = 0.5, 0.5).
        weights: optional (B,) non-negative per-sample weights (e.g. ``per_prompt_weights``), normalised here.
    """
    _check_same_1d({"score_0": score_0, "score_1": score_1, "label_0": label_0, "label_1": label_1})
    labels = torch.stack([label_0, label_1], dim=-1).to(score_0.dtype)  # (B, 2)
    if bool((labels < 0).any()) or not torch.allclose(labels.sum(-1), torch.ones_like(labels[:, 0]), atol=1e-4):
        raise ValueError(f"labels must be >= 0 and sum to 1 per pair, got {labels.tolist()}")
    log_p = torch.log_softmax(torch.stack([score_0, score_1], dim=-1), dim=-1)  # (B, 2)
    entropy_term = torch.special.xlogy(labels, labels).sum(-1)  # (B,) sum y log y (0 log 0 = 0)
    per_pair = -(labels * log_p).sum(-1) + entropy_term  # (B,)
    if weights is None:
        return per_pair.mean()
    if weights.shape != per_pair.shape:
        raise ValueError(f"weights must have shape {tuple(per_pair.shape)}, got {tuple(weights.shape)}")
    if bool((weights < 0).any()) or not bool(weights.sum() > 0):
        raise ValueError("weights must be non-negative with a positive sum")
    weights = weights.to(per_pair.dtype)
    return (weights * per_pair).sum() / weights.sum()


def per_prompt_weights(prompt_keys: Sequence[str], counts: Optional[Mapping[str, int]] = None) -> torch.Tensor:
    """PickScore-style per-prompt reweighting, docs/method.md §2: w_i = (1/n_i) / sum_j (1/n_j).

    n_i = number of pairs with the prompt of pair i: counted within ``prompt_keys`` (e.g. a gathered batch),
    or looked up in ``counts`` (dataset-wide counts, as the official ``num_examples_per_prompt`` column).
    Each prompt then carries the same total weight in the batch when counted within it.

    Returns:
        (len(prompt_keys),) float32, summing to 1.
    """
    if len(prompt_keys) == 0:
        raise ValueError("prompt_keys is empty")
    if counts is None:
        counts = Counter(prompt_keys)
    missing = sorted({k for k in prompt_keys if k not in counts})
    if missing:
        raise ValueError(f"prompt keys missing from counts: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    n = torch.tensor([counts[k] for k in prompt_keys], dtype=torch.float32)  # (B,)
    if bool((n < 1).any()):
        raise ValueError("prompt counts must be >= 1")
    inv = 1.0 / n
    return inv / inv.sum()


# --------------------------------------------------------------------------------------------------------
# LPO (docs/method.md §3)
# --------------------------------------------------------------------------------------------------------


def pair_gap(s_w: torch.Tensor, s_l: torch.Tensor) -> torch.Tensor:
    """p_w - p_l of softmax([s_w, s_l]) = tanh((s_w - s_l) / 2), docs/method.md §3 step 2d.

    The official validity test (compare_funcs.py) is pair_gap > th(t), with p the softmax over the best
    and worst child only (not over all K: docs/prototype.md, trap 1).
    """
    return torch.tanh((s_w - s_l) / 2)


def step_dpo_loss(
    logp_w: torch.Tensor,
    logp_ref_w: torch.Tensor,
    logp_l: torch.Tensor,
    logp_ref_l: torch.Tensor,
    beta: float,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step-level DPO loss with clipped ratios (SPO's "Eqn. 6", which LPO adopts), docs/method.md §3 step 4.

    log r = clamp(log p_theta - log p_ref, log(1 - eps), log(1 + eps))   (= log of the clipped ratio)
    L = mean_i -log sigmoid(beta (log r_w - log r_l))
    The clamp in log space equals the official clamp of exp(log-ratio); its gradient is zero once a ratio
    leaves [1 - eps, 1 + eps] (torch.clamp passes gradient only inside the closed range).

    Args:
        logp_*: (B,) mean-over-elements step log-densities (``lpo.diffusion.step_log_prob``) of the winner /
            loser child under the policy and the frozen reference.
        beta: > 0 (paper 500). clip_eps: in (0, 1) (paper 0.1).

    Returns:
        loss (0-d) and stats (detached 0-d tensors):
        implicit_acc: share with log-ratio_w > log-ratio_l (unclipped; the official code compares the
            clipped ratios, which report a tie once both saturate),
        clipped_frac: share of the 2B ratios outside the clip range,
        logratio_w / logratio_l: mean unclipped log p_theta - log p_ref,
        margin: mean beta (log r_w - log r_l) (clipped, the loss's argument).
    """
    _check_same_1d({"logp_w": logp_w, "logp_ref_w": logp_ref_w, "logp_l": logp_l, "logp_ref_l": logp_ref_l})
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    lo, hi = math.log(1 - clip_eps), math.log(1 + clip_eps)
    logratio_w = logp_w - logp_ref_w  # (B,)
    logratio_l = logp_l - logp_ref_l  # (B,)
    log_r_w = logratio_w.clamp(lo, hi)
    log_r_l = logratio_l.clamp(lo, hi)
    logits = beta * (log_r_w - log_r_l)  # (B,)
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        both = torch.cat([logratio_w, logratio_l])  # (2B,)
        stats = {
            "implicit_acc": (logratio_w > logratio_l).float().mean(),
            "clipped_frac": ((both < lo) | (both > hi)).float().mean(),
            "logratio_w": logratio_w.mean(),
            "logratio_l": logratio_l.mean(),
            "margin": logits.mean(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


# --------------------------------------------------------------------------------------------------------
# Step-level GRPO (docs/method.md section 9)
# --------------------------------------------------------------------------------------------------------


def group_advantages(scores: torch.Tensor) -> torch.Tensor:
    """Group-normalised advantages of the K children of each step, docs/method.md section 9:
    A_k = (S_k - mean_k S) / std_k S (population std over the group).

    scores: (N, K) with a positive spread in every row (groups without one carry no signal and are not kept).
    Returns (N, K): every row has mean 0 and std 1.
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be (N, K) with K >= 2, got {tuple(scores.shape)}")
    scores = scores.double()  # siblings' scores can differ in the 5th digit: float32 would leave a bias
    std = scores.std(dim=1, unbiased=False, keepdim=True)  # (N, 1)
    if bool((std <= 0).any()):
        raise ValueError("group_advantages: a group has no spread (all K scores equal); leave it out")
    return ((scores - scores.mean(dim=1, keepdim=True)) / std).float()


def gaussian_step_kl(mean: torch.Tensor, mean_ref: torch.Tensor, sigma: torch.Tensor, reduce: str) -> torch.Tensor:
    """KL(N(mean, sigma^2 I) || N(mean_ref, sigma^2 I)) of one sampling step, docs/method.md section 9:
    (mean - mean_ref)^2 / (2 sigma^2), summed or averaged over the latent elements (`reduce`: "sum" | "mean",
    the reduction of the step log-density it goes with). mean, mean_ref: (N, ...); sigma: (N,). Returns (N,).
    """
    dtype = torch.promote_types(mean.dtype, torch.float32)
    sq = (mean.to(dtype) - mean_ref.to(dtype)).pow(2).flatten(1)  # (N, D)
    per = sq.sum(dim=1) if reduce == "sum" else sq.mean(dim=1)
    return per / (2 * sigma.to(dtype) ** 2)


def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    kl: torch.Tensor,
    clip_eps: float,
    kl_beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-ratio policy-gradient loss of step-level GRPO with a KL penalty, docs/method.md section 9.

    r = exp(log p_theta - log p_old);  L_pg = mean max(-A r, -A clip(r, 1 - eps, 1 + eps))  (PPO's pessimistic
    bound, over every child of every group);  L = L_pg + kl_beta mean(KL).

    Args:
        logp: (N, K) step log-densities of the K children under the policy (gradient).
        logp_old: (N, K) the same under the policy that sampled them (no gradient).
        advantages: (N, K) group-normalised advantages (``group_advantages``).
        kl: (N,) per-group KL of the policy's step to the reference's (``gaussian_step_kl``).
        clip_eps: in (0, 1). kl_beta: >= 0.

    Returns:
        loss (0-d) and stats (detached 0-d tensors): policy_loss, kl, clipped_frac (share of ratios outside
        the clip range), ratio_dev (mean |r - 1|).
    """
    if logp.shape != logp_old.shape or logp.shape != advantages.shape or logp.ndim != 2:
        raise ValueError(f"logp {tuple(logp.shape)}, logp_old {tuple(logp_old.shape)} and advantages "
                         f"{tuple(advantages.shape)} must be one (N, K) shape")
    if kl.shape != (logp.shape[0],):
        raise ValueError(f"kl must have shape ({logp.shape[0]},), got {tuple(kl.shape)}")
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    if not kl_beta >= 0:
        raise ValueError(f"kl_beta must be >= 0, got {kl_beta}")
    ratio = torch.exp(logp - logp_old.detach())  # (N, K)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    loss = policy_loss + kl_beta * kl.mean()
    with torch.no_grad():
        stats = {
            "policy_loss": policy_loss,
            "kl": kl.mean(),
            "clipped_frac": ((ratio < 1 - clip_eps) | (ratio > 1 + clip_eps)).float().mean(),
            "ratio_dev": (ratio - 1).abs().mean(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


# --------------------------------------------------------------------------------------------------------
# Diffusion-DPO baseline (docs/method.md §5)
# --------------------------------------------------------------------------------------------------------


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||target - pred||^2 averaged over all but the batch dimension: (B, ...) -> (B,) (docs/method.md §5)."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return (pred - target).pow(2).flatten(1).mean(dim=1)


def diffusion_dpo_loss(
    model_err_w: torch.Tensor,
    model_err_l: torch.Tensor,
    ref_err_w: torch.Tensor,
    ref_err_l: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO loss, docs/method.md §5 (SalesforceAIResearch/DiffusionDPO:train.py).

    inside = -beta/2 ((err_w - err_l) - (ref_w - ref_l)),   L = mean_i -log sigmoid(inside)
    with err = per-sample MSE of the epsilon prediction (``per_sample_mse``), the same noise and t for
    winner and loser. At policy == reference L = log 2.

    Returns:
        loss (0-d) and stats (detached 0-d tensors): implicit_acc (share with inside > 0, as the official
        code), model_diff / ref_diff (mean err_w - err_l), inside (mean).
    """
    _check_same_1d(
        {"model_err_w": model_err_w, "model_err_l": model_err_l, "ref_err_w": ref_err_w, "ref_err_l": ref_err_l}
    )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    model_diff = model_err_w - model_err_l  # (B,)
    ref_diff = ref_err_w - ref_err_l  # (B,)
    inside = -0.5 * beta * (model_diff - ref_diff)  # (B,)
    loss = -F.logsigmoid(inside).mean()
    stats = {
        "implicit_acc": (inside > 0).float().mean(),
        "model_diff": model_diff.mean(),
        "ref_diff": ref_diff.mean(),
        "inside": inside.mean(),
    }
    return loss, {k: v.detach() for k, v in stats.items()}
