"""The step-level engine: the loop every step-level method runs (docs/method.md section 3).

One iteration, per process:
1. draw ``optimize.prompts_per_iteration`` prompts and x_T; DDIM with ``optimize.ddim_steps`` steps, eta, CFG
   through the branching sampler (:func:`lpo.branching.branching_steps`): at every trained step the K children
   share one batched CFG U-Net pass and ALL B x K children are scored by the method's scorer in ONE call; the
   method's ``select`` decides what is kept for training (LPO and SPO: the best/worst pair when its gap clears
   th(t); GRPO: the whole group with its advantages); steps that are not trained (outside [t_min, t_max],
   marked untrainable by calibrate, or sigma = 0) draw one child and skip the scorer;
2. kept tuples of all processes are gathered, shuffled with a permutation every process draws from the same
   seed and split equally (remainder dropped; no training when there are fewer tuples than processes), so
   every process runs the same number of optimiser steps and DDP never waits on a process without tuples;
3. one pass over them in minibatches of ``optimize.train_batch_size``: the method's ``update`` (its loss, one
   AdamW step each).

A method is a :class:`StepMethod`: its name, scorer, selection, tuple fields, update and the names of its
stats. The engine owns sampling, sharing, checkpoints (resume after kill), TensorBoard, logs and
``workdir/summary.json`` (settings, kept tuples per timestep bucket, loss trajectory, per-step cost).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from diffusers import DDIMScheduler
from tqdm import tqdm

from lpo.backbones import PromptEmbeds, load_scheduler
from lpo.reward.lrm import check_lrm_dir
from lpo.config import Config, ConfigError, OptimizeConfig, check_minimums
from lpo.branching import BranchStep, branching_steps, now
from lpo.diffusion import StepSplit, cfg_noise_pred, ddim_sigmas, ddim_step_split, ddim_timesteps, step_log_prob
from lpo.losses import pair_gap
from lpo.methods import MethodInputs
from lpo.policy import WEIGHT_DTYPES, Policy, check_policy_config, save_checkpoint, start_training
from lpo.utils import read_json, write_json

log = logging.getLogger(__name__)

NUM_BUCKETS = 4  # kept-pair diagnostics per quarter of the timestep range (as the official code logs)
CHECKPOINT_NAME = "checkpoints/state.pt"
THRESHOLD_KEYS = ("timesteps", "thresholds", "trainable")


# --------------------------------------------------------------------------------------------------------
# Input checks and the threshold table
# --------------------------------------------------------------------------------------------------------


def check_step_config(cfg: OptimizeConfig) -> None:
    """Settings every step-level method needs; a clear ConfigError naming the key, before any compute."""
    if cfg.num_children < 2:
        raise ConfigError(f"optimize.num_children: K must be >= 2 (a best and a worst child), got {cfg.num_children}")
    if not 0.0 < cfg.eta <= 1.0:
        raise ConfigError(f"optimize.eta: must be in (0, 1] (eta = 0 gives identical children), got {cfg.eta}")
    check_minimums("optimize", cfg, {"iterations": 0, "prompts_per_iteration": 1, "train_batch_size": 1,
                                     "checkpoint_every": 1, "ddim_steps": 1})
    if not cfg.lr > 0:
        raise ConfigError(f"optimize.lr: must be > 0, got {cfg.lr}")
    if cfg.t_min > cfg.t_max:
        raise ConfigError(f"optimize.t_min {cfg.t_min} > optimize.t_max {cfg.t_max}: no timestep would be trained")
    check_policy_config(cfg)


@dataclass(frozen=True)
class ThresholdTable:
    """thresholds.json of the calibrate stage: th(t) per DDIM timestep and whether t may be trained.

    File format (agreed with lpo/stages/calibrate.py): {"timesteps": [int], "thresholds": [float | null],
    "trainable": [bool]}, equal lengths; null only where trainable is false; other keys are ignored.
    """

    timesteps: tuple[int, ...]
    thresholds: tuple[float, ...]  # inf where the file has null (never kept)
    trainable: tuple[bool, ...]
    source: str

    def lookup(self, t: int) -> tuple[float, bool]:
        i = self.timesteps.index(t)
        return self.thresholds[i], self.trainable[i]


def read_thresholds(path: Optional[Path], method: str = "lpo") -> ThresholdTable:
    """Read and validate thresholds.json; every problem is a ConfigError naming the file and the key."""
    if path is None:
        raise ConfigError(f"optimize: --thresholds is required for method {method} (calibrate's thresholds.json)")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: thresholds file not found (run the calibrate rule first)")
    try:
        data = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(THRESHOLD_KEYS)}")
    for key in THRESHOLD_KEYS:
        if not isinstance(data.get(key), list):
            raise ConfigError(f"{path}: {key}: missing or not a list (expected keys {', '.join(THRESHOLD_KEYS)})")
    ts, ths, train = data["timesteps"], data["thresholds"], data["trainable"]
    if not ts or not len(ts) == len(ths) == len(train):
        raise ConfigError(f"{path}: timesteps, thresholds and trainable must be non-empty lists of one length, "
                          f"got {len(ts)}, {len(ths)}, {len(train)}")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ts) or len(set(ts)) != len(ts):
        raise ConfigError(f"{path}: timesteps must be distinct integers, got {ts}")
    if not all(isinstance(b, bool) for b in train):
        raise ConfigError(f"{path}: trainable must be true/false per timestep, got {train}")
    values = []
    for t, th, ok in zip(ts, ths, train):
        if th is None:
            if ok:
                raise ConfigError(f"{path}: thresholds: null at t={t}, which is marked trainable")
            values.append(math.inf)
            continue
        if isinstance(th, bool) or not isinstance(th, (int, float)) or not 0.0 <= th < 1.0:
            raise ConfigError(f"{path}: thresholds: t={t}: expected a number in [0, 1) (a pair gap) or null, got {th!r}")
        values.append(float(th))
    return ThresholdTable(tuple(ts), tuple(values), tuple(train), str(path))


@dataclass(frozen=True)
class StepPlan:
    """Per DDIM step i (descending t): the timestep, where it lands, its threshold and whether it is trained."""

    timesteps: tuple[int, ...]
    prev: tuple[int, ...]  # -1 = final_alpha_cumprod (lpo.diffusion.ddim_timesteps)
    thresholds: tuple[float, ...]
    train: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.timesteps)


def step_plan(table: ThresholdTable, scheduler: DDIMScheduler, cfg: OptimizeConfig) -> StepPlan:
    """Match the threshold table to the sampling grid; a step is trained iff the table marks it trainable,
    t_min <= t <= t_max, and its sigma > 0 (a zero-noise step has no log-density)."""
    timesteps, prev = ddim_timesteps(scheduler, cfg.ddim_steps)
    _, sigmas = ddim_sigmas(scheduler, cfg.ddim_steps, cfg.eta)
    grid = [int(t) for t in timesteps]
    missing = [t for t in grid if t not in table.timesteps]
    if missing:
        raise ConfigError(
            f"{table.source}: no threshold for sampling timesteps {missing} of the {cfg.ddim_steps}-step grid "
            f"{grid} (optimize.ddim_steps); re-run calibrate with the same optimize section"
        )
    ths, train = [], []
    for t, sigma in zip(grid, sigmas.tolist()):
        th, ok = table.lookup(t)
        ths.append(th)
        train.append(bool(ok and cfg.t_min <= t <= cfg.t_max and sigma > 0))
    return StepPlan(tuple(grid), tuple(int(p) for p in prev), tuple(ths), tuple(train))


# --------------------------------------------------------------------------------------------------------
# Pure pieces of the branching sampler
# --------------------------------------------------------------------------------------------------------


def best_worst(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best and worst child per prompt and their pair gap, docs/method.md section 3 step 2d.

    scores: (B, K). Returns w_idx (B,), l_idx (B,), gap (B,) = tanh((S_w - S_l) / 2) in [0, 1).
    """
    w_idx = scores.argmax(dim=1)  # (B,)
    l_idx = scores.argmin(dim=1)  # (B,)
    rows = torch.arange(scores.shape[0], device=scores.device)
    return w_idx, l_idx, pair_gap(scores[rows, w_idx], scores[rows, l_idx])


