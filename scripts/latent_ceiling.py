"""How much of the shapes world's preference signal survives the base model's VAE latent? (issue #4 diagnostic)

The LRM judges pairs from VAE latents, so its accuracy is bounded by what the latent keeps of the attributes the
annotator judges. This script measures that bound on the test pairs of a shapes data folder, three ways:

1. the annotator's noiseless reward (oracle judgement + quality, lpo.world.annotator.reward) on the ORIGINAL
   images vs on the VAE round trip (decode of the posterior mean, which is what the latent shards store):
   the share of decided test labels whose winner has the higher reward (a reward tie counts 0.5);
2. per attribute (fg colour, shape, bg colour): how often the oracle reads the same value from the round trip
   as from the image;
3. a small CNN trained WITH the oracle's per-image attribute labels (supervision the LRM never gets) on the
   clean train-split latents, tested on the test-split latents, per attribute and as a pair judge (more
   attributes right wins; equal counts 0.5).

Usage (after `snakemake --cores all` or at least the `precompute_latents` target):
    OMP_NUM_THREADS=2 .venv/bin/python scripts/latent_ceiling.py --config results/shapes/config.yaml \
        --data data/shapes --base results/shapes/base --out results/shapes/lrm/latent_ceiling.json
Takes ~3 min on 2 CPU cores (the CNN: 40 epochs over ~5,000 latents). Not part of the test suite.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn as nn
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lpo.config import load_config  # noqa: E402
from lpo.sampling import decode_images  # noqa: E402
from lpo.stages.latents import encode_posterior, image_to_array, load_vae  # noqa: E402
from lpo.world import oracle  # noqa: E402
from lpo.world.annotator import reward  # noqa: E402
from lpo.world.prompts import parse_prompt, triple_indices  # noqa: E402

ATTRIBUTES = ("fg", "shape", "bg")  # the order of lpo.world.prompts.triple_indices


def read_split(data_dir: Path, split: str) -> dict:
    """Captions, labels and the two images (N, H, W, 3) uint8 of every pair of a split's parquet files."""
    files = sorted(data_dir.glob(f"{split}-*.parquet"))
    if not files:
        raise SystemExit(f"{data_dir}: no {split}-*.parquet files (run the download stage first)")
    cols: dict[str, list] = {"caption": [], "label_0": [], "label_1": [], "jpg_0": [], "jpg_1": []}
    for f in files:
        table = pq.read_table(f, columns=list(cols)).to_pydict()
        for k in cols:
            cols[k] += table[k]

    def decode(blobs: list[bytes]) -> np.ndarray:
        return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])

    return {"caption": cols["caption"], "label_0": np.asarray(cols["label_0"]), "label_1": np.asarray(cols["label_1"]),
            "images_0": decode(cols["jpg_0"]), "images_1": decode(cols["jpg_1"])}


@torch.no_grad()
def encode(vae, images: np.ndarray, resolution: int, batch: int = 256) -> torch.Tensor:
    """Posterior means (N, C, h, w) in the diffusion model's latent units, as the latent shards store them."""
    pixels = torch.from_numpy(np.stack([image_to_array(Image.fromarray(a), resolution) for a in images]))
    return torch.cat([encode_posterior(vae, pixels[i:i + batch])[0] for i in range(0, len(pixels), batch)])


def pair_accuracy(score_0: np.ndarray, score_1: np.ndarray, label_0: np.ndarray, label_1: np.ndarray) -> tuple[float, int]:
    """Share of decided labels (not (0.5, 0.5)) whose winner has the higher score; equal scores count 0.5."""
    decided = label_0 != label_1
    right = np.where(score_0 == score_1, 0.5, ((score_0 > score_1) == (label_0 > label_1)).astype(float))
    return float(right[decided].mean()), int(decided.sum())


def attribute_labels(det: dict[str, np.ndarray]) -> np.ndarray:
    """The oracle's detected (fg, shape, bg) indices of each image, (N, 3); -1 where it found no object."""
    return np.stack([det[a] for a in ATTRIBUTES], axis=1).astype(np.int64)


