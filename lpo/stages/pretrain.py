"""Stage `pretrain_base` (shapes only): train the shapes-tiny VAE, then its U-Net, from scratch.

The text encoder is the frozen pretrained MiniLM (as SD freezes CLIP). The corpus has deliberate flaws
(wrong-attribute captions, blurred/noisy/low-contrast images, see lpo.stages.synthesize), so the base model
is imperfect in alignment and quality and preference optimisation has room to work.

Outputs (in --out): weights/{unet,vae}/ (diffusers format), metrics.json (the oracle's per-attribute accuracy of
samples on held-out prompts with 95% bootstrap intervals), checkpoints/state.pt (resume after kill), tb/.
A killed run restarts from its last checkpoint and ends with the same weights (fixed step counts, saved RNGs).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lpo import backbones
from lpo.config import Config, ConfigError
from lpo.metrics.stats import bootstrap_ci
from lpo.sampling import ddim_sample, decode_images, images_to_tensor, initial_noise
from lpo.stage_main import stage_main
from lpo.utils import atomic_dir, read_json, seed_everything, write_json
from lpo.world import oracle

log = logging.getLogger("lpo.pretrain")


# ----------------------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------------------


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction: min(SNR, gamma) / SNR (Hang et al. 2023)."""
    ac = alphas_cumprod[t]
    snr = ac / (1 - ac)
    if gamma <= 0:
        return torch.ones_like(snr)
    return snr.clamp(max=gamma) / snr


