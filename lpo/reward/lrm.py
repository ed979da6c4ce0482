"""The Latent Reward Model (LRM): the diffusion model's own U-Net encoder half as a noise-aware reward.

docs/method.md section 1 (architecture) is the specification; section 2 (training) uses it. In short:

    h_mid, taps = U-Net(conv_in -> time embedding -> down blocks -> mid block)(x_t, t, context)
    V   = W_v . concat(avgpool(tap_1), ..., avgpool(tap_L), V_enh)     taps = down-block outputs *before*
    V_enh = V_mid_uncond + gs (V_mid - V_mid_uncond)                    their downsampler; VFE on mid only
    T   = W_t . text feature           (sd15, shapes; sdxl: text_embeds of text_encoder_2 as they are)
    S   = exp(logit_scale) . cos(V, T)

The U-Net is diffusers' ``UNet2DConditionModel`` run block by block here, so diffusers is not patched and the
up blocks never run (they stay in the checkpoint, frozen, so the saved ``unet/`` folder is a normal diffusers
U-Net). Three text kinds, picked by the backbone kind (see ``TEXT_KINDS``):

- ``sd15``: CLIPTextModel; U-Net context = last hidden state; feature = pooled EOS state, then W_t.
- ``sdxl``: CLIPTextModel + CLIPTextModelWithProjection; context = concat of both penultimate hidden states;
  added cond = text_embeds of encoder 2 + time_ids; feature = those text_embeds (no W_t).
- ``shapes``: a BERT-type encoder (MiniLM); context = last hidden state; feature = masked mean, then W_t.

Callers that keep the text encoder frozen can cache :class:`TextEncoding` (``encode_text`` under no_grad) and
``repeat_interleave`` it for the K children of one prompt.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    DownBlock2D,
    UNetMidBlock2D,
    UNetMidBlock2DCrossAttn,
)
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, BertModel, CLIPTextModel, CLIPTextModelWithProjection

from lpo.utils import atomic_dir, read_json, write_json

logger = logging.getLogger(__name__)

KINDS = ("sd15", "sdxl", "shapes")
CONFIG_NAME = "lrm_config.json"
HEADS_NAME = "heads.safetensors"
FORMAT_VERSION = 1

# Text-encoder classes a saved LRM may hold (class name in lrm_config.json -> class); explicit, no getattr.
TEXT_ENCODER_CLASSES: dict[str, type] = {
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
    "BertModel": BertModel,
}
# The text-encoder class each kind expects (encoder 1, encoder 2).
_EXPECTED_ENCODERS: dict[str, tuple[tuple[type, ...], Optional[type]]] = {
    "sd15": ((CLIPTextModel,), None),
    "sdxl": ((CLIPTextModel,), CLIPTextModelWithProjection),
    "shapes": ((BertModel,), None),
}
_DOWN_BLOCKS = (CrossAttnDownBlock2D, DownBlock2D)
_MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")

Timesteps = Union[int, float, torch.Tensor]


# --------------------------------------------------------------------------------------------------------
# Pure functions (the math of docs/method.md section 1)
# --------------------------------------------------------------------------------------------------------


def check_lrm_dir(lrm_dir: str | Path) -> None:
    """A ConfigError naming `lrm_dir` unless it holds a saved LRM (its config file)."""
    from lpo.config import ConfigError

    if not (Path(lrm_dir) / CONFIG_NAME).is_file():
        raise ConfigError(f"{lrm_dir}: not an LRM folder (no {CONFIG_NAME}; run the train_lrm rule first)")


def vfe_combine(mid_cond: torch.Tensor, mid_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Visual Feature Enhancement, docs/method.md section 1: V_enh = V_mid_uncond + gs (V_mid - V_mid_uncond).

    Classifier-free guidance on the pooled mid-block feature only; both inputs (B, C_mid).
    """
    return mid_uncond + scale * (mid_cond - mid_uncond)


