"""Typed experiment configuration: frozen dataclasses, a strict loader and the JSON schema.

One YAML file is one experiment (``config/config.yaml`` is the shapes default). It is validated twice:
by ``workflow/schemas/config.schema.yaml`` inside the Snakefile, and here, by the dataclasses every stage
loads. The schema is *generated* from these dataclasses (``python -m lpo.config --write-schema``) and a test
checks that the committed file is in sync, so the two validations cannot drift apart.

Errors name the file and the key path, e.g. ``config/x.yaml: train_lrm.lr: expected a number, got 'fast'``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the key path."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a description (used for the JSON schema and the docs)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _req(help: str) -> Any:
    """A required field (no default)."""
    return field(metadata={"help": help})


# --------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = _req("Experiment name; outputs go to results/<name>/.")
    world: Literal["shapes", "real"] = _f("shapes", "Which world: the embedded shapes world or real SD models.")
    seed: int = _f(0, "Global seed; every stage derives its own generators from it.")


@dataclass(frozen=True)
class BackboneConfig:
    preset: Literal["shapes-tiny", "sd15", "sdxl", "tiny-sd15", "tiny-sdxl"] = _f(
        "shapes-tiny", "Model preset (lpo.backbones.PRESETS). tiny-* are random test models of the real shapes."
    )
    pretrained: Optional[str] = _f(
        None, "sd15/sdxl: hub id or local folder of a diffusers pipeline. Unused for shapes-tiny."
    )
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) for `pretrained`.")
    vae: Optional[str] = _f(None, "Optional separate VAE (hub id or folder), e.g. the SDXL fp16-fix VAE.")
    shapes_base: Literal["shipped", "pretrain"] = _f(
        "shipped", "shapes-tiny: start from the weights shipped in lpo/assets, or rerun pretrain_base."
    )
    text_max_length: int = _f(16, "Tokenizer length for the shapes preset (SD presets use the tokenizer's 77).")


@dataclass(frozen=True)
class WorldConfig:
    resolution: int = _f(32, "Image side in pixels.")
    colours: list[str] = _f(
        ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"],
        "Palette of named colours (names must be known to lpo.world).",
    )
    shapes: list[str] = _f(["circle", "square", "triangle"], "Shapes of the grammar.")
    size_range: list[float] = _f([0.22, 0.36], "Object radius as a fraction of the image side [min, max].")
    rotation_deg: float = _f(20.0, "Maximal absolute rotation jitter of square and triangle, degrees.")
    val_fraction: float = _f(0.1, "Share of prompt triples in the val split.")
    test_fraction: float = _f(0.2, "Share of prompt triples in the test split (held out of pretraining too).")
    split_seed: int = _f(0, "Seed of the triple split (independent of experiment.seed, so splits stay fixed).")
    blur_sigma: list[float] = _f([0.8, 1.6], "Flaw 'blur': Gaussian blur sigma in pixels, drawn per image [min, max].")
    noise_std: list[float] = _f(
        [0.04, 0.1], "Flaw 'noise': std of Gaussian pixel noise (intensities in [0, 1]), drawn per image [min, max]."
    )
    contrast_factor: list[float] = _f(
        [0.35, 0.55], "Flaw 'low_contrast': pixels move to 0.5 + k (x - 0.5), k drawn per image [min, max]."
    )


@dataclass(frozen=True)
class AnnotatorConfig:
    quality_weight: float = _f(0.5, "lambda in r = alignment + lambda * quality.")
    temperature: float = _f(
        0.1, "tau in P(A > B) = sigmoid((r_A - r_B) / tau); one wrong attribute (a reward gap of 1/3) wins 97% at 0.1."
    )
    tie_margin: float = _f(0.05, "delta: |r_A - r_B| < delta is labelled a tie (0.5, 0.5).")


@dataclass(frozen=True)
class SynthesizeConfig:
    n_images: int = _f(20000, "Pretraining corpus size (renders).")
    caption_flaw_rate: float = _f(0.1, "Share of captions with one wrong attribute.")
    blur_rate: float = _f(0.1, "Share of images blurred.")
    noise_rate: float = _f(0.1, "Share of images with pixel noise.")
    low_contrast_rate: float = _f(0.1, "Share of images with low contrast.")


@dataclass(frozen=True)
class PretrainConfig:
    vae_steps: int = _f(1200, "VAE training steps (300 lost a fifth of the shapes in the round trip: README).")
    vae_batch_size: int = _f(64, "VAE batch size.")
    vae_lr: float = _f(2e-3, "VAE learning rate (AdamW).")
    vae_kl_weight: float = _f(1e-6, "KL weight of the VAE loss.")
    unet_steps: int = _f(5000, "U-Net training steps.")
    unet_batch_size: int = _f(32, "U-Net batch size.")
    unet_lr: float = _f(2e-3, "U-Net learning rate (AdamW).")
    prompt_dropout: float = _f(0.1, "Share of empty prompts (for classifier-free guidance).")
    min_snr_gamma: float = _f(5.0, "Min-SNR loss weighting gamma (0 disables).")
    checkpoint_every: int = _f(500, "Checkpoint every N steps (resume after kill).")
    eval_images: int = _f(256, "Samples on held-out prompts for metrics.json.")
    eval_cfg: float = _f(4.0, "CFG scale of the evaluation samples.")
    eval_steps: int = _f(20, "DDIM steps of the evaluation samples.")


@dataclass(frozen=True)
class DownloadConfig:
    source: Literal["shapes", "pickapic"] = _f("shapes", "Where preference pairs come from.")
    dataset: str = _f("shapes", "Dataset name; output folder data/<dataset>/.")
    repo_id: Optional[str] = _f(None, "pickapic: hub dataset id (v1 and v2 vanished from their original ids).")
    revision: Optional[str] = _f(None, "pickapic: hub revision.")
    mirror: Optional[str] = _f(None, "pickapic: local folder of Pick-a-Pic parquet files (takes precedence).")
    splits: list[str] = _f(
        ["train", "validation_unique", "test_unique"],
        "pickapic: splits to fetch (hub names; train, val, test also work for a mirror of our own files).",
    )
    max_pairs: Optional[int] = _f(None, "pickapic: cap on rows per split (None = all).")
    n_train_prompts: int = _f(2500, "shapes: number of train-split prompt draws (one pair each).")
    n_val_prompts: int = _f(300, "shapes: pairs for the val split.")
    n_test_prompts: int = _f(300, "shapes: pairs for the test split.")
    cfg_choices: list[float] = _f([2.0, 4.0, 6.0], "shapes: CFG scales mixed across samples (like Pick-a-Pic's models).")
    steps_choices: list[int] = _f([10, 20], "shapes: DDIM step counts mixed across samples.")
    batch_size: int = _f(200, "shapes: sampling batch size.")


@dataclass(frozen=True)
class MpcfConfig:
    strategy: Literal["none", "1", "2", "3"] = _f("2", "MPCF strategy of docs/method.md section 2 (2 is the paper's).")
    keep_ties: bool = _f(True, "Keep tie pairs (every split; on train they must also pass the MPCF tie rule).")


@dataclass(frozen=True)
class LatentsConfig:
    batch_size: int = _f(64, "VAE encoding batch size in images (two per pair).")
    samples_per_shard: int = _f(500, "Target pairs per shard (the count is rounded up to a multiple of world x workers).")
    world_size: int = _f(1, "Ranks that will read the shards (the shard count is a multiple of world_size x workers).")
    num_workers: int = _f(1, "DataLoader workers per rank.")
    resolution: Optional[int] = _f(
        None, "Resize images to this side before encoding (None = the base model's: U-Net sample_size x VAE factor)."
    )
    dtype: Literal["float16", "float32"] = _f("float16", "Storage dtype of the posterior mean and std in the shards.")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "Where the VAE encodes (auto = cuda when available).")
    mpcf: MpcfConfig = _f(MpcfConfig(), "Multi-preference consistent filtering.")


@dataclass(frozen=True)
class LrmConfig:
    vfe_scale: float = _f(7.5, "VFE guidance scale gs on the pooled mid feature (1 disables VFE).")
    proj_dim: Optional[int] = _f(None, "Projection width (None = the text feature width).")
    logit_scale_init: float = _f(2.6592, "Initial log of the score temperature (CLIP's 2.6592).")
    train_text_encoder: bool = _f(False, "Train the text encoder (the paper does; frozen MiniLM for shapes).")


@dataclass(frozen=True)
class TrainLrmConfig:
    steps: int = _f(2000, "Optimiser steps.")
    batch_size: int = _f(64, "Pairs per step (per process).")
    lr: float = _f(3e-4, "Backbone learning rate.")
    head_lr: float = _f(1e-3, "Learning rate of the projections and logit scale.")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    warmup_steps: int = _f(100, "Linear warmup steps.")
    grad_clip: float = _f(1.0, "Gradient norm clip (0 disables).")
    timesteps: Literal["ddim_grid", "uniform"] = _f(
        "ddim_grid", "Training timestep distribution: the backbone's DDIM grid (official code) or uniform on [0, T)."
    )
    ddim_steps: int = _f(20, "Grid size for timesteps=ddim_grid (and eval_lrm).")
    high_t_weight: float = _f(1.0, "Sampling weight multiplier for the upper half of the timestep range.")
    eval_every: int = _f(200, "Validation (and best-checkpoint selection) every N steps.")
    val_timesteps: int = _f(
        4, "Validation timesteps: this many points of the DDIM grid, evenly spaced, the lowest and highest included."
    )
    select_by: Literal["mean", "lowest_t"] = _f(
        "mean",
        "Best checkpoint by the validation accuracy averaged over val_timesteps, or at the lowest t only (the paper).",
    )
    patience: Optional[int] = _f(
        None, "Stop after this many validations without improvement (None = never; the log says it either way)."
    )
    checkpoint_every: int = _f(200, "Resumable checkpoint every N steps.")
    keep_checkpoints: int = _f(2, "Resumable checkpoints kept (the newest ones).")
    text_cache_size: int = _f(4096, "Frozen text encoder: text encodings cached per caption (least recently used dropped).")
    num_workers: int = _f(0, "DataLoader workers per process reading the shards (0 = in the training process).")
    mixed_precision: Literal["no", "fp16", "bf16"] = _f("no", "accelerate mixed precision.")
    gradient_checkpointing: bool = _f(False, "U-Net gradient checkpointing (real scale).")


@dataclass(frozen=True)
class EvalLrmConfig:
    batch_size: int = _f(128, "Pairs per forward.")
    bootstrap: int = _f(1000, "Bootstrap resamples (over prompts) for the interval of the grid-mean accuracy.")
    chance_margin: float = _f(0.0, "A timestep is above chance when its Wilson 95% lower bound exceeds 0.5 + margin.")


@dataclass(frozen=True)
class CalibrateConfig:
    mode: Literal["sigma", "rollout"] = _f("sigma", "sigma = the paper's linear-in-sigma rule; rollout = measured.")
    th_min: float = _f(0.35, "Threshold at the smallest sigma.")
    th_max: float = _f(0.5, "Threshold at the largest sigma.")
    chance_margin: float = _f(0.0, "Timesteps whose LRM accuracy CI lower bound is <= 0.5 + margin are not trained.")
    gate_on_accuracy: bool = _f(
        True, "Mark timesteps where the LRM is no better than chance untrainable (false: train every step; smoke runs)."
    )
    n_prompts: int = _f(64, "rollout: calibration prompts.")
    precision: float = _f(0.8, "rollout: target agreement of the LRM's best/worst with the judge.")
    min_pairs: int = _f(30, "rollout: fewest kept pairs a timestep's threshold may rest on (fewer: no threshold).")
    ties: Literal["disagree", "exclude"] = _f(
        "disagree",
        "rollout: judge ties (|r_w - r_l| < annotator.tie_margin) count as disagreement, or are left out of the "
        "agreement (they are still counted in the kept share).",
    )
    batch_size: int = _f(256, "rollout: children per U-Net / LRM / VAE batch (all K x prompts of a step, chunked).")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "rollout: where the models run (auto = cuda when available).")


@dataclass(frozen=True)
class SiblingLrmConfig:
    enabled: bool = _f(
        False,
        "Fine-tune the LRM on rollout-judged sibling pairs before LPO (stage sibling_lrm; shapes world only; not "
        "the paper's recipe, README 'LPO'). LPO's calibrate and optimize then use results/<name>/sibling_lrm/model.",
    )
    prompts: int = _f(128, "Train-split prompts of the judged rollouts (cycled when the split is smaller).")
    children: int = _f(8, "K of the rollouts: K (K - 1) / 2 sibling pairs per prompt-step.")
    held_out_every: int = _f(5, "Prompts whose index is a multiple of this are held out (the pairs that pick the checkpoint).")
    steps: int = _f(400, "Optimiser steps.")
    batch_size: int = _f(64, "Pairs per step.")
    lr: float = _f(1e-4, "Learning rate of the U-Net encoder half.")
    head_lr_scale: float = _f(3.0, "Learning rate of the heads = lr x this.")
    eval_every: int = _f(100, "Held-out evaluation (and checkpoint choice) every N steps.")
    labels: Literal["reward", "annotator"] = _f(
        "reward",
        "Order of a train pair: the judge's noiseless reward, or one draw of the simulated annotator (noisy, as the "
        "preference data's labels). Held-out pairs always use the reward.",
    )
    seed: int = _f(11, "Seed of the rollouts, the annotator draws and the pair sampling.")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = _f(8, "LoRA rank (0 is rejected; use full_finetune instead).")
    alpha: Optional[float] = _f(None, "LoRA alpha (None = rank).")
    target_modules: list[str] = _f(["to_q", "to_k", "to_v", "to_out.0"], "Modules that get adapters.")


@dataclass(frozen=True)
class LpoMethodConfig:
    beta: float = _f(500.0, "beta of the step-level DPO loss (docs/method.md section 3 step 4; paper 500).")
    clip_eps: float = _f(0.1, "Ratio clip epsilon of the step-level DPO loss (paper 0.1).")
    lrm_timestep: Literal["parent", "child"] = _f(
        "parent", "Timestep given to the LRM when it scores the children (official code: the parent's)."
    )


@dataclass(frozen=True)
class SpoMethodConfig:
    beta: float = _f(10.0, "beta of SPO's step-level DPO loss (docs/method.md section 5: 10).")
    clip_eps: float = _f(0.1, "Ratio clip epsilon (SPO's 0.1).")
    threshold: float = _f(0.3, "Fixed threshold on the best/worst pair gap.")
    t_max: int = _f(750, "Train only at timesteps <= this (raw t of this backbone's schedule; SPO's 750 on SD).")


@dataclass(frozen=True)
class DpoMethodConfig:
    beta: float = _f(5000.0, "beta of the Diffusion-DPO loss (docs/method.md section 5: 5000).")
    batch_size: int = _f(32, "Pairs per optimiser step (per process).")


@dataclass(frozen=True)
class GrpoMethodConfig:
    clip_eps: float = _f(0.2, "PPO ratio clip epsilon of the group policy-gradient loss (a first guess, untuned).")
    kl_beta: float = _f(0.04, "Weight of the KL to the reference (Flow-GRPO's 0.04; untuned here).")
    logprob: Literal["sum", "mean"] = _f(
        "sum",
        "Reduction of the step log-density over latent elements. 'sum' is the exact Gaussian log-density; its "
        "gradient is about as large as LPO's beta-500 loss on a mean (docs/method.md section 9). 'mean' as "
        "DDPO/Flow-GRPO.",
    )
    std_floor: float = _f(1e-6, "Groups whose reward std is at most this are not kept (all advantages 0).")
    lrm_timestep: Literal["parent", "child"] = _f("parent", "Timestep given to the LRM when it scores the children.")


# Method names, each with its own section under `optimize` (lpo.methods.METHODS keeps the registry of the
# same names; tests/test_methods.py keeps the two in agreement).
METHOD_NAMES = ("lpo", "spo", "dpo", "grpo")


@dataclass(frozen=True)
class OptimizeConfig:
    methods: list[Literal[METHOD_NAMES]] = _f(["lpo", "spo", "dpo"], "Methods the experiment runs.")  # type: ignore[valid-type]
    iterations: int = _f(200, "Rollout iterations (step-level methods) or optimiser steps (dpo).")
    prompts_per_iteration: int = _f(16, "Prompts sampled per rollout iteration (per process).")
    num_children: int = _f(4, "K children per step (>= 2).")
    ddim_steps: int = _f(20, "Sampling steps.")
    eta: float = _f(1.0, "DDIM eta of the branching sampler, in (0, 1] (children differ only by the step noise).")
    cfg: float = _f(4.0, "CFG scale of sampling and of the trained policy.")
    lr: float = _f(3e-4, "Learning rate (AdamW).")
    weight_decay: float = _f(1e-4, "AdamW weight decay.")
    grad_clip: float = _f(1.0, "Gradient norm clip (0 disables).")
    train_batch_size: int = _f(32, "Tuples per optimiser step (one pass over each rollout's shared tuples).")
    full_finetune: bool = _f(
        False, "Train all U-Net weights instead of LoRA (the reference is then a frozen copy: one more U-Net in memory)."
    )
    lora: LoraConfig = _f(LoraConfig(), "LoRA through peft.")
    t_min: int = _f(0, "Step-level methods: train only at (parent) timesteps >= t_min.")
    t_max: int = _f(1000, "Step-level methods: train only at (parent) timesteps <= t_max.")
    checkpoint_every: int = _f(50, "Resumable checkpoint every N iterations (and at the end).")
    mixed_precision: Literal["no", "fp16", "bf16"] = _f("no", "accelerate mixed precision.")
    gradient_checkpointing: bool = _f(False, "U-Net gradient checkpointing.")
    lpo: LpoMethodConfig = _f(LpoMethodConfig(), "LPO (lpo.methods.lpo).")
    spo: SpoMethodConfig = _f(SpoMethodConfig(), "SPO (lpo.methods.spo).")
    dpo: DpoMethodConfig = _f(DpoMethodConfig(), "Diffusion-DPO (lpo.methods.dpo).")
    grpo: GrpoMethodConfig = _f(GrpoMethodConfig(), "Step-level GRPO with the LRM (lpo.methods.grpo).")


# Flat keys of earlier versions -> their places now: an old config gets an error that names the new key, and
# `python -m lpo.config --migrate OLD.yaml` rewrites it.
MOVED_KEYS: dict[str, tuple[str, ...]] = {
    "optimize.beta": ("optimize.lpo.beta",),
    "optimize.clip_eps": ("optimize.lpo.clip_eps", "optimize.spo.clip_eps"),
    "optimize.lrm_timestep": ("optimize.lpo.lrm_timestep",),
    "optimize.spo_beta": ("optimize.spo.beta",),
    "optimize.spo_threshold": ("optimize.spo.threshold",),
    "optimize.spo_t_max": ("optimize.spo.t_max",),
    "optimize.dpo_beta": ("optimize.dpo.beta",),
    "optimize.dpo_batch_size": ("optimize.dpo.batch_size",),
}


def migrate(data: dict) -> dict:
    """A copy of a config mapping with the MOVED_KEYS of earlier versions moved to their places now."""
    out = json.loads(json.dumps(data))
    for old, news in MOVED_KEYS.items():
        section, key = old.split(".")
        if key not in out.get(section, {}):
            continue
        value = out[section].pop(key)
        for new in news:
            node = out
            *parents, leaf = new.split(".")
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = value
    return out


@dataclass(frozen=True)
class TrainSpmConfig:
    steps: int = _f(1000, "Optimiser steps of SPO's step-aware pixel reward model.")
    batch_size: int = _f(32, "Pairs per step.")
    lr: float = _f(1e-3, "Learning rate.")
    weight_decay: float = _f(0.3, "AdamW weight decay.")
    cfg: float = _f(4.0, "CFG of the one base-model step that gives x0-hat.")
    t_max: int = _f(1000, "Train on t ~ U{0..t_max-1}.")
    grad_clip: float = _f(1.0, "Gradient norm clip (0 disables).")
    eval_every: int = _f(200, "Validation (and best-model selection) every N steps, and at the last step.")
    eval_timesteps: list[int] = _f(
        [0, 251, 501, 701, 951],
        "Timesteps of the validation accuracy (SPO's SPM evaluation set); the best model has the highest mean.",
    )
    checkpoint_every: int = _f(200, "Resumable checkpoint every N steps.")
    channels: list[int] = _f(
        [32, 64, 128], "shapes (small SPM): conv widths, one time-modulated residual block each, 2x down between."
    )
    proj_dim: Optional[int] = _f(None, "shapes: width of the image/text projections (None = the text width, 384).")
    logit_scale_init: float = _f(2.6592, "shapes: initial log score temperature (CLIP's, as the LRM).")
    pickscore: Optional[str] = _f(
        None,
        "Real worlds: local folder of the PickScore-style CLIPModel the SPM starts from (e.g. a download of "
        "yuvalkirstain/PickScore_v1); required there, null for shapes.",
    )
    clip_steps: int = _f(
        0,
        "shapes: CLIP-style contrastive pretraining steps of the small SPM on the pretraining corpus (--world "
        "corpus.npz) before preference training, a stand-in for PickScore's CLIP start; 0 = from scratch.",
    )
    clip_batch_size: int = _f(256, "shapes: images per contrastive pretraining step.")
    clip_lr: float = _f(1e-3, "shapes: learning rate of the contrastive pretraining (AdamW).")


@dataclass(frozen=True)
class EvaluateConfig:
    n_prompts: Optional[int] = _f(None, "Test-split prompts (None = all).")
    images_per_prompt: int = _f(8, "Images per prompt, the same seeds for every model.")
    ddim_steps: int = _f(20, "Sampling steps.")
    cfg: float = _f(4.0, "CFG scale.")
    batch_size: int = _f(256, "Sampling batch size.")
    bootstrap: int = _f(1000, "Bootstrap resamples over prompts for the 95% intervals.")
    grid_prompts: int = _f(8, "Rows of the report's image grid (the first prompts of the evaluation).")
    samples_prompts: Optional[int] = _f(
        None, "Prompts whose images samples.npz keeps (None = all; a 512 px image takes 0.8 MB, so cap it for SD)."
    )
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "Where sampling and scoring run (auto = cuda when available).")
    scorers: dict[str, str] = _f(
        {},
        "Image scorers (lpo.metrics.scorers.SCORERS): name -> local weights folder; pickscore, clip_score and "
        "aesthetic are implemented, hpsv2, hpsv2.1 and imagereward need packages not installed here.",
    )
    primary_metric: Optional[str] = _f(
        None, "Metric of the report's quality-per-compute table (None = exact match in shapes, else the first scorer)."
    )


@dataclass(frozen=True)
class ResourcesConfig:
    gpus: dict[str, int] = _f({}, "GPUs per rule (rule name -> count); rules not listed get 0.")
    mem_mb: dict[str, int] = _f({}, "Memory per rule in MB.")
    runtime: dict[str, int] = _f({}, "Runtime per rule in minutes (SLURM).")


@dataclass(frozen=True)
class Config:
    """One experiment. Sections map one-to-one to pipeline stages."""

    experiment: ExperimentConfig = _req("Name, world and seed.")
    backbone: BackboneConfig = _f(BackboneConfig(), "Base model preset.")
    world: WorldConfig = _f(WorldConfig(), "The shapes world (ignored by real worlds).")
    annotator: AnnotatorConfig = _f(AnnotatorConfig(), "The shapes world's simulated annotator.")
    synthesize: SynthesizeConfig = _f(SynthesizeConfig(), "Pretraining corpus of the shapes base model.")
    pretrain: PretrainConfig = _f(PretrainConfig(), "pretrain_base (shapes only).")
    download: DownloadConfig = _f(DownloadConfig(), "Preference pairs.")
    latents: LatentsConfig = _f(LatentsConfig(), "precompute_latents.")
    lrm: LrmConfig = _f(LrmConfig(), "The latent reward model.")
    train_lrm: TrainLrmConfig = _f(TrainLrmConfig(), "train_lrm.")
    eval_lrm: EvalLrmConfig = _f(EvalLrmConfig(), "eval_lrm.")
    sibling_lrm: SiblingLrmConfig = _f(SiblingLrmConfig(), "Optional: the LRM fine-tuned on sibling pairs for LPO.")
    calibrate: CalibrateConfig = _f(CalibrateConfig(), "Timestep-threshold calibration.")
    optimize: OptimizeConfig = _f(OptimizeConfig(), "LPO, SPO and Diffusion-DPO.")
    train_spm: TrainSpmConfig = _f(TrainSpmConfig(), "SPO's step-aware pixel reward model.")
    evaluate: EvaluateConfig = _f(EvaluateConfig(), "Evaluation.")
    resources: ResourcesConfig = _f(ResourcesConfig(), "Scheduler resources per rule.")


# --------------------------------------------------------------------------------------------------------
# Strict conversion dict -> dataclass
# --------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _convert(tp: Any, value: Any, path: str, source: str) -> Any:
    where = f"{source}: {path}" if path else source
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, path, source)
    if origin is Literal:
        allowed = typing.get_args(tp)
        # YAML reads `2` as an int; Literal options are strings ("1", "2", ...).
        if value not in allowed and str(value) in allowed and not isinstance(value, bool):
            value = str(value)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, f"{path}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a bug in this module, not in the config


def _build(cls: type, data: dict, path: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        if key in MOVED_KEYS:
            raise ConfigError(f"{source}: {key}: this key moved to {' and '.join(MOVED_KEYS[key])} "
                              "(python -m lpo.config --migrate FILE rewrites an old config)")
        raise ConfigError(f"{source}: {key}: unknown key (allowed here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], sub, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise ConfigError(f"{source}: {sub}: required key is missing")
    return cls(**kwargs)


def check_minimums(section: str, values: Any, minimums: dict[str, float]) -> None:
    """A ConfigError naming `section.key` for the first field of `values` below its minimum."""
    for key, low in minimums.items():
        value = getattr(values, key)
        if value < low:
            raise ConfigError(f"{section}.{key}: must be >= {low}, got {value}")


def deep_merge(base: dict, override: dict) -> dict:
    """Merge `override` into a copy of `base`, recursively for mappings (as Snakemake's --configfile does)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def from_dict(data: dict, source: str = "<config>") -> Config:
    """Validate a config mapping into a :class:`Config`; errors name `source` and the key path."""
    return _build(Config, data, "", source)


def load_config(*paths: str | Path) -> Config:
    """Load one or more YAML files, later ones deep-merged over earlier ones (Snakemake's order)."""
    if not paths:
        raise ConfigError("no config file given")
    merged: dict = {}
    for p in paths:
        merged = deep_merge(merged, read_yaml(p))
    return from_dict(merged, " + ".join(str(p) for p in paths))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def replace(cfg: Any, **changes: Any) -> Any:
    """`dataclasses.replace` for nested configs: replace(cfg, train_lrm={"steps": 5})."""
    kwargs = {}
    for key, value in changes.items():
        current = getattr(cfg, key)
        kwargs[key] = replace(current, **value) if isinstance(value, dict) and dataclasses.is_dataclass(current) else value
    return dataclasses.replace(cfg, **kwargs)


# --------------------------------------------------------------------------------------------------------
# JSON schema, generated from the dataclasses
# --------------------------------------------------------------------------------------------------------


def _schema_for(tp: Any) -> dict:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        sub = _schema_for(inner[0])
        if "type" in sub:
            types_ = sub["type"] if isinstance(sub["type"], list) else [sub["type"]]
            sub["type"] = types_ + ["null"]
        if "enum" in sub:
            sub["enum"] = list(sub["enum"]) + [None]
        return sub
    if dataclasses.is_dataclass(tp):
        return _schema_for_dataclass(tp)
    if origin is Literal:
        args = list(typing.get_args(tp))
        return {"enum": args}
    if origin is list:
        (item,) = typing.get_args(tp)
        return {"type": "array", "items": _schema_for(item)}
    if origin is dict:
        _, item = typing.get_args(tp)
        return {"type": "object", "additionalProperties": _schema_for(item)}
    return {bool: {"type": "boolean"}, int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"}}[tp]


def _schema_for_dataclass(cls: type) -> dict:
    hints = typing.get_type_hints(cls)
    props, required = {}, []
    for f in dataclasses.fields(cls):
        sub = _schema_for(hints[f.name])
        sub["description"] = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING:
            if not dataclasses.is_dataclass(f.default):
                sub["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            sub["default"] = f.default_factory()  # type: ignore[misc]
        else:
            required.append(f.name)
        if dataclasses.is_dataclass(hints[f.name]) and "default" not in sub and f.name not in required:
            sub["default"] = {}  # lets Snakemake's validate() fill the nested defaults
        props[f.name] = sub
    out: dict = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    return out


def json_schema() -> dict:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "description": "lpo experiment config"}
    schema.update(_schema_for_dataclass(Config))
    return schema


def schema_yaml() -> str:
    header = "# GENERATED by `python -m lpo.config --write-schema` from lpo/config.py; do not edit by hand.\n"
    return header + yaml.safe_dump(json_schema(), sort_keys=False, width=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lpo.config", description=__doc__.splitlines()[0])
    parser.add_argument("--write-schema", action="store_true", help="rewrite workflow/schemas/config.schema.yaml")
    parser.add_argument("--check", nargs="*", default=[], metavar="YAML", help="validate config files (merged)")
    parser.add_argument("--migrate", metavar="YAML", help="print the file with the keys of earlier versions moved")
    args = parser.parse_args(argv)
    if args.migrate:
        try:
            print(yaml.safe_dump(migrate(read_yaml(args.migrate)), sort_keys=False), end="")
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            return 2
    if args.write_schema:
        SCHEMA_PATH.write_text(schema_yaml())
        print(f"wrote {SCHEMA_PATH}")
    if args.check:
        try:
            cfg = load_config(*args.check)
        except ConfigError as err:
            print(f"config error: {err}", file=sys.stderr)
            return 2
        print(json.dumps(to_dict(cfg), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