def cosine_lr(step: int, total: int, warmup: int = 100, floor: float = 0.1) -> float:
    """Linear warmup, then cosine decay to `floor` x the peak learning rate (a multiplier)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: one file with everything a bit-identical resume needs
# ----------------------------------------------------------------------------------------------------------


def save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint


def load_state(path: Path) -> dict | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def restore_phase(state: dict, phase: str, model, opt, rng: np.random.Generator, gen: torch.Generator) -> int:
    """Resume `phase` ("vae" or "unet") from its checkpoint: weights, optimiser, both generators; returns the step."""
    if state.get("phase") != phase:
        return 0
    model.load_state_dict(state[phase])
    opt.load_state_dict(state["opt"])
    rng.bit_generator.state = state["np_rng"]
    gen.set_state(state["torch_rng"])
    log.info("resuming %s training at step %d", phase, state["step"])
    return int(state["step"])


# ----------------------------------------------------------------------------------------------------------
# Training phases
# ----------------------------------------------------------------------------------------------------------


def train_vae(cfg: Config, vae, images: np.ndarray, state: dict, ckpt: Path, writer) -> None:
    p = cfg.pretrain
    opt = torch.optim.AdamW(vae.parameters(), lr=p.vae_lr)
    rng = np.random.default_rng(cfg.experiment.seed)
    gen = torch.Generator().manual_seed(cfg.experiment.seed)
    start = restore_phase(state, "vae", vae, opt, rng, gen)
    vae.train()
    bar = tqdm(range(start, p.vae_steps), desc="vae", initial=start, total=p.vae_steps, mininterval=5)
    for step in bar:
        idx = rng.integers(0, len(images), p.vae_batch_size)
        x = images_to_tensor(images[idx])  # (B, 3, H, W) in [-1, 1]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = posterior.kl().mean()
        loss = mse + p.vae_kl_weight * kl
        for group in opt.param_groups:
            group["lr"] = p.vae_lr * cosine_lr(step, p.vae_steps, warmup=20)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            writer.add_scalar("vae/mse", mse.item(), step)
            writer.add_scalar("vae/kl", kl.item(), step)
            bar.set_postfix(mse=f"{mse.item():.4f}")
        if (step + 1) % p.checkpoint_every == 0 or step + 1 == p.vae_steps:
            save_state(ckpt, {"phase": "vae", "step": step + 1, "vae": vae.state_dict(), "opt": opt.state_dict(),
                              "np_rng": rng.bit_generator.state, "torch_rng": gen.get_state()})
    vae.eval()


@torch.no_grad()
def encode_corpus(vae, images: np.ndarray, batch: int = 512) -> torch.Tensor:
    """Posterior means of the whole corpus (unscaled): (N, 4, h, w)."""
    out = []
    for i in range(0, len(images), batch):
        out.append(vae.encode(images_to_tensor(images[i : i + batch])).latent_dist.mean)
    return torch.cat(out)


def train_unet(cfg: Config, bb, latents: torch.Tensor, caption_idx: np.ndarray, text: torch.Tensor,
               null: torch.Tensor, state: dict, ckpt: Path, writer) -> None:
    """Epsilon-prediction training with min-SNR weighting and prompt dropout (for CFG)."""
    p = cfg.pretrain
    unet, sched = bb.unet, bb.train_scheduler
    opt = torch.optim.AdamW(unet.parameters(), lr=p.unet_lr)
    rng = np.random.default_rng(cfg.experiment.seed + 1)
    gen = torch.Generator().manual_seed(cfg.experiment.seed + 1)
    start = restore_phase(state, "unet", unet, opt, rng, gen)
    alphas_cumprod = sched.alphas_cumprod
    n_train_t = sched.config.num_train_timesteps
    unet.train()
    bar = tqdm(range(start, p.unet_steps), desc="unet", initial=start, total=p.unet_steps, mininterval=5)
    for step in bar:
        idx = rng.integers(0, len(latents), p.unet_batch_size)
        z0 = latents[idx]  # (B, 4, h, w), already scaled
        ctx = text[caption_idx[idx]]  # (B, L, D)
        drop = torch.from_numpy(rng.random(len(idx)) < p.prompt_dropout)
        ctx = torch.where(drop[:, None, None], null.expand_as(ctx), ctx)
        t = torch.randint(0, n_train_t, (len(idx),), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        x_t = sched.add_noise(z0, noise, t)
        pred = unet(x_t, t, encoder_hidden_states=ctx).sample
        err = (pred - noise).pow(2).mean(dim=(1, 2, 3))  # (B,)
        loss = (err * min_snr_weights(alphas_cumprod, t, p.min_snr_gamma)).mean()
        for group in opt.param_groups:
            group["lr"] = p.unet_lr * cosine_lr(step, p.unet_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            writer.add_scalar("unet/loss", loss.item(), step)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % p.checkpoint_every == 0 or step + 1 == p.unet_steps:
            save_state(ckpt, {"phase": "unet", "step": step + 1, "unet": unet.state_dict(), "opt": opt.state_dict(),
                              "vae": bb.vae.state_dict(), "scaling_factor": bb.vae.config.scaling_factor,
                              "np_rng": rng.bit_generator.state, "torch_rng": gen.get_state()})
    unet.eval()


@torch.no_grad()
def evaluate_base(cfg: Config, bb, prompts: list[str], triples: list, n_images: int, seed: int) -> dict:
    """Oracle accuracy per attribute of `n_images` samples on held-out prompts, with 95% bootstrap intervals."""
    p = cfg.pretrain
    picks = [i % len(prompts) for i in range(n_images)]
    cond = bb.encode_prompts([prompts[i] for i in picks]).hidden_states
    uncond = bb.null_embeds(n_images).hidden_states
    x_T = initial_noise([seed + i for i in range(n_images)], (bb.latent_channels, bb.latent_size, bb.latent_size))
    z = ddim_sample(bb.unet, bb.scheduler, cond, uncond, x_T, steps=p.eval_steps, guidance=p.eval_cfg)
    images = decode_images(bb.vae, z)
    verdict = oracle.judge(images, [triples[i] for i in picks], cfg.world)
    metrics = {}
    for key in ("fg", "bg", "shape", "exact"):
        metrics[key] = bootstrap_ci(np.asarray(verdict[key], dtype=float), seed=seed)
    metrics["quality"] = bootstrap_ci(np.asarray(verdict["quality"], dtype=float), seed=seed)
    return metrics


# ----------------------------------------------------------------------------------------------------------
# Stage
# ----------------------------------------------------------------------------------------------------------


def run(cfg: Config, world_dir: str | Path, out_dir: str | Path) -> dict:
    if cfg.backbone.preset != "shapes-tiny":
        raise ConfigError(f"backbone.preset: pretrain_base builds the shapes-tiny model, not {cfg.backbone.preset!r}")
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    corpus_path, prompts_path = world_dir / "corpus.npz", world_dir / "prompts.json"
    for path in (corpus_path, prompts_path):
        if not path.is_file():
            raise ConfigError(f"{path}: missing (run the synthesize rule first)")
    seed_everything(cfg.experiment.seed)
    corpus = np.load(corpus_path)
    images, captions = corpus["images"], [str(c) for c in corpus["captions"]]
    splits = read_json(prompts_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "checkpoints" / "state.pt"
    state = load_state(ckpt) or {}
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out_dir / "tb"))
    t0 = time.time()

    bb = backbones.build_shapes_tiny(seed=cfg.experiment.seed, text_max_length=cfg.backbone.text_max_length)
    if state.get("phase") != "unet":
        train_vae(cfg, bb.vae, images, state, ckpt, writer)
    else:
        bb.vae.load_state_dict(state["vae"])
    t_vae = time.time() - t0
    bb.vae.eval()

    raw = encode_corpus(bb.vae, images)
    scaling = float(state["scaling_factor"]) if state.get("phase") == "unet" else float(1.0 / raw.std())
    bb.vae.register_to_config(scaling_factor=scaling)
    latents = raw * scaling
    log.info("VAE done in %.0f s; latent std %.3f -> scaling_factor %.4f", t_vae, float(raw.std()), scaling)

    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    caption_idx = np.array([index[c] for c in captions])
    text = torch.cat([bb.encode_prompts(unique[i : i + 256]).hidden_states for i in range(0, len(unique), 256)])
    null = bb.null_embeds(1).hidden_states  # (1, L, D)
    t1 = time.time()
    train_unet(cfg, bb, latents, caption_idx, text, null, state, ckpt, writer)
    t_unet = time.time() - t1

    test = splits["test"]
    metrics = evaluate_base(cfg, bb, test["prompts"], test["triples"], cfg.pretrain.eval_images, seed=10_000)
    with atomic_dir(out_dir / "weights") as tmp:
        bb.save_weights(tmp)
    result = {
        "metrics": metrics,
        "eval": {"prompts": "test split (held out of pretraining)", "images": cfg.pretrain.eval_images,
                 "ddim_steps": cfg.pretrain.eval_steps, "cfg": cfg.pretrain.eval_cfg},
        "seconds": {"vae": round(t_vae, 1), "unet": round(t_unet, 1), "total": round(time.time() - t0, 1)},
        "steps": {"vae": cfg.pretrain.vae_steps, "unet": cfg.pretrain.unet_steps},
        "scaling_factor": scaling,
        "threads": torch.get_num_threads(),
    }
    write_json(out_dir / "metrics.json", result)
    writer.close()
    log.info("base model: %s", {k: round(v["mean"], 3) for k, v in metrics.items()})
    return result


def main(argv: Optional[list[str]] = None) -> int:
    return stage_main("pretrain", __doc__, lambda cfg, a: run(cfg, a.world, a.out), argv, inputs=("world",),
                      out=("DIR", "work folder: weights/, metrics.json, checkpoints/, tb/"), summary_keys=())


if __name__ == "__main__":
    sys.exit(main())
