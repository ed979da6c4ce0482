"""Stage `evaluate`: sample held-out prompts with one model on fixed seeds and score the images (docs/method.md 4).

    lpo evaluate --config CFG --model DIR --base DIR --prompts DIR --lrm DIR --out OUTDIR

- --model: a diffusers pipeline folder (results/<name>/base, or a policy's merged pipeline), read with
  lpo.backbones.load_pipeline_folder. --base: the base model's folder (shapes: the win rate's reference).
- Held-out prompts = the TEST split: shapes: --prompts is results/<name>/world (prompts.json); real worlds:
  --prompts is data/<dataset> (Pick-a-Pic parquet), its unique test captions in file order.
  evaluate.n_prompts of them (None = all), evenly spaced over the split.
- Image j of prompt i (i = the prompt's index in the test split) starts from the seed
  SeedSequence([experiment.seed, SEED_STREAM, i, j]), whatever the model, batch size or n_prompts: every model
  is compared on the same initial noise. DDIM with evaluate.ddim_steps, eta 0, CFG evaluate.cfg.

Metrics (per image, then a 95% bootstrap interval over prompts; lpo.metrics.oracle_metrics):
- shapes: the oracle's exact match and per-attribute accuracy (fg, bg, shape; a GenEval-like table), has_object,
  quality, the annotator's reward, and, against the base model on the same seeds, the expected win rate
  sigmoid((r_model - r_base) / tau) and paired differences (<key>_delta, resampled by prompt).
  Base samples: when --model is --base they are the model's own (win rate exactly 0.5); otherwise the base
  model is sampled again in this run, on the same seeds. That costs one more sampling pass (seconds in the
  shapes world) but needs no file from another job and can never pair images from different configs.
- every world: lrm_score, the LRM's mean score of the final latents at the lowest timestep of the DDIM grid.
- every world, when evaluate.scorers names them: the image scorers of lpo.metrics.scorers, on every image.

Outputs in OUTDIR (metrics.json written last; each file atomically):
  metrics.json     {"model", "n_prompts", "images_per_prompt", "metrics": {name: {mean, lo, hi, n, groups}}, ...}
  per_prompt.jsonl one line per prompt: index, prompt, (triple), seeds, values {metric: [one per image]}
  samples.npz      images uint8 (P, n, H, W, 3), prompts (P,), prompt_index (P,), seeds (P, n) [, triples (P, 3)]
                   for the first evaluate.samples_prompts prompts (None = all), for the report's grid
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from lpo.backbones import Backbone, BackboneError, load_pipeline_folder
from lpo.config import Config, ConfigError, EvaluateConfig
from lpo.diffusion import ddim_timesteps
from lpo.metrics import oracle_metrics
from lpo.metrics.scorers import build_scorers
from lpo.sampling import ddim_sample, decode_images, initial_noise
from lpo.stage_main import stage_main
from lpo.utils import write_json

log = logging.getLogger(__name__)

SEED_STREAM = 7  # evaluate's stream of SeedSequence([experiment.seed, stream, ...]); other stages use others
PROMPTS_FILE = "prompts.json"
OUTPUT_FILES = ("metrics.json", "per_prompt.jsonl", "samples.npz")


# --------------------------------------------------------------------------------------------------------
# Prompts and seeds
# --------------------------------------------------------------------------------------------------------


def check_evaluate(ev: EvaluateConfig) -> None:
    """Raise ConfigError naming the evaluate.<field> that is out of range."""
    for name in ("images_per_prompt", "ddim_steps", "batch_size", "bootstrap"):
        if getattr(ev, name) < 1:
            raise ConfigError(f"evaluate.{name}: expected >= 1, got {getattr(ev, name)}")
    if ev.n_prompts is not None and ev.n_prompts < 1:
        raise ConfigError(f"evaluate.n_prompts: expected >= 1 or null (all), got {ev.n_prompts}")
    for name in ("grid_prompts", "samples_prompts"):
        value = getattr(ev, name)
        if value is not None and value < 0:
            raise ConfigError(f"evaluate.{name}: expected >= 0, got {value}")
    if ev.cfg < 0:
        raise ConfigError(f"evaluate.cfg: expected a guidance scale >= 0, got {ev.cfg}")


def shapes_test_prompts(prompts_dir: Path) -> tuple[list[str], list[list[str]]]:
    """The test split of results/<name>/world/prompts.json: prompts and their [fg, shape, bg] triples."""
    path = Path(prompts_dir) / PROMPTS_FILE
    if not path.is_file():
        raise ConfigError(f"--prompts {prompts_dir}: no {PROMPTS_FILE} (the synthesize stage's output folder)")
    doc = json.loads(path.read_text())
    test = doc.get("test")
    if not isinstance(test, dict) or "prompts" not in test or "triples" not in test:
        raise ConfigError(f"{path}: no test split with prompts and triples")
    prompts, triples = list(test["prompts"]), [list(t) for t in test["triples"]]
    if len(prompts) != len(triples):
        raise ConfigError(f"{path}: test split has {len(prompts)} prompts but {len(triples)} triples")
    return prompts, triples


def real_test_prompts(data_dir: Path) -> list[str]:
    """The unique captions of the test split of a Pick-a-Pic parquet folder, in file order."""
    from lpo.data.pickapic import iter_rows  # pyarrow; only real worlds need it

    files = sorted(Path(data_dir).glob("*.parquet"))
    if not files:
        raise ConfigError(f"--prompts {data_dir}: no parquet files (the download stage's output folder)")
    try:
        captions = [row.caption for row in iter_rows(files, split="test", decode=False)]
    except ValueError as err:  # DataError: a file without the Pick-a-Pic columns
        raise ConfigError(str(err)) from None
    return list(dict.fromkeys(captions))


def select_prompts(n_total: int, n_prompts: Optional[int]) -> np.ndarray:
    """Indices of the evaluated prompts: all, or n_prompts evenly spaced over the split (deterministic)."""
    if n_total < 1:
        raise ConfigError("evaluate: the test split has no prompts")
    if n_prompts is None:
        return np.arange(n_total)
    if n_prompts > n_total:
        raise ConfigError(f"evaluate.n_prompts: {n_prompts} requested, the test split has {n_total}")
    return np.round(np.linspace(0, n_total - 1, n_prompts)).astype(np.int64)  # spacing >= 1: no duplicates


def image_seeds(seed: int, prompt_index: Sequence[int], images_per_prompt: int) -> np.ndarray:
    """(P, n) seeds: image j of test prompt i starts from SeedSequence([seed, SEED_STREAM, i, j])."""
    out = np.empty((len(prompt_index), images_per_prompt), dtype=np.int64)
    for row, i in enumerate(prompt_index):
        for j in range(images_per_prompt):
            out[row, j] = np.random.SeedSequence([seed, SEED_STREAM, int(i), j]).generate_state(1)[0]
    return out


def resolve_device(name: str) -> torch.device:
    """evaluate.device -> a torch device (auto = cuda when available)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("evaluate.device: cuda requested, but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------------------------------------
# Sampling and the LRM score
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    bb: Backbone, prompts: Sequence[str], seeds: np.ndarray, ev: EvaluateConfig, desc: str, show_progress: bool
) -> tuple[torch.Tensor, np.ndarray]:
    """Seeded DDIM (eta 0, CFG ev.cfg, ev.ddim_steps) for one prompt per seed, in batches of ev.batch_size.

    Returns the final latents (N, C, h, w) float32 on the CPU and the decoded images uint8 (N, H, W, 3).
    """
    shape = (bb.latent_channels, bb.latent_size, bb.latent_size)
    latents, images = [], []
    starts = range(0, len(prompts), ev.batch_size)
    for s in tqdm(starts, desc=desc, unit="batch", disable=not show_progress):
        batch = list(prompts[s : s + ev.batch_size])
        cond, uncond = bb.encode_prompts(batch), bb.null_embeds(len(batch))
        x_T = initial_noise(seeds[s : s + ev.batch_size], shape).to(bb.device, bb.unet.dtype)  # (b, C, h, w)
        z = ddim_sample(
            bb.unet, bb.scheduler, cond.hidden_states, uncond.hidden_states, x_T, ev.ddim_steps, ev.cfg, eta=0.0,
            added_cond=cond.added_cond_kwargs(), added_uncond=uncond.added_cond_kwargs(),
        )
        latents.append(z.float().cpu())
        images.append(decode_images(bb.vae, z))
    return torch.cat(latents), np.concatenate(images)


