"""Stage `precompute_latents`: Pick-a-Pic parquet pairs -> VAE posterior latents in WebDataset shards.

For every split found in ``<data>/*.parquet`` (train; val = ``val`` or Pick-a-Pic's ``validation_unique``;
test = ``test`` or ``test_unique``): read the valid pairs (bad rows skipped and counted, lpo.data.pickapic),
apply MPCF to the train split when the files carry aux scores (lpo.data.mpcf), resize both images to the
base model's resolution (RGB, [-1, 1]), encode them in batches and store the posterior mean and std times
the VAE scaling factor (so training can still sample the posterior, as the paper's LRM does), dealt over
shards (lpo.data.shards). The output folder is written atomically: a killed run leaves only a hidden
``.<out>.partial`` folder, which no reader accepts and the next run replaces.

Outputs: ``<out>/{split}-%06d.tar``, ``<out>/{split}-index.json`` (counts and skip reasons),
``<out>/latents.json`` (summary: shapes, scaling factor, counts, MPCF breakdown, images/s).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from lpo.config import Config, LatentsConfig, to_dict
from lpo.data.mpcf import mpcf_breakdown, mpcf_keep, pair_gaps
from lpo.data.pickapic import (
    AUX_COLUMNS,
    DataError,
    PairRow,
    count_rows_by_split,
    has_aux,
    iter_rows,
    split_from_filename,
)
from lpo.data.shards import shard_count, write_shards
from lpo.stage_main import stage_main
from lpo.utils import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def load_vae(base_dir: str | Path):
    """The base model's VAE (diffusers AutoencoderKL) from <base>/vae, fp32, eval mode, on the CPU."""
    from diffusers import AutoencoderKL

    vae_dir = Path(base_dir) / "vae"
    if not (vae_dir / "config.json").is_file():
        raise FileNotFoundError(f"{vae_dir}: no VAE here (expected a diffusers AutoencoderKL folder with config.json)")
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32)
    vae.requires_grad_(False)
    return vae.eval()


def base_resolution(base_dir: str | Path, vae) -> int:
    """The image side the base model generates: U-Net sample_size x the VAE's downsampling factor.

    Read from <base>/unet/config.json (SD1.5: 64 x 8 = 512, SDXL: 128 x 8 = 1024); without a U-Net folder,
    the VAE's own sample_size (less reliable: e.g. sd-vae-ft-mse says 256).
    """
    unet_config = Path(base_dir) / "unet" / "config.json"
    if unet_config.is_file():
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        return int(read_json(unet_config)["sample_size"]) * factor
    return int(vae.config.sample_size)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("latents.device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def image_to_array(image: Image.Image, resolution: int) -> np.ndarray:
    """RGB image -> float32 (3, H, W) in [-1, 1], resized (bilinear, no crop, as the official LRM data code)."""
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BILINEAR)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return pixels.transpose(2, 0, 1)  # (3, H, W)


