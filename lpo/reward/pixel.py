"""SPO's step-aware pixel reward model (SPM): a time-conditioned image-text scorer of decoded x0-hat images.

docs/method.md section 5 ("SPO", SPM) is the specification; RockeyCoss/SPO
step_aware_preference_model/trainer/models/time_conditioned_clip.py the reference. Training (train_spm) and
use (the SPO sampler) show the model the DECODED one-step prediction x0-hat of the base model at timestep t,
a blurry image at high noise, together with t, so it can learn how much to trust what it sees:

    c   = MLP(sinusoid(t))                               timestep embedding (DiT's TimestepEmbedder)
    h   = block(norm(h) * (1 + scale(c)) + shift(c)) * gate(c) + h     adaLN in every block, modulation
          Linear zero-initialised with gate bias 1 (SPO's init): at init t has no effect at all
    V   = head(pooled * (1 + scale(c)) + shift(c))        a last adaLN on the pooled feature (SPO)
    S   = exp(logit_scale) <V/||V||, T/||T||>             as the LRM (lpo.reward.lrm.noise_aware_score)

Two kinds (``KINDS``), picked from the backbone kind by ``StepAwarePixelModel.from_backbone``:

- ``small`` (the shapes world): a small convolutional net over the decoded 32x32 RGB image (stride-2 stem,
  one adaLN residual block per width of train_spm.channels, 2x downsampling between widths, global average
  pool); the shapes world has no PickScore to start from, so it starts from scratch or, with
  train_spm.clip_steps > 0, from a CLIP-style pretraining on the corpus (``clip_contrastive_loss``); text =
  the frozen MiniLM of the backbone, mask-mean-pooled (384-d), through a learned projection.
- ``clip`` (real worlds): a PickScore-shaped transformers ``CLIPModel`` (initialised from a local PickScore
  folder, train_spm.pickscore) with adaLN in every vision encoder layer and on the pooled output; images
  resized to the vision tower's size and CLIP-normalised; text = CLIP's own text tower and projection.

Images go in as (B, 3, H, W) in [-1, 1] (the VAE's output range). ``save_pretrained`` writes one folder
(``spm_config.json``, ``model.safetensors``, ``tokenizer/``); ``from_pretrained`` reads it back exactly.
``pixel_accuracy_by_t`` is the SPM's held-out pair accuracy by timestep with the training noise protocol
(the eval_lrm comparison).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel, CLIPConfig, CLIPModel

from lpo.calibration import accuracy_ci
from lpo.config import ConfigError, TrainSpmConfig
from lpo.diffusion import cfg_noise_pred, ddim_step_split
from lpo.reward.lrm import masked_mean, noise_aware_score
from lpo.reward.pairs import chunked_batches, pair_correct
from lpo.utils import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

KINDS = ("small", "clip")
CONFIG_NAME = "spm_config.json"
WEIGHTS_NAME = "model.safetensors"
INFO_NAME = "train_spm.json"
FORMAT_VERSION = 1
FREQ_DIM = 256  # sinusoid width of the timestep embedding (DiT / SPO)
SMALL_TIME_DIM = 128  # width of the small net's timestep embedding
# OpenAI CLIP pixel statistics; PickScore's processor (laion CLIP-ViT-H-14) uses the same values.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EVAL_STREAM = 0x5B3  # seeds the per-pair evaluation noise (pixel_accuracy_by_t)

Text = Union[Sequence[str], "SpmText"]


class SpmError(ConfigError):
    """An SPM that cannot be built or loaded as configured; the message names the folder or config key."""


# --------------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer (or fractional) timesteps, (B,) -> (B, dim) (DiT / GLIDE)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (1 + scale) + shift, with (B, C) shift/scale broadcast over x's trailing dimensions.

    Tokens (B, N, C): over N. Feature maps (B, C, H, W): over H, W. Vectors (B, C): as they are.
    """
    if x.ndim == 3:
        return x * (1 + scale[:, None, :]) + shift[:, None, :]  # (B, N, C)
    if x.ndim == 4:
        return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]  # (B, C, H, W)
    return x * (1 + scale) + shift