@torch.no_grad()
def lrm_scores(lrm, latents: torch.Tensor, prompts: Sequence[str], t: int, batch_size: int,
               device: torch.device) -> np.ndarray:
    """S(p, x_t) of the LRM (docs/method.md section 1) for final latents (N, C, h, w) at timestep t, (N,) float64."""
    null = lrm.encode_text([""]) if lrm.vfe_scale != 1.0 else None
    out = []
    for s in range(0, len(prompts), batch_size):
        enc = lrm.encode_text(list(prompts[s : s + batch_size]))
        z = latents[s : s + batch_size].to(device, lrm.unet.dtype)  # (b, C, h, w) in the LRM's dtype
        out.append(lrm.score(z, t, enc, null).double().cpu().numpy())
    return np.concatenate(out)


def load_lrm(path: Path, device: torch.device):
    """LatentRewardModel.from_pretrained(path) on `device`, in eval mode; a bad folder is a ConfigError."""
    from lpo.reward.lrm import LatentRewardModel  # the LRM module pulls in diffusers' block classes

    try:
        lrm = LatentRewardModel.from_pretrained(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"--lrm {path}: {err}") from None
    return (lrm if device.type == "cpu" else lrm.to(device)).eval()


# --------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------


def _atomic(path: Path, write: Callable[[object], None], mode: str) -> None:
    """Write through a temp file and rename, so a killed run never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, mode) as fh:
        write(fh)
    os.replace(tmp, path)


def per_prompt_rows(prompt_index: np.ndarray, prompts: Sequence[str], triples: Optional[list], seeds: np.ndarray,
                    values: dict[str, np.ndarray]) -> list[dict]:
    """One dict per prompt: its split index, text, triple (shapes), seeds and per-image values."""
    n = seeds.shape[1]
    rows = []
    for row, i in enumerate(prompt_index):
        item: dict = {"index": int(i), "prompt": prompts[row]}
        if triples is not None:
            item["triple"] = list(triples[row])
        item["seeds"] = seeds[row].tolist()
        item["values"] = {k: v[row * n : (row + 1) * n].tolist() for k, v in values.items()}
        rows.append(item)
    return rows


def write_outputs(out_dir: Path, doc: dict, rows: list[dict], samples: dict[str, np.ndarray]) -> None:
    """metrics.json last, so its presence means the three files belong together."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").unlink(missing_ok=True)
    _atomic(out_dir / "per_prompt.jsonl", lambda fh: fh.write("".join(json.dumps(r) + "\n" for r in rows)), "w")
    _atomic(out_dir / "samples.npz", lambda fh: np.savez_compressed(fh, **samples), "wb")
    write_json(out_dir / "metrics.json", doc)