def noise_aware_score(visual: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """LRM score, docs/method.md section 1: S(p, x_t) = exp(logit_scale) <V/||V||, T/||T||>.

    visual, text: (B, D) projected features; returns (B,). Computed in float32 so fp16 LRMs stay stable.
    """
    v = F.normalize(visual.float(), dim=-1)
    t = F.normalize(text.float(), dim=-1)
    return logit_scale.float().exp() * (v * t).sum(dim=-1)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where mask == 1 (sentence-transformers pooling of the shapes text feature)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, S, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def visual_width(unet_config: Mapping[str, Any]) -> int:
    """Width of the concatenated visual feature, from the U-Net config alone (docs/method.md section 1).

    One tap per down block (its out channels, before downsampling) plus the mid block (last block's
    channels): 320+640+1280+1280+1280 = 4800 for SD1.5, 320+640+1280+1280 = 3520 for SDXL.
    """
    channels = list(unet_config.get("block_out_channels") or [])
    down_types = list(unet_config.get("down_block_types") or [])
    if not channels or len(channels) != len(down_types):
        raise ValueError(
            f"U-Net config: block_out_channels {channels} and down_block_types {down_types} must be non-empty "
            "and of equal length"
        )
    unsupported = [t for t in down_types if t not in ("CrossAttnDownBlock2D", "DownBlock2D")]
    if unsupported:
        raise ValueError(f"U-Net config: down_block_types {unsupported} are not supported by the LRM "
                         "(only CrossAttnDownBlock2D and DownBlock2D)")
    # SD1.5's published config has no mid_block_type key: diffusers' default applies.
    mid = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in _MID_BLOCK_TYPES:
        raise ValueError(f"U-Net config: mid_block_type {mid!r} is not supported by the LRM "
                         f"(needs one of {_MID_BLOCK_TYPES})")
    return int(sum(channels) + channels[-1])


def _timesteps(t: Timesteps, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or (B,) timestep as a (B,) tensor on `device`; anything else is an error."""
    if not torch.is_tensor(t):
        t = torch.tensor(t)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or a ({batch},) tensor, got shape {tuple(t.shape)}")
    return t.to(device)


def check_unet(unet: UNet2DConditionModel) -> None:
    """Raise if the U-Net uses a feature the block-by-block encoder pass does not reproduce."""
    cfg = unet.config
    problems = []
    if unet.class_embedding is not None:
        problems.append("class embeddings (class_embed_type / num_class_embeds)")
    if cfg.addition_embed_type not in (None, "text_time"):
        problems.append(f"addition_embed_type={cfg.addition_embed_type!r}")
    if unet.encoder_hid_proj is not None:
        problems.append(f"encoder_hid_dim_type={cfg.encoder_hid_dim_type!r}")
    if cfg.time_cond_proj_dim is not None:
        problems.append("time_cond_proj_dim")
    if cfg.center_input_sample:
        problems.append("center_input_sample")
    for i, block in enumerate(unet.down_blocks):
        if not isinstance(block, _DOWN_BLOCKS):
            problems.append(f"down_blocks[{i}] is {type(block).__name__}")
    if not isinstance(unet.mid_block, (UNetMidBlock2DCrossAttn, UNetMidBlock2D)):
        problems.append(f"mid block {type(unet.mid_block).__name__}")
    if problems:
        raise ValueError("U-Net not supported by the LRM: " + "; ".join(problems))


def unet_features(
    unet: UNet2DConditionModel,
    x_t: torch.Tensor,
    t: Timesteps,
    context: torch.Tensor,
    added_cond: Optional[dict[str, torch.Tensor]] = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The encoder half of a diffusers U-Net pass (docs/method.md section 1; never the up blocks).

    Mirrors ``UNet2DConditionModel.forward`` up to the mid block: time embedding (+ SDXL's ``text_time``
    added embedding from ``added_cond = {"text_embeds", "time_ids"}``), conv_in, down blocks, mid block.
    Returns (taps, mid): taps[i] = output of down block i *before* its downsampler, i.e.
    ``res_samples[len(block.resnets) - 1]``, (B, C_i, H / 2**i, W / 2**i); mid = (B, C_mid, h, w).
    """
    batch = x_t.shape[0]
    timesteps = _timesteps(t, batch, x_t.device)
    t_emb = unet.get_time_embed(sample=x_t, timestep=timesteps)  # (B, C_t), cast to x_t's dtype
    emb = unet.time_embedding(t_emb, None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added_cond or {})
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)

    h = unet.conv_in(x_t)
    taps = []
    for block in unet.down_blocks:
        if isinstance(block, CrossAttnDownBlock2D):
            h, res = block(h, temb=emb, encoder_hidden_states=context)
        else:
            h, res = block(h, temb=emb)
        taps.append(res[len(block.resnets) - 1])
    if isinstance(unet.mid_block, UNetMidBlock2DCrossAttn):
        mid = unet.mid_block(h, emb, encoder_hidden_states=context)
    else:
        mid = unet.mid_block(h, emb)
    return taps, mid


# --------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TextEncoding:
    """What the LRM needs from a batch of prompts; cacheable when the text encoder is frozen.

    context: (B, S, D) U-Net cross-attention states. text_feature: (B, F) the text feature *before* the
    trainable head W_t. pooled: (B, P) SDXL added-cond text_embeds (None for other kinds). truncated: (B,)
    bool, True where the prompt was longer than the tokenizer's max length and got cut.
    """

    context: torch.Tensor
    text_feature: torch.Tensor
    truncated: torch.Tensor
    pooled: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.context.shape[0]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TextEncoding":
        return TextEncoding(
            context=fn(self.context),
            text_feature=fn(self.text_feature),
            truncated=fn(self.truncated),
            pooled=None if self.pooled is None else fn(self.pooled),
        )

    def __getitem__(self, index: Union[int, slice, torch.Tensor]) -> "TextEncoding":
        """Rows of the encoding (an int keeps the batch dimension: enc[i] has one row)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda x: x[index])

    def repeat_interleave(self, k: int) -> "TextEncoding":
        """Each prompt k times in a row (the K children of one parent): B -> B*k."""
        return self._map(lambda x: x.repeat_interleave(k, dim=0))

    def expand_to(self, batch: int) -> "TextEncoding":
        """A one-prompt encoding (e.g. the null prompt) broadcast to `batch` rows; a `batch`-row one as is."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot broadcast a text encoding of {len(self)} prompts to a batch of {batch}")
        return self._map(lambda x: x.expand(batch, *x.shape[1:]))

    def to(self, device: Union[str, torch.device]) -> "TextEncoding":
        return self._map(lambda x: x.to(device))

    def detach(self) -> "TextEncoding":
        return self._map(lambda x: x.detach())


