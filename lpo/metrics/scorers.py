"""Image scorers for real worlds (docs/method.md section 4): a registry of PickScore, CLIP score, LAION aesthetic,
HPSv2, HPSv2.1 and ImageReward, each loaded from a local weights folder named in `evaluate.scorers`.

    evaluate:
      scorers:
        pickscore: /models/PickScore_v1          # CLIPModel + its processor files (tokenizer, image processor)
        clip_score: /models/CLIP-ViT-H-14        # any transformers CLIPModel folder
        aesthetic: /models/clip-vit-large-patch14  # CLIPModel (ViT-L/14) + aesthetic_mlp.safetensors or the .pth

Implemented with transformers classes (CLIPModel + AutoProcessor; the image processor falls back to its PIL
version without torchvision, which is harmless):
- ``pickscore``: exp(logit_scale) * cos(image, prompt) with the PickScore_v1 CLIP-H (raw logit, ~100 cos, the
  scale of the paper's 20-23 numbers). PickScore_v1's hub repo has no processor files: copy those of
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K (the processor PickScore uses) into the folder.
- ``clip_score``: 100 * max(cos(image, prompt), 0) (CLIPScore with w = 100, torchmetrics' convention).
- ``aesthetic``: the LAION improved-aesthetic-predictor: an MLP (768-1024-128-64-16-1, no activations) on the
  L2-normalised CLIP ViT-L/14 image embedding; weights sac+logos+ava1-l14-linearMSE.pth (or the same state
  dict as aesthetic_mlp.safetensors) inside the CLIP folder.

Not implemented: ``hpsv2`` / ``hpsv2.1`` (OpenCLIP ViT-H/14 fine-tunes, loaded through open_clip, which needs
torchvision) and ``imagereward`` (BLIP, through the image-reward package). Naming one raises a ConfigError
that says which packages are missing. HPS v2.0 and v2.1 stay separate keys: their scores are not comparable.

Every scorer takes all images: ``scorer(images uint8 (N, H, W, 3), prompts (N,)) -> (N,) float64`` (the
official evaluation script scored only the first of four images per prompt; docs/method.md section 4).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoProcessor, CLIPModel

from lpo.config import ConfigError

log = logging.getLogger(__name__)

# The aesthetic MLP's weight files, looked for in this order inside the aesthetic folder.
AESTHETIC_FILES = ("aesthetic_mlp.safetensors", "sac+logos+ava1-l14-linearMSE.pth")


class Scorer(Protocol):
    """One image metric: higher is better; one value per (image, prompt) pair."""

    name: str

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------------------
# Pure formulas (docs/method.md section 4)
# --------------------------------------------------------------------------------------------------------


def pickscore_from_embeddings(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """PickScore (docs/method.md section 4): exp(logit_scale) <I/||I||, T/||T||>, the raw logit, (B,) from (B, D) each."""
    return logit_scale.float().exp() * (F.normalize(image.float(), dim=-1) * F.normalize(text.float(), dim=-1)).sum(-1)


def clip_score_from_embeddings(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """CLIP score (docs/method.md section 4; Hessel et al. 2021 with w = 100): 100 max(cos(I, T), 0), (B,)."""
    cos = (F.normalize(image.float(), dim=-1) * F.normalize(text.float(), dim=-1)).sum(-1)
    return 100.0 * cos.clamp(min=0.0)


class AestheticMLP(nn.Module):
    """The LAION improved-aesthetic-predictor head: linear layers 768-1024-128-64-16-1 with dropout, no
    activations (state-dict keys layers.0/2/4/6/7, as in sac+logos+ava1-l14-linearMSE.pth)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def aesthetic_from_embedding(image: torch.Tensor, mlp: AestheticMLP) -> torch.Tensor:
    """LAION aesthetic score (docs/method.md section 4): MLP(I / ||I||) on the CLIP image embedding, (B,)."""
    weight = mlp.layers[0].weight
    return mlp(F.normalize(image.float(), dim=-1).to(weight.dtype)).squeeze(-1).float()  # (B,)


# --------------------------------------------------------------------------------------------------------
# CLIP-based scorers (transformers)
# --------------------------------------------------------------------------------------------------------