# --------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------


def _on(bb: Backbone, device: torch.device) -> Backbone:
    """Move a freshly loaded (CPU, fp32) backbone to `device`; a no-op on the CPU."""
    return bb if device.type == "cpu" else bb.to(device)


def _same_folder(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def run(
    cfg: Config,
    model_dir: Path,
    base_dir: Path,
    prompts_dir: Path,
    lrm_dir: Optional[Path],
    out_dir: Path,
    name: Optional[str] = None,
    show_progress: bool = True,
) -> dict:
    """Sample the test prompts with `model_dir`, score them, write OUTDIR/{metrics.json, per_prompt.jsonl,
    samples.npz}; return the metrics document. `name` defaults to OUTDIR's folder name (eval/<model>)."""
    start = time.perf_counter()
    ev, shapes = cfg.evaluate, cfg.experiment.world == "shapes"
    check_evaluate(ev)
    model_dir, base_dir, out_dir = Path(model_dir), Path(base_dir), Path(out_dir)
    name = name or out_dir.name
    device = resolve_device(ev.device)
    seconds: dict[str, float] = {}

    if shapes:
        all_prompts, all_triples = shapes_test_prompts(Path(prompts_dir))
    else:
        all_prompts, all_triples = real_test_prompts(Path(prompts_dir)), None
    index = select_prompts(len(all_prompts), ev.n_prompts)
    prompts = [all_prompts[i] for i in index]
    triples = [all_triples[i] for i in index] if all_triples is not None else None
    n = ev.images_per_prompt
    seeds = image_seeds(cfg.experiment.seed, index, n)  # (P, n)
    flat_prompts = [p for p in prompts for _ in range(n)]  # prompt-major, as seeds.reshape(-1)
    flat_triples = [t for t in triples for _ in range(n)] if triples is not None else None
    groups = oracle_metrics.prompt_groups(len(prompts), n)

    # Everything that can fail on a bad path or config is loaded before the minutes of sampling.
    scorers = build_scorers(ev.scorers, device, ev.batch_size)
    lrm = load_lrm(Path(lrm_dir), device) if lrm_dir is not None else None
    model = _on(load_pipeline_folder(model_dir), device)
    lrm_t = int(ddim_timesteps(model.scheduler, ev.ddim_steps)[0][-1])
    log.info("%s: %d test prompts x %d images, %d DDIM steps, CFG %g, on %s", name, len(prompts), n,
             ev.ddim_steps, ev.cfg, device)

    t0 = time.perf_counter()
    latents, images = generate(model, flat_prompts, seeds.reshape(-1), ev, f"sample {name}", show_progress)
    seconds["sample"] = time.perf_counter() - t0
    del model

    values: dict[str, np.ndarray] = {}
    base_samples = None
    if shapes:
        t0 = time.perf_counter()
        values.update(oracle_metrics.oracle_values(images, flat_triples, cfg.world, cfg.annotator))
        seconds["judge"] = time.perf_counter() - t0
        if _same_folder(model_dir, base_dir):
            base_values, base_samples = values, "this model (--model is --base)"
        else:
            t0 = time.perf_counter()
            base = _on(load_pipeline_folder(base_dir), device)
            _, base_images = generate(base, flat_prompts, seeds.reshape(-1), ev, "sample base", show_progress)
            del base
            base_values = oracle_metrics.oracle_values(base_images, flat_triples, cfg.world, cfg.annotator)
            seconds["base"] = time.perf_counter() - t0
            base_samples = "resampled in this run on the same seeds"
        values["win_rate"] = oracle_metrics.expected_win_rate(
            values["reward"], base_values["reward"], cfg.annotator.temperature
        )
        values.update(oracle_metrics.paired_differences(values, base_values))
    if lrm is not None:
        t0 = time.perf_counter()
        values["lrm_score"] = lrm_scores(lrm, latents, flat_prompts, lrm_t, ev.batch_size, device)
        seconds["lrm"] = time.perf_counter() - t0
    for key, scorer in scorers.items():
        t0 = time.perf_counter()
        values[key] = scorer(images, flat_prompts)
        seconds[f"scorer_{key}"] = time.perf_counter() - t0

    table = oracle_metrics.interval_table(values, groups, ev.bootstrap, cfg.experiment.seed)
    seconds["total"] = time.perf_counter() - start
    doc = {
        "model": name,
        "model_dir": str(model_dir),
        "base_dir": str(base_dir),
        "world": cfg.experiment.world,
        "n_prompts": len(prompts),
        "images_per_prompt": n,
        "n_images": len(flat_prompts),
        "seeds": f"SeedSequence([{cfg.experiment.seed}, {SEED_STREAM}, test prompt index, image index])",
        "sampling": {"ddim_steps": ev.ddim_steps, "cfg": ev.cfg, "eta": 0.0, "batch_size": ev.batch_size},
        "lrm_timestep": lrm_t if lrm is not None else None,
        "base_samples": base_samples,
        "scorers": list(scorers),
        "bootstrap": {"resamples": ev.bootstrap, "over": "prompts", "seed": cfg.experiment.seed},
        "metrics": table,
        "device": str(device),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    keep = len(prompts) if ev.samples_prompts is None else min(ev.samples_prompts, len(prompts))
    h, w = images.shape[1:3]
    samples = {
        "images": images.reshape(len(prompts), n, h, w, 3)[:keep],  # (P, n, H, W, 3)
        "prompts": np.array(prompts[:keep], dtype=str),
        "prompt_index": index[:keep],
        "seeds": seeds[:keep],
    }
    if triples is not None:
        samples["triples"] = np.array(triples[:keep], dtype=str).reshape(keep, 3)  # (P, 3)
    write_outputs(out_dir, doc, per_prompt_rows(index, prompts, triples, seeds, values), samples)
    summary = ", ".join(f"{k} {v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]" for k, v in table.items()
                        if not k.endswith("_delta"))
    log.info("%s: %s (%.1f s) -> %s", name, summary, seconds["total"], out_dir)
    return doc


def main(argv: Optional[list[str]] = None) -> int:
    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, metavar="DIR", help="diffusers pipeline folder of the model")

    return stage_main("evaluate", __doc__,
                      lambda cfg, a: run(cfg, Path(a.model), Path(a.base), Path(a.prompts),
                                         Path(a.lrm) if a.lrm else None, Path(a.out)),
                      argv, inputs=("base", "prompts"), optional_inputs=("lrm",),
                      out=("DIR", "output folder (results/<name>/eval/<model>)"), arguments=arguments,
                      user_errors=(BackboneError,), summary_keys=())


if __name__ == "__main__":
    sys.exit(main())