def _tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int, device: torch.device):
    """Pad/truncate to max_length (as the diffusion pipelines do); also say which prompts were cut."""
    # One extra token of room tells whether truncation removed anything (special tokens included).
    probe = tokenizer(list(prompts), truncation=True, max_length=max_length + 1)["input_ids"]
    truncated = torch.tensor([len(ids) > max_length for ids in probe], dtype=torch.bool, device=device)
    tok = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return tok["input_ids"].to(device), tok["attention_mask"].to(device), truncated


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _encode_sd15(lrm: "LatentRewardModel", prompts: Sequence[str]) -> TextEncoding:
    """SD1.5: context = CLIP last hidden state; feature = pooled EOS state (docs/method.md section 1)."""
    device = _device_of(lrm.text_encoder)
    ids, _, truncated = _tokenize(lrm.tokenizer, prompts, lrm.text_max_length, device)
    out = lrm.text_encoder(ids)
    return TextEncoding(context=out.last_hidden_state, text_feature=out.pooler_output, truncated=truncated)


def _encode_sdxl(lrm: "LatentRewardModel", prompts: Sequence[str]) -> TextEncoding:
    """SDXL: context = concat of both penultimate states; feature = text_embeds of encoder 2 (section 1)."""
    device = _device_of(lrm.text_encoder)
    ids1, _, trunc1 = _tokenize(lrm.tokenizer, prompts, lrm.text_max_length, device)
    ids2, _, trunc2 = _tokenize(lrm.tokenizer_2, prompts, lrm.text_max_length_2, _device_of(lrm.text_encoder_2))
    out1 = lrm.text_encoder(ids1, output_hidden_states=True)
    out2 = lrm.text_encoder_2(ids2, output_hidden_states=True)
    context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2].to(device)], dim=-1)  # (B, S, D1+D2)
    text_embeds = out2.text_embeds.to(device)  # (B, P)
    return TextEncoding(context=context, text_feature=text_embeds, truncated=trunc1 | trunc2.to(device),
                        pooled=text_embeds)