def train_probe(latents: torch.Tensor, labels: torch.Tensor, classes: list[int], epochs: int, seed: int) -> nn.Module:
    """A 3-conv CNN with one softmax head per attribute, trained on clean latents (with left-right mirroring)."""
    torch.manual_seed(seed)
    found = (labels >= 0).all(dim=1)  # the oracle reads -1 where it finds no object: nothing to learn there
    latents, labels = latents[found], labels[found]
    c, h, w = latents.shape[1:]
    net = nn.Sequential(
        nn.Conv2d(c, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(64 * h * w, 256), nn.SiLU(),
        nn.Linear(256, sum(classes)),
    )
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-2)
    for _ in range(epochs):
        perm = torch.randperm(len(latents))
        for i in range(0, len(perm), 128):
            idx = perm[i:i + 128]
            x = latents[idx]
            x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x)
            logits = torch.split(net(x), classes, dim=1)
            loss = sum(nn.functional.cross_entropy(z, labels[idx, j]) for j, z in enumerate(logits))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="config YAML (repeat to merge)")
    parser.add_argument("--data", required=True, help="shapes pairs folder (train-*.parquet, test-*.parquet)")
    parser.add_argument("--base", required=True, help="base model folder (its vae/ is used)")
    parser.add_argument("--out", required=True, help="output JSON")
    parser.add_argument("--probe-epochs", type=int, default=40, help="CNN probe epochs (0 skips the probe)")
    args = parser.parse_args(argv)
    cfg = load_config(*args.config)
    world, data_dir = cfg.world, Path(args.data)
    vae = load_vae(args.base)
    resolution = world.resolution
    classes = [len(world.colours), len(world.shapes), len(world.colours)]  # the order of ATTRIBUTES
    test = read_split(data_dir, "test")
    triples = [parse_prompt(c, world) for c in test["caption"]]
    target = triple_indices(triples, world)  # (P, 3)
    result: dict = {"data": str(data_dir), "base": args.base, "n_test_pairs": len(triples)}

    # 1 + 2: the annotator's reward and the oracle's attributes on the images and on their VAE round trips,
    # both from one detection per image set
    rewards, attrs, latents = {}, {}, {}
    for side in ("0", "1"):
        images = test[f"images_{side}"]
        latents[side] = encode(vae, images, resolution)
        round_trip = decode_images(vae, latents[side])
        for name, imgs in (("image", images), ("round_trip", round_trip)):
            det = oracle.detect(imgs, world)
            rewards[name, side] = reward(oracle.judge_detection(det, target), cfg.annotator)
            attrs[name, side] = attribute_labels(det)
    for name in ("image", "round_trip"):
        acc, n = pair_accuracy(rewards[name, "0"], rewards[name, "1"], test["label_0"], test["label_1"])
        result[f"pair_accuracy_reward_on_{name}"] = acc
        result["n_decided"] = n
    both = lambda name: np.concatenate([attrs[name, "0"], attrs[name, "1"]])  # noqa: E731
    result["round_trip_attribute_agreement"] = {
        a: float(np.mean(both("image")[:, j] == both("round_trip")[:, j])) for j, a in enumerate(ATTRIBUTES)}

    # 3: a supervised CNN probe on clean latents
    if args.probe_epochs > 0:
        train = read_split(data_dir, "train")
        train_images = np.concatenate([train["images_0"], train["images_1"]])
        train_labels = torch.from_numpy(attribute_labels(oracle.detect(train_images, world)))
        net = train_probe(encode(vae, train_images, resolution), train_labels, classes, args.probe_epochs,
                          cfg.experiment.seed)
        right, per_attribute = {}, []
        with torch.no_grad():
            for side in ("0", "1"):
                logits = torch.split(net(latents[side]), classes, dim=1)
                pred = torch.stack([z.argmax(1) for z in logits], 1).numpy()
                per_attribute.append(pred == attrs["image", side])
                right[side] = (pred == target).sum(1)
        acc, _ = pair_accuracy(right["0"], right["1"], test["label_0"], test["label_1"])
        per_attribute = np.concatenate(per_attribute)
        result["probe"] = {"epochs": args.probe_epochs, "train_images": int(len(train_images)),
                           "test_attribute_accuracy": {a: float(per_attribute[:, j].mean()) for j, a in enumerate(ATTRIBUTES)},
                           "pair_accuracy": acc}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
