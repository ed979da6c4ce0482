"""Stage `synthesize` (shapes world only): the prompt split and the base model's pretraining corpus.

Writes, atomically (lpo.utils.atomic_dir):
  out_dir/prompts.json  {"train"|"val"|"test": {"prompts": [...], "triples": [[fg, shape, bg], ...]}, ...} and
                        "pretrain_splits": ["train", "val"] (test is held out altogether, like validation_unique)
  out_dir/corpus.npz    images uint8 (N, H, W, 3), captions (N,), triples and caption_triples (N, 3)
                        [fg, shape, bg] indices, caption_flawed (N,), flaws (N, 3) bool with flaw_names,
                        colours, shapes. No pickles (string arrays are fixed-width unicode).
  out_dir/summary.json  counts (also the return value of run)

The corpus is deliberately flawed, as web data is: a share of captions names one wrong attribute
(synthesize.caption_flaw_rate; the wrong caption is always another *pretraining* triple, so no test prompt
leaks in), and shares of images are blurred, noisy or low-contrast (independently, so flaws can co-occur).
Pretraining triples appear equally often (+-1).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from lpo.config import Config, ConfigError, SynthesizeConfig, to_dict
from lpo.stage_main import stage_main
from lpo.utils import atomic_dir, write_json
from lpo.world.prompts import (
    Triple,
    all_triples,
    format_prompt,
    pretrain_triples,
    split_triples,
    triple_indices,
)
from lpo.world.render import FLAWS, check_render, render_indices

log = logging.getLogger(__name__)

TEMPLATE = "a {fg} {shape} on a {bg} background"
STREAM = 1  # this stage's generator is default_rng([experiment.seed, STREAM]); other stages use other streams
RENDER_CHUNK = 2000


def check_synthesize(cfg: SynthesizeConfig) -> None:
    """Raise ConfigError naming the synthesize.<field> that is out of range."""
    if cfg.n_images < 1:
        raise ConfigError(f"synthesize.n_images: expected >= 1, got {cfg.n_images}")
    for field in ("caption_flaw_rate", "blur_rate", "noise_rate", "low_contrast_rate"):
        value = getattr(cfg, field)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"synthesize.{field}: expected a share in [0, 1], got {value}")


def prompts_document(cfg: Config, splits: dict[str, list[Triple]]) -> dict:
    """The content of prompts.json: {"train"|"val"|"test": {"prompts": [...], "triples": [[fg, shape, bg], ...]},
    "pretrain_splits": ["train", "val"], "template", "colours", "shapes", "world"}."""
    doc: dict = {"template": TEMPLATE, "colours": list(cfg.world.colours), "shapes": list(cfg.world.shapes)}
    for name, triples in splits.items():
        doc[name] = {"prompts": [format_prompt(t) for t in triples], "triples": [list(t) for t in triples]}
    doc["pretrain_splits"] = ["train", "val"]  # test is held out of pretraining altogether
    doc["world"] = to_dict(cfg.world)
    return doc


def one_attribute_neighbours(triples: Sequence[Triple]) -> list[np.ndarray]:
    """For each triple, the indices (into `triples`) of the triples that differ in exactly one attribute."""
    index = np.array([tuple(t) for t in triples], dtype=object)  # (P, 3) names
    same = (index[:, None, :] == index[None, :, :]).sum(-1)  # (P, P) number of equal attributes
    return [np.flatnonzero(row == 2) for row in same]


def flawed_captions(
    true_ix: np.ndarray, flawed: np.ndarray, neighbours: list[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Caption triple index per image: a uniformly drawn one-attribute neighbour where `flawed`, else the truth.

    Returns the caption indices and the flags actually applied (a triple without a neighbour keeps its caption).
    """
    caption_ix = true_ix.copy()
    applied = np.zeros_like(flawed)
    for i in np.flatnonzero(flawed):
        options = neighbours[true_ix[i]]
        if options.size:
            caption_ix[i] = options[rng.integers(options.size)]
            applied[i] = True
    return caption_ix, applied