def _encode_shapes(lrm: "LatentRewardModel", prompts: Sequence[str]) -> TextEncoding:
    """Shapes (BERT-type MiniLM): context = last hidden state; feature = masked mean of it."""
    device = _device_of(lrm.text_encoder)
    ids, mask, truncated = _tokenize(lrm.tokenizer, prompts, lrm.text_max_length, device)
    hidden = lrm.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, S, D)
    return TextEncoding(context=hidden, text_feature=masked_mean(hidden, mask), truncated=truncated)


TEXT_KINDS: dict[str, Callable[["LatentRewardModel", Sequence[str]], TextEncoding]] = {
    "sd15": _encode_sd15,
    "sdxl": _encode_sdxl,
    "shapes": _encode_shapes,
}


def _max_length(tokenizer: Any, text_encoder: nn.Module, requested: Optional[int], what: str) -> int:
    """The token length to pad/truncate to: `requested`, else the tokenizer's; must fit the encoder."""
    length = requested if requested is not None else int(tokenizer.model_max_length)
    limit = int(text_encoder.config.max_position_embeddings)
    if length <= 0 or length > limit:
        raise ValueError(
            f"{what}: max token length {length} (text_max_length or tokenizer.model_max_length) must be in "
            f"1..{limit} (the encoder's max_position_embeddings); set tokenizer.model_max_length or text_max_length"
        )
    return length


# --------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------


