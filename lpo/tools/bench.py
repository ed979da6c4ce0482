"""Tool `bench`: what a sampling step and an LRM training step cost, LPO vs SPO, measured side by side.

Issue #8 item 6; docs/method.md section 4 (Tab. 5: one sampling step with K = 4 on an A100, SPO 0.243 s vs LPO
0.039 s, ~6x) and section 5 (SPO's scorer). Timed on the real code paths, with random weights (the cost
of a forward does not depend on the values):

- ``lpo_step`` / ``spo_step``: ONE step of ``lpo.methods.engine.branching_rollout`` (a one-step plan at the grid
  timestep nearest T/2 that both methods train) with the real scorers: ``LrmScorer`` (one CFG U-Net pass of
  the LoRA policy, then the LRM on all B x K children in one batch) and ``lpo.methods.spo.SpoScorer`` (plus,
  per child, a CFG U-Net pass at the child's timestep, a VAE decode of its x0-hat and the step-aware pixel
  model). Calls and rows through each model are counted with forward hooks on the models themselves.
- ``lrm_train_step_latents`` / ``lrm_train_step_on_the_fly``: ``train_lrm``'s training step,
  ``lpo.training.lrm.LrmStep`` (posterior sample + noising with ``noisy_pair``, ``PairScorer``, Bradley-Terry
  with per-prompt weights), then backward, gradient clip, AdamW as lpo.training.trainer does them from a batch of stored posterior latents, vs the same step after decoding
  the pair's JPEGs, ``image_to_array`` and ``encode_posterior`` (the latents stage's functions) on the fly.
  The JPEGs are made at the model's resolution, so no resize is timed (real Pick-a-Pic images need one).
- ``loader``: ``lpo.data.loader.PairLoader`` over shards written by ``lpo.data.shards.write_shards`` into
  a temporary folder (latent shape and dtype of the size), one epoch per repeat, against the samples per
  second the latents training step consumes.

Sizes (``SIZES``): ``shapes`` (the embedded world: the shipped shapes-tiny base, small SPM), ``sd15`` (the
SD1.5 architecture: 860M U-Net, 84M VAE, CLIP ViT-L/14 text encoder, and for SPO a PickScore-shaped CLIP
ViT-H/14, 986M, with SPO's time conditioning, +320M, as pixel model) and ``tiny-sd15`` (the same layout at toy width, for
tests). Settings (CFG, eta, VFE scale, LoRA, whether the LRM trains its text encoder, learning rates, shard
dtype) come from the experiment configs: config/config.yaml for shapes, + config/sd15.yaml for the SD sizes
(``--config`` replaces them). Mixed precision: bf16/fp16 casts every frozen model of the sampling step (LoRA
base U-Net, LRM, VAE, text encoders, SPM; the optimize stage casts only the U-Net and the LRM and leaves the
rest to autocast, which re-casts their weights at every call: casting all is the fair comparison) and runs
under autocast; the LRM trains with float32 master weights under autocast (accelerate's mixed_precision; no
fp16 loss scaler here).

Output: one JSON (stdout, and --out): versions, device name, dtype, threads, per item median / p10 / p90
seconds, the ratios (SPO/LPO step, on-the-fly/latents LRM step, loader/train samples per second) and the
per-step counts (U-Net passes, LRM passes, VAE decodes, pixel-model evaluations).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import logging
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import diffusers
import numpy as np
import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from lpo.backbones import (
    CLIP_BOS_ID,
    CLIP_EOS_ID,
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    SHIPPED_SHAPES_BASE,
    Backbone,
    build_clip_tokenizer,
    build_shapes_tiny,
    build_tiny_sd15,
    load_shapes_tiny,
    sd_scheduler,
    tiny_clip_config,
)
from lpo.config import Config, ConfigError, load_config
from lpo.data.loader import PairLoader
from lpo.data.shards import write_shards
from lpo.diffusion import ddim_timesteps
from lpo.losses import per_prompt_weights
from lpo.methods.engine import LrmScorer, StepPlan, branching_rollout
from lpo.methods.lpo import Lpo
from lpo.methods.spo import Spo, SpoCost, SpoScorer
from lpo.policy import WEIGHT_DTYPES, build_policy
from lpo.reward.lrm import LatentRewardModel
from lpo.reward.pixel import StepAwarePixelModel
from lpo.reward.pairs import PairScorer
from lpo.stages.latents import encode_posterior, image_to_array, prompt_key
from lpo.training.lrm import LrmStep, candidate_timesteps, set_frozen_eval, timestep_weights
from lpo.training.trainer import local_loss_scale
from lpo.utils import setup_logging, write_json

log = logging.getLogger("lpo.bench")

REPO = Path(__file__).resolve().parents[2]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# --dtype -> the stages' mixed_precision name (lpo.policy.WEIGHT_DTYPES)
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
SIZE_GROUPS: dict[str, tuple[str, ...]] = {"shapes": ("shapes",), "sd15": ("sd15",), "tiny-sd15": ("tiny-sd15",),
                                           "both": ("shapes", "sd15")}
PROMPTS = ("a red circle on a blue background", "a green square on a white background",
           "a photo of a cat sitting on a wooden table, soft light", "an astronaut riding a horse on the moon",
           "a watercolor painting of a lighthouse at dusk")

# The published SD1.5 component configs (stable-diffusion-v1-5 unet/vae/text_encoder config.json).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215, act_fn="silu",
)
_CLIP_IDS = dict(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=CLIP_BOS_ID,
                 eos_token_id=CLIP_EOS_ID, pad_token_id=CLIP_EOS_ID)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768, **_CLIP_IDS)
# PickScore_v1 = laion CLIP-ViT-H-14-laion2B-s32B-b79K: ViT-H/14 at 224 px, 1024-d text tower of 24 layers.
PICKSCORE_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      hidden_act="gelu", **_CLIP_IDS)
PICKSCORE_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                        image_size=224, patch_size=14, hidden_act="gelu")
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                   patch_size=8, hidden_act="gelu")


# --------------------------------------------------------------------------------------------------------
# Options and sizes
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchOptions:
    """What to measure. batch = prompts per sampling step (None = the config's optimize.prompts_per_iteration);
    train_batch = pairs per LRM training step and loader batch (None = the config's train_lrm.batch_size)."""

    size: str = "shapes"
    device: str = "cpu"
    dtype: str = "fp32"
    batch: Optional[int] = None
    children: int = 4
    repeats: int = 10
    warmup: int = 1
    train_batch: Optional[int] = None
    loader_samples: int = 512
    seed: int = 0

    def resolved(self, cfg: Config) -> "BenchOptions":
        """Batch sizes filled in from the experiment config where not given."""
        batch = self.batch if self.batch is not None else cfg.optimize.prompts_per_iteration
        pairs = self.train_batch if self.train_batch is not None else cfg.train_lrm.batch_size
        return dataclasses.replace(self, batch=batch, train_batch=pairs)


def check_options(opts: BenchOptions) -> None:
    """Bad input -> ConfigError naming the option, before any model is built."""
    if opts.size not in SIZE_GROUPS:
        raise ConfigError(f"bench: --size {opts.size!r} is not one of {', '.join(SIZE_GROUPS)}")
    if opts.children < 2:
        raise ConfigError(f"bench: --children must be >= 2 (a best and a worst child), got {opts.children}")
    if opts.dtype not in DTYPES:
        raise ConfigError(f"bench: --dtype {opts.dtype!r} is not one of {', '.join(DTYPES)}")
    if opts.device not in ("cpu", "cuda"):
        raise ConfigError(f"bench: --device must be cpu or cuda, got {opts.device!r}")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench: --device cuda, but torch sees no CUDA device")
    if opts.device == "cpu" and opts.dtype == "fp16":
        raise ConfigError("bench: --dtype fp16 needs --device cuda (use fp32 or bf16 on the CPU)")
    for name in ("batch", "train_batch", "repeats", "loader_samples"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ConfigError(f"bench: --{name.replace('_', '-')} must be >= 1, got {value}")
    if opts.warmup < 0:
        raise ConfigError(f"bench: --warmup must be >= 0, got {opts.warmup}")


def default_configs(size: str) -> tuple[Path, ...]:
    """The experiment configs whose settings a size is measured with."""
    if size == "shapes":
        return (REPO / "config" / "config.yaml",)
    return (REPO / "config" / "config.yaml", REPO / "config" / "sd15.yaml")


def _clip_spm(text: dict, vision: dict, projection_dim: int) -> StepAwarePixelModel:
    """SPO's "clip" pixel model around a random CLIPModel of the given shape (what from_pickscore builds)."""
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
    return StepAwarePixelModel("clip", build_clip_tokenizer(), CLIP_MAX_LENGTH, clip=clip)


def _build_shapes(cfg: Config) -> Backbone:
    """The shipped shapes-tiny base (random init if the repo has none: the same architecture)."""
    if (SHIPPED_SHAPES_BASE / "unet" / "config.json").is_file():
        return load_shapes_tiny(SHIPPED_SHAPES_BASE, cfg.backbone.text_max_length)
    return build_shapes_tiny(cfg.experiment.seed, cfg.backbone.text_max_length)


def build_sd15_architecture() -> Backbone:
    """Random SD1.5: the published U-Net / VAE / CLIP text encoder configs, the offline CLIP tokenizer, DDIM."""
    text_encoder = CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT)).eval().requires_grad_(False)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    vae = AutoencoderKL(**SD15_VAE).eval()
    scheduler = sd_scheduler()
    return Backbone(kind="sd15", vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(),
                    scheduler=scheduler, train_scheduler=DDPMScheduler.from_config(scheduler.config), resolution=512)


@dataclass(frozen=True)
class Size:
    """How to build one size: the backbone, and SPO's pixel model for it (`spm_name` says which)."""

    backbone: Callable[[Config], Backbone]
    spm: Callable[[Backbone, Config], StepAwarePixelModel]
    spm_name: str


SIZES: dict[str, Size] = {
    "shapes": Size(_build_shapes, lambda bb, cfg: StepAwarePixelModel.from_backbone(bb, cfg.train_spm),
                   "small (the shapes world's SPM, train_spm.channels)"),
    "sd15": Size(lambda cfg: build_sd15_architecture(),
                 lambda bb, cfg: _clip_spm(PICKSCORE_TEXT, PICKSCORE_VISION, 1024),
                 "clip: PickScore-shaped CLIP ViT-H/14 (224 px) + SPO time conditioning"),
    "tiny-sd15": Size(lambda cfg: build_tiny_sd15(cfg.experiment.seed),
                      lambda bb, cfg: _clip_spm(tiny_clip_config(hidden_act="gelu").to_dict(), TINY_VISION, 32),
                      "clip: toy-width CLIP + SPO time conditioning"),
}


# --------------------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------------------


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int,
            device: torch.device) -> dict[str, tuple[list[float], list[Any]]]:
    """Call each fn warmup times untimed, then repeats rounds timed, the fns interleaved within a round (so
    load from other processes hits them alike); synchronised on CUDA. name -> (seconds, results)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, tuple[list[float], list[Any]]] = {name: ([], []) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = _now(device)
            result = fn()
            out[name][0].append(_now(device) - start)
            out[name][1].append(result)
    return out


def summarize(seconds: Sequence[float]) -> dict[str, Any]:
    """Median and 10th / 90th percentiles (linear interpolation) of a list of timings, plus the list."""
    s = np.asarray(seconds, dtype=np.float64)
    return {"median": float(np.median(s)), "p10": float(np.percentile(s, 10)), "p90": float(np.percentile(s, 90)),
            "n": int(s.size), "all": [round(float(v), 6) for v in s]}


class RowCounter:
    """Calls of a module and rows (leading dimension of the first input) through it, by a forward pre-hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.rows = 0
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        first = args[0] if args else next(iter(kwargs.values()))
        self.calls += 1
        self.rows += int(first.shape[0])

    def close(self) -> None:
        self._handle.remove()