def _features(out) -> torch.Tensor:
    """get_image/text_features output -> (B, D): a tensor in transformers 4, pooler_output (projected) in 5."""
    return out if torch.is_tensor(out) else out.pooler_output


def load_clip(folder: Path, key: str, device: torch.device) -> tuple[CLIPModel, object]:
    """A CLIPModel and its processor (tokenizer + image processor) from a local folder, eval mode, on device."""
    if not folder.is_dir():
        hint = SCORERS[key].weights if key in SCORERS else "a CLIPModel folder"
        raise ConfigError(f"evaluate.scorers.{key}: weights folder not found: {folder} ({hint})")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"evaluate.scorers.{key}: {folder} is not a transformers model folder (no config.json)")
    try:
        model = CLIPModel.from_pretrained(folder)
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            f"evaluate.scorers.{key}: cannot load a CLIPModel and its processor (tokenizer + image processor "
            f"files) from {folder}: {reason}"
        ) from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ConfigError(f"evaluate.scorers.{key}: {folder} holds no CLIP processor (tokenizer + image processor)")
    return model.to(device).eval(), processor


class ClipScorer:
    """Scores (image, prompt) pairs with a CLIPModel: embeds both, then applies `formula` per batch."""

    def __init__(self, name: str, model: CLIPModel, processor, formula: Callable[..., torch.Tensor],
                 batch_size: int, device: torch.device):
        self.name, self.model, self.processor, self.formula = name, model, processor, formula
        self.batch_size, self.device = batch_size, device
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return _features(self.model.get_image_features(pixel_values=pixels.to(self.device)))  # (B, D)

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.processor.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                          return_tensors="pt")
        return _features(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                      attention_mask=tokens["attention_mask"].to(self.device)))

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        _check_batch(images, prompts, self.name)
        out = []
        for s in range(0, len(prompts), self.batch_size):
            img = self.embed_images(images[s:s + self.batch_size])
            txt = self.embed_texts(prompts[s:s + self.batch_size])
            out.append(self.formula(img, txt, self.model.logit_scale).cpu().double().numpy())
        return np.concatenate(out) if out else np.zeros(0)


class AestheticScorer:
    """LAION aesthetic predictor: CLIP ViT-L/14 image embedding -> MLP (the prompt is not used)."""

    def __init__(self, model: CLIPModel, processor, mlp: AestheticMLP, batch_size: int, device: torch.device):
        self.name, self.model, self.processor = "aesthetic", model, processor
        self.mlp, self.batch_size, self.device = mlp.to(device).eval(), batch_size, device

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        _check_batch(images, prompts, self.name)
        out = []
        for s in range(0, len(images), self.batch_size):
            pixels = self.processor.image_processor(images=list(images[s:s + self.batch_size]),
                                                    return_tensors="pt")["pixel_values"]
            emb = _features(self.model.get_image_features(pixel_values=pixels.to(self.device)))  # (B, D)
            out.append(aesthetic_from_embedding(emb, self.mlp).cpu().double().numpy())
        return np.concatenate(out) if out else np.zeros(0)


def _check_batch(images: np.ndarray, prompts: Sequence[str], name: str) -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(prompts) != len(images):
        raise ValueError(f"{name}: {len(images)} images but {len(prompts)} prompts")


def load_aesthetic_mlp(folder: Path, width: int) -> AestheticMLP:
    """The aesthetic head from `folder` (AESTHETIC_FILES: safetensors, or the original .pth state dict)."""
    mlp = AestheticMLP(width)
    for name in AESTHETIC_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # a plain state dict, no pickle code
        try:
            mlp.load_state_dict(state)
        except RuntimeError as err:
            raise ConfigError(f"evaluate.scorers.aesthetic: {path} does not fit the {width}-d aesthetic MLP: "
                              f"{str(err).splitlines()[0]}") from None
        return mlp
    raise ConfigError(f"evaluate.scorers.aesthetic: {folder} has none of {', '.join(AESTHETIC_FILES)} "
                      "(the LAION improved-aesthetic-predictor weights)")


def build_pickscore(folder: Path, key: str, device: torch.device, batch_size: int) -> Scorer:
    model, processor = load_clip(folder, key, device)
    return ClipScorer(key, model, processor, pickscore_from_embeddings, batch_size, device)