def score_timestep(t: int, t_prev: int, which: str) -> int:
    """The timestep given to the reward model: the parent's t (official code) or the child's (paper notation).

    The child of the last step is x_0 (t_prev = -1), scored at t = 0.
    """
    if which == "parent":
        return t
    if which == "child":
        return max(t_prev, 0)
    raise ValueError(f"lrm_timestep (optimize.lpo, optimize.grpo) must be 'parent' or 'child', got {which!r}")


def timestep_bucket(t: int, num_train_timesteps: int, num_buckets: int = NUM_BUCKETS) -> str:
    """Label of t's quarter of [0, T), e.g. 't750-999' (high noise) ... 't0-249'."""
    width = num_train_timesteps // num_buckets
    b = min(t // width, num_buckets - 1)
    hi = num_train_timesteps - 1 if b == num_buckets - 1 else (b + 1) * width - 1
    return f"t{b * width}-{hi}"


def draw_prompts(num_prompts: int, k: int, generator: torch.Generator) -> list[int]:
    """k prompt indices: distinct when k <= num_prompts, else with replacement."""
    if k <= num_prompts:
        return torch.randperm(num_prompts, generator=generator)[:k].tolist()
    return torch.randint(num_prompts, (k,), generator=generator).tolist()


# --------------------------------------------------------------------------------------------------------
# Kept tuples
# --------------------------------------------------------------------------------------------------------


@dataclass
class Tuples:
    """Kept tuples as a dict of equally long tensors: x_t (N, C, h, w) float; t, t_prev (N,) int64; hidden
    (N, L, D) prompt states; SDXL adds text_embeds (N, P) and time_ids (N, 6); and the method's own fields
    (LPO and SPO: x_w, x_l (N, C, h, w); GRPO: the K children, their old log-probs and advantages)."""

    data: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return int(self.data["t"].shape[0])

    def index(self, idx: torch.Tensor) -> "Tuples":
        return Tuples({k: v[idx.to(v.device)] for k, v in self.data.items()})

    def slice(self, start: int, stop: int) -> "Tuples":
        return Tuples({k: v[start:stop] for k, v in self.data.items()})

    def to(self, device: torch.device) -> "Tuples":
        return Tuples({k: v.to(device) for k, v in self.data.items()})

    @staticmethod
    def cat(parts: Sequence["Tuples"], template: "Tuples") -> "Tuples":
        """Concatenate parts; `template` (possibly empty) fixes keys, trailing shapes and dtypes."""
        if not parts:
            return template
        return Tuples({k: torch.cat([p.data[k] for p in parts]) for k in template.data})

    @staticmethod
    def empty(latent_shape: Sequence[int], cond: PromptEmbeds, device: torch.device,
              fields: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> "Tuples":
        """No tuples, with the right trailing shapes (a process without tuples still joins the gather);
        fields: the method's own (``StepMethod.fields``)."""
        data = {"x_t": torch.zeros((0, *latent_shape), device=device)}
        data |= {k: torch.zeros((0, *shape), dtype=dtype, device=device) for k, (shape, dtype) in fields.items()}
        data |= {"t": torch.zeros(0, dtype=torch.int64, device=device),
                 "t_prev": torch.zeros(0, dtype=torch.int64, device=device),
                 "hidden": cond.hidden_states.new_zeros((0, *cond.hidden_states.shape[1:])).to(device)}
        if cond.text_embeds is not None:
            data["text_embeds"] = cond.text_embeds.new_zeros((0, *cond.text_embeds.shape[1:])).to(device)
            data["time_ids"] = cond.add_time_ids.new_zeros((0, *cond.add_time_ids.shape[1:])).to(device)
        return Tuples(data)

    def cond(self) -> PromptEmbeds:
        return PromptEmbeds(self.data["hidden"], self.data.get("text_embeds"), self.data.get("time_ids"))


def shared_indices(counts: Sequence[int], rank: int, world_size: int, generator: torch.Generator) -> torch.Tensor:
    """This process's share of all processes' tuples (docs/method.md section 3 step 3).

    Tuples are numbered by concatenating the processes' tuples in rank order. A permutation drawn from
    `generator` (seeded identically everywhere) is cut into world_size equal parts of total // world_size,
    the remainder dropped; fewer tuples than processes gives every process none.
    """
    total = int(sum(counts))
    per = total // world_size
    perm = torch.randperm(total, generator=generator)  # (total,)
    return perm[rank * per:(rank + 1) * per]


def share_seed(seed: int, iteration: int) -> int:
    """Seed of the shared permutation of `iteration`: the same on every process, different per iteration."""
    return (seed * 1_000_003 + iteration * 7_919 + 12_345) % (2**63)


def share_tuples(accelerator: Any, tuples: Tuples, seed: int, iteration: int) -> tuple[Tuples, int]:
    """Gather every process's tuples, shuffle them the same way everywhere, keep this process's equal share.

    Every process must call this every iteration (collectives), with or without tuples. Returns (share,
    total number of tuples over all processes).
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    generator = torch.Generator().manual_seed(share_seed(seed, iteration))
    if world == 1:
        return tuples.index(shared_indices([len(tuples)], 0, 1, generator)), len(tuples)
    device = tuples.data["t"].device
    counts = accelerator.gather(torch.tensor([len(tuples)], device=device)).tolist()  # (W,)
    most = max(counts)
    if most == 0:
        return tuples, 0

    def padded(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([v, v.new_zeros((most - v.shape[0], *v.shape[1:]))])  # (most, ...)

    gathered = {k: accelerator.gather(padded(v)) for k, v in tuples.data.items()}  # (W * most, ...)
    valid = torch.cat([torch.arange(r * most, r * most + n) for r, n in enumerate(counts)])  # (total,)
    everything = Tuples({k: v[valid.to(v.device)] for k, v in gathered.items()})
    return everything.index(shared_indices(counts, rank, world, generator)), int(sum(counts))


# --------------------------------------------------------------------------------------------------------
# The branching sampler
# --------------------------------------------------------------------------------------------------------


class Scorer(Protocol):
    """Scores the K children of every prompt in one batched call: (B*K, C, h, w), timestep -> (B*K,)."""

    def __call__(self, children: torch.Tensor, t: int) -> torch.Tensor: ...


class LrmScorer:
    """The frozen LRM on one iteration's prompts; text encodings computed once and repeated K times."""

    def __init__(self, lrm: Any, prompts: Sequence[str], num_children: int, null_enc: Any) -> None:
        with torch.no_grad():
            self.enc = lrm.encode_text(list(prompts)).repeat_interleave(num_children)  # B -> B*K rows
        self.lrm, self.null_enc = lrm, null_enc

    @torch.no_grad()
    def __call__(self, children: torch.Tensor, t: int) -> torch.Tensor:
        return self.lrm.score(children, t, self.enc, self.null_enc)  # (B*K,)


@dataclass
class StepRecord:
    """What one sampling step did (for diagnostics and the cost summary)."""

    t: int
    trained: bool
    kept: int
    prompts: int
    unet_s: float
    score_s: float
    gap_mean: float = float("nan")


@dataclass(frozen=True)
class Selection:
    """What a method keeps of one trained step: rows (n,) of the batch and its own fields, each (n, ...)."""

    rows: torch.Tensor
    fields: dict[str, torch.Tensor]
    gap_mean: float = float("nan")


class StepMethod:
    """A step-level method on this engine. Subclasses set the class attributes and implement the methods.

    name: the registry name (logs, TensorBoard, summary); stat_names: the keys of ``update``'s stats, averaged
    per iteration and logged in this order (the first two go to the progress bar); loss_reference: the loss
    before the first update, when it is known (the first update's loss is logged next to it); score_at:
    which timestep the scorer is given, the parent's t or the child's (``score_timestep``).
    """

    name: str = ""
    stat_names: tuple[str, ...] = ("loss",)
    loss_reference: Optional[float] = None
    score_at: str = "parent"

    def make_scorer(self, prompts: list[str]) -> Scorer:
        raise NotImplementedError

    def fields(self, latent_shape: Sequence[int], num_children: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Trailing shape and dtype of every field ``select`` returns (an empty batch of tuples is built from it)."""
        raise NotImplementedError

    def select(self, step: BranchStep, scores: torch.Tensor, threshold: float) -> Selection:
        """What to train on at a trained step; scores: (B, K) float, threshold: th(t) of the plan."""
        raise NotImplementedError

    def update(self, policy: Policy, train_unet: Any, batch: "Tuples", uncond: PromptEmbeds,
               optimizer: torch.optim.Optimizer, accelerator: Any, cfg: OptimizeConfig) -> dict[str, float]:
        """One optimiser step on a minibatch of tuples; returns floats for every name in ``stat_names``."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The method's own settings, for summary.json."""
        return {}


@torch.no_grad()
def branching_rollout(
    unet: Any,
    scheduler: DDIMScheduler,
    cond: PromptEmbeds,
    uncond: PromptEmbeds,
    x_T: torch.Tensor,
    plan: StepPlan,
    cfg_scale: float,
    eta: float,
    num_children: int,
    scorer: Scorer,
    generator: torch.Generator,
    method: StepMethod,
) -> tuple[Tuples, list[StepRecord]]:
    """One branching trajectory per prompt; returns the kept tuples and one record per step.

    docs/method.md section 3 step 2: per step one CFG U-Net pass on the whole batch, K children from the shared
    mean, one scorer call on all B*K children, the method's selection of what to keep, and the trunk goes on
    from a uniformly random child (lpo.branching). All randomness comes from `generator` (CPU), so a run is
    reproducible. Every tuple holds x_t, t, t_prev and the prompt's conditioning besides the method's fields.
    """
    device = x_T.device
    batch, latent_shape = x_T.shape[0], tuple(x_T.shape[1:])
    template = Tuples.empty(latent_shape, cond, device, method.fields(latent_shape, num_children))
    parts: list[Tuples] = []
    records: list[StepRecord] = []
    steps = branching_steps(unet, scheduler, cond, uncond, x_T, plan.timesteps, plan.prev, cfg_scale, eta,
                            num_children, generator, branch=plan.train)
    for step, th in zip(steps, plan.thresholds):
        t, t_prev = step.t, step.t_prev
        if not step.branched:
            records.append(StepRecord(t, False, 0, batch, step.unet_s, 0.0))
            continue
        scored_from = now(device)
        flat = step.children.flatten(0, 1)  # (B*K, C, h, w)
        scores = scorer(flat, score_timestep(t, t_prev, method.score_at)).float().view(batch, num_children)  # (B, K)
        chosen = method.select(step, scores, th)
        kept = chosen.rows
        if kept.numel():
            n = kept.numel()
            part = {
                "x_t": step.x[kept].float(),
                **chosen.fields,
                "t": torch.full((n,), t, dtype=torch.int64, device=device),
                "t_prev": torch.full((n,), t_prev, dtype=torch.int64, device=device),
                "hidden": cond.hidden_states[kept],
            }
            if cond.text_embeds is not None:
                part["text_embeds"] = cond.text_embeds[kept]
                part["time_ids"] = cond.add_time_ids[kept]
            parts.append(Tuples(part))
        records.append(StepRecord(t, True, int(kept.numel()), batch, step.unet_s, now(device) - scored_from,
                                  chosen.gap_mean))
    return Tuples.cat(parts, template), records


# --------------------------------------------------------------------------------------------------------
# The update
# --------------------------------------------------------------------------------------------------------


def policy_step(
    unet: Callable[..., Any],
    batch: Tuples,
    uncond: PromptEmbeds,
    scheduler: DDIMScheduler,
    cfg_scale: float,
    eta: float,
) -> StepSplit:
    """The step's Gaussian (mean, sigma) at each tuple's (x_t, t) under the CFG model `unet`.

    One CFG U-Net pass per tuple (all children of a tuple share x_t, hence the mean and sigma); per-sample t.
    """
    cond = batch.cond()
    d = batch.data
    out = cfg_noise_pred(unet, d["x_t"], d["t"], cond.hidden_states, uncond.hidden_states, cfg_scale,
                         cond.added_cond_kwargs(), uncond.added_cond_kwargs())
    return ddim_step_split(out, d["x_t"], d["t"], d["t_prev"], scheduler, eta)


def pair_log_probs(batch: Tuples, split: StepSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x_w | x_t) and log p(x_l | x_t) under the step Gaussian `split` of the tuples' (x_t, t)
    (``policy_step``), docs/method.md section 3 step 4. Returns two (N,) tensors (mean over latent elements,
    ``lpo.diffusion.step_log_prob``)."""
    d = batch.data
    return step_log_prob(d["x_w"], split.mean, split.sigma), step_log_prob(d["x_l"], split.mean, split.sigma)


def optimizer_step(loss: torch.Tensor, policy: Policy, optimizer: torch.optim.Optimizer, accelerator: Any,
                   cfg: OptimizeConfig) -> None:
    """Backward (through accelerate: DDP averages gradients), gradient clip, AdamW step."""
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    if cfg.grad_clip > 0:
        accelerator.clip_grad_norm_(policy.trainable_parameters(), cfg.grad_clip)
    optimizer.step()


class PairwiseStepMethod(StepMethod):
    """A step-level method that trains on the best/worst child of a step (LPO, SPO).

    select: the best and worst child by score, kept iff their pair gap tanh((S_w - S_l)/2) > th(t) (strict, as
    the official compare_funcs.py); update: reference log-probs (adapters off, no grad), policy log-probs
    (grad, through the DDP wrapper), the method's ``loss(logp_w, ref_w, logp_l, ref_l, beta, clip_eps)``.
    """

    stat_names = ("loss", "implicit_acc", "clipped_frac", "margin", "logratio_w", "logratio_l")
    loss_reference = math.log(2)  # -log sigmoid(0): policy == reference before the first step
    beta: float
    clip_eps: float

    @staticmethod
    def loss(logp_w: torch.Tensor, ref_w: torch.Tensor, logp_l: torch.Tensor, ref_l: torch.Tensor, beta: float,
             clip_eps: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def fields(self, latent_shape: Sequence[int], num_children: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        shape = tuple(latent_shape)
        return {"x_w": (shape, torch.float32), "x_l": (shape, torch.float32)}

    def select(self, step: BranchStep, scores: torch.Tensor, threshold: float) -> Selection:
        w_idx, l_idx, gap = best_worst(scores)
        kept = (gap > threshold).nonzero().squeeze(1)  # (n,)
        children = step.children
        return Selection(kept, {"x_w": children[kept, w_idx[kept]].float(), "x_l": children[kept, l_idx[kept]].float()},
                         float(gap.mean()))

    def update(self, policy: Policy, train_unet: Any, batch: Tuples, uncond: PromptEmbeds,
               optimizer: torch.optim.Optimizer, accelerator: Any, cfg: OptimizeConfig) -> dict[str, float]:
        scheduler = policy.backbone.scheduler
        with policy.reference() as ref:
            ref_w, ref_l = pair_log_probs(batch, policy_step(ref, batch, uncond, scheduler, cfg.cfg, cfg.eta))
        logp_w, logp_l = pair_log_probs(batch, policy_step(train_unet, batch, uncond, scheduler, cfg.cfg, cfg.eta))
        loss, stats = self.loss(logp_w, ref_w, logp_l, ref_l, self.beta, self.clip_eps)
        optimizer_step(loss, policy, optimizer, accelerator, cfg)
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in stats.items()}}

    def settings(self) -> dict[str, Any]:
        return {"beta": self.beta, "clip_eps": self.clip_eps, "lrm_timestep": self.score_at}


# --------------------------------------------------------------------------------------------------------
# The loop (shared by step-level methods)
# --------------------------------------------------------------------------------------------------------


@dataclass
class Totals:
    """Counters over the whole run (all processes), carried through checkpoints."""

    kept: dict[str, int] = field(default_factory=dict)  # bucket -> kept tuples
    steps: dict[str, int] = field(default_factory=dict)  # bucket -> prompt-steps sampled
    trained_steps: dict[str, int] = field(default_factory=dict)  # bucket -> prompt-steps scored
    tuples_trained: int = 0
    updates: int = 0
    first_update_loss: Optional[float] = None  # log 2 exactly: policy == reference before the first step
    sampling_steps: int = 0
    scored_steps: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"unet": 0.0, "score": 0.0, "sampling": 0.0,
                                                               "share": 0.0, "update": 0.0, "iteration": 0.0})
    history: list[dict] = field(default_factory=list)


def _bucket_counts(records: list[StepRecord], num_train_timesteps: int) -> dict[str, list[int]]:
    """bucket -> [kept, prompt-steps, scored prompt-steps] of one rollout."""
    out: dict[str, list[int]] = {}
    for r in records:
        c = out.setdefault(timestep_bucket(r.t, num_train_timesteps), [0, 0, 0])
        c[0] += r.kept
        c[1] += r.prompts
        c[2] += r.prompts if r.trained else 0
    return out


def _reduce_sum(accelerator: Any, values: list[float]) -> list[float]:
    """Sum a list of numbers over processes (identity on one process)."""
    if accelerator.num_processes == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()


def rank_seed(seed: int, rank: int) -> int:
    """Seed of a process's generator (prompts, x_T, children, random continuation): distinct per rank."""
    return seed * 1_000 + rank


def step_level_loop(
    cfg: Config,
    policy: Policy,
    prompts: Sequence[str],
    workdir: Path,
    accelerator: Any,
    plan: StepPlan,
    method: StepMethod,
) -> dict[str, Any]:
    """Rollout -> share -> update, ``optimize.iterations`` times, resuming from workdir/checkpoints/state.pt.

    Returns the summary (also written to workdir/summary.json by the main process).
    """
    ocfg = cfg.optimize
    device = accelerator.device
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    bb = policy.backbone
    ckpt = workdir / CHECKPOINT_NAME
    begin = start_training(policy, ocfg, accelerator, ckpt, rank_seed(cfg.experiment.seed, rank), Totals)
    train_unet, optimizer, generator = begin.train_unet, begin.optimizer, begin.generator
    totals, start = begin.totals, begin.start
    uncond = bb.null_embeds(1).to(device)
    num_train = int(bb.scheduler.config.num_train_timesteps)
    latent_shape = (bb.latent_channels, bb.latent_size, bb.latent_size)
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(workdir / "tb"))
    policy.unet.eval()  # no dropout anywhere: sampling, reference and policy passes see the same network
    bar = tqdm(range(start, ocfg.iterations), desc=method.name, initial=start, total=ocfg.iterations,
               disable=not is_main)
    for it in bar:
        it_start = now(device)
        batch_prompts = [prompts[i] for i in draw_prompts(len(prompts), ocfg.prompts_per_iteration, generator)]
        cond = bb.encode_prompts(batch_prompts).to(device)
        scorer = method.make_scorer(batch_prompts)
        x_T = torch.randn((len(batch_prompts), *latent_shape), generator=generator).to(device)
        with accelerator.autocast():
            tuples, records = branching_rollout(policy.unet, bb.scheduler, cond, uncond, x_T, plan, ocfg.cfg,
                                                ocfg.eta, ocfg.num_children, scorer, generator, method)
        sampled = now(device)
        mine, total = share_tuples(accelerator, tuples, cfg.experiment.seed, it)
        shared = now(device)
        stats: list[dict[str, float]] = []
        with accelerator.autocast():
            for lo in range(0, len(mine), ocfg.train_batch_size):
                stats.append(method.update(policy, train_unet, mine.slice(lo, lo + ocfg.train_batch_size), uncond,
                                           optimizer, accelerator, ocfg))
        updated = now(device)

        # Bookkeeping: counts summed over processes; losses averaged (every process ran the same steps).
        buckets = _bucket_counts(records, num_train)
        names = sorted(buckets, key=lambda b: -int(b[1:].split("-")[0]))  # high noise first
        flat = [v for b in names for v in buckets[b]]
        keys = list(method.stat_names)
        means = [sum(s[k] for s in stats) / len(stats) if stats else 0.0 for k in keys]
        summed = _reduce_sum(accelerator, flat + [len(mine)] + means)
        counts, trained_here = summed[: len(flat)], int(summed[len(flat)])
        means = [m / world for m in summed[len(flat) + 1:]]
        row: dict[str, Any] = {"iteration": it + 1, "tuples_kept": total, "tuples_trained": trained_here,
                               "updates": len(stats)}
        for j, b in enumerate(names):
            kept, steps, scored = (int(v) for v in counts[3 * j: 3 * j + 3])
            totals.kept[b] = totals.kept.get(b, 0) + kept
            totals.steps[b] = totals.steps.get(b, 0) + steps
            totals.trained_steps[b] = totals.trained_steps.get(b, 0) + scored
            row[f"kept/{b}"] = kept
            row[f"kept_share/{b}"] = kept / steps if steps else 0.0
        if stats:
            row.update({k: m for k, m in zip(keys, means)})
        if totals.first_update_loss is None and stats:
            totals.first_update_loss = stats[0]["loss"]
        totals.tuples_trained += trained_here
        totals.updates += len(stats)
        totals.sampling_steps += len(records)
        totals.scored_steps += sum(r.trained for r in records)
        sec = totals.seconds
        sec["unet"] += sum(r.unet_s for r in records)
        sec["score"] += sum(r.score_s for r in records)
        sec["sampling"] += sampled - it_start
        sec["share"] += shared - sampled
        sec["update"] += updated - shared
        sec["iteration"] += updated - it_start
        totals.history.append(row)
        _log_iteration(writer, bar, row, it, start, names, method.name, keys)

        if (it + 1) % ocfg.checkpoint_every == 0 or it + 1 == ocfg.iterations:
            rngs = _gather_rng(accelerator, generator)
            if is_main:
                save_checkpoint(ckpt, policy, optimizer, it + 1, rngs, {"totals": dataclasses.asdict(totals)})
            accelerator.wait_for_everyone()
    if writer is not None:
        writer.close()
    summary = _summary(cfg, policy, plan, totals, world, method, num_train)
    if is_main:
        write_json(workdir / "summary.json", summary)
    return summary


def _gather_rng(accelerator: Any, generator: torch.Generator) -> list[torch.Tensor]:
    """Every process's generator state, in rank order (a list of one on a single process)."""
    if accelerator.num_processes == 1:
        return [generator.get_state()]
    from accelerate.utils import gather_object

    return list(gather_object([generator.get_state()]))


def _log_iteration(writer: Any, bar: Any, row: dict[str, Any], it: int, start: int, buckets: list[str],
                   method: str, stat_names: Sequence[str]) -> None:
    """TensorBoard scalars, the progress-bar postfix, and log lines (first iteration: kept share per bucket)."""
    step = row["iteration"]
    if writer is not None:
        for key, value in row.items():
            if key != "iteration":
                writer.add_scalar(f"{method}/{key}" if "/" not in key else key, value, step)
    shown = [k for k in stat_names if k in row][:2]
    if shown:
        bar.set_postfix({k: f"{row[k]:.3f}" for k in shown} | {"kept": row["tuples_kept"]})
    shares = ", ".join(f"{b} {row[f'kept/{b}']} ({row[f'kept_share/{b}']:.0%})" for b in buckets)
    if it == start:
        log.info("%s iteration %d: kept pairs per timestep bucket: %s (aim for ~10-25%% of steps, "
                 "docs/prototype.md trap 1)", method, step, shares)
    elif step % 10 == 0:
        log.info("%s iteration %d: kept %s", method, step, shares)
    if shown and (it == start or step % 10 == 0):
        stats = " ".join(f"{k} {row[k]:.4g}" for k in stat_names if k in row)
        log.info("%s iteration %d: %s tuples %d", method, step, stats, row["tuples_trained"])


def _summary(cfg: Config, policy: Policy, plan: StepPlan, totals: Totals, world: int, method: StepMethod,
             num_train: int) -> dict[str, Any]:
    """workdir/summary.json: run settings, kept pairs per bucket, loss trajectory and the per-step cost."""
    ocfg = cfg.optimize
    sec = totals.seconds
    iterations = max(len(totals.history), 1)
    scored = max(totals.scored_steps, 1)
    # seconds are this (main) process's; counts are over all processes
    per_process_updates = max(totals.updates, 1)
    losses = [h["loss"] for h in totals.history if "loss" in h]
    return {
        "method": method.name,
        "iterations": len(totals.history),
        "world_size": world,
        "prompts_per_iteration": ocfg.prompts_per_iteration,
        "num_children": ocfg.num_children,
        "ddim_steps": ocfg.ddim_steps,
        "cfg": ocfg.cfg,
        "eta": ocfg.eta,
        **method.settings(),
        "policy": {"mode": policy.mode, **policy.parameter_counts()},
        "plan": {"timesteps": list(plan.timesteps),
                 "thresholds": [None if math.isinf(v) else v for v in plan.thresholds],
                 "trained": list(plan.train)},
        "kept_by_bucket": {b: {"kept": totals.kept[b], "prompt_steps": totals.steps[b],
                               "scored_prompt_steps": totals.trained_steps.get(b, 0),
                               "share": totals.kept[b] / totals.steps[b] if totals.steps[b] else 0.0}
                           for b in sorted(totals.kept, key=lambda b: -int(b[1:].split("-")[0]))},
        "tuples_kept": sum(totals.kept.values()),
        "tuples_trained": totals.tuples_trained,
        "loss_first_update": totals.first_update_loss,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_reference": method.loss_reference,
        "cost": {
            "note": "wall seconds of the main process; one U-Net pass = one batched CFG forward "
                    "([uncond; cond], 2 x prompts rows); one LRM pass = one batched forward over prompts x K "
                    "children (doubled inside the LRM for VFE)",
            "sampling_steps": totals.sampling_steps,
            "unet_passes_per_sampling_step": 1,
            "lrm_passes_per_sampling_step": totals.scored_steps / max(totals.sampling_steps, 1),
            "seconds_per_sampling_step": sec["sampling"] / max(totals.sampling_steps, 1),
            "seconds_unet_per_sampling_step": sec["unet"] / max(totals.sampling_steps, 1),
            "seconds_lrm_per_scored_step": sec["score"] / scored,
            "updates": totals.updates,
            "unet_passes_per_update": 2,
            "tuples_per_update": totals.tuples_trained / world / per_process_updates,
            "seconds_per_update": sec["update"] / per_process_updates,
            "seconds_share_per_iteration": sec["share"] / iterations,
            "seconds_per_iteration": sec["iteration"] / iterations,
        },
        "seconds": dict(sec),
        "history": totals.history,
        "timestep_buckets": NUM_BUCKETS,
        "num_train_timesteps": num_train,
    }


# --------------------------------------------------------------------------------------------------------
# Methods scored by the LRM (LPO, GRPO): input checks and loading
# --------------------------------------------------------------------------------------------------------


def check_lrm_inputs(cfg: Config, inputs: MethodInputs, method: str) -> StepPlan:
    """Bad input of a method scored by the LRM, before any model is loaded: the step settings, a missing LRM
    folder or thresholds file, a thresholds grid that does not match the sampler, nothing trainable."""
    check_step_config(cfg.optimize)
    if inputs.lrm_dir is None:
        raise ConfigError(f"optimize: --lrm is required for method {method} (the train_lrm output folder)")
    check_lrm_dir(inputs.lrm_dir)
    table = read_thresholds(inputs.thresholds, method)
    plan = step_plan(table, load_scheduler(inputs.base_dir), cfg.optimize)
    if not any(plan.train):
        raise ConfigError(
            f"{table.source}: no sampling step is trainable (trainable flags {list(table.trainable)}, "
            f"optimize.t_min={cfg.optimize.t_min}, t_max={cfg.optimize.t_max}): {method} would train nothing. "
            "If calibrate found the LRM at chance everywhere (see its untrainable_reason and eval_lrm's accuracy), "
            "train the LRM longer or lower calibrate.chance_margin"
        )
    return plan


def load_lrm(lrm_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32,
             latent_channels: Optional[int] = None) -> Any:
    """The frozen LRM (eval, no grad) on `device`; a folder that does not load, or an LRM for latents of
    another channel count, is a ConfigError naming it."""
    from lpo.reward.lrm import LatentRewardModel

    try:
        lrm = LatentRewardModel.from_pretrained(lrm_dir)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{lrm_dir}: cannot load the LRM ({type(err).__name__}: {err})") from None
    if latent_channels is not None and lrm.unet.config.in_channels != latent_channels:
        raise ConfigError(f"{lrm_dir}: LRM takes {lrm.unet.config.in_channels}-channel latents, the base "
                          f"model makes {latent_channels}")
    lrm.requires_grad_(False)
    if next(lrm.parameters()).dtype != dtype:
        lrm.to(dtype=dtype)
    return lrm.to(device=device).eval()


def lrm_null_encoding(lrm: Any) -> Any:
    """The null prompt's encoding that VFE needs (None when VFE is off)."""
    with torch.no_grad():
        return lrm.encode_text([""]) if lrm.vfe_scale != 1.0 else None


def train_lrm_method(cfg: Config, policy: Policy, inputs: MethodInputs, workdir: Path, accelerator: Any, name: str,
                     make_method: Callable[[Any], StepMethod], describe: Callable[[StepPlan], str]) -> dict[str, Any]:
    """The training of a method scored by the LRM: the plan from calibrate's thresholds.json, the frozen LRM,
    the engine's loop with ``make_method(lrm)``; `describe(plan)` is logged first. Returns the summary."""
    ocfg = cfg.optimize
    plan = step_plan(read_thresholds(inputs.thresholds, name), policy.backbone.scheduler, ocfg)
    lrm = load_lrm(Path(inputs.lrm_dir), accelerator.device, WEIGHT_DTYPES[ocfg.mixed_precision],
                   policy.backbone.latent_channels)
    log.info("%s", describe(plan))
    summary = step_level_loop(cfg, policy, inputs.prompts, workdir, accelerator, plan, make_method(lrm))
    summary["lrm"] = str(inputs.lrm_dir)
    summary["thresholds_file"] = str(inputs.thresholds)
    if accelerator.is_main_process:
        write_json(workdir / "summary.json", summary)
    return summary
