"""Stage `train_lrm`: train the Latent Reward Model on latent preference pairs (docs/method.md sections 1, 2).

The LRM starts from the base model (``load_pipeline_folder(base)`` -> ``LatentRewardModel.from_backbone``) and
is trained with the Bradley-Terry loss (ties as (0.5, 0.5), per-prompt reweighting over the global batch).
Each step draws both latents of a pair from their stored VAE posterior (mean + std * noise) and noises them
to the SAME timestep with INDEPENDENT noise (docs/method.md section 2, "Noising"; lpo.diffusion.noisy_pair, the step
in lpo.training.lrm, the scorer and validation protocol in lpo.reward.pairs); timesteps come from the
backbone's DDIM grid (official code) or uniformly from [0, T), with the upper half up-weighted by
``train_lrm.high_t_weight`` (docs/prototype.md, trap 4: the prototype's LRM was blind at high t).

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
size and the inputs match (``run_fingerprint``); otherwise training starts over. The loop, checkpoints,
validation and logs are lpo.training.trainer.PairTrainer's (shared with train_spm).

Several processes (DDP through accelerate; the latents need a shard count that is a multiple of the process
count, latents.world_size): ``accelerate launch --multi_gpu --num_processes N -m lpo train_lrm ...``. On a
machine without CUDA this runs N CPU processes on gloo (``--cpu`` instead picks accelerate's mpirun launcher,
which starts ONE process when mpirun is absent).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from lpo.checkpoint import fingerprint as checkpoint_fingerprint
from lpo.checkpoint import input_digest
from lpo.config import Config, ConfigError, to_dict
from lpo.data.loader import PairLoader
from lpo.data.shards import ShardError
from lpo.diffusion import ddim_timesteps
from lpo.reward.lrm import LatentRewardModel
from lpo.reward.pairs import PairScorer, accuracy_by_t, dedupe, score_pairs
from lpo.training.lrm import (
    LrmStep,
    candidate_timesteps,
    set_frozen_eval,
    timestep_weights,
    validation_timesteps,
    warmup_factor,
)
from lpo.training.trainer import (
    PairTrainer,
    StepContext,
    TrainerSettings,
    sum_over_ranks,
    timing,
)
from lpo.stage_main import stage_main
from lpo.utils import write_json

log = logging.getLogger("lpo.train_lrm")

class TrainLrmError(ConfigError):
    """A user-facing training failure (bad input data, a non-finite loss); `lpo train_lrm` prints one line."""


def run_fingerprint(cfg: Config, latents_dir: Path, base_dir: Path, world_size: int) -> str:
    """What a checkpoint must match to be resumed: lrm + train_lrm sections, seed, world size and the inputs
    (the latents' split indexes and the base model's configs and weight files)."""
    return checkpoint_fingerprint([to_dict(cfg.lrm), to_dict(cfg.train_lrm), cfg.experiment.seed, world_size],
                                  [input_digest(latents_dir, base_dir)])


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
    is_main, world = accelerator.is_main_process, accelerator.num_processes
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

    def validate() -> dict[str, Any]:
        raw.eval()
        with accelerator.autocast():
            records = score_pairs(raw, val_loader, val_ts, alphas, seed, c.batch_size, device,
                                  desc="validate", show_progress=False)
        stats = sum_over_ranks(accelerator, val_loader.last_stats.get("nonfinite_skipped", 0))
        raw.train()
        set_frozen_eval(raw.lrm, cfg.lrm.train_text_encoder)
        records = dedupe(gather_object(records))
        correct, decided = accuracy_by_t(records, len(val_ts))
        acc = [float(correct[decided, j].mean()) if decided.any() else float("nan") for j in range(len(val_ts))]
        metric = acc[0] if c.select_by == "lowest_t" else float(np.mean(acc))
        return {"acc_by_t": dict(zip(map(str, val_ts), acc)), "metric": metric, "n": int(decided.sum()),
                "nonfinite_skipped": stats}

    def describe(ctx: StepContext) -> dict[str, Any]:
        lrs = trainer.lr_scheduler.get_last_lr()
        return {"step": ctx.step, "epoch": ctx.epoch, "batch": ctx.batch, "loss": ctx.loss,
                "train_acc": ctx.train_acc, "lr": lrs[0], "head_lr": lrs[1],
                "logit_scale": float(raw.lrm.logit_scale.detach()), "grad_norm": ctx.grad_norm,
                "t_mean": ctx.out.extra["t_mean"]}

    settings = TrainerSettings(
        name="train_lrm", steps=c.steps, eval_every=c.eval_every, checkpoint_every=c.checkpoint_every, seed=seed,
        grad_clip=c.grad_clip, keep_checkpoints=c.keep_checkpoints, patience=c.patience, early_stopping=True,
        mixed_precision=c.mixed_precision, hint="Lower train_lrm.lr/head_lr, use mixed_precision 'no'")
    trainer = PairTrainer(
        accelerator, settings, out_dir, train_loader, raw.lrm, optimizer, groups["backbone"] + groups["heads"],
        run_fingerprint(cfg, latents_dir, base_dir, world), TrainLrmError,
        step_fn=LrmStep(model, candidates, weights, alphas, device), validate_fn=validate,
        save_best=lambda path, step, metric: raw.lrm.save_pretrained(path), describe=describe,
        lr_scheduler=lr_sched, data_desc=f"the latents in {latents_dir}")
    trainer.resume()
    raw.train()
    set_frozen_eval(raw.lrm, cfg.lrm.train_text_encoder)
    state = trainer.fit()

    # ---- outputs -----------------------------------------------------------------------------------------
    truncated = gather_object(sorted(raw.truncated))
    summary = {
        "steps": state.step, "stopped_early": state.done and state.step < c.steps,
        "resumed_from": trainer.resumed_from,
        "best_step": state.best_step, "best_metric": state.best_metric, "select_by": c.select_by,
        "validation_timesteps": val_ts, "validations": state.history, "world_size": world,
        "global_batch": c.batch_size * world, "threads": torch.get_num_threads(), "device": str(device),
        "seconds_per_step": timing(trainer.step_seconds), "nonfinite_skipped": state.nonfinite_skipped,
        "truncated_captions": len(set(truncated)), "parameters": counts, "fingerprint": trainer.fingerprint,
        "train_pairs": train_loader.index["n_samples"], "batches_per_epoch": train_loader.batches_per_rank,
    }
    if any(state.nonfinite_skipped.values()):
        log.warning("samples with non-finite latents skipped: %d train reads, %d val pairs",
                    state.nonfinite_skipped["train"], state.nonfinite_skipped["val"])
    if summary["truncated_captions"]:
        log.warning("%d distinct captions were truncated to %d tokens", summary["truncated_captions"],
                    raw.lrm.text_max_length)
    if is_main:
        with trainer.export_best(out_dir / "model") as tmp:
            bb.scheduler.save_pretrained(tmp / "scheduler")
            write_json(tmp / "train_lrm.json", {"base": str(base_dir), "latents": str(latents_dir),
                                                "best_step": state.best_step, "best_metric": state.best_metric,
                                                "select_by": c.select_by, "config": {"lrm": to_dict(cfg.lrm),
                                                "train_lrm": to_dict(c)}})
        write_json(out_dir / "summary.json", summary)
        log.info("best LRM: step %s, val %s %.3f -> %s", state.best_step, c.select_by, state.best_metric,
                 out_dir / "model")
    trainer.close()
    accelerator.wait_for_everyone()
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    # a corrupt shard found mid-epoch (ShardError) is one line, like other input errors
    return stage_main("train_lrm", __doc__, lambda cfg, a: run(cfg, a.latents, a.base, a.out), argv,
                      inputs=("latents", "base"),
                      out=("DIR", "work folder: model/, checkpoints/, tb/, train_log.jsonl"),
                      user_errors=(ShardError,), summary_keys=())


if __name__ == "__main__":
    sys.exit(main())