def run(cfg: Config, out_dir: str | Path, show_progress: bool = True) -> dict:
    """Write prompts.json, corpus.npz and summary.json into out_dir (atomically); return the summary."""
    if cfg.experiment.world != "shapes":
        raise ConfigError(f"experiment.world: synthesize runs only in the shapes world, got {cfg.experiment.world!r}")
    check_render(cfg.world)
    syn = cfg.synthesize
    check_synthesize(syn)
    start = time.perf_counter()
    rng = np.random.default_rng([cfg.experiment.seed, STREAM])

    splits = split_triples(cfg.world)
    pretrain = pretrain_triples(splits)
    log.info("%d triples -> train %d, val %d, test %d (test held out of pretraining)", len(all_triples(cfg.world)),
             len(splits["train"]), len(splits["val"]), len(splits["test"]))
    pretrain_ix = triple_indices(pretrain, cfg.world)  # (P, 3)

    n = syn.n_images
    true_ix = rng.permutation(np.resize(np.arange(len(pretrain)), n))  # balanced: each triple n/P times (+-1)
    caption_ix, caption_flawed = flawed_captions(
        true_ix, rng.random(n) < syn.caption_flaw_rate, one_attribute_neighbours(pretrain), rng
    )
    rates = {"blur": syn.blur_rate, "noise": syn.noise_rate, "low_contrast": syn.low_contrast_rate}
    flaws = np.stack([rng.random(n) < rates[name] for name in FLAWS], axis=1)  # (N, 3)

    side = cfg.world.resolution
    images = np.empty((n, side, side, 3), dtype=np.uint8)
    for s in tqdm(range(0, n, RENDER_CHUNK), desc="render", unit="chunk", disable=not show_progress):
        sl = slice(s, s + RENDER_CHUNK)
        chunk_flaws = {name: flaws[sl, k] for k, name in enumerate(FLAWS)}
        images[sl] = render_indices(pretrain_ix[true_ix[sl]], rng, cfg.world, flaws=chunk_flaws)

    caption_text = [format_prompt(pretrain[i]) for i in range(len(pretrain))]
    summary = {
        "n_images": n,
        "n_pretrain_triples": len(pretrain),
        "splits": {name: len(t) for name, t in splits.items()},
        "caption_flawed": int(caption_flawed.sum()),
        "flaws": {name: int(flaws[:, k].sum()) for k, name in enumerate(FLAWS)},
        "clean": int((~flaws.any(1) & ~caption_flawed).sum()),
        "seconds": None,
    }
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "prompts.json", prompts_document(cfg, splits))
        np.savez_compressed(  # plain backgrounds compress ~6x (20k images: 65 -> 11 MB, +1.3 s)
            tmp / "corpus.npz",
            images=images,
            captions=np.array([caption_text[i] for i in caption_ix]),
            triples=pretrain_ix[true_ix].astype(np.int16),
            caption_triples=pretrain_ix[caption_ix].astype(np.int16),
            caption_flawed=caption_flawed,
            flaws=flaws,
            flaw_names=np.array(FLAWS),
            colours=np.array(cfg.world.colours),
            shapes=np.array(cfg.world.shapes),
        )
        summary["seconds"] = round(time.perf_counter() - start, 3)
        write_json(tmp / "summary.json", summary)
    log.info(
        "wrote %s: %d images (%d clean; wrong captions %d; blur %d, noise %d, low contrast %d) in %.1f s",
        out_dir, n, summary["clean"], summary["caption_flawed"], *summary["flaws"].values(), summary["seconds"],
    )
    return summary


def load_corpus(path: str | Path) -> dict[str, np.ndarray]:
    """Read corpus.npz back (no pickles allowed)."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def main(argv: Optional[list[str]] = None) -> int:
    return stage_main("synthesize", __doc__, lambda cfg, a: run(cfg, a.out), argv,
                      out=("DIR", "output folder (prompts.json, corpus.npz)"), summary_keys=())


if __name__ == "__main__":
    sys.exit(main())