def to_clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """[-1, 1] images (B, 3, H, W) -> CLIP input: [0, 1], bicubic resize to size x size, clamp, normalise
    (RockeyCoss/SPO spm_task.py: the same steps, in that order)."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, caption_ids: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (Radford et al. 2021), the pretraining behind PickScore (docs/method.md section 5):
    logits = exp(logit_scale) cos(V_i, T_j); cross-entropy image -> text and text -> image. Images that share
    a caption are all positives (soft targets, uniform over them), since a batch of a small world repeats
    captions. image_features, text_features: (B, D); caption_ids: (B,) equal for equal captions."""
    v = F.normalize(image_features.float(), dim=-1)
    t = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.float().exp() * v @ t.T  # (B, B)
    same = (caption_ids[:, None] == caption_ids[None, :]).float()  # (B, B), symmetric
    targets = same / same.sum(dim=1, keepdim=True)
    image_to_text = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


class _AdaLN(nn.Module):
    """SiLU -> Linear(cond_dim, n * width), split into n chunks of (B, width).

    SPO's initialisation: weight 0, bias 0 except the gate chunks (bias 1), so every modulated block computes
    exactly what it did without time conditioning, for every t, until training moves the weights.
    """

    def __init__(self, cond_dim: int, width: int, n: int, gates: Sequence[int] = ()) -> None:
        super().__init__()
        self.n, self.width = n, width
        self.linear = nn.Linear(cond_dim, n * width)
        nn.init.zeros_(self.linear.weight)
        bias = torch.zeros(n * width)
        for g in gates:
            bias[g * width:(g + 1) * width] = 1.0
        with torch.no_grad():
            self.linear.bias.copy_(bias)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(c)).chunk(self.n, dim=1)  # n x (B, width)


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, dim): sinusoid(FREQ_DIM) -> Linear -> SiLU -> Linear, weights N(0, 0.02) (DiT / SPO)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t).to(self.mlp[0].weight.dtype))


# --------------------------------------------------------------------------------------------------------
# Image towers
# --------------------------------------------------------------------------------------------------------


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 when they divide the channels, else the largest divisor <= 8."""
    return max(g for g in range(1, 9) if channels % g == 0)


class _AdaResBlock(nn.Module):
    """A residual block whose two norms are time-modulated and whose residual branch is time-gated."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.mod_in = _AdaLN(cond_dim, c_in, 2)  # shift, scale of norm1
        self.mod_out = _AdaLN(cond_dim, c_out, 3, gates=(2,))  # shift, scale of norm2, gate

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1 = self.mod_in(c)
        shift2, scale2, gate = self.mod_out(c)
        h = self.conv1(F.silu(modulate(self.norm1(x), shift1, scale1)))
        h = self.conv2(F.silu(modulate(self.norm2(h), shift2, scale2)))
        return self.skip(x) + gate[:, :, None, None] * h  # (B, c_out, H, W)


