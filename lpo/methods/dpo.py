"""Diffusion-DPO (Wallace et al., SalesforceAIResearch/DiffusionDPO train.py) as an ``optimize`` method.

docs/method.md section 5 ("Diffusion-DPO") is the specification. Offline: no sampling, no reward model, no VAE in
the loop. Each optimiser step (``optimize.iterations`` of them) takes a batch of ``optimize.dpo.batch_size``
pairs from the latent shards' train split (lpo.data.loader.PairLoader, the same shards the LRM and SPM learn
from) and:
1. drops ties (labels (0.5, 0.5), counted), as the official code drops Pick-a-Pic's split decisions, and
   orders each pair winner / loser by its label;
2. draws both latents from their VAE posterior (mean + std * noise), and ONE noise and ONE timestep
   t ~ U{0 .. T-1} per pair, shared by winner and loser (``noise.chunk(2)[0].repeat(2)`` in the official code);
3. predicts the noise of both with the policy (LoRA on, gradient) and the reference (adapters disabled, no
   gradient; lpo.policy.Policy.reference), conditioned on the caption (the backbone's encode_prompts, cached
   per caption; no CFG: the conditional model is trained, as in the official code);
4. loss = lpo.losses.diffusion_dpo_loss on the per-sample MSEs (mean over latent elements), beta =
   ``optimize.dpo.beta``; AdamW (optimize.lr, weight_decay), gradient clip.
The target is the noise for epsilon-prediction models and the velocity for v-prediction ones.

Checkpoints (lpo.policy.save_checkpoint, every optimize.checkpoint_every steps and at the end) hold the
trainable weights, the optimiser, every process's generator and the step; the data position is a function of
the step (PairLoader.iterate's epoch and start_batch), so a resumed run continues exactly.
Under DDP every process runs the same number of steps; a batch whose pairs are all ties still runs the
forward pass (its loss times 0), so gradients are synchronised and no process waits.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from tqdm import tqdm

from lpo.backbones import Backbone, PromptEmbeds
from lpo.config import Config, ConfigError
from lpo.data.loader import PairLoader
from lpo.data.shards import ShardError, read_split_index
from lpo.losses import diffusion_dpo_loss, per_sample_mse
from lpo.methods import Method, MethodInputs
from lpo.policy import Policy, check_policy_config, save_checkpoint, start_training
from lpo.utils import write_json

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoints/state.pt"
TEXT_CACHE_SIZE = 4096  # prompt embeddings kept per caption (LRU)
STAT_KEYS = ("loss", "implicit_acc", "model_diff", "ref_diff", "inside", "model_mse", "ref_mse")


# --------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------


def check_inputs(cfg: Config, inputs: MethodInputs) -> None:
    """Diffusion-DPO's bad-input list, before any model is loaded: its fields and the latent shards' train split."""
    ocfg = cfg.optimize
    check_policy_config(ocfg)
    if not ocfg.dpo.beta > 0:
        raise ConfigError(f"optimize.dpo.beta: must be > 0, got {ocfg.dpo.beta}")
    if ocfg.dpo.batch_size < 1:
        raise ConfigError(f"optimize.dpo.batch_size: must be >= 1, got {ocfg.dpo.batch_size}")
    if ocfg.checkpoint_every < 1:
        raise ConfigError(f"optimize.checkpoint_every: must be >= 1, got {ocfg.checkpoint_every}")
    if ocfg.iterations < 0:
        raise ConfigError(f"optimize.iterations: must be >= 0, got {ocfg.iterations}")
    if not ocfg.lr > 0:
        raise ConfigError(f"optimize.lr: must be > 0, got {ocfg.lr}")
    if inputs.latents_dir is None:
        raise ConfigError("optimize: --latents is required for method dpo (the precompute_latents folder)")
    try:
        index = read_split_index(inputs.latents_dir, "train")
    except ShardError as err:
        raise ConfigError(str(err)) from None
    if index["n_samples"] < ocfg.dpo.batch_size:
        raise ConfigError(f"{inputs.latents_dir}: the train split has {index['n_samples']} pairs, fewer than "
                          f"optimize.dpo.batch_size {ocfg.dpo.batch_size}")


# --------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------


def winner_loser(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order each decided pair winner-first and drop ties (docs/method.md section 5; the official label_0 flip).

    x: (B, 2, ...) both images of each pair; labels: (B, 2). Returns x_w, x_l (n, ...) and the indices (n,)
    of the decided pairs in the batch.
    """
    rows = (labels[:, 0] != labels[:, 1]).nonzero().squeeze(1)  # (n,)
    w = (labels[rows, 1] > labels[rows, 0]).long()  # (n,): 1 where image 1 won
    return x[rows, w], x[rows, 1 - w], rows


def noise_target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The regression target of the U-Net: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ConfigError(f"Diffusion-DPO: scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction)")


