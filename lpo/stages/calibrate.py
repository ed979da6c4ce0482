"""Stage `calibrate`: per-timestep pair thresholds th(t) for LPO, and the timesteps LPO must not train at.

docs/design.md "Threshold calibration", docs/method.md section 3 (step 2d and the dynamic threshold). Output
``thresholds.json`` (read by ``optimize``; ``lpo.calibration.threshold_at`` looks thresholds up by exact t):

    mode                 "sigma" | "rollout"
    timesteps            the optimize sampler's grid, ddim_timesteps(base scheduler, optimize.ddim_steps)
    sigmas               DDIM sigma of each step (eta = optimize.eta)
    thresholds           th(t): a step's best/worst pair is kept iff pair_gap = tanh((S_w - S_l)/2) > th(t);
                         null = no threshold (rollout mode found none; never kept, the step is untrainable),
                         the format lpo.methods.engine.read_thresholds reads
    trainable            False where LPO must not train: the LRM's held-out accuracy at the nearest evaluated t
                         has a 95% lower bound <= 0.5 + calibrate.chance_margin (a blind judge picks noise
                         pairs), or, in rollout mode, no threshold reaches calibrate.precision
    untrainable_reason   null | "lrm_at_chance" | "no_rollout_threshold" (both: "lrm_at_chance")
    lrm_accuracy         the accuracy entry used per step (nearest evaluated t; ties: the lower bound that is lower;
                         an entry without pairs, lo null, counts as at chance)
    expected_kept_share  rollout: share of steps' pairs LPO will keep (0 where untrainable); null in sigma mode
    agreement            rollout: per-step agreement of the LRM's best/worst order with the judge; null in sigma
    config               the calibrate section and the optimize fields that define the sampler

Modes:
- ``sigma``: th(t) linear in the DDIM sigma between calibrate.th_min and th_max (the paper's rule, Eq. 11).
- ``rollout``: on calibrate.n_prompts val prompts (cycled when the split is smaller; each draw has its own
  noise), run LPO's branching sampler (one CFG U-Net pass per step, K = optimize.num_children children,
  the LRM scores all K at the parent's t, or the child's with optimize.lpo.lrm_timestep = child), roll every
  child out to x_0 with deterministic DDIM (eta 0, CFG optimize.cfg) along the rest of the grid, decode and
  judge it (shapes: oracle.judge -> annotator.reward, the annotator's noiseless reward), and record per
  step the LRM's best/worst gap and whether the judge prefers the LRM's best child. Judge ties
  (|r_w - r_l| < annotator.tie_margin, or equal rewards) count as disagreement by default (calibrate.ties:
  "disagree"): a kept pair whose children the judge cannot tell apart teaches nothing, so the precision
  asked for is the share of kept pairs the judge *strictly* confirms. With ties: "exclude" they are left
  out of the agreement (but not of the kept share). th(t) = calibration.rollout_threshold(gaps, agree,
  precision, min_pairs); None -> threshold null (never kept) and the step is untrainable. The trunk
  continues from a uniformly random child, as in LPO. All K x prompts children of a step are rolled out
  together (in chunks of calibrate.batch_size).
  Real worlds have no judge yet: rollout mode raises a ConfigError there.
  Cost: N (N - 1) / 2 CFG U-Net passes over the B x K children plus N x B x K VAE decodes for N steps; the
  shapes defaults (64 prompts, K = 4, 20 steps) took ~4.5 min on the shared 2-core CPU (190 passes at batch
  512, 5,120 decodes), against ~0.02 s for sigma mode.

The accuracy file is eval_lrm's: a table "by_t" (or "per_t") of {t, n, acc, lo, hi, above_chance}.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from lpo.backbones import Backbone, BackboneError, load_pipeline_folder, load_scheduler
from lpo.branching import branching_steps
from lpo.calibration import kept_share, rollout_threshold, sigma_thresholds
from lpo.config import Config, ConfigError, check_minimums, to_dict
from lpo.diffusion import ddim_sigmas, ddim_timesteps
from lpo.losses import pair_gap
from lpo.reward.lrm import LatentRewardModel, check_lrm_dir
from lpo.sampling import ddim_rollout, decode_images
from lpo.stage_main import stage_main
from lpo.utils import read_json, write_json
from lpo.world.judge import Judge, judge_agreement, shapes_judge

log = logging.getLogger(__name__)

STREAM = 7  # this stage's generator is seeded from (experiment.seed, STREAM); other stages use other streams
ACCURACY_TABLES = ("by_t", "per_t")  # eval_lrm writes "by_t"; "per_t" is the name first agreed on
ACCURACY_OPTIONAL = ("n", "hi", "above_chance")  # copied when present


# --------------------------------------------------------------------------------------------------------
# Checks and inputs
# --------------------------------------------------------------------------------------------------------


def check_calibrate(cfg: Config) -> None:
    """Raise ConfigError naming the calibrate.<field> (or optimize.<field>) the stage cannot use."""
    cal, opt = cfg.calibrate, cfg.optimize
    for name in ("th_min", "th_max"):
        value = getattr(cal, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"calibrate.{name}: expected a pair gap in [0, 1), got {value}")
    if not 0.0 <= cal.chance_margin < 0.5:
        raise ConfigError(f"calibrate.chance_margin: expected a value in [0, 0.5), got {cal.chance_margin}")
    if opt.ddim_steps < 2:
        raise ConfigError(f"optimize.ddim_steps: the sampler needs >= 2 steps, got {opt.ddim_steps}")
    if not 0.0 < opt.eta <= 1.0:
        raise ConfigError(f"optimize.eta: LPO's children need noise, expected a value in (0, 1], got {opt.eta}")
    if cal.mode == "rollout":
        check_minimums("calibrate", cal, {"n_prompts": 1, "min_pairs": 1, "batch_size": 1})
        if not 0.0 < cal.precision <= 1.0:
            raise ConfigError(f"calibrate.precision: expected a share in (0, 1], got {cal.precision}")
        if opt.num_children < 2:
            raise ConfigError(f"optimize.num_children: a best/worst pair needs K >= 2, got {opt.num_children}")


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def read_accuracy(path: Path) -> list[dict[str, Any]]:
    """eval_lrm's accuracy.json -> its per-timestep entries {t, n, acc, lo, hi, above_chance}, sorted by t.

    The table is under "by_t" (what eval_lrm writes) or "per_t". acc and lo may be null only for an entry
    without pairs (n = 0); such an entry keeps lo = None (no evidence: at chance). Errors name file and key.
    """
    if not path.is_file():
        raise ConfigError(f"{path}: LRM accuracy file not found (run the eval_lrm rule first)")
    try:
        doc = read_json(path)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    name = next((key for key in ACCURACY_TABLES if isinstance(doc, dict) and key in doc), ACCURACY_TABLES[0])
    table = doc.get(name) if isinstance(doc, dict) else None
    if not isinstance(table, list) or not table:
        raise ConfigError(f"{path}: expected a non-empty list under the key {' or '.join(map(repr, ACCURACY_TABLES))} "
                          "(entries {t, n, acc, lo, hi, above_chance})")
    entries = []
    for i, entry in enumerate(table):
        where = f"{path}: {name}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping, got {entry!r}")
        t = entry.get("t")
        if not _number(t) or int(t) != t:
            raise ConfigError(f"{where}.t: expected an integer timestep, got {t!r}")
        empty = entry.get("n") == 0
        for key in ("acc", "lo"):
            value = entry.get(key)
            if not (value is None and empty) and not (_number(value) and 0.0 <= value <= 1.0):
                raise ConfigError(f"{where}.{key}: expected an accuracy in [0, 1] (null only with n = 0), "
                                  f"got {value!r}")
        kept = {"t": int(t), "acc": entry["acc"], "lo": entry["lo"]}
        kept.update({key: entry[key] for key in ACCURACY_OPTIONAL if key in entry})
        entries.append(kept)
    ts = [e["t"] for e in entries]
    if len(set(ts)) != len(ts):
        raise ConfigError(f"{path}: {name} lists a timestep twice: {sorted(ts)}")
    return sorted(entries, key=lambda e: e["t"])


def nearest_accuracy(entries: Sequence[dict[str, Any]], timesteps: Sequence[int]) -> list[dict[str, Any]]:
    """For each sampling t the accuracy entry of the nearest evaluated t.

    Equidistant entries: the one with the lower interval bound (the more cautious verdict; no bound = lowest).
    """
    if not entries:
        raise ValueError("no accuracy entries")
    out = []
    for t in timesteps:
        out.append(min(entries, key=lambda e: (abs(e["t"] - int(t)), -1.0 if e["lo"] is None else e["lo"])))
    return out


def lrm_above_chance(lo: Sequence[Optional[float]], margin: float) -> list[bool]:
    """The chance gate of docs/design.md "Threshold calibration": trainable iff the 95% lower bound > 0.5 + margin.

    The same rule as ``lpo.calibration.above_chance``, applied to the bounds eval_lrm wrote; None (no pairs
    were evaluated there) is no evidence, so not above chance.
    """
    return [v is not None and float(v) > 0.5 + margin for v in lo]


def load_val_prompts(prompts_dir: Path, n: int) -> tuple[list[str], list[list[str]]]:
    """n calibration prompts (and their triples) from the shapes world's val split, cycled when it is smaller."""
    path = prompts_dir / "prompts.json"
    if not path.is_file():
        raise ConfigError(f"{path}: missing (run the synthesize rule first)")
    doc = read_json(path)
    val = doc.get("val") if isinstance(doc, dict) else None
    if not isinstance(val, dict) or not val.get("prompts") or len(val["prompts"]) != len(val.get("triples", [])):
        raise ConfigError(f"{path}: expected val.prompts and val.triples, non-empty and of one length")
    prompts, triples = val["prompts"], val["triples"]
    return [prompts[i % len(prompts)] for i in range(n)], [triples[i % len(triples)] for i in range(n)]


