"""Can anything tell LPO's sibling children apart? (issue #5 diagnostic)

LPO trains on the best and worst of K children x_{t-1}^k = mean + sigma eps_k of ONE parent x_t. Whether that
teaches anything depends on two things eval_lrm does not measure (it scores pairs of *different* images):
(a) do the siblings lead to different images at all, and (b) does the LRM rank the ones that do. This script
runs LPO's branching sampler (lpo.diffusion: one CFG U-Net pass, K children, a uniformly random child goes on)
with the BASE model on shapes calibration prompts and, at every step, rolls every child out to an image
(deterministic DDIM, the evaluation sampler) and judges it with the shapes oracle + the annotator's noiseless
reward (the judge of `calibrate.mode: rollout`). Per step it reports, over all K(K-1)/2 sibling pairs:

- ``nontie_share``: the share of sibling pairs whose rollouts the judge tells apart (|r_i - r_j| >= tie_margin);
- ``concordance[scorer]``: among those, the share the scorer orders like the judge (0.5 = blind), with a
  Wilson 95% interval, for three scorers of the child:
  ``lrm_parent`` the LRM at the parent's t (what LPO does by default, `optimize.lpo.lrm_timestep: parent`),
  ``lrm_child`` the LRM at the child's t, and ``x0hat_judge`` the judge itself on the decoded one-step
  prediction x0-hat of the child (one more base U-Net pass): a look-ahead oracle of the child's current
  state, i.e. roughly the best any reward of the state alone (latent or pixel, SPO's kind) could do;
- ``best_worst``: LPO's own pair (the LRM's highest- and lowest-scored child): judge non-tie share and
  agreement, overall and among the pairs a thresholds.json (``--thresholds``) would keep.

Usage (after `snakemake --cores all`):
    OMP_NUM_THREADS=2 .venv/bin/python scripts/sibling_ranking.py --config results/shapes/config.yaml \
        --base results/shapes/base --lrm results/shapes/lrm/model --world results/shapes/world \
        --thresholds results/shapes/calibration/thresholds.json --prompts 256 \
        --out results/shapes/calibration/sibling_ranking.json
~14 min for 256 prompts on 2 CPU cores (the rollouts). Not part of the test suite (its smoke run is).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lpo.backbones import load_pipeline_folder  # noqa: E402
from lpo.calibration import accuracy_ci  # noqa: E402
from lpo.config import load_config  # noqa: E402
from lpo.branching import branching_steps  # noqa: E402
from lpo.diffusion import cfg_noise_pred, ddim_step_split, ddim_timesteps  # noqa: E402
from lpo.reward.lrm import LatentRewardModel  # noqa: E402
from lpo.sampling import ddim_rollout, decode_images  # noqa: E402
from lpo.stages.calibrate import load_val_prompts  # noqa: E402
from lpo.world.judge import shapes_judge  # noqa: E402

SCORERS = ("lrm_parent", "lrm_child", "x0hat_judge")


def concordance(scores: np.ndarray, rewards: np.ndarray, tie_margin: float) -> tuple[int, int]:
    """(concordant, judged) over all sibling pairs of one step: scores, rewards (B, K).

    A pair is judged when its rewards differ by >= tie_margin; it is concordant when the scorer orders it the
    same way (a scorer tie is not concordant).
    """
    k = scores.shape[1]
    agree = judged = 0
    for i in range(k):
        for j in range(i + 1, k):
            dr = rewards[:, i] - rewards[:, j]  # (B,)
            ds = scores[:, i] - scores[:, j]  # (B,)
            mask = np.abs(dr) >= tie_margin
            agree += int((dr * ds > 0)[mask].sum())
            judged += int(mask.sum())
    return agree, judged


def best_worst_stats(lrm_scores: np.ndarray, rewards: np.ndarray, threshold: float | None,
                     tie_margin: float) -> dict:
    """LPO's pair (argmax / argmin of the LRM): judge non-tie share and agreement, all and kept (gap > th)."""
    rows = np.arange(lrm_scores.shape[0])
    w, l = lrm_scores.argmax(1), lrm_scores.argmin(1)
    gap = np.tanh((lrm_scores[rows, w] - lrm_scores[rows, l]) / 2)  # docs/method.md section 3 step 2d
    dr = rewards[rows, w] - rewards[rows, l]
    nontie = np.abs(dr) >= tie_margin

    def stats(mask: np.ndarray) -> dict:
        n, n_judged = int(mask.sum()), int((mask & nontie).sum())
        agree = int(((dr > 0) & mask & nontie).sum())
        return {"pairs": n, "judged": n_judged, "agree": agree,
                "agreement": agree / n_judged if n_judged else None}

    out = {"all": stats(np.ones_like(nontie))}
    if threshold is not None:
        out["kept"] = stats(gap > threshold)
    return out


