"""Test helpers for the data layer: tiny JPEGs, Pick-a-Pic rows and a tiny random VAE, all offline."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size: int = 32) -> bytes:
    """A small random-colour JPEG; different seeds give different bytes."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    pixels = np.clip(base + rng.integers(-30, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def pair_row(i: int, split: str = "train", label: tuple[float, float] = (1.0, 0.0), aux: Optional[dict] = None,
             caption: Optional[str] = None, size: int = 32) -> dict:
    """One full-schema row for lpo.data.pickapic.write_pairs; aux: AUX_COLUMNS -> score (or None for no aux)."""
    row = {
        "caption": caption if caption is not None else f"a red circle number {i}",
        "jpg_0": jpeg_bytes(2 * i, size),
        "jpg_1": jpeg_bytes(2 * i + 1, size),
        "label_0": label[0],
        "label_1": label[1],
        "ranking_id": i,
        "image_0_uid": f"u{i}a",
        "image_1_uid": f"u{i}b",
        "best_image_uid": f"u{i}a" if label[0] > label[1] else (f"u{i}b" if label[1] > label[0] else ""),
        "are_different": True,
        "has_label": True,
        "split": split,
    }
    if aux is not None:
        row.update(aux)
    return row


def aux_scores(gap_a: float = 0.0, gap_c: float = 0.0, gap_v: float = 0.0) -> dict:
    """Aux columns whose image-0-minus-image-1 gaps are the given values."""
    return {
        "aux_aesthetic_0": 5.0 + gap_a, "aux_aesthetic_1": 5.0,
        "aux_clip_0": 0.3 + gap_c, "aux_clip_1": 0.3,
        "aux_vqa_0": 0.6 + gap_v, "aux_vqa_1": 0.6,
    }


def save_tiny_vae(base_dir: Path, sample_size: int = 32) -> Path:
    """A random AutoencoderKL (downsampling 4x, 4 latent channels) saved as <base_dir>/vae."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size,
        scaling_factor=0.5,
    )
    vae.save_pretrained(base_dir / "vae")
    return base_dir


def make_samples(n: int, shape=(4, 2, 2), dtype=np.float16, start: int = 0):
    """Shard samples for write_shards; sample i's arrays are filled with i (mean0), i+1 (std0), -i, i+2."""
    for i in range(start, start + n):
        arr = np.full(shape, i, dtype=dtype)
        yield {
            "key": f"pairs-r{i:07d}",
            "mean0": arr, "std0": arr + 1, "mean1": -arr, "std1": arr + 2,
            "meta": {"caption": f"c{i}", "label_0": 1.0, "label_1": 0.0, "split": "train", "prompt_key": f"p{i % 3}"},
        }