def counted(fn: Callable[[], Any], counters: dict[str, RowCounter], totals: dict[str, list[int]]) -> Callable[[], Any]:
    """fn, adding the calls and rows each counter saw during it to totals[name] = [calls, rows]."""

    def wrapped() -> Any:
        before = {name: (c.calls, c.rows) for name, c in counters.items()}
        result = fn()
        for name, c in counters.items():
            totals[name][0] += c.calls - before[name][0]
            totals[name][1] += c.rows - before[name][1]
        return result

    return wrapped


def _params(module: Optional[torch.nn.Module]) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision as accelerate applies it (nothing for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating weights to dtype (skipped when they already are: diffusers warns on every cast)."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform's answer."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------


def bench_plan(timesteps: Sequence[int], prev: Sequence[int], spo_t_max: int, num_train_timesteps: int) -> StepPlan:
    """A one-step plan both samplers train: the grid step nearest T/2 with t <= spo_t_max (SPO trains it) and
    t_prev > 0 (SPO's children get their own U-Net pass, the general case of its scorer). Threshold 0: every
    pair is kept, so the tuple bookkeeping is timed too."""
    steps = [(int(t), int(p)) for t, p in zip(timesteps, prev) if t <= spo_t_max and p > 0]
    if not steps:
        raise ConfigError(f"optimize.spo.t_max={spo_t_max}: no step of the grid {list(timesteps)} is trained by SPO")
    t, p = min(steps, key=lambda tp: abs(tp[0] - num_train_timesteps // 2))
    return StepPlan((t,), (p,), (0.0,), (True,))


def ratio(numerator: float, denominator: float) -> Optional[float]:
    return numerator / denominator if denominator > 0 else None


def _prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


# --------------------------------------------------------------------------------------------------------
# 1. One sampling step: LPO vs SPO
# --------------------------------------------------------------------------------------------------------


def bench_sampling(size: str, cfg: Config, opts: BenchOptions, device: torch.device) -> dict[str, Any]:
    """LPO's and SPO's branching step on the same policy, prompts and x_t; times, counts, breakdown."""
    spec, oc = SIZES[size], cfg.optimize
    dtype = WEIGHT_DTYPES[MIXED_PRECISION[opts.dtype]]
    torch.manual_seed(opts.seed)
    bb = spec.backbone(cfg)
    lrm = LatentRewardModel.from_backbone(bb, cfg.lrm)  # a copy, as train_lrm makes (the policy gets LoRA)
    spm = spec.spm(bb, cfg)
    policy = build_policy(bb, oc, dtype)  # LoRA (or full) on bb.unet, frozen weights cast to dtype
    for module in (bb.vae, *bb.text_encoders(), lrm, spm):
        _cast(module, dtype)
    lrm.requires_grad_(False)
    spm.requires_grad_(False)
    bb.to(device)
    lrm.to(device).eval()
    spm.to(device).eval()
    models = {
        "unet_params": _params(bb.unet), "vae_params": _params(bb.vae), "text_encoder_params": _params(bb.text_encoder),
        "lrm": lrm.parameter_counts(), "spm": {"kind": spm.kind, "model": spec.spm_name, "params": _params(spm)},
        "policy": {"mode": policy.mode, **policy.parameter_counts()},
        "latent_shape": [bb.latent_channels, bb.latent_size, bb.latent_size], "resolution": bb.resolution,
        "unet_attention_processors": sorted({type(p).__name__ for p in bb.unet.attn_processors.values()}),
    }
    if spm.kind == "clip":
        vc = spm.clip.config.vision_config
        models["spm"].update(vision={"hidden": vc.hidden_size, "layers": vc.num_hidden_layers,
                                     "patch": vc.patch_size, "image_size": vc.image_size},
                             attn_implementation=spm.clip.config._attn_implementation)

    timesteps, prev = ddim_timesteps(bb.scheduler, oc.ddim_steps)
    plan = bench_plan(timesteps.tolist(), prev.tolist(), oc.spo.t_max, bb.scheduler.config.num_train_timesteps)
    prompts, b, k = _prompts(opts.batch), opts.batch, opts.children
    with torch.no_grad():
        cond = bb.encode_prompts(prompts).to(device)
        uncond = bb.null_embeds(1).to(device)
        null_enc = lrm.encode_text([""]) if lrm.vfe_scale != 1.0 else None
    latent_shape = (bb.latent_channels, bb.latent_size, bb.latent_size)
    x_t = torch.randn((b, *latent_shape), generator=torch.Generator().manual_seed(opts.seed)).to(device)
    generator = torch.Generator().manual_seed(opts.seed)
    lrm_scorer = LrmScorer(lrm, prompts, k, null_enc)  # text encoded once per iteration, as in the loop
    spo_cost = SpoCost()
    spo_scorer = SpoScorer(spm, bb, prompts, uncond, oc.cfg, k, spo_cost)

    # the methods' own selection and scoring timestep (LPO: the parent's t, SPO: the child's); the scorers are
    # built here so that their work is counted per call
    lpo_method = Lpo(oc.lpo, lrm, k)
    spo_method = Spo(oc.spo, spm, bb, uncond, oc.cfg, k)

    def step(scorer: Any, method: Any) -> list:
        with torch.inference_mode(), _autocast(device, dtype):
            _, records = branching_rollout(policy.unet, bb.scheduler, cond, uncond, x_t, plan, oc.cfg, oc.eta, k,
                                           scorer, generator, method)
        return records

    out: dict[str, Any] = {"models": models, "timestep": plan.timesteps[0], "timestep_prev": plan.prev[0]}
    calls = opts.warmup + opts.repeats
    counters = {"unet": RowCounter(bb.unet), "lrm": RowCounter(lrm.visual_proj),
                "vae_decode": RowCounter(bb.vae.decoder), "pixel": RowCounter(spm.image)}
    totals = {m: {name: [0, 0] for name in counters} for m in ("lpo", "spo")}
    fns = {"lpo": counted(lambda: step(lrm_scorer, lpo_method), counters, totals["lpo"]),
           "spo": counted(lambda: step(spo_scorer, spo_method), counters, totals["spo"])}
    try:
        measured = measure(fns, opts.repeats, opts.warmup, device)
    finally:
        for c in counters.values():
            c.close()
    cfg_rows = 1 if oc.cfg == 1.0 else 2  # a CFG evaluation is a cond and an uncond row

    def per_prompt(rows: int, per_eval: int = 1) -> float:
        """Evaluations per prompt and sampling step."""
        return rows / per_eval / calls / b

    for method, (seconds, results) in measured.items():
        n = totals[method]
        records = [r[0] for r in results]
        out[f"{method}_step"] = summarize(seconds)
        out[f"{method}_counts"] = {
            "unet_calls_per_step": n["unet"][0] / calls,
            "unet_cfg_evals_per_prompt": per_prompt(n["unet"][1], cfg_rows),
            "lrm_calls_per_step": n["lrm"][0] / calls,
            "lrm_latents_per_prompt": per_prompt(n["lrm"][1]),
            "vae_decodes_per_prompt": per_prompt(n["vae_decode"][1]),
            "pixel_evals_per_prompt": per_prompt(n["pixel"][1]),
            "pixel_calls_per_step": n["pixel"][0] / calls,
        }
        out[f"{method}_breakdown_mean_s"] = {"trunk_unet": float(np.mean([r.unet_s for r in records])),
                                             "scorer": float(np.mean([r.score_s for r in records]))}
    spo_calls = max(spo_cost.calls, 1)
    out["spo_breakdown_mean_s"].update({f"scorer_{k_}": v / spo_calls for k_, v in spo_cost.seconds.items()})
    del policy, lrm, spm, lrm_scorer, spo_scorer, bb
    _free(device)
    return out


# --------------------------------------------------------------------------------------------------------
# 2. One LRM training step: stored latents vs encoding on the fly
# --------------------------------------------------------------------------------------------------------


def _jpeg(side: int, rng: np.random.Generator) -> bytes:
    """A smooth random RGB image (upsampled 16x16 noise) as JPEG bytes, as Pick-a-Pic stores images."""
    small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((side, side), Image.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bench_lrm_training(size: str, cfg: Config, opts: BenchOptions, device: torch.device) -> dict[str, Any]:
    """train_lrm's step body from posterior latents vs from JPEG bytes through the VAE encoder."""
    spec, c = SIZES[size], cfg.train_lrm
    dtype = DTYPES[opts.dtype]
    torch.manual_seed(opts.seed)
    bb = spec.backbone(cfg)
    lrm = LatentRewardModel.from_backbone(bb, cfg.lrm).to(device)  # float32 master weights
    vae = bb.vae.to(device)
    vae.requires_grad_(False)
    num_train = int(bb.scheduler.config.num_train_timesteps)
    grid, _ = ddim_timesteps(bb.scheduler, c.ddim_steps)
    alphas = bb.scheduler.alphas_cumprod.clone().to(device)
    resolution, latent_shape = bb.resolution, (bb.latent_channels, bb.latent_size, bb.latent_size)
    del bb  # the backbone's U-Net is not needed here; the LRM holds its own copy
    _free(device)

    groups = lrm.trainable_parameters(cfg.lrm.train_text_encoder)
    if c.gradient_checkpointing:
        lrm.unet.enable_gradient_checkpointing()
    scorer = PairScorer(lrm, cache_text=not cfg.lrm.train_text_encoder, cache_size=c.text_cache_size)
    optimizer = torch.optim.AdamW([{"params": groups["backbone"], "lr": c.lr},
                                   {"params": groups["heads"], "lr": c.head_lr}], weight_decay=c.weight_decay)
    params = groups["backbone"] + groups["heads"]
    lrm.train()
    set_frozen_eval(lrm, cfg.lrm.train_text_encoder)  # as train_lrm: a frozen encoder stays in eval mode

    b = opts.train_batch
    rng = np.random.default_rng(opts.seed)
    captions = _prompts(b)
    batch = {"mean": torch.randn((b, 2, *latent_shape)), "std": torch.full((b, 2, *latent_shape), 0.05),
             "labels": torch.tensor([[1.0, 0.0]] * b), "captions": captions,
             "prompt_keys": [prompt_key(p) for p in captions], "keys": [f"bench-{i}" for i in range(b)]}
    jpegs = [_jpeg(resolution, rng) for _ in range(2 * b)]  # image_0 of every pair, then image_1
    candidates = candidate_timesteps(c.timesteps, grid, num_train)
    weights = timestep_weights(candidates, num_train, c.high_t_weight)
    generator = torch.Generator().manual_seed(opts.seed)

    step = LrmStep(scorer, candidates, weights, alphas, device)

    def train_step(mean: torch.Tensor, std: torch.Tensor) -> float:
        """One step of lpo.stages.train_lrm on one process: its step function (LrmStep), the weighted loss,
        backward, clip, AdamW (no gather, no logging)."""
        with _autocast(device, dtype):
            w = per_prompt_weights(batch["prompt_keys"]).to(device)
            out = step({**batch, "mean": mean, "std": std}, generator, w)
            loss = out.loss * local_loss_scale(w, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        optimizer.step()
        return float(loss.detach())

    def from_latents() -> tuple[float, float]:
        return train_step(batch["mean"], batch["std"]), 0.0

    def on_the_fly() -> tuple[float, float]:
        """Returns the loss and the seconds spent decoding and encoding the images."""
        start = _now(device)
        images = []
        for data in jpegs:  # as lpo.data.pickapic decodes a row's images
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                images.append(img.convert("RGB"))
        pixels = torch.from_numpy(np.stack([image_to_array(im, resolution) for im in images]))  # (2B, 3, H, W)
        with _autocast(device, dtype):
            mean, std = encode_posterior(vae, pixels.to(device))  # (2B, C, h, w) each
        mean = torch.stack([mean[:b], mean[b:]], dim=1).float()  # (B, 2, C, h, w)
        std = torch.stack([std[:b], std[b:]], dim=1).float()
        encoded = _now(device)
        return train_step(mean, std), encoded - start

    # AdamW allocates its state in the first step, a one-off cost: allocate it untimed, so that --warmup 0
    # (the SD1.5 run on a CPU) times steady-state steps.
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    measured = measure({"latents": from_latents, "on_the_fly": on_the_fly}, opts.repeats, opts.warmup, device)
    (lat_s, lat_out), (fly_s, fly_out) = measured["latents"], measured["on_the_fly"]
    losses = [r[0] for r in lat_out + fly_out]
    out = {"lrm_train_step_latents": summarize(lat_s), "lrm_train_step_on_the_fly": summarize(fly_s),
           "on_the_fly_decode_encode_mean_s": float(np.mean([r[1] for r in fly_out])),
           "train_pairs": b, "train_text_encoder": cfg.lrm.train_text_encoder,
           "trainable_params": sum(p.numel() for p in params), "image_resolution": resolution,
           "losses_finite": bool(np.isfinite(losses).all())}
    if device.type == "cuda":
        out["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    del lrm, vae, scorer, optimizer, params, groups
    _free(device)
    return out


# --------------------------------------------------------------------------------------------------------
# 3. The shard loader
# --------------------------------------------------------------------------------------------------------


def _loader_samples(n: int, latent_shape: Sequence[int], dtype: np.dtype, seed: int) -> Iterator[dict[str, Any]]:
    """Pairs in the latents stage's sample format (key, four posterior arrays, meta)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        caption = PROMPTS[i % len(PROMPTS)]
        arrays = {name: rng.standard_normal(latent_shape).astype(dtype) for name in ("mean0", "std0", "mean1", "std1")}
        meta = {"caption": caption, "label_0": 1.0, "label_1": 0.0, "split": "train", "prompt_key": prompt_key(caption),
                "aux": None, "ranking_id": i, "source": "bench"}
        yield {"key": f"bench-r{i:06d}", **arrays, "meta": meta}


def bench_loader(latent_shape: Sequence[int], cfg: Config, opts: BenchOptions, n_shards: int = 4) -> dict[str, Any]:
    """Samples per second of PairLoader (one epoch per repeat, shuffled) over freshly written shards."""
    dtype = np.dtype(cfg.latents.dtype)
    n = max(opts.loader_samples, opts.train_batch * n_shards)
    with tempfile.TemporaryDirectory(prefix="lpo-bench-") as tmp:
        index = write_shards(_loader_samples(n, latent_shape, dtype, opts.seed), tmp, "train", n_shards)
        loader = PairLoader(tmp, "train", opts.train_batch, seed=opts.seed, shuffle=True,
                            num_workers=cfg.train_lrm.num_workers)
        per_epoch = loader.batches_per_rank * opts.train_batch
        epoch = iter(range(opts.warmup + opts.repeats))

        def one_epoch() -> int:
            return sum(len(batch["keys"]) for batch in loader.iterate(next(epoch)))

        seconds, counts = measure({"epoch": one_epoch}, opts.repeats, opts.warmup, torch.device("cpu"))["epoch"]
        megabytes = sum(s["bytes"] for s in index["shards"]) / 2**20
    if any(c != per_epoch for c in counts):
        raise RuntimeError(f"bench: the loader gave {counts} samples per epoch, expected {per_epoch}")
    rates = [per_epoch / s for s in seconds]
    return {"loader_epoch": summarize(seconds), "loader_samples_per_s": summarize(rates), "samples": per_epoch,
            "shards": n_shards, "shard_megabytes": megabytes, "dtype": str(dtype), "latent_shape": list(latent_shape),
            "num_workers": cfg.train_lrm.num_workers}


# --------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------


def bench_size(size: str, cfg: Config, opts: BenchOptions, device: torch.device) -> dict[str, Any]:
    """All three measurements for one size, and their ratios."""
    start = time.perf_counter()
    log.info("%s: sampling step, LPO vs SPO (B=%d, K=%d)", size, opts.batch, opts.children)
    sampling = bench_sampling(size, cfg, opts, device)
    log.info("%s: LRM training step, latents vs on the fly (%d pairs)", size, opts.train_batch)
    training = bench_lrm_training(size, cfg, opts, device)
    log.info("%s: shard loader", size)
    loader = bench_loader(sampling["models"]["latent_shape"], cfg, opts)
    train_sps = opts.train_batch / training["lrm_train_step_latents"]["median"]
    loader_sps = loader["loader_samples_per_s"]["median"]
    timings = {"lpo_step": sampling.pop("lpo_step"), "spo_step": sampling.pop("spo_step"),
               "lrm_train_step_latents": training.pop("lrm_train_step_latents"),
               "lrm_train_step_on_the_fly": training.pop("lrm_train_step_on_the_fly"),
               "loader_epoch": loader.pop("loader_epoch")}
    oc = cfg.optimize
    return {
        "settings": {"cfg": oc.cfg, "eta": oc.eta, "ddim_steps": oc.ddim_steps, "vfe_scale": cfg.lrm.vfe_scale,
                     "lora_rank": None if oc.full_finetune else oc.lora.rank, "lrm_timestep_lpo": oc.lpo.lrm_timestep,
                     "timestep": sampling.pop("timestep"), "timestep_prev": sampling.pop("timestep_prev"),
                     "prompts_per_step": opts.batch, "children": opts.children, "train_pairs": opts.train_batch},
        "models": sampling.pop("models"),
        "timings_s": timings,
        "ratios": {
            "spo_over_lpo_step": ratio(timings["spo_step"]["median"], timings["lpo_step"]["median"]),
            "on_the_fly_over_latents_lrm_step": ratio(timings["lrm_train_step_on_the_fly"]["median"],
                                                      timings["lrm_train_step_latents"]["median"]),
            "loader_over_train_samples_per_s": ratio(loader_sps, train_sps),
        },
        "counts_per_step": {"lpo": sampling.pop("lpo_counts"), "spo": sampling.pop("spo_counts")},
        "breakdown_mean_s": {"lpo": sampling.pop("lpo_breakdown_mean_s"), "spo": sampling.pop("spo_breakdown_mean_s")},
        "throughput_samples_per_s": {"loader": loader.pop("loader_samples_per_s"), "train_step_latents": train_sps},
        "lrm_training": training,
        "loader": loader,
        "seconds": time.perf_counter() - start,
    }


def run(opts: BenchOptions, out: Optional[str | Path] = None,
        config_files: Optional[Sequence[str | Path]] = None) -> dict[str, Any]:
    """Measure every size of opts.size; write the JSON to `out` when given. config_files (None = each size's
    default_configs) set CFG, eta, LoRA, the LRM and the shard dtype."""
    check_options(opts)
    device = torch.device(opts.device)
    result: dict[str, Any] = {
        "stage": "bench",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "device": opts.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "dtype": opts.dtype,
        "threads": torch.get_num_threads(),
        "options": dataclasses.asdict(opts),
        "sizes": {},
    }
    for size in SIZE_GROUPS[opts.size]:
        files = tuple(config_files) if config_files else default_configs(size)
        cfg = load_config(*files)
        sized = bench_size(size, cfg, opts.resolved(cfg), device)
        sized["config_files"] = [str(f) for f in files]
        result["sizes"][size] = sized
        log.info("%s: SPO/LPO step %.2fx (%.4f vs %.4f s), on-the-fly/latents LRM step %.2fx, loader/train %.1fx",
                 size, sized["ratios"]["spo_over_lpo_step"], sized["timings_s"]["spo_step"]["median"],
                 sized["timings_s"]["lpo_step"]["median"], sized["ratios"]["on_the_fly_over_latents_lrm_step"],
                 sized["ratios"]["loader_over_train_samples_per_s"])
    # ru_maxrss is KiB on Linux: the process's peak resident memory over the whole run
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if out is not None:
        write_json(out, result)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lpo bench", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", choices=list(SIZE_GROUPS), default="shapes",
                        help="model size: shapes, sd15 (SD1.5 architecture, random weights), both, tiny-sd15 (tests)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the models run")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="weights of the frozen models and autocast (fp16 on cuda only)")
    parser.add_argument("--batch", type=int, default=None,
                        help="prompts per sampling step (default: the config's optimize.prompts_per_iteration)")
    parser.add_argument("--children", type=int, default=4, help="K children per prompt and step")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per item")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per item before the timed ones")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="pairs per LRM training step and loader batch (default: train_lrm.batch_size)")
    parser.add_argument("--loader-samples", type=int, default=512, help="pairs written to the temporary shards")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights, latents and noise")
    parser.add_argument("--config", action="append", default=None, metavar="PATH",
                        help="experiment config(s) for the settings, merged in order (default: config/config.yaml, "
                             "+ config/sd15.yaml for the SD sizes)")
    parser.add_argument("--out", default=None, metavar="JSON", help="also write the JSON here")
    args = parser.parse_args(argv)
    setup_logging()
    opts = BenchOptions(size=args.size, device=args.device, dtype=args.dtype, batch=args.batch,
                        children=args.children, repeats=args.repeats, warmup=args.warmup,
                        train_batch=args.train_batch, loader_samples=args.loader_samples, seed=args.seed)
    try:
        result = run(opts, args.out, args.config)
    except ConfigError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
