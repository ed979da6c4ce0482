"""Data made by sampling a model: the shapes world's preference pairs (the `download` stage's shapes source),
sampled by the base model and labelled by the simulated annotator.

As Pick-a-Pic mixes models and sampling settings, each image of a pair gets its own CFG scale and step count
(download.cfg_choices, download.steps_choices) and its own seed. The oracle judges both images, the simulated
annotator labels the pair (Bradley-Terry with ties, lpo.world.annotator), the auxiliary scorers add the MPCF
scores. Output: data/<dataset>/{train,val,test}-00000.parquet in the Pick-a-Pic schema (lpo.data.pickapic),
pairs_meta.jsonl (per pair: which attributes differ, the noiseless rewards; for analysis), manifest.json.

Prompts come from the world's split of triples (lpo.world.prompts.split_triples), so the test split's triples
are never seen in pretraining nor in preference training.
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from lpo.backbones import load_pipeline_folder
from lpo.config import Config, ConfigError
from lpo.data.pickapic import sha256_file, write_pairs
from lpo.sampling import ddim_sample, decode_images, initial_noise
from lpo.utils import atomic_dir, write_json
from lpo.world import annotator, auxiliary, oracle
from lpo.world.prompts import format_prompt, split_triples

log = logging.getLogger("lpo.generate")

SPLIT_SEED_OFFSET = {"train": 0, "val": 1, "test": 2}


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@torch.no_grad()
def sample_images(bb, prompts: list[str], cfg_scales: np.ndarray, steps: np.ndarray, seeds: np.ndarray,
                  batch_size: int, desc: str) -> np.ndarray:
    """One image per (prompt, cfg, steps, seed); batches grouped by step count (a scheduler runs one grid)."""
    images = np.zeros((len(prompts), bb.resolution, bb.resolution, 3), np.uint8)
    shape = (bb.latent_channels, bb.latent_size, bb.latent_size)
    order = np.argsort(steps, kind="stable")
    bar = tqdm(total=len(prompts), desc=desc, mininterval=5)
    for n_steps in np.unique(steps):
        idx_all = order[steps[order] == n_steps]
        for start in range(0, len(idx_all), batch_size):
            idx = idx_all[start : start + batch_size]
            emb = bb.encode_prompts([prompts[i] for i in idx])
            null = bb.null_embeds(len(idx))
            x_T = initial_noise(seeds[idx].tolist(), shape)
            z = ddim_sample(bb.unet, bb.scheduler, emb.hidden_states, null.hidden_states, x_T, steps=int(n_steps),
                            guidance=torch.as_tensor(cfg_scales[idx], dtype=torch.float32),
                            added_cond=emb.added_cond_kwargs(), added_uncond=null.added_cond_kwargs())
            images[idx] = decode_images(bb.vae, z)
            bar.update(len(idx))
    bar.close()
    return images


def make_split(cfg: Config, bb, split: str, n_pairs: int, id_offset: int) -> tuple[list[dict], list[dict], dict]:
    """Sample, judge and label `n_pairs` pairs for prompts of `split`; returns parquet rows, meta rows, stats."""
    d = cfg.download
    rng = np.random.default_rng([cfg.experiment.seed, 7, SPLIT_SEED_OFFSET[split]])
    triples = split_triples(cfg.world)[split]
    if not triples:
        raise ConfigError(f"world: the {split} split has no prompt triples")
    pick = rng.integers(0, len(triples), n_pairs)
    pair_triples = [triples[i] for i in pick]
    prompts = [format_prompt(t) for t in pair_triples]
    # two images per pair, each with its own sampling settings and seed (index 2k = image 0, 2k+1 = image 1)
    prompts2 = [p for p in prompts for _ in range(2)]
    triples2 = [t for t in pair_triples for _ in range(2)]
    cfg_scales = rng.choice(np.asarray(d.cfg_choices, dtype=np.float64), 2 * n_pairs)
    steps = rng.choice(np.asarray(d.steps_choices), 2 * n_pairs)
    seeds = rng.integers(0, 2**31 - 1, 2 * n_pairs)
    images = sample_images(bb, prompts2, cfg_scales, steps, seeds, d.batch_size, desc=f"sample {split}")
    # Judge what the annotator will see: the JPEG as stored, not the raw decode.
    jpegs = [jpeg_bytes(im) for im in images]
    seen = np.stack([decode_jpeg(b) for b in jpegs])
    detection = oracle.detect(seen, cfg.world)
    target = np.asarray([[cfg.world.colours.index(t.fg), cfg.world.shapes.index(t.shape), cfg.world.colours.index(t.bg)]
                         for t in triples2])
    verdict = oracle.judge_detection(detection, target)
    reward = annotator.reward(verdict, cfg.annotator)
    aux = auxiliary.aux_scores(seen, triples2, cfg.world, detection=detection)
    r0, r1 = reward[0::2], reward[1::2]
    label_0, label_1 = annotator.annotate(r0, r1, cfg.annotator, rng)
    rows, meta = [], []
    for k in range(n_pairs):
        a, b = 2 * k, 2 * k + 1
        rid = id_offset + k
        uid0, uid1 = f"{split}-{k:06d}-0", f"{split}-{k:06d}-1"
        best = uid0 if label_0[k] > label_1[k] else uid1 if label_1[k] > label_0[k] else ""
        row = {
            "caption": prompts[k], "jpg_0": jpegs[a], "jpg_1": jpegs[b],
            "label_0": float(label_0[k]), "label_1": float(label_1[k]),
            "ranking_id": rid, "image_0_uid": uid0, "image_1_uid": uid1, "best_image_uid": best,
            "are_different": jpegs[a] != jpegs[b], "has_label": True, "split": split,
        }
        for name in ("aesthetic", "clip", "vqa"):
            row[f"aux_{name}_0"] = float(aux[name][a])
            row[f"aux_{name}_1"] = float(aux[name][b])
        rows.append(row)
        meta.append({
            "ranking_id": rid, "split": split, "caption": prompts[k],
            "reward_0": float(r0[k]), "reward_1": float(r1[k]),
            # which attributes the two images disagree on (correct in one, wrong in the other)
            "differ": [att for att in ("fg", "bg", "shape") if bool(verdict[att][a]) != bool(verdict[att][b])],
            "quality_gap": float(verdict["quality"][a] - verdict["quality"][b]),
            "cfg": [float(cfg_scales[a]), float(cfg_scales[b])], "steps": [int(steps[a]), int(steps[b])],
        })
    ties = label_0 == label_1
    stats = {
        "pairs": n_pairs,
        "ties": int(ties.sum()),
        "annotator_agreement": annotator.agreement_with_noiseless((label_0, label_1), r0, r1),
        "oracle_accuracy": {att: float(np.mean(verdict[att])) for att in ("fg", "bg", "shape", "exact")},
        "mean_reward": float(reward.mean()),
    }
    return rows, meta, stats


def run(cfg: Config, out_dir: str | Path, base_dir: str | Path) -> dict:
    if cfg.experiment.world != "shapes":
        raise ConfigError("download.source: 'shapes' needs experiment.world: shapes")
    annotator.check_annotator(cfg.annotator)
    bb = load_pipeline_folder(base_dir)
    d = cfg.download
    t0 = time.time()
    summary: dict = {"source": "shapes", "dataset": d.dataset, "base": str(base_dir), "splits": {}}
    with atomic_dir(out_dir) as tmp:
        all_meta = []
        offset = 0
        for split, n in (("train", d.n_train_prompts), ("val", d.n_val_prompts), ("test", d.n_test_prompts)):
            rows, meta, stats = make_split(cfg, bb, split, n, offset)
            offset += n
            write_pairs(tmp / f"{split}-00000.parquet", rows)
            all_meta += meta
            summary["splits"][split] = stats
            log.info("%s: %d pairs, %d ties, annotator agreement %.3f, oracle exact %.3f", split, n, stats["ties"],
                     stats["annotator_agreement"], stats["oracle_accuracy"]["exact"])
        with open(tmp / "pairs_meta.jsonl", "w") as fh:
            for m in all_meta:
                fh.write(json.dumps(m) + "\n")
        seconds = time.time() - t0
        total = sum(s["pairs"] for s in summary["splits"].values())
        summary["seconds"] = round(seconds, 1)
        summary["pairs_per_s"] = round(total / max(seconds, 1e-9), 2)
        summary["files"] = [
            {"name": f.name, "sha256": sha256_file(f), "bytes": f.stat().st_size} for f in sorted(tmp.iterdir())
        ]
        write_json(tmp / "manifest.json", summary)
    log.info("wrote %s: %d pairs in %.0f s (%.1f pairs/s)", out_dir, total, seconds, summary["pairs_per_s"])
    return summary