class LatentRewardModel(nn.Module):
    """Noise-aware latent reward S(p, x_t) built from a diffusion backbone (docs/method.md section 1).

    Args:
        unet: the diffusers U-Net (owned by the LRM from now on; ``from_backbone`` passes a deep copy).
        kind: "sd15", "sdxl" or "shapes" (which text encoders and features, see module docstring).
        text_encoder, tokenizer: CLIPTextModel (sd15, sdxl) or BertModel (shapes) and its tokenizer.
        text_encoder_2, tokenizer_2: SDXL's CLIPTextModelWithProjection and tokenizer; None otherwise.
        vfe_scale: VFE guidance scale gs on the mid feature; 1 disables it (no null-prompt pass).
        proj_dim: width of the projected features (None = the text-feature width). Must be None or equal
            to text_encoder_2's projection_dim for sdxl, whose text feature is not projected.
        logit_scale_init: initial logit_scale (score temperature exp(2.6592) = 14.3).
        text_max_length: tokens per prompt (None = tokenizer.model_max_length), for both SDXL encoders.
        time_ids: SDXL micro-conditioning (orig h, orig w, crop top, crop left, target h, target w);
            None = a square image of 8 x unet sample_size (1024 for SDXL).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        kind: str,
        text_encoder: nn.Module,
        tokenizer: Any,
        text_encoder_2: Optional[nn.Module] = None,
        tokenizer_2: Any = None,
        vfe_scale: float = 7.5,
        proj_dim: Optional[int] = None,
        logit_scale_init: float = 2.6592,
        text_max_length: Optional[int] = None,
        time_ids: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        if kind not in TEXT_KINDS:
            raise ValueError(f"LRM kind {kind!r} is not one of {', '.join(KINDS)}")
        enc1_types, enc2_type = _EXPECTED_ENCODERS[kind]
        if not isinstance(text_encoder, enc1_types):
            raise TypeError(f"LRM kind {kind!r}: text_encoder must be {enc1_types[0].__name__}, "
                            f"got {type(text_encoder).__name__}")
        if enc2_type is None and (text_encoder_2 is not None or tokenizer_2 is not None):
            raise ValueError(f"LRM kind {kind!r} takes one text encoder; got text_encoder_2/tokenizer_2")
        if enc2_type is not None and (not isinstance(text_encoder_2, enc2_type) or tokenizer_2 is None):
            raise TypeError(f"LRM kind {kind!r}: text_encoder_2 must be {enc2_type.__name__} with tokenizer_2, "
                            f"got {type(text_encoder_2).__name__}")
        if vfe_scale <= 0:
            raise ValueError(f"lrm.vfe_scale must be > 0 (1 disables VFE), got {vfe_scale}")
        check_unet(unet)

        self.kind = kind
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.vfe_scale = float(vfe_scale)
        self.logit_scale_init = float(logit_scale_init)
        self.text_max_length = _max_length(tokenizer, text_encoder, text_max_length, "tokenizer")
        # SDXL concatenates both encoders' states token by token, so both use the same length.
        self.text_max_length_2 = (
            _max_length(tokenizer_2, text_encoder_2, self.text_max_length, "tokenizer_2")
            if text_encoder_2 is not None else None
        )

        # Check that the text side matches what the U-Net was built for, with a message naming both.
        hidden = int(text_encoder.config.hidden_size)
        context_dim = hidden + (int(text_encoder_2.config.hidden_size) if text_encoder_2 is not None else 0)
        if unet.config.cross_attention_dim != context_dim:
            raise ValueError(f"LRM kind {kind!r}: unet cross_attention_dim {unet.config.cross_attention_dim} != "
                             f"text context width {context_dim}")
        if kind == "sdxl":
            if unet.config.addition_embed_type != "text_time":
                raise ValueError("LRM kind 'sdxl' needs a U-Net with addition_embed_type='text_time'")
            text_width = int(text_encoder_2.config.projection_dim)
            expected = text_width + 6 * int(unet.config.addition_time_embed_dim)
            if unet.config.projection_class_embeddings_input_dim != expected:
                raise ValueError(f"LRM kind 'sdxl': unet projection_class_embeddings_input_dim "
                                 f"{unet.config.projection_class_embeddings_input_dim} != text_embeds + 6 time ids "
                                 f"= {expected}")
            if proj_dim is not None and proj_dim != text_width:
                raise ValueError(f"lrm.proj_dim {proj_dim}: sdxl's text feature is text_encoder_2's text_embeds "
                                 f"({text_width}-d, not projected again), so proj_dim must be null or {text_width}")
        else:
            if unet.config.addition_embed_type is not None:
                raise ValueError(f"LRM kind {kind!r}: U-Net addition_embed_type must be None, "
                                 f"got {unet.config.addition_embed_type!r}")
            text_width = hidden
        self.proj_dim = int(proj_dim) if proj_dim is not None else text_width

        # Heads: W_v (and W_t except for sdxl), no bias, N(0, 0.02) as in the official code; logit scale.
        self.visual_proj = nn.Linear(visual_width(unet.config), self.proj_dim, bias=False)
        nn.init.normal_(self.visual_proj.weight, std=0.02)
        self.text_proj: Optional[nn.Linear] = None
        if kind != "sdxl":
            self.text_proj = nn.Linear(text_width, self.proj_dim, bias=False)
            nn.init.normal_(self.text_proj.weight, std=0.02)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))

        if time_ids is None:
            side = 8 * int(unet.config.sample_size)
            time_ids = (side, side, 0, 0, side, side)
        if len(time_ids) != 6:
            raise ValueError(f"time_ids must have 6 entries (orig h, w, crop top, left, target h, w), got {time_ids}")
        self.time_ids_list = [int(v) for v in time_ids]
        self.register_buffer("time_ids", torch.tensor(self.time_ids_list, dtype=torch.float32), persistent=False)

        # The up path never runs: freeze it so optimisers and weight decay leave it alone.
        for module in (unet.up_blocks, unet.conv_norm_out, unet.conv_out):
            if module is not None:
                module.requires_grad_(False)

    # ---- construction ------------------------------------------------------------------------------------

    @staticmethod
    def visual_width(unet_config: Mapping[str, Any]) -> int:
        """Visual feature width from the U-Net config alone (4800 SD1.5, 3520 SDXL); see ``visual_width``."""
        return visual_width(unet_config)

    @classmethod
    def from_backbone(cls, backbone: Any, cfg: Any) -> "LatentRewardModel":
        """Build an LRM from a backbone (any object with kind, unet, text_encoder, tokenizer, text_encoder_2,
        tokenizer_2) and an ``LrmConfig``. All modules are deep-copied, so the base model stays untouched."""
        return cls(
            unet=copy.deepcopy(backbone.unet),
            kind=backbone.kind,
            text_encoder=copy.deepcopy(backbone.text_encoder),
            tokenizer=copy.deepcopy(backbone.tokenizer),
            text_encoder_2=copy.deepcopy(backbone.text_encoder_2),
            tokenizer_2=copy.deepcopy(backbone.tokenizer_2),
            vfe_scale=cfg.vfe_scale,
            proj_dim=cfg.proj_dim,
            logit_scale_init=cfg.logit_scale_init,
        )

    def config_dict(self) -> dict[str, Any]:
        """Everything besides weights that ``from_pretrained`` needs (written to lrm_config.json)."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "vfe_scale": self.vfe_scale,
            "proj_dim": self.proj_dim,
            "logit_scale_init": self.logit_scale_init,
            "text_max_length": self.text_max_length,
            "time_ids": self.time_ids_list,
            "visual_width": self.visual_proj.in_features,
            "text_encoder_class": type(self.text_encoder).__name__,
            "text_encoder_2_class": None if self.text_encoder_2 is None else type(self.text_encoder_2).__name__,
        }

    def save_pretrained(self, path: Union[str, Path]) -> None:
        """Write the LRM folder atomically: lrm_config.json, heads.safetensors, unet/ (diffusers),
        text_encoder/ + tokenizer/ (transformers) and, for sdxl, text_encoder_2/ + tokenizer_2/."""
        with atomic_dir(path) as tmp:
            write_json(tmp / CONFIG_NAME, self.config_dict())
            heads = {"visual_proj.weight": self.visual_proj.weight, "logit_scale": self.logit_scale}
            if self.text_proj is not None:
                heads["text_proj.weight"] = self.text_proj.weight
            save_file({k: v.detach().contiguous().cpu() for k, v in heads.items()}, str(tmp / HEADS_NAME))
            self.unet.save_pretrained(tmp / "unet")
            self.text_encoder.save_pretrained(tmp / "text_encoder")
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            if self.text_encoder_2 is not None:
                self.text_encoder_2.save_pretrained(tmp / "text_encoder_2")
                self.tokenizer_2.save_pretrained(tmp / "tokenizer_2")

    @classmethod
    def from_pretrained(cls, path: Union[str, Path]) -> "LatentRewardModel":
        """Load a folder written by ``save_pretrained`` (on CPU, in the saved dtype)."""
        path = Path(path)
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: not an LRM folder (no {CONFIG_NAME})")
        conf = read_json(config_file)
        if conf.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_file}: format_version {conf.get('format_version')!r}, "
                             f"this code reads {FORMAT_VERSION}")

        def encoder(key: str, folder: str) -> Optional[nn.Module]:
            name = conf.get(key)
            if name is None:
                return None
            if name not in TEXT_ENCODER_CLASSES:
                raise ValueError(f"{config_file}: {key} {name!r} is not one of {sorted(TEXT_ENCODER_CLASSES)}")
            return TEXT_ENCODER_CLASSES[name].from_pretrained(path / folder)

        text_encoder_2 = encoder("text_encoder_2_class", "text_encoder_2")
        lrm = cls(
            unet=UNet2DConditionModel.from_pretrained(path / "unet"),
            kind=conf["kind"],
            text_encoder=encoder("text_encoder_class", "text_encoder"),
            tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
            text_encoder_2=text_encoder_2,
            tokenizer_2=AutoTokenizer.from_pretrained(path / "tokenizer_2") if text_encoder_2 is not None else None,
            vfe_scale=conf["vfe_scale"],
            proj_dim=conf["proj_dim"],
            logit_scale_init=conf["logit_scale_init"],
            text_max_length=conf["text_max_length"],
            time_ids=conf["time_ids"],
        )
        heads = load_file(str(path / HEADS_NAME))
        missing, unexpected = lrm.load_state_dict(heads, strict=False)
        expected = {"visual_proj.weight", "logit_scale"}
        if lrm.text_proj is not None:
            expected.add("text_proj.weight")
        if unexpected or expected & set(missing):
            raise ValueError(f"{path / HEADS_NAME}: missing {sorted(expected & set(missing))}, "
                             f"unexpected {sorted(unexpected)}")
        return lrm

    # ---- forward pieces -------------------------------------------------------------------------------------

    def encode_text(self, prompts: Sequence[str]) -> TextEncoding:
        """Tokenize and encode prompts (with gradients unless the caller uses no_grad)."""
        if isinstance(prompts, str):
            raise TypeError("encode_text takes a list of prompts, got a single string")
        enc = TEXT_KINDS[self.kind](self, prompts)
        if bool(enc.truncated.any()):
            logger.debug("%d of %d prompts truncated to %d tokens", int(enc.truncated.sum()), len(enc),
                         self.text_max_length)
        return enc

    def added_cond(self, pooled: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[dict[str, torch.Tensor]]:
        """SDXL's added conditioning: pooled text_embeds (B, P) + time_ids (B, 6); None for other kinds."""
        if self.kind != "sdxl":
            return None
        time_ids = self.time_ids.to(device=pooled.device, dtype=dtype).unsqueeze(0).expand(pooled.shape[0], -1)
        return {"text_embeds": pooled.to(dtype), "time_ids": time_ids}

    def visual_features(
        self, x_t: torch.Tensor, t: Timesteps, enc: TextEncoding, null_enc: Optional[TextEncoding] = None
    ) -> torch.Tensor:
        """Concatenated pooled visual feature (B, visual_width), with VFE on the mid feature.

        With vfe_scale != 1 the null-prompt branch runs in the same U-Net pass (batch doubled); null_enc is
        the encoding of [""] (computed here when None). With vfe_scale == 1 there is no null-prompt pass.
        """
        batch = x_t.shape[0]
        if len(enc) != batch:
            raise ValueError(f"text encoding has {len(enc)} prompts for a batch of {batch} latents "
                             "(use TextEncoding.repeat_interleave for K children)")
        timesteps = _timesteps(t, batch, x_t.device)
        dtype = x_t.dtype
        enc = enc.to(x_t.device)
        if self.vfe_scale == 1.0:
            taps, mid = unet_features(self.unet, x_t, timesteps, enc.context.to(dtype),
                                      self.added_cond(enc.pooled, dtype))
            pooled_mid = mid.mean(dim=(2, 3))  # (B, C_mid)
        else:
            if null_enc is None:
                null_enc = self.encode_text([""])
            null_enc = null_enc.to(x_t.device).expand_to(batch)
            # Conditional and null-prompt branches in one U-Net pass: rows [0, B) and [B, 2B).
            context = torch.cat([enc.context, null_enc.context]).to(dtype)  # (2B, S, D)
            pooled = None if enc.pooled is None else torch.cat([enc.pooled, null_enc.pooled])  # (2B, P)
            taps, mid = unet_features(self.unet, torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]),
                                      context, self.added_cond(pooled, dtype))
            taps = [tap[:batch] for tap in taps]  # down features from the conditional branch only
            mid_both = mid.mean(dim=(2, 3))  # (2B, C_mid)
            pooled_mid = vfe_combine(mid_both[:batch], mid_both[batch:], self.vfe_scale)
        features = [tap.mean(dim=(2, 3)) for tap in taps] + [pooled_mid]  # each (B, C_i)
        return torch.cat(features, dim=1)  # (B, visual_width)

    def text_features(self, enc: TextEncoding) -> torch.Tensor:
        """Projected text feature T (B, proj_dim): W_t . feature, or sdxl's text_embeds as they are."""
        if self.text_proj is None:
            return enc.text_feature
        return self.text_proj(enc.text_feature.to(self.text_proj.weight.dtype))

    def score(
        self, x_t: torch.Tensor, t: Timesteps, enc: TextEncoding, null_enc: Optional[TextEncoding] = None
    ) -> torch.Tensor:
        """S(p, x_t) for a batch (B,), float32; `enc` holds one prompt per latent."""
        visual = self.visual_proj(self.visual_features(x_t, t, enc, null_enc).to(self.visual_proj.weight.dtype))
        return noise_aware_score(visual, self.text_features(enc).to(visual.device), self.logit_scale)

    def forward(self, x_t: torch.Tensor, t: Timesteps, prompts: Sequence[str]) -> torch.Tensor:
        """Score latents x_t (B, C, H, W) at timestep(s) t against one prompt each; returns (B,)."""
        enc = self.encode_text(prompts)
        null_enc = self.encode_text([""]) if self.vfe_scale != 1.0 else None
        return self.score(x_t, t, enc, null_enc)

    # ---- training helpers ---------------------------------------------------------------------------------

    def text_encoders(self) -> list[nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    def head_parameters(self) -> list[nn.Parameter]:
        heads = [self.visual_proj.weight, self.logit_scale]
        if self.text_proj is not None:
            heads.append(self.text_proj.weight)
        return heads

    def trainable_parameters(self, train_text_encoder: bool) -> dict[str, list[nn.Parameter]]:
        """Parameter groups for different learning rates: {"backbone": ..., "heads": ...}.

        backbone = the U-Net's encoder half (the up path is frozen) plus, if train_text_encoder, the text
        encoder(s). Side effect: sets requires_grad on the text encoder(s) to train_text_encoder, so a frozen
        encoder computes no gradients.
        """
        for encoder in self.text_encoders():
            encoder.requires_grad_(train_text_encoder)
        backbone = [p for p in self.unet.parameters() if p.requires_grad]
        if train_text_encoder:
            backbone += [p for enc in self.text_encoders() for p in enc.parameters()]
        return {"backbone": backbone, "heads": self.head_parameters()}

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts by part, for logs: the U-Net's used encoder half vs its unused up path, etc."""
        up = [self.unet.up_blocks, self.unet.conv_norm_out, self.unet.conv_out]
        n_up = sum(p.numel() for m in up if m is not None for p in m.parameters())
        n_unet = sum(p.numel() for p in self.unet.parameters())
        counts = {
            "unet_encoder_half": n_unet - n_up,
            "unet_up_path_unused": n_up,
            "text_encoder": sum(p.numel() for p in self.text_encoder.parameters()),
            "heads": sum(p.numel() for p in self.head_parameters()),
        }
        if self.text_encoder_2 is not None:
            counts["text_encoder_2"] = sum(p.numel() for p in self.text_encoder_2.parameters())
        return counts