def dpo_errors(
    unet: Any, x_t: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample MSE of `unet`'s prediction on the stacked [winners; losers] batch: (err_w (n,), err_l (n,))."""
    pred = unet(x_t, t, encoder_hidden_states=cond.hidden_states, added_cond_kwargs=cond.added_cond_kwargs(),
                return_dict=False)[0]
    err = per_sample_mse(pred.float(), target.float())  # (2n,)
    return err.chunk(2)


# --------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------


@dataclass
class DpoTotals:
    """Counters over the whole run (carried through checkpoints)."""

    pairs: int = 0
    ties_skipped: int = 0
    empty_batches: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


class CaptionCache:
    """encode_prompts per caption (LRU; each caption encoded alone so values never depend on the batch)."""

    def __init__(self, backbone: Backbone, device: torch.device) -> None:
        self.backbone, self.device = backbone, device
        self._cache: OrderedDict[str, PromptEmbeds] = OrderedDict()

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> PromptEmbeds:
        for caption in dict.fromkeys(captions):
            if caption in self._cache:
                self._cache.move_to_end(caption)
                continue
            self._cache[caption] = self.backbone.encode_prompts([caption]).to(self.device)
            if len(self._cache) > TEXT_CACHE_SIZE:
                self._cache.popitem(last=False)
        return PromptEmbeds.cat([self._cache[c] for c in captions])


def _batch_stream(loader: PairLoader, start_step: int) -> Iterator[dict[str, Any]]:
    epoch, batch = divmod(start_step, loader.batches_per_rank)
    while True:
        yield from loader.iterate(epoch, start_batch=batch)
        epoch, batch = epoch + 1, 0


def _gather_rng(accelerator: Any, generator: torch.Generator) -> list[torch.Tensor]:
    if accelerator.num_processes == 1:
        return [generator.get_state()]
    from accelerate.utils import gather_object

    return list(gather_object([generator.get_state()]))


def dpo_step(
    policy: Policy,
    train_unet: Any,
    batch: dict[str, Any],
    captions: CaptionCache,
    generator: torch.Generator,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float], int]:
    """Loss of one batch (docs/method.md section 5). Returns (loss, stats, decided pairs). All randomness from
    `generator` (CPU): posterior noise, diffusion noise and t, drawn for the whole batch so the stream does not
    depend on how many pairs are ties."""
    bb = policy.backbone
    device = bb.unet.device
    sched = bb.train_scheduler
    b = batch["mean"].shape[0]
    eps_post = torch.randn(batch["mean"].shape, generator=generator)  # (B, 2, C, h, w)
    noise_all = torch.randn((b, *batch["mean"].shape[2:]), generator=generator)  # (B, C, h, w)
    t_all = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator)  # (B,)
    x0_all = batch["mean"] + batch["std"] * eps_post  # (B, 2, C, h, w)
    labels = batch["labels"]
    n = int((labels[:, 0] != labels[:, 1]).sum())
    if n == 0:  # all ties: run the batch with arbitrary order and a zero loss (DDP still synchronises)
        labels = torch.tensor([[1.0, 0.0]] * b)
    x0_w, x0_l, rows = winner_loser(x0_all, labels)
    x0 = torch.cat([x0_w, x0_l]).to(device)  # (2n, C, h, w): winners, then losers
    noise = noise_all[rows].repeat(2, 1, 1, 1).to(device)  # (2n, C, h, w): shared by winner and loser
    t = t_all[rows].repeat(2).to(device)  # (2n,)
    x_t = sched.add_noise(x0, noise, t)
    target = noise_target(sched, x0, noise, t)
    caps = [batch["captions"][i] for i in rows.tolist()]
    cond = captions(caps)
    cond = PromptEmbeds.cat([cond, cond])  # (2n, ...)
    with policy.reference() as ref:
        ref_w, ref_l = dpo_errors(ref, x_t, t, cond, target)
    model_w, model_l = dpo_errors(train_unet, x_t, t, cond, target)
    loss, stats = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, beta)
    if n == 0:
        loss = loss * 0.0
    out = {k: float(v) for k, v in stats.items()}
    out.update({"loss": float(loss.detach()), "model_mse": float(torch.cat([model_w, model_l]).mean().detach()),
                "ref_mse": float(torch.cat([ref_w, ref_l]).mean())})
    return loss, out, n


