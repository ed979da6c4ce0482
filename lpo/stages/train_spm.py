"""Stage `train_spm`: train SPO's step-aware pixel reward model (SPM) on the latent preference pairs.

    lpo train_spm --config CFG --latents DIR --base DIR [--world DIR] --out WORKDIR

docs/method.md section 5 (SPO, SPM); RockeyCoss/SPO spm_task.py. SPO's SPM starts from PickScore, a CLIP
pretrained on image-text pairs; the shapes world has no such model. With train_spm.clip_steps > 0 the small
SPM is first pretrained CLIP-style (``clip_contrastive_loss``) on the base model's pretraining corpus
(--world: corpus.npz, renders with their captions, t = 0), as the LRM starts from the pretrained U-Net
(default 0: in a 300-step comparison on the shapes pairs it gave no gain within the noise).
Then, on the SAME latent shards as the LRM
(lpo.data.loader.PairLoader, train split), each step:
1. both latents of a pair are drawn from their VAE posterior (mean + std * noise) and noised with the SAME
   noise at the same t ~ U{0 .. train_spm.t_max - 1} (the LRM uses independent noise);
2. ONE classifier-free-guided step of the frozen base model (guidance train_spm.cfg) gives x0-hat, which the
   VAE decodes (lpo.reward.pixel.decoded_x0_hat);
3. the SPM scores both decoded images at t; Bradley-Terry loss (ties (0.5, 0.5)) with PickScore's per-prompt
   weights (within the batch), AdamW (train_spm.lr, weight_decay), gradient clip.
Every train_spm.eval_every steps (and at the last) the val split's pair accuracy at train_spm.eval_timesteps
(SPO's evaluation set) is measured with the same protocol and fixed per-pair noise
(``pixel_accuracy_by_t``); the model with the best mean accuracy is kept.

Outputs in WORKDIR (--out): ``model/`` (the best SPM, ``StepAwarePixelModel.from_pretrained``; written once,
at the end), ``summary.json`` (best step, validations, per-step cost: U-Net pass, decode, score + update),
``train_log.jsonl`` (one record per step and per validation), ``tb/`` (TensorBoard),
``checkpoints/state.pt`` (trainable weights, optimiser, step, best-so-far).

Resume: rerun the same command. The randomness of step s is a pure function of (seed, s, rank)
(``lpo.stages.train_lrm.step_generator``) and its data position is (s // batches, s % batches) of
``PairLoader.iterate``, so the checkpoint needs no generator state and a resumed run ends, on CPU, with the
same weights as an uninterrupted one. A checkpoint of another config section, world size or input data is
ignored (training starts over, with a warning).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from lpo.backbones import Backbone, BackboneError, PromptEmbeds, load_pipeline_folder
from lpo.checkpoint import fingerprint as checkpoint_fingerprint
from lpo.checkpoint import input_digest
from lpo.config import Config, ConfigError, to_dict
from lpo.data.loader import PairLoader
from lpo.data.shards import ShardError
from lpo.losses import bradley_terry_loss
from lpo.reward.pixel import (
    SpmText,
    StepAwarePixelModel,
    clip_contrastive_loss,
    decode_latents,
    one_step_x0_hat,
    pixel_correct_by_t,
)
from lpo.sampling import images_to_tensor
from lpo.training.trainer import PairTrainer, StepContext, StepResult, TrainerSettings, now
from lpo.stage_main import stage_main
from lpo.utils import write_json

log = logging.getLogger("lpo.train_spm")

VAL_SEED_OFFSET = 101  # validation noise: pair_noise(experiment.seed + offset, key), fixed for the whole run
TEXT_CACHE_SIZE = 4096  # prompt embeddings of the base model kept per caption (LRU)


class TrainSpmError(ConfigError):
    """A user-facing train_spm failure (bad data, a checkpoint of another run); `lpo train_spm` prints one line."""


# --------------------------------------------------------------------------------------------------------
# Checks and small helpers
# --------------------------------------------------------------------------------------------------------


def check_config(cfg: Config) -> None:
    """ConfigError naming the train_spm.<field> that cannot work, before anything is loaded."""
    c = cfg.train_spm
    for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "t_max"):
        if getattr(c, name) < 1:
            raise ConfigError(f"train_spm.{name}: must be >= 1, got {getattr(c, name)}")
    if not c.lr > 0:
        raise ConfigError(f"train_spm.lr: must be > 0, got {c.lr}")
    if c.weight_decay < 0 or c.grad_clip < 0:
        raise ConfigError("train_spm.weight_decay and grad_clip must be >= 0")
    if c.cfg < 1.0:
        raise ConfigError(f"train_spm.cfg: a guidance scale >= 1 is expected, got {c.cfg}")
    if not c.eval_timesteps:
        raise ConfigError("train_spm.eval_timesteps: empty; give at least one timestep")


def check_timesteps(cfg: Config, num_train_timesteps: int) -> None:
    c = cfg.train_spm
    if c.t_max > num_train_timesteps:
        raise ConfigError(f"train_spm.t_max {c.t_max} > the base model's {num_train_timesteps} training timesteps")
    bad = [t for t in c.eval_timesteps if not 0 <= t < num_train_timesteps]
    if bad:
        raise ConfigError(f"train_spm.eval_timesteps {bad}: outside [0, {num_train_timesteps - 1}]")


def fingerprint(cfg: Config, world_size: int, latents_dir: Path, base_dir: Path) -> str:
    """What a checkpoint must match to be resumed: the train_spm section, the seed, the world size and the
    inputs' content (latent shards, base model); ``steps`` excluded, so a finished run can be extended."""
    section = {k: v for k, v in to_dict(cfg.train_spm).items() if k not in ("steps", "eval_every", "checkpoint_every")}
    return checkpoint_fingerprint({"train_spm": section, "seed": cfg.experiment.seed, "world": world_size},
                                  [input_digest(latents_dir, base_dir)])