def build_clip_score(folder: Path, key: str, device: torch.device, batch_size: int) -> Scorer:
    model, processor = load_clip(folder, key, device)
    return ClipScorer(key, model, processor, lambda img, txt, _scale: clip_score_from_embeddings(img, txt),
                      batch_size, device)


def build_aesthetic(folder: Path, key: str, device: torch.device, batch_size: int) -> Scorer:
    model, processor = load_clip(folder, key, device)
    mlp = load_aesthetic_mlp(folder, int(model.config.projection_dim))
    return AestheticScorer(model, processor, mlp, batch_size, device)


# --------------------------------------------------------------------------------------------------------
# Scorers that need packages this environment cannot install
# --------------------------------------------------------------------------------------------------------


def missing_packages(modules: Sequence[str]) -> list[str]:
    """The modules in `modules` that do not import here (an installed package whose own imports fail counts)."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception:  # ImportError, or e.g. open_clip failing on its torchvision import
            missing.append(module)
    return missing


def _unavailable(display: str, modules: tuple[str, ...], why: str) -> Callable[[Path, str, torch.device, int], Scorer]:
    def build(folder: Path, key: str, device: torch.device, batch_size: int) -> Scorer:
        missing = missing_packages(modules)
        if missing:
            raise ConfigError(
                f"evaluate.scorers.{key}: {display} needs the python packages {', '.join(modules)} ({why}); "
                f"not importable here: {', '.join(missing)}. Install them in the evaluation environment, or remove "
                f"the key."
            )
        raise ConfigError(
            f"evaluate.scorers.{key}: {display}: the packages are installed, but lpo has no adapter for it yet "
            "(it could not be tested offline); remove the key, or add one in lpo/metrics/scorers.py"
        )

    return build


@dataclass(frozen=True)
class ScorerSpec:
    """A registry entry: the display name, what the weights folder holds, and the builder."""

    display: str
    weights: str
    build: Callable[[Path, str, torch.device, int], Scorer]


# evaluate.scorers key -> spec (a plain dict: the config's keys are checked against it, no getattr on strings).
SCORERS: dict[str, ScorerSpec] = {
    "pickscore": ScorerSpec("PickScore", "yuvalkirstain/PickScore_v1 + CLIP-H processor files", build_pickscore),
    "clip_score": ScorerSpec("CLIP score", "a CLIPModel folder (docs/method.md: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)",
                             build_clip_score),
    "aesthetic": ScorerSpec("LAION aesthetic", "openai/clip-vit-large-patch14 + the aesthetic MLP", build_aesthetic),
    "hpsv2": ScorerSpec("HPSv2", "HPS_v2_compressed.pt",
                        _unavailable("HPSv2", ("hpsv2", "open_clip", "torchvision"), "OpenCLIP ViT-H/14")),
    "hpsv2.1": ScorerSpec("HPSv2.1", "HPS_v2.1_compressed.pt",
                          _unavailable("HPSv2.1", ("hpsv2", "open_clip", "torchvision"), "OpenCLIP ViT-H/14")),
    "imagereward": ScorerSpec("ImageReward", "ImageReward.pt + med_config.json",
                              _unavailable("ImageReward", ("ImageReward", "timm", "fairscale"), "BLIP")),
}


def build_scorers(spec: Mapping[str, str], device: torch.device, batch_size: int) -> dict[str, Scorer]:
    """Build every scorer `evaluate.scorers` names ({key: weights path}), in the config's order."""
    unknown = [key for key in spec if key not in SCORERS]
    if unknown:
        raise ConfigError(f"evaluate.scorers.{unknown[0]}: unknown scorer (known: {', '.join(SCORERS)})")
    scorers: dict[str, Scorer] = {}
    for key, path in spec.items():
        entry = SCORERS[key]
        folder = Path(path).expanduser()
        log.info("scorer %s (%s) from %s", key, entry.display, folder)
        scorers[key] = entry.build(folder, key, device, batch_size)
    return scorers


def display_name(key: str) -> Optional[str]:
    """The scorer's name for tables ("PickScore"), or None when `key` is not a scorer."""
    return SCORERS[key].display if key in SCORERS else None