class SmallImageTower(nn.Module):
    """The shapes world's image model: a stride-2 stem conv, one adaLN res block per width (2x down between),
    pooled feature with a final adaLN, projection to proj_dim. Resolution-agnostic (global average pool)."""

    def __init__(self, channels: Sequence[int], proj_dim: int) -> None:
        super().__init__()
        if not channels or any(c < 1 for c in channels):
            raise SpmError(f"train_spm.channels: expected a non-empty list of positive widths, got {list(channels)}")
        self.t_embedder = TimestepEmbedder(SMALL_TIME_DIM)
        # Stride 2: a 32 px decoded image is read at 16 x 16 (the shapes are large), 4x cheaper per image.
        self.stem = nn.Conv2d(3, channels[0], 3, stride=2, padding=1)
        self.blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        c_in = channels[0]
        for i, c in enumerate(channels):
            self.blocks.append(_AdaResBlock(c_in, c, SMALL_TIME_DIM))
            last = i == len(channels) - 1
            self.downs.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
            c_in = c
        self.norm_out = nn.LayerNorm(c_in, elementwise_affine=False)
        self.mod_out = _AdaLN(SMALL_TIME_DIM, c_in, 2)  # shift, scale of the pooled feature
        self.proj = nn.Linear(c_in, proj_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)

    def time_parameters(self) -> list[nn.Parameter]:
        """The time conditioning: embedder MLP and every adaLN linear."""
        mods = [m for m in self.modules() if isinstance(m, _AdaLN)]
        return list(self.t_embedder.parameters()) + [p for m in mods for p in m.parameters()]

    def forward(self, images: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = self.t_embedder(t)  # (B, SMALL_TIME_DIM)
        h = self.stem(images.to(self.stem.weight.dtype))  # (B, C0, H, W)
        for block, down in zip(self.blocks, self.downs):
            h = down(block(h, c))
        pooled = h.mean(dim=(2, 3))  # (B, C_last)
        shift, scale = self.mod_out(c)
        return self.proj(modulate(self.norm_out(pooled), shift, scale))  # (B, proj_dim)


class ClipImageTower(nn.Module):
    """A CLIPModel's vision tower with SPO's time conditioning (RockeyCoss/SPO time_conditioned_clip.py):
    per encoder layer 6 modulation chunks (shift, scale, gate before attention and before the MLP) and a
    shift/scale on the pooled, post-layernorm CLS feature; then CLIP's visual projection."""

    def __init__(self, clip: CLIPModel) -> None:
        super().__init__()
        self.clip = clip
        hidden = clip.config.vision_config.hidden_size
        self.image_size = int(clip.config.vision_config.image_size)
        self.t_embedder = TimestepEmbedder(hidden)
        layers = clip.vision_model.encoder.layers
        self.layer_mods = nn.ModuleList([_AdaLN(hidden, hidden, 6, gates=(2, 5)) for _ in layers])
        self.pool_mod = _AdaLN(hidden, hidden, 2)

    def time_parameters(self) -> list[nn.Parameter]:
        return [*self.t_embedder.parameters(), *self.layer_mods.parameters(), *self.pool_mod.parameters()]

    def forward(self, images: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        vm = self.clip.vision_model
        x = to_clip_pixels(images, self.image_size).to(vm.embeddings.patch_embedding.weight.dtype)
        c = self.t_embedder(t)  # (B, hidden)
        h = vm.pre_layrnorm(vm.embeddings(x))  # (B, 1 + patches, hidden)
        for layer, mod in zip(vm.encoder.layers, self.layer_mods):
            shift1, scale1, gate1, shift2, scale2, gate2 = mod(c)
            attn, _ = layer.self_attn(hidden_states=modulate(layer.layer_norm1(h), shift1, scale1), attention_mask=None)
            h = h + gate1[:, None, :] * attn
            h = h + gate2[:, None, :] * layer.mlp(modulate(layer.layer_norm2(h), shift2, scale2))
        pooled = vm.post_layernorm(h[:, 0])  # (B, hidden): the CLS token
        shift, scale = self.pool_mod(c)
        return self.clip.visual_projection(modulate(pooled, shift, scale))  # (B, projection_dim)


# --------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SpmText:
    """Text features of a batch of prompts before the trainable text head: (B, F). Cache it (encode once per
    prompt, ``repeat_interleave`` for K children) whenever the text tower takes no gradient."""

    features: torch.Tensor

    def __len__(self) -> int:
        return self.features.shape[0]

    def repeat_interleave(self, k: int) -> "SpmText":
        return SpmText(self.features.repeat_interleave(k, dim=0))  # (B*k, F)

    def index(self, idx: Union[torch.Tensor, slice, list[int]]) -> "SpmText":
        return SpmText(self.features[idx])

    def to(self, device: Union[str, torch.device]) -> "SpmText":
        return SpmText(self.features.to(device))


# --------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------


class StepAwarePixelModel(nn.Module):
    """S(p, x0-hat, t) of SPO (module docstring). Build with ``from_backbone`` (or the constructors below).

    kind "small": ``image`` = SmallImageTower, ``text_encoder`` = a frozen BertModel (MiniLM) with its
    tokenizer, ``text_proj`` = Linear(text width -> proj_dim), own ``logit_scale``.
    kind "clip": ``image`` = ClipImageTower over ``clip``; text = clip.text_model + clip.text_projection;
    logit scale = clip.logit_scale (PickScore's, learned on).
    """

    def __init__(
        self,
        kind: str,
        tokenizer: Any,
        text_max_length: int,
        *,
        channels: Sequence[int] = (32, 64, 128),
        proj_dim: Optional[int] = None,
        logit_scale_init: float = 2.6592,
        text_encoder: Optional[BertModel] = None,
        clip: Optional[CLIPModel] = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise SpmError(f"SPM kind {kind!r} is not one of {', '.join(KINDS)}")
        self.kind = kind
        self.tokenizer = tokenizer
        self.text_max_length = int(text_max_length)
        self.channels = [int(c) for c in channels]
        self.logit_scale_init = float(logit_scale_init)
        if kind == "small":
            if not isinstance(text_encoder, BertModel) or clip is not None:
                raise SpmError(f"SPM kind 'small' needs a BertModel text encoder and no CLIP, got "
                               f"{type(text_encoder).__name__} / {type(clip).__name__}")
            width = int(text_encoder.config.hidden_size)
            self.proj_dim = int(proj_dim) if proj_dim is not None else width
            self.text_encoder = text_encoder
            self.text_encoder.requires_grad_(False)  # frozen, as the backbone's (and the LRM's for shapes)
            self.text_proj = nn.Linear(width, self.proj_dim, bias=False)
            nn.init.normal_(self.text_proj.weight, std=0.02)
            self.logit_scale = nn.Parameter(torch.tensor(self.logit_scale_init))
            self.image = SmallImageTower(self.channels, self.proj_dim)
        else:
            if not isinstance(clip, CLIPModel) or text_encoder is not None:
                raise SpmError(f"SPM kind 'clip' needs a CLIPModel and no separate text encoder, got "
                               f"{type(clip).__name__} / {type(text_encoder).__name__}")
            if proj_dim is not None and proj_dim != clip.config.projection_dim:
                raise SpmError(f"train_spm.proj_dim {proj_dim}: a CLIP SPM keeps the CLIP projection "
                               f"({clip.config.projection_dim}-d); set it to null")
            self.proj_dim = int(clip.config.projection_dim)
            self.image = ClipImageTower(clip)
            limit = int(clip.config.text_config.max_position_embeddings)
            if not 0 < self.text_max_length <= limit:
                raise SpmError(f"SPM text_max_length {self.text_max_length} not in 1..{limit} (CLIP positions)")

    # ---- construction ------------------------------------------------------------------------------------

    @property
    def clip(self) -> Optional[CLIPModel]:
        return self.image.clip if self.kind == "clip" else None

    @classmethod
    def from_backbone(cls, backbone: Any, cfg: TrainSpmConfig) -> "StepAwarePixelModel":
        """The SPM for a backbone: kind "small" for the shapes world (text encoder deep-copied from the
        backbone), "clip" otherwise (from the local PickScore folder ``cfg.pickscore``, required).
        Random parts are initialised from torch's global generator: seed it first."""
        if backbone.kind == "shapes":
            if cfg.pickscore is not None:
                raise SpmError("train_spm.pickscore: the shapes world uses the small SPM; set it to null")
            return cls("small", copy.deepcopy(backbone.tokenizer), int(backbone.tokenizer.model_max_length),
                       channels=cfg.channels, proj_dim=cfg.proj_dim, logit_scale_init=cfg.logit_scale_init,
                       text_encoder=copy.deepcopy(backbone.text_encoder))
        if not cfg.pickscore:
            raise SpmError(f"train_spm.pickscore: required for backbone kind {backbone.kind!r} (a local folder "
                           "with a PickScore-style CLIPModel, e.g. a download of yuvalkirstain/PickScore_v1)")
        return cls.from_pickscore(cfg.pickscore, proj_dim=cfg.proj_dim)

    @classmethod
    def from_pickscore(cls, folder: Union[str, Path], proj_dim: Optional[int] = None) -> "StepAwarePixelModel":
        """A "clip" SPM initialised from a local CLIPModel folder (PickScore_v1 or any CLIPModel). Its
        tokenizer comes from the folder when it has one, else the offline OpenAI CLIP BPE tokenizer
        (PickScore_v1 ships none; its processor, laion CLIP-ViT-H-14, uses that vocabulary)."""
        folder = Path(folder).expanduser()
        if not (folder / "config.json").is_file():
            raise SpmError(f"train_spm.pickscore: {folder} is not a transformers model folder (no config.json)")
        try:
            clip = CLIPModel.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise SpmError(f"train_spm.pickscore: cannot load a CLIPModel from {folder}: {err}") from None
        tokenizer = _clip_tokenizer(folder)
        max_len = min(int(clip.config.text_config.max_position_embeddings), 77)
        return cls("clip", tokenizer, max_len, proj_dim=proj_dim, clip=clip)

    def config_dict(self) -> dict[str, Any]:
        """What ``from_pretrained`` needs to rebuild the modules before loading the weights."""
        conf: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "text_max_length": self.text_max_length,
            "proj_dim": self.proj_dim,
            "channels": self.channels,
            "logit_scale_init": self.logit_scale_init,
        }
        if self.kind == "small":
            conf["text_encoder_config"] = self.text_encoder.config.to_dict()
        else:
            conf["clip_config"] = self.clip.config.to_dict()
        return conf

    def save_pretrained(self, path: Union[str, Path], info: Optional[dict[str, Any]] = None) -> None:
        """One folder, written atomically: spm_config.json, model.safetensors (every weight), tokenizer/, and
        `info` (provenance, e.g. the training config) as train_spm.json."""
        with atomic_dir(path) as tmp:
            write_json(tmp / CONFIG_NAME, self.config_dict())
            if info is not None:
                write_json(tmp / INFO_NAME, info)
            save_model(self, str(tmp / WEIGHTS_NAME))
            self.tokenizer.save_pretrained(tmp / "tokenizer")

    @classmethod
    def from_pretrained(cls, path: Union[str, Path]) -> "StepAwarePixelModel":
        """Load a folder written by ``save_pretrained`` (CPU, float32); strict: every weight must match."""
        path = Path(path)
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise SpmError(f"{path}: not an SPM folder (no {CONFIG_NAME}; run the train_spm rule first)")
        conf = read_json(config_file)
        if conf.get("format_version") != FORMAT_VERSION:
            raise SpmError(f"{config_file}: format_version {conf.get('format_version')!r}, this code reads "
                           f"{FORMAT_VERSION}")
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        kind = conf.get("kind")
        if kind == "small":
            spm = cls("small", tokenizer, conf["text_max_length"], channels=conf["channels"],
                      proj_dim=conf["proj_dim"], logit_scale_init=conf["logit_scale_init"],
                      text_encoder=BertModel(BertConfig.from_dict(conf["text_encoder_config"])))
        elif kind == "clip":
            spm = cls("clip", tokenizer, conf["text_max_length"], proj_dim=conf["proj_dim"],
                      clip=CLIPModel(CLIPConfig.from_dict(conf["clip_config"])))
        else:
            raise SpmError(f"{config_file}: kind {kind!r} is not one of {', '.join(KINDS)}")
        missing, unexpected = load_model(spm, str(path / WEIGHTS_NAME), strict=False)
        if missing or unexpected:
            raise SpmError(f"{path / WEIGHTS_NAME}: weights do not match {config_file.name}: missing "
                           f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        return spm.eval()

    def train(self, mode: bool = True) -> "StepAwarePixelModel":
        """As nn.Module.train, but the frozen MiniLM stays in eval mode (its dropout would make the text
        features random, and cached features irreproducible)."""
        super().train(mode)
        if self.kind == "small":
            self.text_encoder.eval()
        return self

    # ---- parameters --------------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What train_spm optimises: everything but the frozen MiniLM (small); the whole CLIP (clip, as SPO)."""
        return [p for p in self.parameters() if p.requires_grad]

    def time_parameters(self) -> list[nn.Parameter]:
        """The time conditioning (timestep embedder + adaLN linears), for tests and diagnostics."""
        return self.image.time_parameters()

    # ---- forward -----------------------------------------------------------------------------------------

    def encode_text(self, prompts: Sequence[str]) -> SpmText:
        """Text features before the trainable head (gradients flow unless the caller uses no_grad)."""
        if isinstance(prompts, str):
            raise TypeError("encode_text takes a list of prompts, got a single string")
        device = self.logit_scale_param.device
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.text_max_length,
                             return_tensors="pt")
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
        if self.kind == "small":
            hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, S, D)
            return SpmText(masked_mean(hidden, mask))  # (B, D)
        out = self.clip.text_model(input_ids=ids, attention_mask=mask)
        return SpmText(out.pooler_output)  # (B, D_text): the EOS state, before text_projection

    @property
    def logit_scale_param(self) -> nn.Parameter:
        return self.logit_scale if self.kind == "small" else self.clip.logit_scale

    def text_features(self, text: SpmText) -> torch.Tensor:
        """T = the trainable text head of the features: (B, proj_dim)."""
        head = self.text_proj if self.kind == "small" else self.clip.text_projection
        return head(text.features.to(head.weight.dtype))

    def score(self, images: torch.Tensor, t: Union[int, torch.Tensor], text: Text) -> torch.Tensor:
        """S for images (B, 3, H, W) in [-1, 1] at timesteps t (scalar or (B,)) against one prompt each:
        prompts (encoded here) or an ``SpmText``. Returns (B,) float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"SPM images must be (B, 3, H, W), got {tuple(images.shape)}")
        batch = images.shape[0]
        t = torch.as_tensor(t, device=images.device)
        if t.ndim == 0:
            t = t.expand(batch)  # (B,)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or shape ({batch},), got {tuple(t.shape)}")
        if not isinstance(text, SpmText):
            text = self.encode_text(text)
        if len(text) != batch:
            raise ValueError(f"{len(text)} prompts for {batch} images (use SpmText.repeat_interleave for K children)")
        visual = self.image(images, t)  # (B, proj_dim)
        return noise_aware_score(visual, self.text_features(text.to(images.device)), self.logit_scale_param)

    def forward(self, images: torch.Tensor, t: Union[int, torch.Tensor], text: Text) -> torch.Tensor:
        return self.score(images, t, text)


def _clip_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer if it has one, else SD's offline CLIP tokenizer (same BPE vocabulary)."""
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    from lpo.backbones import build_clip_tokenizer

    log.info("%s has no tokenizer; using the offline OpenAI CLIP BPE tokenizer", folder)
    return build_clip_tokenizer()


# --------------------------------------------------------------------------------------------------------
# The training noise protocol (train_spm, pixel_accuracy_by_t)
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def one_step_x0_hat(
    backbone: Any,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    cond: Any,
    uncond: Any,
    cfg_scale: float,
) -> torch.Tensor:
    """SPM training input in latent space, docs/method.md section 5 (SPM): both latents of a pair noised with the
    SAME noise at the same t, ONE CFG step of the base model, its x0-hat (RockeyCoss/SPO spm_task.py
    get_noised_imgs: add_noise, CFG U-Net, ``pred_original_sample``).

    x0: (B, 2, C, h, w) scaled latents; t: (B,); noise: (B, C, h, w) shared by both images of a pair;
    cond: PromptEmbeds of the B captions; uncond: PromptEmbeds of the null prompt (1 row).
    Returns x0-hat (B, 2, C, h, w), float32.
    """
    b = x0.shape[0]
    flat = x0.flatten(0, 1)  # (2B, C, h, w): pair-major (p0 img0, p0 img1, p1 img0, ...)
    t2 = t.repeat_interleave(2)  # (2B,)
    eps = noise.repeat_interleave(2, dim=0)  # (2B, C, h, w): the same noise for both images
    x_t = backbone.train_scheduler.add_noise(flat, eps, t2)
    cond2 = cond.index(torch.arange(b, device=t.device).repeat_interleave(2))
    out = cfg_noise_pred(backbone.unet, x_t.to(backbone.unet.dtype), t2, cond2.hidden_states, uncond.hidden_states,
                         cfg_scale, cond2.added_cond_kwargs(), uncond.added_cond_kwargs())
    # t_prev = t - 1 (-1 at t = 0): any earlier grid point gives the same x0-hat, the only output used.
    x0_hat = ddim_step_split(out, x_t, t2, t2 - 1, backbone.scheduler, eta=0.0).x0_hat  # (2B, C, h, w)
    return x0_hat.float().view(b, 2, *x0_hat.shape[1:])


@torch.no_grad()
def decoded_x0_hat(
    backbone: Any,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    cond: Any,
    uncond: Any,
    cfg_scale: float,
) -> torch.Tensor:
    """``one_step_x0_hat`` decoded by the VAE: images (B, 2, 3, H, W) in [-1, 1], what the SPM is shown."""
    x0_hat = one_step_x0_hat(backbone, x0, t, noise, cond, uncond, cfg_scale)
    images = decode_latents(backbone.vae, x0_hat.flatten(0, 1))  # (2B, 3, H, W)
    return images.view(*x0_hat.shape[:2], *images.shape[1:])


def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1] (float, clamped), as the pipelines decode."""
    x = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
    return x.float().clamp(-1, 1)


def pair_noise(seed: int, key: str, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation noise of one pair: posterior noise (2, *shape) and ONE diffusion noise (*shape) shared by
    both images; a pure function of (seed, key), the same at every t (common random numbers)."""
    state = np.random.SeedSequence([seed, EVAL_STREAM, zlib.crc32(key.encode("utf-8"))]).generate_state(2, np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn((2, *shape), generator=gen), torch.randn(tuple(shape), generator=gen)


@torch.no_grad()
def pixel_correct_by_t(
    spm: StepAwarePixelModel,
    backbone: Any,
    loader: Any,
    timesteps: Sequence[int],
    seed: int,
    cfg_scale: float = 4.0,
    batch_size: int = 64,
) -> dict[int, dict[str, bool]]:
    """Per timestep, per decided pair key: does the SPM rank the labelled winner higher? (training protocol)

    Every pair of `loader` (a PairLoader; with batch_size 1 no pair is dropped: it is regrouped here into
    batches of `batch_size`) gets its posterior and diffusion noise from ``pair_noise(seed, key)``, then
    ``decoded_x0_hat`` with the base model's CFG `cfg_scale` (train_spm.cfg), then the SPM at t. Ties
    (0.5, 0.5) are left out; an exact score tie counts as wrong (lpo.reward.pairs.pair_correct).
    """
    device = backbone.unet.device
    ts = sorted({int(t) for t in timesteps})
    batches = chunked_batches(loader, batch_size) if loader.batch_size == 1 else loader.iterate(0)
    uncond = backbone.null_embeds(1).to(device)
    out: dict[int, dict[str, bool]] = {t: {} for t in ts}
    was_training = spm.training
    spm.eval()
    for batch in batches:
        b = len(batch["keys"])
        noises = [pair_noise(seed, k, batch["mean"].shape[2:]) for k in batch["keys"]]
        eps_post = torch.stack([n[0] for n in noises]).to(device)  # (B, 2, C, h, w)
        eps = torch.stack([n[1] for n in noises]).to(device)  # (B, C, h, w)
        x0 = batch["mean"].to(device) + batch["std"].to(device) * eps_post  # (B, 2, C, h, w)
        cond = backbone.encode_prompts(batch["captions"]).to(device)
        text = spm.encode_text(batch["captions"]).repeat_interleave(2)  # (2B, F)
        for t in ts:
            tt = torch.full((b,), t, dtype=torch.int64, device=device)
            images = decoded_x0_hat(backbone, x0, tt, eps, cond, uncond, cfg_scale)  # (B, 2, 3, H, W)
            s = spm.score(images.flatten(0, 1), tt.repeat_interleave(2), text).float().cpu().view(b, 2)  # (B, 2)
            ok, decided = pair_correct(s[:, 0], s[:, 1], batch["labels"])
            for key, o, d in zip(batch["keys"], ok.tolist(), decided.tolist()):
                if d:
                    out[t][key] = bool(o)
    spm.train(was_training)
    return out


def pixel_accuracy_by_t(
    spm: StepAwarePixelModel,
    backbone: Any,
    loader: Any,
    timesteps: Sequence[int],
    seed: int,
    cfg_scale: float = 4.0,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """The SPM's held-out pair accuracy by timestep with its training noise protocol (``pixel_correct_by_t``),
    for eval_lrm's comparison with the LRM. One entry per t, ascending: {t, n, acc, lo, hi} (Wilson 95%);
    n = 0 gives NaNs. One process (under DDP, gather ``pixel_correct_by_t`` and merge by key instead).
    """
    out = []
    for t, by_key in pixel_correct_by_t(spm, backbone, loader, timesteps, seed, cfg_scale, batch_size).items():
        if not by_key:
            out.append({"t": t, "n": 0, "acc": float("nan"), "lo": float("nan"), "hi": float("nan")})
            continue
        acc, lo, hi = accuracy_ci(list(by_key.values()))
        out.append({"t": t, "n": len(by_key), "acc": acc, "lo": lo, "hi": hi})
    return out
