"""Stage `eval_lrm`: pairwise accuracy of the trained LRM on the test split at every DDIM timestep.

The pairs are scored with the protocol train_lrm trains and validates with (lpo.reward.pairs: ``PairScorer``,
``score_pairs``; noising in lpo.diffusion): both images of a pair at the same t, each drawn from its VAE
posterior and noised with its own noise; here seeded by (experiment.seed, pair key), so every model and every
run sees the same noisy latents. Ties (0.5, 0.5) are excluded; intervals are Wilson 95%
(lpo.calibration.accuracy_ci), and a timestep is "above chance" when the lower bound exceeds 0.5 + margin.

Writes (``--out``) a JSON with, per t: n, acc, lo, hi, above_chance; the highest t still above chance and
the t from which the LRM is blind; the accuracy at the lowest t; the grid-mean accuracy with a bootstrap
interval over prompts; the annotator ceiling (the labels' agreement with the noiseless reward, recorded by the
shapes download stage in ``<data>/manifest.json``; null if unknown); accuracy by which attributes differ
between the two images (shapes pairs, from ``<data>/pairs_meta.jsonl`` or the shard json; skipped if absent);
and, with ``--spm``, the curve of SPO's step-aware pixel model (lpo.reward.pixel, its own noise protocol).
``--plot`` gets accuracy vs t with the interval band, the chance line and the ceiling.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from lpo.calibration import accuracy_ci
from lpo.config import Config, ConfigError
from lpo.data.loader import PairLoader
from lpo.data.shards import ShardError
from lpo.diffusion import ddim_timesteps
from lpo.metrics.stats import grouped_bootstrap_ci
from lpo.reward.lrm import LatentRewardModel
from lpo.reward.pairs import PairScorer, accuracy_by_t, dedupe, score_pairs
from lpo.stage_main import stage_main
from lpo.utils import read_json, write_json

log = logging.getLogger("lpo.eval_lrm")

# Which attributes differ between the two images (pairs_meta "differ") -> the group a pair is reported in.
ATTRIBUTE_GROUPS = ("colour", "shape", "colour+shape", "quality_only")


class EvalLrmError(ConfigError):
    """A user-facing input problem of eval_lrm (missing scheduler, empty split); printed as one line."""


# --------------------------------------------------------------------------------------------------------
# Pure pieces of the report
# --------------------------------------------------------------------------------------------------------


def accuracy_table(correct: np.ndarray, decided: np.ndarray, timesteps: Sequence[int], margin: float) -> list[dict]:
    """Per timestep (ascending): n decided pairs, accuracy, Wilson 95% [lo, hi], lo > 0.5 + margin."""
    rows = []
    for j, t in enumerate(timesteps):
        c = correct[decided, j]
        if c.size == 0:
            rows.append({"t": int(t), "n": 0, "acc": None, "lo": None, "hi": None, "above_chance": False})
            continue
        acc, lo, hi = accuracy_ci(c.astype(np.float64))
        rows.append({"t": int(t), "n": int(c.size), "acc": acc, "lo": lo, "hi": hi,
                     "above_chance": bool(lo > 0.5 + margin)})
    return rows


def chance_summary(rows: list[dict]) -> dict[str, Optional[int]]:
    """highest_t_above_chance: the largest t above chance; blind_from_t: the smallest t from which every
    larger grid t is at chance (None when the highest t is still above chance)."""
    above = [r["t"] for r in rows if r["above_chance"]]
    blind_from = None
    for r in reversed(rows):  # descending t
        if r["above_chance"]:
            break
        blind_from = r["t"]
    return {"highest_t_above_chance": max(above) if above else None, "blind_from_t": blind_from}


def attribute_group(differ: Sequence[str]) -> str:
    """The attribute type of a shapes pair from the attributes its images disagree on (fg, bg, shape)."""
    colour = bool({"fg", "bg"} & set(differ))
    shape = "shape" in differ
    if colour and shape:
        return "colour+shape"
    if colour:
        return "colour"
    if shape:
        return "shape"
    return "quality_only"


# --------------------------------------------------------------------------------------------------------
# Side inputs: the data folder's annotator ceiling and per-pair attributes
# --------------------------------------------------------------------------------------------------------


def find_data_dir(latents_dir: Path) -> Optional[Path]:
    """The pairs folder the latents were made from (latents.json's data_dir), if it still exists."""
    summary = latents_dir / "latents.json"
    if not summary.is_file():
        return None
    data_dir = read_json(summary).get("data_dir")
    return Path(data_dir) if data_dir and Path(data_dir).is_dir() else None


def annotator_ceiling(data_dir: Optional[Path], split: str = "test") -> tuple[Optional[float], Optional[str]]:
    """The labels' agreement with the noiseless reward on `split` (manifest.json or summary.json of the
    shapes download stage: splits.<split>.annotator_agreement); (None, None) when not recorded."""
    if data_dir is None:
        return None, None
    for name in ("manifest.json", "summary.json"):
        path = data_dir / name
        if not path.is_file():
            continue
        value = read_json(path).get("splits", {}).get(split, {}).get("annotator_agreement")
        if isinstance(value, (int, float)) and np.isfinite(value):
            return float(value), str(path)
    return None, None


def pair_attributes(records: list[dict], data_dir: Optional[Path]) -> dict[str, list[str]]:
    """pair key -> differing attributes: from the shard json ("differ") or pairs_meta.jsonl by ranking_id."""
    by_rid: dict[int, list[str]] = {}
    meta_file = data_dir / "pairs_meta.jsonl" if data_dir is not None else None
    if meta_file is not None and meta_file.is_file():
        for line in meta_file.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if "differ" in row and "ranking_id" in row:
                    by_rid[int(row["ranking_id"])] = list(row["differ"])
    out = {}
    for r in records:
        meta = r["meta"]
        if "differ" in meta:
            out[r["key"]] = list(meta["differ"])
        elif meta.get("ranking_id") is not None and int(meta["ranking_id"]) in by_rid:
            out[r["key"]] = by_rid[int(meta["ranking_id"])]
    return out


# --------------------------------------------------------------------------------------------------------
# Optional: SPO's step-aware pixel model
# --------------------------------------------------------------------------------------------------------


def spm_accuracy(cfg: Config, spm_dir: Optional[str | Path], base_dir: Optional[Path], latents_dir: Path,
                 timesteps: Sequence[int], gather: Callable[[list], list]) -> Optional[list[dict]]:
    """SPO's pixel model's test accuracy by t, or None (with a log line) when it cannot be had.

    Uses lpo.reward.pixel: ``StepAwarePixelModel.from_pretrained`` and ``pixel_correct_by_t`` (the SPM's own
    protocol: one shared noise per pair, one CFG step of the base model, decoded x0-hat), so it needs the base
    model folder too. Per-key verdicts are gathered over processes and merged, like the LRM's records.
    """
    if spm_dir is None:
        return None
    if not Path(spm_dir).is_dir():
        log.warning("--spm %s: no such folder; the pixel-model curve is skipped", spm_dir)
        return None
    if importlib.util.find_spec("lpo.reward.pixel") is None:
        log.warning("--spm given, but lpo.reward.pixel does not exist; the pixel-model curve is skipped")
        return None
    if base_dir is None or not base_dir.is_dir():
        log.warning("--spm needs the base model (--base, or 'base' in the LRM's train_lrm.json): %s not found; "
                    "the pixel-model curve is skipped", base_dir)
        return None
    from lpo.backbones import load_pipeline_folder

    pixel = importlib.import_module("lpo.reward.pixel")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spm = pixel.StepAwarePixelModel.from_pretrained(spm_dir).to(device)
    backbone = load_pipeline_folder(base_dir).to(device)
    loader = PairLoader(latents_dir, "test", 1, shuffle=False)
    verdicts = pixel.pixel_correct_by_t(spm, backbone, loader, timesteps, cfg.experiment.seed, cfg.train_spm.cfg,
                                        cfg.eval_lrm.batch_size)  # {t: {pair key: correct}}
    merged: dict[int, dict[str, bool]] = {int(t): {} for t in timesteps}
    for part in gather([verdicts]):
        for t, by_key in part.items():
            merged[int(t)].update(by_key)
    keys = sorted(set().union(*merged.values()))
    if not keys:
        log.warning("the pixel model decided no test pair; its curve is skipped")
        return None
    correct = np.array([[merged[int(t)].get(k, False) for t in timesteps] for k in keys])  # (P, T)
    return accuracy_table(correct, np.ones(len(keys), dtype=bool), timesteps, cfg.eval_lrm.chance_margin)


# --------------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------------


def plot_accuracy(path: str | Path, rows: list[dict], ceiling: Optional[float], spm_rows: Optional[list[dict]],
                  title: str) -> None:
    """Accuracy vs t with the 95% band, the chance line and (when known) the annotator ceiling.

    Points whose interval reaches chance (not above_chance) are hollow: those are the timesteps calibrate marks
    untrainable for LPO. The title names the models shown ("LRM" or "LRM vs SPO pixel model"), then `title`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for data, label, colour in ((rows, "LRM", "tab:blue"), (spm_rows, "SPO pixel model", "tab:orange")):
        if not data:
            continue
        pts = [r for r in data if r["acc"] is not None]
        t = [r["t"] for r in pts]
        ax.plot(t, [r["acc"] for r in pts], color=colour, label=label)
        ax.fill_between(t, [r["lo"] for r in pts], [r["hi"] for r in pts], color=colour, alpha=0.2)
        for above in (True, False):
            sel = [r for r in pts if r["above_chance"] == above]
            ax.plot([r["t"] for r in sel], [r["acc"] for r in sel], "o", ms=4, color=colour,
                    markerfacecolor=colour if above else "white")
    ax.plot([], [], "o", ms=4, color="0.4", markerfacecolor="white", label="hollow: interval reaches chance")
    ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
    if ceiling is not None:
        ax.axhline(ceiling, color="tab:green", ls=":", lw=1.2, label=f"annotator ceiling {ceiling:.2f}")
    ax.set_xlabel("timestep t (noise increases to the right)")
    ax.set_ylabel("pairwise accuracy (ties excluded)")
    ax.set_ylim(0.0, 1.02)
    models = "LRM vs SPO pixel model" if spm_rows else "LRM"
    ax.set_title(f"{models}: held-out pair accuracy by timestep\n{title}", fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(f".{Path(path).stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------


def run(cfg: Config, model_dir: str | Path, latents_dir: str | Path, out_json: str | Path, plot_png: str | Path,
        spm_dir: Optional[str | Path] = None, data_dir: Optional[str | Path] = None,
        base_dir: Optional[str | Path] = None) -> dict:
    """Evaluate the LRM in `model_dir` on the test split of `latents_dir`; writes `out_json` and `plot_png`.

    Optional: `spm_dir` (SPO's pixel model: its curve is added; needs `base_dir`, by default the base recorded
    in the LRM's train_lrm.json), `data_dir` (the pairs folder, by default latents.json's data_dir)."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from diffusers import DDIMScheduler

    e = cfg.eval_lrm
    if e.batch_size < 1 or e.bootstrap < 1:
        raise ConfigError(f"eval_lrm.batch_size and eval_lrm.bootstrap must be >= 1, got {e.batch_size}, {e.bootstrap}")
    model_dir, latents_dir = Path(model_dir), Path(latents_dir)
    scheduler_dir = model_dir / "scheduler"
    if not (scheduler_dir / "scheduler_config.json").is_file():
        raise EvalLrmError(f"{scheduler_dir}: no scheduler_config.json (an LRM folder written by train_lrm has one)")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    try:
        loader = PairLoader(latents_dir, "test", 1, shuffle=False)
    except ShardError as err:
        raise EvalLrmError(str(err)) from None
    if len(loader) == 0:
        raise EvalLrmError(f"{latents_dir}: the test split has fewer pairs than the "
                           f"{accelerator.num_processes} processes")

    scheduler = DDIMScheduler.from_pretrained(scheduler_dir)
    grid, _ = ddim_timesteps(scheduler, cfg.train_lrm.ddim_steps)
    timesteps = sorted(int(t) for t in grid)
    alphas = scheduler.alphas_cumprod.clone()
    seed = cfg.experiment.seed
    lrm = LatentRewardModel.from_pretrained(model_dir).to(device).eval()
    scorer = PairScorer(lrm, cache_text=True).eval()
    log.info("LRM %s on %s: test split of %s (%d pairs), t = %s", model_dir, device, latents_dir,
             loader.index["n_samples"], timesteps)
    records = score_pairs(scorer, loader, timesteps, alphas, seed, e.batch_size, device, desc="eval_lrm",
                          show_progress=accelerator.is_main_process)
    records = dedupe(gather_object(records))
    skipped = loader.last_stats.get("nonfinite_skipped", 0)

    correct, decided = accuracy_by_t(records, len(timesteps))
    if not decided.any():
        raise EvalLrmError(f"{latents_dir}: every test pair is a tie; no accuracy can be measured")
    rows = accuracy_table(correct, decided, timesteps, e.chance_margin)
    per_pair = correct[decided].mean(axis=1)  # (P,) accuracy of each pair over the grid
    prompts = np.asarray([r["prompt_key"] for r in records])[decided]
    grid_mean = grouped_bootstrap_ci(per_pair, prompts, n_boot=e.bootstrap, seed=seed)

    data_dir = Path(data_dir) if data_dir is not None else find_data_dir(latents_dir)
    ceiling, ceiling_source = annotator_ceiling(data_dir)
    by_attribute = _by_attribute(records, correct, decided, timesteps, data_dir, e.chance_margin)

    if base_dir is None and (model_dir / "train_lrm.json").is_file():
        base_dir = read_json(model_dir / "train_lrm.json").get("base")
    spm_rows = spm_accuracy(cfg, spm_dir, Path(base_dir) if base_dir else None, latents_dir, timesteps, gather_object)

    lowest = rows[0]
    result = {
        "model": str(model_dir), "latents": str(latents_dir), "split": "test",
        "noise": "same t for both images; independent posterior and diffusion noise per image, seeded by "
                 f"(experiment.seed={seed}, pair key); the same noise at every t",
        "timesteps": timesteps, "chance_margin": e.chance_margin,
        "n_pairs": len(records), "n_ties_excluded": int((~decided).sum()), "nonfinite_skipped": int(skipped),
        "by_t": rows, **chance_summary(rows),
        "lowest_t": {k: lowest[k] for k in ("t", "n", "acc", "lo", "hi")},
        "grid_mean": grid_mean,
        "annotator_ceiling": ceiling, "annotator_ceiling_source": ceiling_source,
        "by_attribute": by_attribute, "spm": {"dir": str(spm_dir), "by_t": spm_rows} if spm_rows else None,
    }
    if accelerator.is_main_process:
        write_json(out_json, result)
        title = f"{result['n_pairs'] - result['n_ties_excluded']} test pairs (ties excluded); bands: Wilson 95%"
        plot_accuracy(plot_png, rows, ceiling, spm_rows, title)
        log.info("accuracy at t=%d: %.3f [%.3f, %.3f]; highest t above chance: %s; grid mean %.3f; ceiling %s",
                 lowest["t"], lowest["acc"], lowest["lo"], lowest["hi"], result["highest_t_above_chance"],
                 grid_mean["mean"], ceiling)
    accelerator.wait_for_everyone()
    return result


def _by_attribute(records: list[dict], correct: np.ndarray, decided: np.ndarray, timesteps: Sequence[int],
                  data_dir: Optional[Path], margin: float) -> Optional[dict[str, Any]]:
    """Accuracy per attribute group (which attributes differ between the images); None without that info."""
    attributes = pair_attributes(records, data_dir)
    if not attributes:
        log.info("no per-pair attribute information (shard json 'differ' or pairs_meta.jsonl); by_attribute skipped")
        return None
    groups = np.asarray([attribute_group(attributes[r["key"]]) if r["key"] in attributes else "" for r in records])
    out: dict[str, Any] = {"covered_pairs": int(sum(1 for r in records if r["key"] in attributes))}
    for group in ATTRIBUTE_GROUPS:
        mask = groups == group
        if not (mask & decided).any():
            continue
        rows = accuracy_table(correct[mask], decided[mask], timesteps, margin)
        out[group] = {"n": rows[0]["n"], "lowest_t": rows[0], "by_t": rows}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, metavar="DIR", help="LRM folder (train_lrm's model/)")
        parser.add_argument("--spm", default=None, metavar="DIR", help="SPO's pixel model folder (its curve is added)")
        parser.add_argument("--plot", required=True, metavar="PNG", help="accuracy-vs-t PNG")

    return stage_main("eval_lrm", __doc__,
                      lambda cfg, a: run(cfg, a.model, a.latents, a.out, a.plot, spm_dir=a.spm, data_dir=a.data,
                                         base_dir=a.base),
                      argv, inputs=("latents",), optional_inputs=("data", "base"), out=("JSON", "accuracy JSON"),
                      arguments=arguments, user_errors=(ShardError,), summary_keys=())


if __name__ == "__main__":
    sys.exit(main())