# --------------------------------------------------------------------------------------------------------
# Rollout mode: the branching sampler with every child rolled out and judged
# --------------------------------------------------------------------------------------------------------


def _pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("calibrate.device: 'cuda' asked for, but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@torch.no_grad()
def branching_rollout(
    backbone: Backbone,
    lrm: LatentRewardModel,
    prompts: Sequence[str],
    judge: Judge,
    cfg: Config,
    device: torch.device,
    show_progress: bool = True,
) -> dict[str, np.ndarray]:
    """LPO's branching sampler on `prompts`, every child judged after a deterministic rollout.

    Returns per step i (rows) and prompt b (columns): gap (N, B) float = pair_gap of the LRM's best and worst
    child; agree, tie (N, B) bool (``judge_agreement``); reward_w, reward_l (N, B) the judge's rewards.
    """
    opt, cal = cfg.optimize, cfg.calibrate
    batch, k = len(prompts), opt.num_children
    timesteps, prev = ddim_timesteps(backbone.scheduler, opt.ddim_steps)  # (N,), (N,)
    n_steps = len(timesteps)
    gen = torch.Generator().manual_seed(cfg.experiment.seed * 1000 + STREAM)

    embeds = backbone.encode_prompts(list(prompts)).to(device)  # (B, L, D)
    null = backbone.null_embeds(1).to(device)  # (1, L, D)
    enc = lrm.encode_text(list(prompts)).repeat_interleave(k)  # B*K rows: the K children of prompt b in a row
    null_enc = lrm.encode_text([""]) if lrm.vfe_scale != 1.0 else None
    child_prompt = torch.arange(batch).repeat_interleave(k)  # (B*K,) prompt index of each child

    shape = (backbone.latent_channels, backbone.latent_size, backbone.latent_size)
    x_T = torch.randn((batch, *shape), generator=gen).to(device) * backbone.scheduler.init_noise_sigma  # (B, C, h, w)
    rows = {name: np.zeros((n_steps, batch), dtype=dtype) for name, dtype in
            (("gap", np.float64), ("agree", bool), ("tie", bool), ("reward_w", np.float64), ("reward_l", np.float64))}
    chunk = cal.batch_size
    steps = branching_steps(backbone.unet, backbone.scheduler, embeds, null, x_T, timesteps, prev, opt.cfg, opt.eta,
                            k, gen)
    for step in tqdm(steps, total=n_steps, desc="calibrate", unit="step", disable=not show_progress):
        i, t, t_prev = step.index, step.t, step.t_prev
        flat = step.children.to(x_T.dtype).flatten(0, 1)  # (B*K, C, h, w)

        t_score = t if opt.lpo.lrm_timestep == "parent" else max(t_prev, 0)
        scores, rewards = [], []
        for s in range(0, batch * k, chunk):
            rows_ix = child_prompt[s:s + chunk]
            scores.append(lrm.score(flat[s:s + chunk], t_score, enc[s:s + chunk], null_enc).float().cpu())
            x0 = ddim_rollout(backbone.unet, backbone.scheduler, flat[s:s + chunk], i + 1, timesteps, prev,
                              embeds.index(rows_ix.to(device)), null, opt.cfg)
            rewards.append(judge.reward(decode_images(backbone.vae, x0), rows_ix.numpy()))
        score = torch.cat(scores).view(batch, k)  # (B, K)
        reward = np.concatenate(rewards).reshape(batch, k)  # (B, K)

        best, worst = score.argmax(dim=1), score.argmin(dim=1)  # (B,) each
        b = torch.arange(batch)
        rows["gap"][i] = pair_gap(score[b, best], score[b, worst]).double().numpy()
        rows["reward_w"][i], rows["reward_l"][i] = reward[b, best], reward[b, worst]
        rows["agree"][i], rows["tie"][i] = judge_agreement(rows["reward_w"][i], rows["reward_l"][i], judge.tie_margin)
    return rows


def rollout_calibration(rows: dict[str, np.ndarray], cfg: Config) -> dict[str, Any]:
    """Per-step thresholds from the rollout records (``calibration.rollout_threshold``) and their summary.

    thresholds[i] is None where no threshold reaches the precision (never kept; kept share 0).
    """
    cal = cfg.calibrate
    thresholds, found, kept, agree_all, agree_kept, tie_rate = [], [], [], [], [], []
    for gap, agree, tie in zip(rows["gap"], rows["agree"], rows["tie"]):
        use = ~tie if cal.ties == "exclude" else np.ones_like(tie)
        th = rollout_threshold(gap[use].tolist(), agree[use].tolist(), cal.precision, cal.min_pairs) if use.any() \
            else None
        found.append(th is not None)
        thresholds.append(th)
        kept.append(kept_share(gap.tolist(), th) if th is not None else 0.0)
        agree_all.append(float(agree[use].mean()) if use.any() else None)
        in_kept = use & (gap > th) if th is not None else np.zeros_like(use)
        agree_kept.append(float(agree[in_kept].mean()) if in_kept.any() else None)
        tie_rate.append(float(tie.mean()))
    return {
        "thresholds": thresholds,
        "found": found,
        "kept_share": kept,
        "agreement": {
            "ties": cal.ties,
            "precision_target": cal.precision,
            "min_pairs": cal.min_pairs,
            "n": [int(g.size) for g in rows["gap"]],
            "agree_all": agree_all,
            "agree_kept": agree_kept,
            "tie_rate": tie_rate,
            "mean_gap": [float(g.mean()) for g in rows["gap"]],
            "gap": [[round(float(v), 6) for v in g] for g in rows["gap"]],
            "agree": rows["agree"].tolist(),
            "tie": rows["tie"].tolist(),
            "reward_w": [[round(float(v), 6) for v in r] for r in rows["reward_w"]],
            "reward_l": [[round(float(v), 6) for v in r] for r in rows["reward_l"]],
        },
    }


# --------------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------------


# Legend words for thresholds.json's untrainable_reason values.
UNTRAINABLE_WORDS = {"lrm_at_chance": "LRM at chance", "no_rollout_threshold": "no rollout threshold"}


def plot_thresholds(result: dict[str, Any], path: Path) -> None:
    """th(t) vs t with the untrainable steps shaded; rollout mode adds agreement and kept share per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = np.asarray(result["timesteps"], dtype=float)
    none = np.array([v is None for v in result["thresholds"]])
    th = np.array([np.nan if v is None else v for v in result["thresholds"]], dtype=float)
    untrainable = ~np.asarray(result["trainable"], dtype=bool)
    half = 0.5 * float(np.min(np.abs(np.diff(ts)))) if len(ts) > 1 else 0.5
    rollout = result["mode"] == "rollout"
    fig, axes = plt.subplots(1, 2 if rollout else 1, figsize=(11 if rollout else 6, 4), squeeze=False)

    reasons = sorted({r for r in result.get("untrainable_reason", []) if r})
    why = f" ({', '.join(UNTRAINABLE_WORDS.get(r, r) for r in reasons)})" if reasons else ""

    def shade(ax: Any) -> None:
        for j, t in enumerate(ts[untrainable]):
            ax.axvspan(t - half, t + half, color="grey", alpha=0.25, lw=0,
                       label=f"untrainable{why}" if j == 0 else None)

    ax = axes[0, 0]
    shade(ax)
    ax.plot(ts, th, "-", color="C0", label="th(t)")
    # trainable steps filled; untrainable ones hollow: their threshold is never applied
    ax.plot(ts[~untrainable], th[~untrainable], "o", color="C0")
    ax.plot(ts[untrainable], th[untrainable], "o", color="C0", markerfacecolor="white")
    if none.any():
        ax.plot(ts[none], np.ones(int(none.sum())), "x", color="C3", label="no threshold (never kept)")
    ax.set(xlabel="timestep t (noise increases to the right)", ylabel="threshold th(t) on tanh((S_w - S_l) / 2)",
           ylim=(0, 1.02))
    ax.set_title(f"LPO pair thresholds, {result['mode']} mode: {int((~untrainable).sum())} of {len(ts)} "
                 "steps trainable", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    if rollout:
        agreement = result["agreement"]
        ax = axes[0, 1]
        shade(ax)
        nan = lambda xs: [np.nan if v is None else v for v in xs]  # noqa: E731
        ax.plot(ts, nan(agreement["agree_all"]), "o-", label="agreement, all pairs")
        ax.plot(ts, nan(agreement["agree_kept"]), "s-", label="agreement, kept pairs")
        ax.plot(ts, agreement["tie_rate"], "x:", label="judge tie rate")
        ax.plot(ts, result["expected_kept_share"], "^-", label="expected kept share")
        ax.axhline(agreement["precision_target"], color="k", ls="--", lw=1, label="target precision")
        ax.set(xlabel="timestep t (noise increases to the right)", ylabel="share", ylim=(0, 1.02))
        ax.set_title("rollouts: the LRM's best/worst order vs the judge", fontsize=10)
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # atomic: rename when complete
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------------


def run(
    cfg: Config,
    lrm_dir: str | Path,
    accuracy_path: str | Path,
    base_dir: str | Path,
    prompts_dir: str | Path,
    out_path: str | Path,
    plot_path: str | Path,
    show_progress: bool = True,
) -> dict:
    """Write thresholds.json (see the module docstring) and its plot; return a summary."""
    start = time.perf_counter()
    lrm_dir, accuracy_path, base_dir = Path(lrm_dir), Path(accuracy_path), Path(base_dir)
    prompts_dir, out_path, plot_path = Path(prompts_dir), Path(out_path), Path(plot_path)
    cal, opt = cfg.calibrate, cfg.optimize
    check_calibrate(cfg)
    if cal.mode == "rollout" and cfg.experiment.world != "shapes":
        raise ConfigError("calibrate.mode: rollout needs a judge of images; only the shapes oracle exists "
                          f"(experiment.world is {cfg.experiment.world!r}); use mode: sigma or configure a scorer")
    check_lrm_dir(lrm_dir)
    accuracy = read_accuracy(accuracy_path)
    if not prompts_dir.exists():
        raise ConfigError(f"{prompts_dir}: prompt source folder not found")
    scheduler = load_scheduler(base_dir)

    timesteps, sigmas = ddim_sigmas(scheduler, opt.ddim_steps, opt.eta)  # (N,), (N,)
    ts = [int(t) for t in timesteps]
    used = nearest_accuracy(accuracy, ts)
    gate = lrm_above_chance([e["lo"] for e in used], cal.chance_margin)
    if not cal.gate_on_accuracy:
        log.warning("calibrate.gate_on_accuracy is false: every step is trainable, even where the LRM is at chance")
        gate = [True] * len(gate)
    far = sorted({(t, e["t"]) for t, e in zip(ts, used) if e["t"] != t})
    if far:
        log.info("accuracy looked up at the nearest evaluated t for %d steps (sampling t -> evaluated t): %s",
                 len(far), far)

    expected_kept, agreement = None, None
    found = [True] * len(ts)
    if cal.mode == "sigma":
        thresholds = sigma_thresholds(sigmas, cal.th_min, cal.th_max).tolist()
    else:
        device = _pick_device(cal.device)
        prompts, triples = load_val_prompts(prompts_dir, cal.n_prompts)
        backbone = load_pipeline_folder(base_dir)
        lrm = LatentRewardModel.from_pretrained(lrm_dir).eval()
        if device.type != "cpu":  # both load on the CPU; moving there again only makes diffusers warn
            backbone.to(device)
            lrm.to(device)
        rows = branching_rollout(backbone, lrm, prompts, shapes_judge(cfg, triples), cfg, device, show_progress)
        measured = rollout_calibration(rows, cfg)
        thresholds, found, agreement = measured["thresholds"], measured["found"], measured["agreement"]
        expected_kept = [share if ok and g else 0.0 for share, ok, g in zip(measured["kept_share"], found, gate)]

    trainable = [bool(g and f) for g, f in zip(gate, found)]
    reasons = [None if ok else ("lrm_at_chance" if not g else "no_rollout_threshold")
               for ok, g in zip(trainable, gate)]
    result = {
        "mode": cal.mode,
        "timesteps": ts,
        "sigmas": [float(s) for s in sigmas],
        "thresholds": [None if v is None else float(v) for v in thresholds],
        "trainable": trainable,
        "untrainable_reason": reasons,
        "lrm_accuracy": used,
        "expected_kept_share": expected_kept,
        "agreement": agreement,
        "config": {
            "calibrate": to_dict(cal),
            "optimize": {"ddim_steps": opt.ddim_steps, "eta": opt.eta, "cfg": opt.cfg,
                         "num_children": opt.num_children, "lrm_timestep": opt.lpo.lrm_timestep},
            "seed": cfg.experiment.seed,
        },
        "inputs": {"lrm": str(lrm_dir), "accuracy": str(accuracy_path), "base": str(base_dir),
                   "prompts": str(prompts_dir)},
        "seconds": round(time.perf_counter() - start, 3),
    }
    if not any(trainable):
        log.warning("calibrate: no sampling step is trainable (reasons %s); optimize --method lpo will refuse "
                    "this file", sorted({r for r in reasons if r}))
    write_json(out_path, result)
    plot_thresholds(result, plot_path)
    numeric = [v for v in result["thresholds"] if v is not None]
    summary = {
        "mode": cal.mode,
        "steps": len(ts),
        "trainable_steps": int(sum(trainable)),
        "threshold_range": [min(numeric), max(numeric)] if numeric else None,
        "mean_expected_kept_share": None if expected_kept is None else float(np.mean(expected_kept)),
        "out": str(out_path),
        "plot": str(plot_path),
        "seconds": result["seconds"],
    }
    log.info("calibrate (%s): %d of %d steps trainable, th range %s -> %s in %.1f s", cal.mode,
             summary["trainable_steps"], len(ts), summary["threshold_range"], out_path, result["seconds"])
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--accuracy", required=True, metavar="JSON", help="eval_lrm's accuracy.json (by_t table)")
        parser.add_argument("--plot", required=True, metavar="PNG", help="output plot")

    return stage_main("calibrate", __doc__,
                      lambda cfg, a: run(cfg, a.lrm, a.accuracy, a.base, a.prompts, a.out, a.plot), argv, inputs=("lrm", "base", "prompts"), out=("JSON", "output thresholds.json"),
                      arguments=arguments, user_errors=(BackboneError,))


if __name__ == "__main__":
    sys.exit(main())