@torch.no_grad()
def run(cfg, base_dir: Path, lrm_dir: Path, world_dir: Path, n_prompts: int, thresholds: dict | None,
        seed: int) -> dict:
    opt = cfg.optimize
    k = opt.num_children
    backbone = load_pipeline_folder(base_dir)
    lrm = LatentRewardModel.from_pretrained(lrm_dir).eval()
    prompts, triples = load_val_prompts(world_dir, n_prompts)
    judge = shapes_judge(cfg, triples)
    batch = len(prompts)
    timesteps, prev = ddim_timesteps(backbone.scheduler, opt.ddim_steps)  # (N,), (N,)
    gen = torch.Generator().manual_seed(seed)
    embeds = backbone.encode_prompts(list(prompts))
    null = backbone.null_embeds(1)
    enc = lrm.encode_text(list(prompts)).repeat_interleave(k)  # the K children of prompt b in a row
    null_enc = lrm.encode_text([""]) if lrm.vfe_scale != 1.0 else None
    child_prompt = torch.arange(batch).repeat_interleave(k)  # (B*K,)
    child_embeds = embeds.index(child_prompt)
    shape = (backbone.latent_channels, backbone.latent_size, backbone.latent_size)
    x_T = torch.randn((batch, *shape), generator=gen) * backbone.scheduler.init_noise_sigma  # (B, C, h, w)
    th_by_t = {} if thresholds is None else dict(zip(thresholds["timesteps"], thresholds["thresholds"]))
    steps = []
    start = time.perf_counter()
    # the trunk goes on from a random child (LPO) when the next step is asked for
    for branch in branching_steps(backbone.unet, backbone.scheduler, embeds, null, x_T, timesteps, prev, opt.cfg,
                                  opt.eta, k, gen):
        i, t, t_prev = branch.index, branch.t, branch.t_prev
        flat = branch.children.to(x_T.dtype).flatten(0, 1)  # (B*K, C, h, w)
        scores = {
            "lrm_parent": lrm.score(flat, t, enc, null_enc),
            "lrm_child": lrm.score(flat, max(t_prev, 0), enc, null_enc),
        }
        if i + 1 < len(timesteps):  # the child's one-step prediction of x_0 (the last child already is x_0)
            t_next, t_after = int(timesteps[i + 1]), int(prev[i + 1])
            out_next = cfg_noise_pred(backbone.unet, flat, t_next, child_embeds.hidden_states, null.hidden_states,
                                      opt.cfg, child_embeds.added_cond_kwargs(), null.added_cond_kwargs())
            x0_hat = ddim_step_split(out_next, flat, t_next, t_after, backbone.scheduler, 0.0).x0_hat
        else:
            x0_hat = flat
        ids = child_prompt.numpy()
        scores["x0hat_judge"] = torch.as_tensor(judge.reward(decode_images(backbone.vae, x0_hat), ids))
        x0 = ddim_rollout(backbone.unet, backbone.scheduler, flat, i + 1, timesteps, prev, child_embeds, null, opt.cfg)
        rewards = judge.reward(decode_images(backbone.vae, x0), ids).reshape(batch, k)  # (B, K)
        step = {"t": t, "pairs": batch * k * (k - 1) // 2, "concordance": {}}
        for name in SCORERS:
            agree, judged = concordance(scores[name].float().view(batch, k).numpy(), rewards, judge.tie_margin)
            _, lo, hi = accuracy_ci([1.0] * agree + [0.0] * (judged - agree)) if judged else (None, None, None)
            step["concordance"][name] = {"agree": agree, "judged": judged,
                                         "value": agree / judged if judged else None, "lo": lo, "hi": hi}
        step["nontie_share"] = step["concordance"]["lrm_parent"]["judged"] / step["pairs"]
        th = th_by_t.get(t)
        step["threshold"] = th
        step["best_worst"] = best_worst_stats(scores["lrm_parent"].float().view(batch, k).numpy(), rewards,
                                              th if thresholds is not None else None, judge.tie_margin)
        steps.append(step)
        c = step["concordance"]
        print(f"t={t:4d} judged {c['lrm_parent']['judged']:4d} of {step['pairs']}: "
              + "  ".join(f"{n} {c[n]['value'] if c[n]['value'] is None else round(c[n]['value'], 2)}"
                          for n in SCORERS)
              + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"prompts": batch, "num_children": k, "eta": opt.eta, "cfg": opt.cfg, "ddim_steps": opt.ddim_steps,
            "tie_margin": judge.tie_margin, "seed": seed, "scorers": list(SCORERS), "steps": steps,
            "seconds": round(time.perf_counter() - start, 1)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["steps"]
    ts = [s["t"] for s in steps]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, marker in zip(SCORERS, "osx"):
        val = [np.nan if s["concordance"][name]["value"] is None else s["concordance"][name]["value"] for s in steps]
        lo = [np.nan if s["concordance"][name]["lo"] is None else s["concordance"][name]["lo"] for s in steps]
        hi = [np.nan if s["concordance"][name]["hi"] is None else s["concordance"][name]["hi"] for s in steps]
        ax.plot(ts, val, marker + "-", label=name)
        ax.fill_between(ts, lo, hi, alpha=0.15)
    ax.axhline(0.5, color="k", lw=1, ls="--")
    ax.set_xlabel("timestep t of the parent")
    ax.set_ylabel("concordance with the judge")
    ax.set_title("sibling pairs the judge tells apart: who orders them right", fontsize=10)
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    ax2.plot(ts, [s["nontie_share"] for s in steps], "o-")
    ax2.set_xlabel("timestep t of the parent")
    ax2.set_ylabel("share of sibling pairs the judge tells apart")
    ax2.set_ylim(0, 1)
    ax2.invert_xaxis()
    fig.suptitle(f"{result['prompts']} prompts, K={result['num_children']}, eta={result['eta']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="config YAML (repeat to merge)")
    parser.add_argument("--base", required=True, help="base pipeline folder")
    parser.add_argument("--lrm", required=True, help="LRM folder (train_lrm's model/)")
    parser.add_argument("--world", required=True, help="shapes world folder (synthesize's prompts.json)")
    parser.add_argument("--thresholds", help="calibrate's thresholds.json: adds the kept-pair statistics")
    parser.add_argument("--prompts", type=int, default=256, help="calibration prompts (val split, cycled)")
    parser.add_argument("--seed", type=int, default=123, help="seed of x_T, the children and the continuation")
    parser.add_argument("--out", required=True, help="output JSON (a PNG plot is written beside it)")
    args = parser.parse_args(argv)
    cfg = load_config(*args.config)
    if cfg.experiment.world != "shapes":
        raise SystemExit("sibling_ranking: needs the shapes world's judge (experiment.world is "
                         f"{cfg.experiment.world!r})")
    thresholds = json.loads(Path(args.thresholds).read_text()) if args.thresholds else None
    result = run(cfg, Path(args.base), Path(args.lrm), Path(args.world), args.prompts, thresholds, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