class PromptCache:
    """The base model's prompt embeddings per caption (LRU), each computed alone so a cached value never
    depends on which captions shared its batch; and the SPM's text features when its text tower is frozen."""

    def __init__(self, backbone: Backbone, spm: StepAwarePixelModel, device: torch.device) -> None:
        self.backbone, self.spm, self.device = backbone, spm, device
        self.cache_spm_text = not any(p.requires_grad for p in _text_parameters(spm))
        self._cond: OrderedDict[str, PromptEmbeds] = OrderedDict()
        self._text: OrderedDict[str, SpmText] = OrderedDict()

    @torch.no_grad()
    def cond(self, captions: list[str]) -> PromptEmbeds:
        for caption in dict.fromkeys(captions):
            if caption in self._cond:
                self._cond.move_to_end(caption)
                continue
            self._cond[caption] = self.backbone.encode_prompts([caption]).to(self.device)
            if len(self._cond) > TEXT_CACHE_SIZE:
                self._cond.popitem(last=False)
        return PromptEmbeds.cat([self._cond[c] for c in captions])

    def spm_text(self, captions: list[str]) -> Any:
        """SpmText from the cache (frozen text tower), or the captions themselves (encoded with gradient)."""
        if not self.cache_spm_text:
            return captions
        with torch.no_grad():
            for caption in dict.fromkeys(captions):
                if caption in self._text:
                    self._text.move_to_end(caption)
                    continue
                self._text[caption] = self.spm.encode_text([caption])
                if len(self._text) > TEXT_CACHE_SIZE:
                    self._text.popitem(last=False)
        return SpmText(torch.cat([self._text[c].features for c in captions]))  # (B, F)


def _text_parameters(spm: StepAwarePixelModel) -> list[torch.nn.Parameter]:
    if spm.kind == "small":
        return list(spm.text_encoder.parameters())
    return list(spm.clip.text_model.parameters())