def train(cfg: Config, policy: Policy, inputs: MethodInputs, workdir: Path, accelerator: Any) -> dict[str, Any]:
    """Diffusion-DPO for optimize.iterations steps, resuming from workdir/checkpoints/state.pt."""
    ocfg = cfg.optimize
    device = accelerator.device
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    seed = cfg.experiment.seed
    try:
        loader = PairLoader(inputs.latents_dir, "train", ocfg.dpo.batch_size, seed=seed, shuffle=True)
    except ShardError as err:
        raise ConfigError(str(err)) from None
    if loader.batches_per_rank == 0:
        raise ConfigError(f"{inputs.latents_dir}: the train split has {loader.index['n_samples']} pairs, fewer than "
                          f"optimize.dpo.batch_size {ocfg.dpo.batch_size} x {world} processes")
    bb = policy.backbone
    ckpt = workdir / CHECKPOINT_NAME
    begin = start_training(policy, ocfg, accelerator, ckpt, seed * 1_000 + rank + 7, DpoTotals, unit="step")
    train_unet, optimizer, generator = begin.train_unet, begin.optimizer, begin.generator
    totals, start = begin.totals, begin.start
    captions = CaptionCache(bb, device)
    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(workdir / "tb"), purge_step=start)
    log.info("dpo: %d steps of %d pairs x %d process(es), beta %g, %d train pairs (%d batches per epoch)",
             ocfg.iterations, ocfg.dpo.batch_size, world, ocfg.dpo.beta, loader.index["n_samples"],
             loader.batches_per_rank)
    policy.unet.eval()  # no dropout: policy and reference passes see the same network (as LPO's loop)
    batches = _batch_stream(loader, start)
    bar = tqdm(range(start, ocfg.iterations), desc="dpo", initial=start, total=ocfg.iterations, disable=not is_main,
               mininterval=5)
    for step in bar:
        began = time.perf_counter()
        batch = next(batches)
        with accelerator.autocast():
            loss, stats, n = dpo_step(policy, train_unet, batch, captions, generator, ocfg.dpo.beta)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(policy.trainable_parameters(), ocfg.grad_clip)
        optimizer.step()
        # bookkeeping: counts summed, stats averaged over processes
        b = len(batch["keys"])
        values = [float(n), float(b - n), float(n == 0)] + [stats[k] for k in STAT_KEYS]
        if world > 1:
            values = accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=device), "sum").tolist()
            values = values[:3] + [v / world for v in values[3:]]
        totals.pairs += int(values[0])
        totals.ties_skipped += int(values[1])
        totals.empty_batches += int(values[2])
        totals.seconds += time.perf_counter() - began
        row = {"step": step + 1, "pairs": int(values[0]), **dict(zip(STAT_KEYS, values[3:])),
               "grad_norm": float(grad_norm) if grad_norm is not None else None}
        totals.history.append(row)
        if writer is not None:
            for key, value in row.items():
                if key != "step" and value is not None:
                    writer.add_scalar(f"dpo/{key}", value, step + 1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['implicit_acc']:.2f}", refresh=False)
        if step == start or (step + 1) % 50 == 0:
            log.info("step %d: loss %.4f implicit_acc %.3f inside %.3f (model_diff %.2e, ref_diff %.2e)", step + 1,
                     row["loss"], row["implicit_acc"], row["inside"], row["model_diff"], row["ref_diff"])
        if (step + 1) % ocfg.checkpoint_every == 0 or step + 1 == ocfg.iterations:
            rngs = _gather_rng(accelerator, generator)
            if is_main:
                save_checkpoint(ckpt, policy, optimizer, step + 1, rngs, {"totals": asdict(totals)})
            accelerator.wait_for_everyone()
    batches.close()
    if writer is not None:
        writer.close()
    summary = dpo_summary(cfg, policy, totals, world, loader)
    if is_main:
        write_json(workdir / "summary.json", summary)
    return summary


def _window_mean(rows: list[dict], key: str, lo: int, hi: int) -> Optional[float]:
    values = [r[key] for r in rows[lo:hi] if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def dpo_summary(cfg: Config, policy: Policy, totals: DpoTotals, world: int, loader: PairLoader) -> dict[str, Any]:
    """workdir/summary.json: settings, pair counts, loss / implicit-accuracy trajectory, cost per update."""
    ocfg = cfg.optimize
    h = totals.history
    window = max(1, min(20, len(h) // 4)) if h else 1
    steps = max(len(h), 1)
    return {
        "method": "dpo",
        "iterations": len(h),
        "world_size": world,
        "beta": ocfg.dpo.beta,
        "batch_size": ocfg.dpo.batch_size,
        "global_batch": ocfg.dpo.batch_size * world,
        "policy": {"mode": policy.mode, **policy.parameter_counts()},
        "train_pairs": loader.index["n_samples"],
        "epochs": len(h) / loader.batches_per_rank if loader.batches_per_rank else None,
        "pairs_trained": totals.pairs,
        "ties_skipped": totals.ties_skipped,
        "empty_batches": totals.empty_batches,
        "loss_first": h[0]["loss"] if h else None,
        "loss_last": h[-1]["loss"] if h else None,
        "loss_reference": math.log(2),
        "start_window": {k: _window_mean(h, k, 0, window) for k in STAT_KEYS},
        "end_window": {k: _window_mean(h, k, len(h) - window, len(h)) for k in STAT_KEYS},
        "window": window,
        "cost": {
            "note": "wall seconds of the main process; per update: one policy forward + backward and one "
                    "reference forward over 2 x pairs latents (no sampling, no VAE, no reward model)",
            "updates": len(h),
            "unet_passes_per_update": 2,
            "seconds_per_update": totals.seconds / steps,
        },
        "seconds": totals.seconds,
        "history": h,
    }


METHOD = Method(check=check_inputs, train=train)