@torch.no_grad()
def encode_posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) in the diffusion model's latent units: (mean - shift) * s, std * s.

    pixels: (N, 3, H, W) in [-1, 1] on the VAE's device. Returns two (N, C, h, w) float32 tensors; a posterior
    sample in those units is mean + std * eps.
    """
    dist = vae.encode(pixels).latent_dist
    scale = vae.config.scaling_factor
    shift = vae.config.get("shift_factor") or 0.0  # SD1.5 / SDXL VAEs have none
    return (dist.mean - shift) * scale, dist.std * scale


def prompt_key(caption: str) -> str:
    """A stable id of the prompt, for per-prompt loss weighting (docs/method.md section 2)."""
    return hashlib.sha1(caption.strip().encode("utf-8")).hexdigest()[:16]


def _batches(rows: Iterator[PairRow], size: int) -> Iterator[list[PairRow]]:
    batch: list[PairRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _mpcf_filter(batch: list[PairRow], cfg: LatentsConfig, stats: Counter) -> list[PairRow]:
    """Keep the rows that pass MPCF (docs/method.md section 2); add the breakdown to `stats` as mpcf_*."""
    gaps = np.array([pair_gaps(r.aux, r.label_0, r.label_1) for r in batch])  # (N, 3)
    is_tie = np.array([r.is_tie for r in batch])
    args = (gaps[:, 0], gaps[:, 1], gaps[:, 2], is_tie, cfg.mpcf.strategy, cfg.mpcf.keep_ties)
    for key, value in mpcf_breakdown(*args).items():
        stats[f"mpcf_{key}"] += value
    keep = mpcf_keep(*args)
    return [row for row, k in zip(batch, keep) if k]


def _json_scores(aux: Optional[dict[str, float]]) -> Optional[dict[str, Optional[float]]]:
    """Aux scores for the sample json: a missing (NaN) score becomes null, so the json stays standard."""
    return None if aux is None else {k: (None if math.isnan(v) else v) for k, v in aux.items()}


@dataclass
class _Timer:
    seconds: float = 0.0
    images: int = 0


def _encode_split(
    files: list[Path],
    split: str,
    cfg: Config,
    vae,
    device: torch.device,
    resolution: int,
    use_mpcf: bool,
    stats: Counter,
    timer: _Timer,
    total_rows: int,
) -> Iterator[dict]:
    """Samples for write_shards: one dict per valid pair with its posterior arrays and metadata."""
    lc = cfg.latents
    out_dtype = np.dtype(lc.dtype)
    rows = iter_rows(files, split=split, keep_ties=lc.mpcf.keep_ties, decode=True, stats=stats)
    pairs_per_batch = max(1, lc.batch_size // 2)  # latents.batch_size counts images, two per pair
    is_main = int(os.environ.get("RANK", "0")) == 0
    with tqdm(total=total_rows, desc=f"encode {split}", unit="pair", disable=not is_main) as bar:
        for batch in _batches(rows, pairs_per_batch):
            bar.update(stats["rows"] - bar.n)
            if use_mpcf:
                batch = _mpcf_filter(batch, lc, stats)
                if not batch:
                    continue
            images = [r.image_0 for r in batch] + [r.image_1 for r in batch]
            pixels = torch.from_numpy(np.stack([image_to_array(im, resolution) for im in images]))  # (2N, 3, H, W)
            start = time.perf_counter()
            mean, std = encode_posterior(vae, pixels.to(device))
            mean, std = mean.float().cpu().numpy(), std.float().cpu().numpy()  # (2N, C, h, w)
            timer.seconds += time.perf_counter() - start
            timer.images += len(images)
            n = len(batch)
            for i, row in enumerate(batch):
                arrays = {
                    "mean0": mean[i].astype(out_dtype),
                    "std0": std[i].astype(out_dtype),
                    "mean1": mean[n + i].astype(out_dtype),
                    "std1": std[n + i].astype(out_dtype),
                }
                if not all(np.isfinite(a).all() for a in arrays.values()):
                    stats["nonfinite_latent"] += 1  # e.g. a float16 overflow; never stored
                    log.warning("%s: non-finite latent (dtype %s); skipped", row.source, lc.dtype)
                    continue
                stats["written"] += 1
                meta = {
                    "caption": row.caption,
                    "label_0": row.label_0,
                    "label_1": row.label_1,
                    "split": split,
                    "prompt_key": prompt_key(row.caption),
                    "aux": _json_scores(row.aux),
                    "ranking_id": row.ranking_id,
                    "source": row.source,
                }
                yield {"key": row.key, **arrays, "meta": meta}
        bar.update(stats["rows"] - bar.n)


def _aux_presence(files: list[Path], strategy: str) -> bool:
    """Whether MPCF can run: all files that may hold train rows carry the aux columns (True), none do (False).

    A mix is an error (half of the train split filtered, half not, would be a silent bias).
    """
    schemas = {f: pq.read_schema(f) for f in files}
    files = [f for f in files if "split" in schemas[f].names or split_from_filename(f) == "train"]
    with_aux = [f for f in files if has_aux(schemas[f])]
    if with_aux and len(with_aux) != len(files):
        without = next(f for f in files if f not in with_aux)
        raise DataError(
            f"{without}: no aux columns ({', '.join(AUX_COLUMNS)}) while {with_aux[0]} has them; "
            f"MPCF (latents.mpcf.strategy={strategy}) needs them in every file or in none"
        )
    return bool(with_aux)


def run(cfg: Config, data_dir: str | Path, base_dir: str | Path, out_dir: str | Path) -> dict:
    """Encode every split of `data_dir` into shards under `out_dir`; returns the summary (latents.json)."""
    lc = cfg.latents
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    files = sorted(data_dir.glob("*.parquet"))
    if not files:
        raise DataError(f"{data_dir}: no *.parquet files (run the download stage first)")
    counts = count_rows_by_split(files)  # also validates every file's schema
    log.info("rows per split in %s: %s", data_dir, counts)
    aux = _aux_presence(files, lc.mpcf.strategy)
    use_mpcf = aux and lc.mpcf.strategy != "none"
    if lc.mpcf.strategy == "none":
        log.info("MPCF: strategy 'none', every train pair kept")
    elif not aux:
        log.warning(
            "MPCF: latents.mpcf.strategy=%s, but %s has no aux score columns (%s): NO MPCF filter could be applied, "
            "all valid train pairs are kept",
            lc.mpcf.strategy, data_dir, ", ".join(AUX_COLUMNS),
        )
    vae = load_vae(base_dir)
    device = resolve_device(lc.device)
    vae.to(device)
    resolution = lc.resolution or base_resolution(base_dir, vae)
    log.info("VAE %s on %s, resolution %d, scaling factor %s", base_dir, device, resolution, vae.config.scaling_factor)

    summary: dict = {
        "data_dir": str(data_dir),
        "base_dir": str(base_dir),
        "resolution": resolution,
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": vae.config.get("shift_factor"),
        "dtype": lc.dtype,
        "mpcf": {"strategy": lc.mpcf.strategy, "keep_ties": lc.mpcf.keep_ties, "applied": use_mpcf},
        "splits": {},
        "config": to_dict(lc),
    }
    timer = _Timer()
    wall_start = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            if counts.get(split, 0) == 0:
                log.warning("split %s: no rows in %s; no shards written", split, data_dir)
                continue
            stats: Counter = Counter()
            n_shards = shard_count(counts[split], lc.samples_per_shard, lc.world_size, lc.num_workers)
            samples = _encode_split(
                files, split, cfg, vae, device, resolution, use_mpcf and split == "train", stats, timer, counts[split]
            )
            index = write_shards(samples, tmp, split, n_shards, stats=stats)
            log.info("split %s: %s", split, dict(stats))
            summary["splits"][split] = {"n_samples": index["n_samples"], "n_shards": n_shards, "stats": dict(stats)}
            if index["latent_shape"] is not None:
                summary["latent_shape"] = index["latent_shape"]
        wall = time.perf_counter() - wall_start
        summary["images"] = timer.images
        summary["encode_seconds"] = round(timer.seconds, 3)
        summary["encode_images_per_s"] = round(timer.images / timer.seconds, 1) if timer.seconds else None
        summary["wall_seconds"] = round(wall, 3)
        summary["images_per_s"] = round(timer.images / wall, 1) if wall else None
        log.info(
            "encoded %d images: %.1f images/s in the VAE, %.1f images/s end to end (decode, resize, write)",
            timer.images, summary["encode_images_per_s"] or 0.0, summary["images_per_s"] or 0.0,
        )
        write_json(tmp / "latents.json", summary)
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    return stage_main("latents", __doc__, lambda cfg, a: run(cfg, a.data, a.base, a.out), argv,
                      inputs=("data", "base"), out=("DIR", "output folder of the shards"), summary_keys=())


if __name__ == "__main__":
    sys.exit(main())