def _mean(values: list[float]) -> Optional[float]:
    return float(np.mean(values)) if values else None


def clip_warm_start(spm: StepAwarePixelModel, corpus_path: Path, cfg: Config, device: torch.device,
                    log_record: Any) -> dict[str, Any]:
    """CLIP-style pretraining of the small SPM on the pretraining corpus (clean images, t = 0): a stand-in for
    the CLIP pretraining PickScore starts from. Deterministic (seeded), so a rerun repeats it exactly."""
    c = cfg.train_spm
    if not corpus_path.is_file():
        raise TrainSpmError(f"{corpus_path}: missing (run the synthesize rule; or set train_spm.clip_steps: 0)")
    data = np.load(corpus_path)
    images, captions = data["images"], [str(x) for x in data["captions"]]
    unique = sorted(set(captions))
    index = {caption: i for i, caption in enumerate(unique)}
    ids = torch.tensor([index[caption] for caption in captions])  # (N,)
    with torch.no_grad():  # the MiniLM is frozen: its pooled features once per distinct caption
        features = torch.cat([spm.encode_text(unique[i:i + 256]).features for i in range(0, len(unique), 256)])
    params = spm.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=c.clip_lr, weight_decay=c.weight_decay)
    gen = torch.Generator().manual_seed(cfg.experiment.seed * 1_000 + 0xC1)
    start, losses = time.perf_counter(), []
    spm.train()
    for k in tqdm(range(c.clip_steps), desc="train_spm clip", mininterval=5):
        pick = torch.randint(len(images), (c.clip_batch_size,), generator=gen)  # (B,)
        x = images_to_tensor(images[pick.numpy()]).to(device)  # (B, 3, H, W) in [-1, 1]
        visual = spm.image(x, torch.zeros(len(pick), dtype=torch.int64, device=device))
        text = spm.text_features(SpmText(features[ids[pick]].to(device)))
        loss = clip_contrastive_loss(visual, text, spm.logit_scale_param, ids[pick].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        if k % 10 == 0 or k == c.clip_steps - 1:
            log_record({"event": "clip", "clip_step": k + 1, "loss": losses[-1]})
    result = {"steps": c.clip_steps, "corpus_images": len(images), "captions": len(unique),
              "loss_first": losses[0], "loss_last": float(np.mean(losses[-10:])),
              "seconds": time.perf_counter() - start}
    log.info("CLIP warm start: %d steps on %d images, loss %.3f -> %.3f in %.0f s", c.clip_steps, len(images),
             result["loss_first"], result["loss_last"], result["seconds"])
    return result


# --------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------


def run(cfg: Config, latents_dir: str | Path, base_dir: str | Path, out_dir: str | Path,
        world_dir: Optional[str | Path] = None) -> dict:
    """Train the SPM; writes out_dir/{model, summary.json, train_log.jsonl, tb, checkpoints} (module docstring).

    world_dir: the synthesize output (corpus.npz), needed by the shapes SPM's CLIP warm start (clip_steps > 0).
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    check_config(cfg)
    c = cfg.train_spm
    latents_dir, base_dir, out_dir = Path(latents_dir), Path(base_dir), Path(out_dir)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    is_main, world, device = accelerator.is_main_process, accelerator.num_processes, accelerator.device
    seed = cfg.experiment.seed
    try:
        train_loader = PairLoader(latents_dir, "train", c.batch_size, seed=seed, shuffle=True)
        val_loader = PairLoader(latents_dir, "val", 1, shuffle=False)
    except ShardError as err:
        raise TrainSpmError(str(err)) from None
    if train_loader.batches_per_rank == 0:
        raise TrainSpmError(f"{latents_dir}: the train split has {train_loader.index['n_samples']} pairs, fewer than "
                            f"train_spm.batch_size {c.batch_size} x {world} processes; lower the batch size")
    try:
        bb = load_pipeline_folder(base_dir)
    except BackboneError as err:
        raise TrainSpmError(str(err)) from None
    check_timesteps(cfg, int(bb.scheduler.config.num_train_timesteps))
    bb.to(device)
    for module in (bb.unet, bb.vae, *bb.text_encoders()):
        module.requires_grad_(False)
    warm_start = bb.kind == "shapes" and c.clip_steps > 0
    if warm_start and world_dir is None:
        raise ConfigError("train_spm.clip_steps > 0: the shapes SPM's CLIP warm start needs --world (the synthesize "
                          "output with corpus.npz); or set train_spm.clip_steps: 0 to start from scratch")
    torch.manual_seed(seed)  # the SPM's random init (same on every process)
    spm = StepAwarePixelModel.from_backbone(bb, c).to(device)
    params = spm.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    model, optimizer = accelerator.prepare(spm, optimizer)
    prompts = PromptCache(bb, spm, device)
    uncond = bb.null_embeds(1).to(device)
    n_params = sum(p.numel() for p in params)
    log.info("SPM kind %s: %d trainable parameters; base %s; %d process(es) on %s", spm.kind, n_params, base_dir,
             world, device)

    def validate() -> dict[str, Any]:
        spm.eval()
        local = pixel_correct_by_t(spm, bb, val_loader, c.eval_timesteps, seed + VAL_SEED_OFFSET, c.cfg,
                                   batch_size=max(c.batch_size, 32))
        spm.train()
        merged: dict[int, dict[str, bool]] = {t: {} for t in local}
        for part in (gather_object([local]) if world > 1 else [local]):
            for t, by_key in part.items():
                merged[t].update(by_key)  # replayed pairs (uneven ranks) count once
        acc = {t: float(np.mean(list(v.values()))) if v else float("nan") for t, v in merged.items()}
        n = max((len(v) for v in merged.values()), default=0)
        return {"acc_by_t": {str(t): a for t, a in acc.items()}, "metric": float(np.nanmean(list(acc.values()))),
                "n": n}

    def step_fn(batch: dict[str, Any], gen: torch.Generator, w: torch.Tensor) -> StepResult:
        """docs/method.md section 5: posterior sample, shared noise at t ~ U{0..t_max-1}, one CFG step, decode, SPM."""
        b = len(batch["keys"])
        eps_post = torch.randn(batch["mean"].shape, generator=gen)  # (B, 2, C, h, w)
        t = torch.randint(0, c.t_max, (b,), generator=gen)  # (B,)
        noise = torch.randn(batch["mean"].shape[:1] + batch["mean"].shape[2:], generator=gen)  # (B, C, h, w)
        x0 = batch["mean"].to(device) + batch["std"].to(device) * eps_post.to(device)  # (B, 2, C, h, w)
        t, noise, labels = t.to(device), noise.to(device), batch["labels"].to(device)
        cond = prompts.cond(batch["captions"])
        x0_hat = one_step_x0_hat(bb, x0, t, noise, cond, uncond, c.cfg)  # (B, 2, C, h, w)
        after_unet = now(device)
        with torch.no_grad():
            images = decode_latents(bb.vae, x0_hat.flatten(0, 1))  # (2B, 3, H, W): pair-major
        after_decode = now(device)
        text = prompts.spm_text(batch["captions"])
        text2 = text.repeat_interleave(2) if isinstance(text, SpmText) else [p for p in text for _ in range(2)]
        scores = model(images, t.repeat_interleave(2), text2).view(b, 2)  # (B, 2)
        loss = bradley_terry_loss(scores[:, 0], scores[:, 1], labels[:, 0], labels[:, 1], w)
        return StepResult(loss, scores[:, 0], scores[:, 1], labels,
                          {"t_mean": float(t.float().mean()), "after_unet": after_unet, "after_decode": after_decode})

    seconds: dict[str, list[float]] = {"unet": [], "decode": [], "score": [], "step": []}

    def describe(ctx: StepContext) -> dict[str, Any]:
        after_unet, after_decode = ctx.out.extra["after_unet"], ctx.out.extra["after_decode"]
        phases = {"unet": after_unet - ctx.start, "decode": after_decode - after_unet,
                  "score": ctx.end - after_decode}
        for key, value in (*phases.items(), ("step", ctx.end - ctx.start)):
            seconds[key].append(value)
        return {"step": ctx.step, "loss": ctx.loss, "train_acc": ctx.train_acc, "t_mean": ctx.out.extra["t_mean"],
                "logit_scale": float(spm.logit_scale_param.detach()), "grad_norm": ctx.grad_norm,
                "seconds": phases}

    info = {"base": str(base_dir), "latents": str(latents_dir), "train_spm": to_dict(c)}

    def save_best(path: Path, step: int, metric: float) -> None:
        spm.save_pretrained(path, info={"base": info["base"], "latents": info["latents"], "best_step": step,
                                        "best_metric": metric, "train_spm": info["train_spm"]})

    settings = TrainerSettings(name="train_spm", steps=c.steps, eval_every=c.eval_every,
                               checkpoint_every=c.checkpoint_every, seed=seed, grad_clip=c.grad_clip,
                               hint="Lower train_spm.lr")
    trainer = PairTrainer(accelerator, settings, out_dir, train_loader, spm, optimizer, params,
                          fingerprint(cfg, world, latents_dir, base_dir), TrainSpmError, step_fn=step_fn,
                          validate_fn=validate, save_best=save_best, describe=describe,
                          data_desc=str(latents_dir))
    trainer.resume()

    # ---- CLIP warm start (shapes, optional), then the training loop -------------------------------------
    warm: Optional[dict[str, Any]] = None
    if warm_start and trainer.state.step == 0:  # a resumed run has the warm-started weights in its checkpoint
        warm = clip_warm_start(spm, Path(world_dir) / "corpus.npz", cfg, device, trainer.log_record)
    spm.train()
    state = trainer.fit()

    # ---- outputs -----------------------------------------------------------------------------------------
    per_step = {k: _mean(v) for k, v in seconds.items()}
    summary = {
        "kind": spm.kind, "clip_warm_start": warm, "steps": state.step, "best_step": state.best_step,
        "best_metric": state.best_metric,
        "best_acc_by_t": state.best_acc_by_t, "eval_timesteps": list(c.eval_timesteps),
        "validations": state.history,
        "world_size": world, "global_batch": c.batch_size * world, "trainable_parameters": n_params,
        "device": str(device), "threads": torch.get_num_threads(), "train_pairs": train_loader.index["n_samples"],
        "cost": {
            "note": "mean wall seconds per training step of this process run (a resumed run times its own steps): "
                    "one batched CFG U-Net pass over 2 x batch latents, one VAE decode of 2 x batch x0-hats, "
                    "SPM forward + backward + AdamW",
            "steps_timed": len(seconds["step"]),
            "seconds_unet_per_step": per_step["unet"], "seconds_decode_per_step": per_step["decode"],
            "seconds_score_update_per_step": per_step["score"], "seconds_per_step": per_step["step"],
        },
    }
    if is_main:
        with trainer.export_best(out_dir / "model"):
            pass
        write_json(out_dir / "summary.json", summary)
        log.info("best SPM: step %s, mean val accuracy %.3f -> %s", state.best_step, state.best_metric,
                 out_dir / "model")
    trainer.close()
    accelerator.wait_for_everyone()
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    return stage_main("train_spm", __doc__, lambda cfg, a: run(cfg, a.latents, a.base, a.out, world_dir=a.world), argv,
                      inputs=("latents", "base"), optional_inputs=("world",),
                      out=("DIR", "work folder: model/, summary.json, train_log.jsonl, tb/, checkpoints/"),
                      user_errors=(ShardError,), summary_keys=())


if __name__ == "__main__":
    sys.exit(main())
