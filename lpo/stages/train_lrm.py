"""Stage `train_lrm`: train the Latent Reward Model on latent preference pairs (METHOD.md sections 1, 2).

The LRM starts from the base model (``load_pipeline_folder(base)`` -> ``LatentRewardModel.from_backbone``) and
is trained with the Bradley-Terry loss (ties as (0.5, 0.5), per-prompt reweighting over the global batch).
Each step draws both latents of a pair from their stored VAE posterior (mean + std * noise) and noises them
to the SAME timestep with INDEPENDENT noise (METHOD.md section 2, "Noising"; the pair protocol lives in
lpo.stages.eval_lrm, which validation shares); timesteps come from the
backbone's DDIM grid (official code) or uniformly from [0, T), with the upper half up-weighted by
``train_lrm.high_t_weight`` (LPO-PROTOTYPE.md, trap 4: the prototype's LRM was blind at high t).

Outputs in the work folder (--out):
- ``model/``: the best LatentRewardModel by validation accuracy (``LatentRewardModel.from_pretrained``),
  plus ``scheduler/`` (the backbone's DDIM scheduler, which eval_lrm needs) and ``train_lrm.json``;
  written once, at the end, so it never holds a half-trained model;
- ``checkpoints/step-NNNNNNN/`` + ``checkpoints/latest.json``: resumable state (trainable weights, optimiser,
  LR schedule, per-process RNG states, data position, best-so-far); ``checkpoints/best/``: the best LRM so far;
- ``tb/`` (TensorBoard scalars), ``train_log.jsonl`` (one record per step and per validation), ``summary.json``.

Determinism: all noise and timesteps of step s come from a generator seeded by (seed, s, rank), validation
noise from (seed, pair key), and the data position of step s is (s // batches_per_rank, s % batches_per_rank)
in ``PairLoader.iterate``. A killed run therefore resumes from its last checkpoint and ends, on CPU, with
the same weights as an uninterrupted one. A checkpoint is only reused when the config sections, the world
size and the inputs match (``run_fingerprint``); otherwise training starts over.

Several processes (DDP through accelerate; the latents need a shard count that is a multiple of the process
count, latents.world_size): ``accelerate launch --multi_gpu --num_processes N -m lpo train_lrm ...``. On a
machine without CUDA this runs N CPU processes on gloo (``--cpu`` instead picks accelerate's mpirun launcher,
which starts ONE process when mpirun is absent).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from lpo.config import Config, ConfigError, load_config, to_dict
from lpo.data.loader import PairLoader
from lpo.data.shards import ShardError
from lpo.diffusion import ddim_timesteps
from lpo.losses import bradley_terry_loss, per_prompt_weights
from lpo.reward.lrm import LatentRewardModel
from lpo.stages.eval_lrm import PairScorer, accuracy_by_t, dedupe, noisy_pair, pair_correct, score_pairs
from lpo.stages.eval_lrm import chunked_batches  # noqa: F401 - re-exported: lpo.reward.pixel imports it from here
from lpo.utils import atomic_dir, read_json, setup_logging, training_inputs_digest, write_json

log = logging.getLogger("lpo.train_lrm")

class TrainLrmError(ConfigError):
    """A user-facing training failure (bad input data, a non-finite loss); `lpo train_lrm` prints one line."""


# --------------------------------------------------------------------------------------------------------
# Pure functions: timesteps, noising, weights (METHOD.md section 2)
# --------------------------------------------------------------------------------------------------------


def candidate_timesteps(mode: str, grid: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Training timesteps, METHOD.md section 2: the DDIM grid (official code, {1, 51, ..., 951} for SD1.5) or
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


def local_loss_scale(local_weights: torch.Tensor, world_size: int) -> float:
    """Factor that turns the local weighted mean into this rank's share of the global weighted loss.

    bradley_terry_loss normalises weights locally: L_loc = sum_loc w L / sum_loc w. With w normalised over
    the global batch (per_prompt_weights of the gathered keys, METHOD.md section 2: "gathered over GPUs") and
    DDP averaging gradients over ranks, L_loc * world * sum_loc w has the gradient of sum_global w L.
    """
    return float(world_size * local_weights.sum())


def validation_timesteps(grid: torch.Tensor, n: int) -> list[int]:
    """n points of the DDIM grid, evenly spaced by index, the lowest and highest t included; ascending."""
    ordered = torch.sort(grid).values.tolist()
    if n < 1 or n > len(ordered):
        raise ConfigError(f"train_lrm.val_timesteps must be in 1..{len(ordered)} (the grid size), got {n}")
    if n == 1:
        return [int(ordered[0])]
    picks = np.unique(np.round(np.linspace(0, len(ordered) - 1, n)).astype(int))
    return [int(ordered[i]) for i in picks]


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of one training step on one rank: a pure function of (seed, step, rank)."""
    state = np.random.SeedSequence([seed, 0x1A7, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# --------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------


def run_fingerprint(cfg: Config, latents_dir: Path, base_dir: Path, world_size: int) -> str:
    """What a checkpoint must match to be resumed: lrm + train_lrm sections, seed, world size and the inputs
    (the latents' split indexes and the base model's configs and weight files)."""
    h = hashlib.sha256()
    h.update(json.dumps([to_dict(cfg.lrm), to_dict(cfg.train_lrm), cfg.experiment.seed, world_size],
                        sort_keys=True).encode())
    h.update(training_inputs_digest(latents_dir, base_dir).encode())
    return h.hexdigest()[:20]


def trainable_state(lrm: LatentRewardModel) -> dict[str, torch.Tensor]:
    """The parameters training changes (frozen text encoders and the unused up path are never saved)."""
    return {name: p.detach().cpu().clone() for name, p in lrm.named_parameters() if p.requires_grad}


def load_trainable_state(lrm: LatentRewardModel, state: dict[str, torch.Tensor], where: Path) -> None:
    expected = {name for name, p in lrm.named_parameters() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise TrainLrmError(f"{where}: checkpoint does not match the model (missing {missing[:3]}, extra {extra[:3]}); "
                            "delete the checkpoints folder to start over")
    params = dict(lrm.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device))


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------


def check_config(cfg: Config) -> None:
    c = cfg.train_lrm
    positive = {"steps": c.steps, "batch_size": c.batch_size, "eval_every": c.eval_every,
                "checkpoint_every": c.checkpoint_every, "ddim_steps": c.ddim_steps,
                "keep_checkpoints": c.keep_checkpoints, "text_cache_size": c.text_cache_size}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"train_lrm.{name} must be >= 1, got {value}")
    for name, value in {"lr": c.lr, "head_lr": c.head_lr}.items():
        if not value > 0:
            raise ConfigError(f"train_lrm.{name} must be > 0, got {value}")
    for name, value in {"warmup_steps": c.warmup_steps, "weight_decay": c.weight_decay, "grad_clip": c.grad_clip,
                        "num_workers": c.num_workers}.items():
        if value < 0:
            raise ConfigError(f"train_lrm.{name} must be >= 0, got {value}")
    if c.patience is not None and c.patience < 1:
        raise ConfigError(f"train_lrm.patience must be >= 1 or null, got {c.patience}")
    if c.high_t_weight <= 0:
        raise ConfigError(f"train_lrm.high_t_weight must be > 0, got {c.high_t_weight}")
    if not 1 <= c.val_timesteps <= c.ddim_steps:
        raise ConfigError(f"train_lrm.val_timesteps must be in 1..ddim_steps ({c.ddim_steps}), got {c.val_timesteps}")


class _Run:
    """Mutable training state of one run (what a checkpoint stores besides weights and optimiser)."""

    def __init__(self) -> None:
        self.step = 0
        self.best_metric = -math.inf
        self.best_step: Optional[int] = None
        self.evals_since_best = 0
        self.done = False
        self.nonfinite_skipped = {"train": 0, "val": 0}  # samples the loader skipped, summed over ranks
        self.history: list[dict[str, Any]] = []

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def run(cfg: Config, latents_dir: str | Path, base_dir: str | Path, out_dir: str | Path) -> dict:
    """Train the LRM; writes out_dir/{model, checkpoints, tb, train_log.jsonl, summary.json} (module docstring)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, gather_object

    from lpo.backbones import load_pipeline_folder

    check_config(cfg)
    c = cfg.train_lrm
    latents_dir, base_dir, out_dir = Path(latents_dir), Path(base_dir), Path(out_dir)
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=cfg.lrm.train_text_encoder)
    accelerator = Accelerator(mixed_precision=c.mixed_precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[ddp_kwargs])
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    seed = cfg.experiment.seed
    device = accelerator.device

    try:
        train_loader = PairLoader(latents_dir, "train", c.batch_size, seed=seed, shuffle=True,
                                  num_workers=c.num_workers)
        val_loader = PairLoader(latents_dir, "val", 1, shuffle=False)
    except ShardError as err:
        raise TrainLrmError(str(err)) from None
    if train_loader.batches_per_rank == 0:
        raise TrainLrmError(f"{latents_dir}: the train split has {train_loader.index['n_samples']} pairs, fewer than "
                            f"train_lrm.batch_size {c.batch_size} x {world} processes; lower the batch size")
    if len(val_loader) == 0:
        raise TrainLrmError(f"{latents_dir}: the val split has fewer pairs than the {world} processes")

    bb = load_pipeline_folder(base_dir)
    torch.manual_seed(seed)  # heads are initialised from the global generator
    lrm = LatentRewardModel.from_backbone(bb, cfg.lrm)
    groups = lrm.trainable_parameters(cfg.lrm.train_text_encoder)
    if c.gradient_checkpointing:
        lrm.unet.enable_gradient_checkpointing()
    grid, _ = ddim_timesteps(bb.scheduler, c.ddim_steps)
    alphas = bb.scheduler.alphas_cumprod.clone()
    num_train_t = int(bb.scheduler.config.num_train_timesteps)
    candidates = candidate_timesteps(c.timesteps, grid, num_train_t)
    weights = timestep_weights(candidates, num_train_t, c.high_t_weight)
    val_ts = validation_timesteps(grid, c.val_timesteps)
    counts = lrm.parameter_counts()
    log.info("LRM from %s (%s): %s; %d processes on %s", base_dir, bb.kind, counts, world, device)
    log.info("timesteps %s (%d candidates, upper half x%.2f); validation at t=%s", c.timesteps, len(candidates),
             c.high_t_weight, val_ts)

    scorer = PairScorer(lrm, cache_text=not cfg.lrm.train_text_encoder, cache_size=c.text_cache_size)
    optimizer = torch.optim.AdamW([
        {"params": groups["backbone"], "lr": c.lr, "name": "backbone"},
        {"params": groups["heads"], "lr": c.head_lr, "name": "heads"},
    ], weight_decay=c.weight_decay)
    # Not passed to accelerator.prepare: its AcceleratedScheduler would step once per process per step.
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_factor(s, c.warmup_steps))
    model, optimizer = accelerator.prepare(scorer, optimizer)
    raw: PairScorer = accelerator.unwrap_model(model)

    # ---- resume ------------------------------------------------------------------------------------------
    ckpt_root = out_dir / "checkpoints"
    fingerprint = run_fingerprint(cfg, latents_dir, base_dir, world)
    state = _Run()
    latest = ckpt_root / "latest.json"
    resumed_from = None
    if latest.is_file():
        pointer = read_json(latest)
        if pointer.get("fingerprint") != fingerprint:
            log.warning("%s: checkpoints of another config, world size or input; starting over", ckpt_root)
            accelerator.wait_for_everyone()
            if is_main:
                shutil.rmtree(ckpt_root)
        else:
            step_dir = ckpt_root / pointer["dir"]
            saved = torch.load(step_dir / "state.pt", map_location="cpu", weights_only=False)
            load_trainable_state(raw.lrm, saved["model"], step_dir)
            optimizer.load_state_dict(saved["optimizer"])
            lr_sched.load_state_dict(saved["lr_scheduler"])
            state.load(saved["run"])
            set_rng_state(torch.load(step_dir / f"rng-rank{rank}.pt", map_location="cpu", weights_only=False))
            resumed_from = state.step
            log.info("resumed from %s (step %d, epoch %d, batch %d)", step_dir, state.step,
                     *divmod(state.step, train_loader.batches_per_rank))
    accelerator.wait_for_everyone()

    writer = None
    log_path = out_dir / "train_log.jsonl"
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_path, state.step)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"), purge_step=state.step)

    def log_record(record: dict[str, Any]) -> None:
        if is_main:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def validate() -> dict[str, Any]:
        raw.eval()
        with accelerator.autocast():
            records = score_pairs(raw, val_loader, val_ts, alphas, seed, c.batch_size, device,
                                  desc="validate", show_progress=False)
        stats = _sum_over_ranks(accelerator, val_loader.last_stats.get("nonfinite_skipped", 0))
        raw.train()
        _set_frozen_eval(raw.lrm, cfg.lrm.train_text_encoder)
        records = dedupe(gather_object(records))
        correct, decided = accuracy_by_t(records, len(val_ts))
        acc = [float(correct[decided, j].mean()) if decided.any() else float("nan") for j in range(len(val_ts))]
        metric = acc[0] if c.select_by == "lowest_t" else float(np.mean(acc))
        return {"acc_by_t": dict(zip(map(str, val_ts), acc)), "metric": metric, "n": int(decided.sum()),
                "nonfinite_skipped": stats}

    def save_checkpoint() -> Path:
        name = f"step-{state.step:07d}"
        step_dir = ckpt_root / name
        tmp = ckpt_root / f".{name}.partial"
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
        if is_main:
            epoch, batch_index = divmod(state.step, train_loader.batches_per_rank)
            torch.save({"model": trainable_state(raw.lrm), "optimizer": optimizer.state_dict(),
                        "lr_scheduler": lr_sched.state_dict(), "run": state.as_dict(),
                        "data": {"epoch": epoch, "batch": batch_index}, "world_size": world}, tmp / "state.pt")
        accelerator.wait_for_everyone()
        if is_main:
            shutil.rmtree(step_dir, ignore_errors=True)
            os.replace(tmp, step_dir)
            write_json(latest, {"dir": name, "step": state.step, "fingerprint": fingerprint})
            old = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())[: -c.keep_checkpoints]
            for path in old:
                shutil.rmtree(path)
        accelerator.wait_for_everyone()
        return step_dir

    def evaluate_and_select() -> None:
        result = validate()
        improved = result["metric"] > state.best_metric
        if improved:
            state.best_metric, state.best_step, state.evals_since_best = result["metric"], state.step, 0
            if is_main:
                raw.lrm.save_pretrained(ckpt_root / "best")
                write_json(ckpt_root / "best" / "best.json", {"step": state.step, **result})
            accelerator.wait_for_everyone()
        else:
            state.evals_since_best += 1
        state.nonfinite_skipped["val"] = result["nonfinite_skipped"]  # the same val samples at every validation
        entry = {"event": "validation", "step": state.step, **result, "best_step": state.best_step,
                 "best_metric": state.best_metric, "evals_since_best": state.evals_since_best}
        state.history.append(entry)
        log_record(entry)
        if writer is not None:
            for t, acc in result["acc_by_t"].items():
                writer.add_scalar(f"val/acc_t{t}", acc, state.step)
            writer.add_scalar("val/metric", result["metric"], state.step)
        log.info("step %d: val accuracy %s (%s %.3f); best %.3f at step %d; %d validation(s) without improvement%s",
                 state.step, {t: round(a, 3) for t, a in result["acc_by_t"].items()}, c.select_by, result["metric"],
                 state.best_metric, state.best_step, state.evals_since_best,
                 f" (patience {c.patience})" if c.patience else "")
        if c.patience is not None and state.evals_since_best >= c.patience:
            log.info("early stop: no improvement in %d validations", c.patience)
            state.done = True

    def nonfinite(what: str, value: float) -> TrainLrmError:
        """The error that stops training before a non-finite loss or gradient reaches the weights."""
        epoch, batch_index = divmod(state.step, train_loader.batches_per_rank)
        log_record({"event": f"nonfinite_{what.replace(' ', '_')}", "step": state.step + 1, "epoch": epoch,
                    "batch": batch_index})
        where = f"{last_ckpt} (step {read_json(latest)['step']})" if last_ckpt else "none (no checkpoint yet)"
        return TrainLrmError(
            f"non-finite {what} ({value}) at step {state.step + 1} (epoch {epoch}, batch {batch_index}); training "
            f"stopped without applying it. Last good checkpoint: {where}. Lower train_lrm.lr/head_lr, use "
            f"mixed_precision 'no', or check the latents in {latents_dir}"
        )

    # ---- training loop ----------------------------------------------------------------------------------
    raw.train()
    _set_frozen_eval(raw.lrm, cfg.lrm.train_text_encoder)
    params = groups["backbone"] + groups["heads"]
    step_seconds: list[float] = []
    last_ckpt: Optional[Path] = (ckpt_root / read_json(latest)["dir"]) if latest.is_file() else None
    bar = tqdm(total=c.steps, initial=state.step, desc="train_lrm", disable=not is_main, mininterval=5)
    skipped_done = {"train": 0}  # non-finite samples of finished epochs on this rank (the live epoch: last_stats)
    batches = _batch_stream(train_loader, state.step, skipped_done)
    while state.step < c.steps and not state.done:
        start = time.perf_counter()
        epoch, batch_index = divmod(state.step, train_loader.batches_per_rank)
        batch = next(batches)
        gen = step_generator(seed, state.step, rank)
        b = len(batch["keys"])
        t = sample_timesteps(b, candidates, weights, gen)  # (B,)
        eps_post = torch.randn(batch["mean"].shape, generator=gen)  # (B, 2, C, h, w)
        eps = torch.randn(batch["mean"].shape, generator=gen)  # (B, 2, C, h, w)
        mean, std, labels = batch["mean"].to(device), batch["std"].to(device), batch["labels"].to(device)
        t, eps_post, eps = t.to(device), eps_post.to(device), eps.to(device)
        x_t = noisy_pair(mean, std, t, alphas, eps_post, eps)  # (B, 2, C, h, w)
        scores = model(torch.cat([x_t[:, 0], x_t[:, 1]]), torch.cat([t, t]), batch["captions"] * 2)  # (2B,)
        s0, s1 = scores[:b], scores[b:]
        all_keys = gather_object(list(batch["prompt_keys"])) if world > 1 else list(batch["prompt_keys"])
        w_all = per_prompt_weights(all_keys)
        w = w_all[rank * b:(rank + 1) * b].to(device)  # gather_object concatenates ranks in order
        loss = bradley_terry_loss(s0, s1, labels[:, 0], labels[:, 1], w) * local_loss_scale(w, world)
        correct, decided = pair_correct(s0.detach(), s1.detach(), labels)
        totals = accelerator.reduce(torch.stack([
            loss.detach().float() / world, (~torch.isfinite(loss.detach())).float(),
            correct.float().sum(), decided.float().sum(),
        ]), reduction="sum")
        if totals[1] > 0:  # summed over ranks, so every rank stops at the same step
            raise nonfinite("loss", float(totals[0]))
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(params, c.grad_clip) if c.grad_clip > 0 else None
        # fp16's loss scaler skips overflowing steps by itself; otherwise an inf/NaN gradient would poison the weights
        if grad_norm is not None and c.mixed_precision != "fp16" and not math.isfinite(float(grad_norm)):
            raise nonfinite("gradient norm", float(grad_norm))
        optimizer.step()
        lr_sched.step()
        state.step += 1
        step_seconds.append(time.perf_counter() - start)

        record = {"step": state.step, "epoch": epoch, "batch": batch_index, "loss": float(totals[0]),
                  "train_acc": float(totals[2] / totals[3]) if totals[3] > 0 else None,
                  "lr": lr_sched.get_last_lr()[0], "head_lr": lr_sched.get_last_lr()[1],
                  "logit_scale": float(raw.lrm.logit_scale.detach()),
                  "grad_norm": None if grad_norm is None else float(grad_norm), "t_mean": float(t.float().mean())}
        log_record(record)
        if writer is not None:
            for key in ("loss", "train_acc", "lr", "logit_scale", "grad_norm"):
                if record[key] is not None:
                    writer.add_scalar(f"train/{key}", record[key], state.step)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if state.step % c.eval_every == 0 or state.step == c.steps:
            evaluate_and_select()
        if state.step % c.checkpoint_every == 0 or state.step == c.steps or state.done:
            last_ckpt = save_checkpoint()
    bar.close()
    batches.close()
    if not (ckpt_root / "best" / "lrm_config.json").is_file():  # e.g. deleted by hand after a finished run
        log.warning("%s: no best model saved; validating the final weights as the best", ckpt_root / "best")
        state.best_metric = -math.inf
        evaluate_and_select()
    train_skipped = skipped_done["train"] + train_loader.last_stats.get("nonfinite_skipped", 0)
    state.nonfinite_skipped["train"] += _sum_over_ranks(accelerator, train_skipped)

    # ---- outputs -----------------------------------------------------------------------------------------
    truncated = gather_object(sorted(raw.truncated))
    summary = {
        "steps": state.step, "stopped_early": state.done and state.step < c.steps, "resumed_from": resumed_from,
        "best_step": state.best_step, "best_metric": state.best_metric, "select_by": c.select_by,
        "validation_timesteps": val_ts, "validations": state.history, "world_size": world,
        "global_batch": c.batch_size * world, "threads": torch.get_num_threads(), "device": str(device),
        "seconds_per_step": _timing(step_seconds), "nonfinite_skipped": state.nonfinite_skipped,
        "truncated_captions": len(set(truncated)), "parameters": counts, "fingerprint": fingerprint,
        "train_pairs": train_loader.index["n_samples"], "batches_per_epoch": train_loader.batches_per_rank,
    }
    if any(state.nonfinite_skipped.values()):
        log.warning("samples with non-finite latents skipped: %d train reads, %d val pairs",
                    state.nonfinite_skipped["train"], state.nonfinite_skipped["val"])
    if summary["truncated_captions"]:
        log.warning("%d distinct captions were truncated to %d tokens", summary["truncated_captions"],
                    raw.lrm.text_max_length)
    if is_main:
        with atomic_dir(out_dir / "model") as tmp:
            shutil.rmtree(tmp)
            shutil.copytree(ckpt_root / "best", tmp)
            (tmp / "best.json").unlink(missing_ok=True)
            bb.scheduler.save_pretrained(tmp / "scheduler")
            write_json(tmp / "train_lrm.json", {"base": str(base_dir), "latents": str(latents_dir),
                                                "best_step": state.best_step, "best_metric": state.best_metric,
                                                "select_by": c.select_by, "config": {"lrm": to_dict(cfg.lrm),
                                                "train_lrm": to_dict(c)}})
        write_json(out_dir / "summary.json", summary)
        writer.close()
        log.info("best LRM: step %s, val %s %.3f -> %s", state.best_step, c.select_by, state.best_metric,
                 out_dir / "model")
    accelerator.wait_for_everyone()
    return summary


def _set_frozen_eval(lrm: LatentRewardModel, train_text_encoder: bool) -> None:
    """Frozen text encoders stay in eval mode (no dropout), so their cached encodings are exact."""
    if not train_text_encoder:
        for encoder in lrm.text_encoders():
            encoder.eval()


def _batch_stream(loader: PairLoader, step: int, skipped: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Training batches from global step `step` on: (epoch, batch) = divmod(step, batches_per_rank).

    Adds each finished epoch's count of skipped non-finite samples to skipped["train"]."""
    epoch, start = divmod(step, loader.batches_per_rank)
    for epoch in itertools.count(epoch):
        yield from loader.iterate(epoch, start_batch=start)
        n = loader.last_stats.get("nonfinite_skipped", 0)
        if n:
            log.warning("epoch %d: %d samples with non-finite latents skipped on this rank", epoch, n)
        skipped["train"] += n
        start = 0


def _sum_over_ranks(accelerator, value: int) -> int:
    """Sum of an integer count over all processes."""
    return int(accelerator.reduce(torch.tensor([float(value)], device=accelerator.device), reduction="sum").item())


def _timing(seconds: list[float]) -> dict[str, Optional[float]]:
    """Mean / median step time, skipping the first 3 steps (warm-up) when there are enough."""
    s = seconds[3:] if len(seconds) > 6 else seconds
    if not s:
        return {"mean": None, "median": None, "n": 0}
    return {"mean": round(float(np.mean(s)), 5), "median": round(float(np.median(s)), 5), "n": len(s)}


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log records of steps <= `step` (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lpo train_lrm", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", action="append", required=True, help="config YAML (repeat to merge)")
    parser.add_argument("--latents", required=True, help="latent shards folder (precompute_latents output)")
    parser.add_argument("--base", required=True, help="base model pipeline folder (results/<name>/base)")
    parser.add_argument("--out", required=True, help="work folder: model/, checkpoints/, tb/, train_log.jsonl")
    args = parser.parse_args(argv)
    setup_logging(is_main=int(os.environ.get("RANK", "0")) == 0)
    cfg = load_config(*args.config)
    try:
        run(cfg, args.latents, args.base, args.out)
    except ShardError as err:  # a corrupt shard found mid-epoch: one line, like other input errors
        raise TrainLrmError(str(err)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
