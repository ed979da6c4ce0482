"""Stage `sibling_lrm`: fine-tune the LRM on rollout-judged sibling pairs (optional; not the paper's recipe).

The paper's LRM learns from pairs of *different* images noised by the forward process; LPO asks it to rank
*siblings*, the K children of one x_t. In the shapes world the trained LRM orders the sibling pairs the judge
tells apart at 0.44 for t >= 750 (scripts/sibling_ranking.py, README "LPO"). This stage asks the same model
(the U-Net's encoder half on x_t, the same heads and loss) the question LPO asks, with the shapes judge as the
teacher. Enabled by `sibling_lrm.enabled`; then LPO's calibrate and optimize read its model.

1. rollouts: LPO's branching sampler with the BASE model (one CFG pass per step, K = sibling_lrm.children
   children, a random child goes on) on sibling_lrm.prompts train-split prompts (cycled); every child rolled out
   with deterministic DDIM and judged (oracle + the annotator's noiseless reward, as calibrate's rollout mode).
   Every sibling pair whose rewards differ by >= annotator.tie_margin is a preference pair (winner, loser,
   parent t, prompt). With `labels: annotator` a train pair is ordered by one draw of the simulated annotator.
2. training: Bradley-Terry (docs/method.md §2 "Loss", lpo.losses.bradley_terry_loss with strict labels), children
   scored at the parent's t (LPO's `optimize.lpo.lrm_timestep: parent`), AdamW on the encoder half and the heads.
3. held out: the pairs of every `held_out_every`-th prompt are never trained on; their concordance (share
   ordered like the noiseless judge), overall and per quarter of the timestep range, is measured every
   `eval_every` steps; the best checkpoint by overall held-out concordance is the output.

Output folder (written atomically): model/ (an LRM folder, LatentRewardModel.from_pretrained reads it) and
sibling_lrm.json (pairs, concordance history, timings).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from lpo.backbones import BackboneError, load_pipeline_folder, load_scheduler
from lpo.branching import branching_steps
from lpo.config import Config, ConfigError, to_dict
from lpo.diffusion import ddim_timesteps
from lpo.losses import bradley_terry_loss
from lpo.methods.engine import NUM_BUCKETS, timestep_bucket
from lpo.reward.lrm import LatentRewardModel, check_lrm_dir
from lpo.sampling import ddim_rollout, decode_images
from lpo.stage_main import stage_main
from lpo.utils import atomic_dir, read_json, write_json
from lpo.world.annotator import annotate
from lpo.world.judge import shapes_judge

log = logging.getLogger("lpo.sibling_lrm")

# smallest allowed value of each integer key of the sibling_lrm section (check)
MINIMUMS = {"prompts": 1, "children": 2, "held_out_every": 2, "steps": 1, "batch_size": 1, "eval_every": 1}


# --------------------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------------------

def preference_pairs(rewards: np.ndarray, use_prompt: np.ndarray, tie_margin: float) -> np.ndarray:
    """(P, 4) int rows (step, prompt, winner child, loser child) of all sibling pairs the judge tells apart
    (r_w - r_l >= tie_margin), for the prompts (columns of rewards (N, B, K)) where use_prompt (B,) is true."""
    rows = []
    for i in range(rewards.shape[0]):
        for b in np.flatnonzero(use_prompt):
            diff = rewards[i, b][:, None] - rewards[i, b][None, :]  # (K, K): diff[w, l] = r_w - r_l
            for w, l in zip(*np.nonzero(diff >= tie_margin)):
                rows.append((i, b, w, l))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


def annotator_labels(rewards: np.ndarray, rows: np.ndarray, annotator: Any, rng: np.random.Generator
                     ) -> tuple[np.ndarray, float]:
    """`rows` re-ordered by the simulated annotator's sampled labels instead of the noiseless reward.

    Each pair gets one Bradley-Terry draw (lpo.world.annotator.annotate, temperature annotator.temperature), as
    the preference data's labels; where the annotator prefers the judge's loser, winner and loser swap. Returns
    the rows and the share swapped. Only pairs the judge tells apart come in, so no draw is a tie.
    """
    r_w = rewards[rows[:, 0], rows[:, 1], rows[:, 2]]
    r_l = rewards[rows[:, 0], rows[:, 1], rows[:, 3]]
    label_w, _ = annotate(r_w, r_l, annotator, rng)
    swap = label_w == 0.0
    out = rows.copy()
    out[swap, 2], out[swap, 3] = rows[swap, 3], rows[swap, 2]
    return out, float(swap.mean()) if len(rows) else 0.0


def concordance_by_bucket(right: np.ndarray, timesteps: np.ndarray, num_train_timesteps: int
                          ) -> dict[str, dict[str, Any]]:
    """{"all" | "t<lo>-<hi>": {value, pairs}}: share of pairs ordered right, overall and per quarter of the
    timestep range (lpo.methods.lpo.timestep_bucket, the buckets optimize logs), high noise first."""
    out = {"all": {"value": float(right.mean()) if len(right) else None, "pairs": int(len(right))}}
    labels = np.array([timestep_bucket(int(t), num_train_timesteps) for t in timesteps])
    width = num_train_timesteps // NUM_BUCKETS
    for b in reversed(range(NUM_BUCKETS)):
        label = timestep_bucket(b * width, num_train_timesteps)
        mask = labels == label
        out[label] = {"value": float(right[mask].mean()) if mask.any() else None, "pairs": int(mask.sum())}
    return out


# --------------------------------------------------------------------------------------------------------
# Rollouts and training
# --------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sibling_rollouts(cfg: Config, backbone: Any, prompts: list[str], triples: list, k: int, seed: int
                     ) -> dict[str, np.ndarray]:
    """LPO's branching sampler on `prompts`; every child rolled out and judged.

    Returns children (N, B, K, C, h, w) float32 (the latents at the step's prev t), rewards (N, B, K) and
    timesteps (N,) = the parent's t.
    """
    opt = cfg.optimize
    judge = shapes_judge(cfg, triples)
    batch = len(prompts)
    timesteps, prev = ddim_timesteps(backbone.scheduler, opt.ddim_steps)
    gen = torch.Generator().manual_seed(seed)
    embeds, null = backbone.encode_prompts(prompts), backbone.null_embeds(1)
    child_prompt = torch.arange(batch).repeat_interleave(k)  # (B*K,)
    child_embeds = embeds.index(child_prompt)
    shape = (backbone.latent_channels, backbone.latent_size, backbone.latent_size)
    x_T = torch.randn((batch, *shape), generator=gen) * backbone.scheduler.init_noise_sigma
    children_all, rewards_all = [], []
    steps = branching_steps(backbone.unet, backbone.scheduler, embeds, null, x_T, timesteps, prev, opt.cfg, opt.eta,
                            k, gen)
    for step in tqdm(steps, total=len(timesteps), desc="rollouts", unit="step", mininterval=5):
        children = step.children  # (B, K, C, h, w); a random child goes on when the next step is asked for
        x0 = ddim_rollout(backbone.unet, backbone.scheduler, children.flatten(0, 1), step.index + 1, timesteps, prev,
                          child_embeds, null, opt.cfg)
        rewards_all.append(judge.reward(decode_images(backbone.vae, x0), child_prompt.numpy()).reshape(batch, k))
        children_all.append(children.float().numpy())
    return {"children": np.stack(children_all), "rewards": np.stack(rewards_all),
            "timesteps": timesteps.numpy().astype(np.int64)}


def score_pairs(lrm: LatentRewardModel, data: dict, rows: np.ndarray, enc: Any, null_enc: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """LRM scores (P,) of the winners and the losers of `rows`, both at the parent's t."""
    step, prompt = rows[:, 0], rows[:, 1]
    t = torch.from_numpy(data["timesteps"][step])
    text = enc[torch.from_numpy(prompt)]
    x_w = torch.from_numpy(data["children"][step, prompt, rows[:, 2]])
    x_l = torch.from_numpy(data["children"][step, prompt, rows[:, 3]])
    return lrm.score(x_w, t, text, null_enc), lrm.score(x_l, t, text, null_enc)


@torch.no_grad()
def held_out_concordance(lrm: LatentRewardModel, data: dict, rows: np.ndarray, enc: Any, null_enc: Any,
                         num_train_timesteps: int, chunk: int = 512) -> dict[str, dict[str, Any]]:
    lrm.eval()
    right = [np.zeros(0, dtype=bool)]
    for i in range(0, len(rows), chunk):
        s_w, s_l = score_pairs(lrm, data, rows[i:i + chunk], enc, null_enc)
        right.append((s_w > s_l).numpy())
    lrm.train()
    return concordance_by_bucket(np.concatenate(right), data["timesteps"][rows[:, 0]], num_train_timesteps)


def check(cfg: Config, lrm_dir: Path, world_dir: Path) -> None:
    """Every bad input fails here, before any compute."""
    sc = cfg.sibling_lrm
    if cfg.experiment.world != "shapes":
        raise ConfigError(f"sibling_lrm: needs the shapes world's judge (experiment.world is {cfg.experiment.world!r})")
    for key, minimum in MINIMUMS.items():
        if getattr(sc, key) < minimum:
            raise ConfigError(f"sibling_lrm.{key}: expected >= {minimum}, got {getattr(sc, key)}")
    if sc.prompts < sc.held_out_every + 1:
        raise ConfigError(f"sibling_lrm.prompts ({sc.prompts}) must exceed held_out_every ({sc.held_out_every}): "
                          "both a train and a held-out prompt are needed")
    if not sc.lr > 0 or not sc.head_lr_scale > 0:
        raise ConfigError(f"sibling_lrm.lr and head_lr_scale must be > 0, got {sc.lr} and {sc.head_lr_scale}")
    check_lrm_dir(lrm_dir)
    if not (world_dir / "prompts.json").is_file():
        raise ConfigError(f"{world_dir}: no prompts.json (run the synthesize rule first)")


def run(cfg: Config, base_dir: str | Path, lrm_dir: str | Path, world_dir: str | Path, out_dir: str | Path,
        rollouts_cache: Optional[str | Path] = None) -> dict[str, Any]:
    sc = cfg.sibling_lrm
    lrm_dir, world_dir, out_dir = Path(lrm_dir), Path(world_dir), Path(out_dir)
    check(cfg, lrm_dir, world_dir)
    num_train_timesteps = load_scheduler(Path(base_dir)).config.num_train_timesteps  # the buckets' range
    torch.manual_seed(sc.seed)
    split = read_json(world_dir / "prompts.json")["train"]
    index = np.arange(sc.prompts) % len(split["prompts"])  # (B,) the train-split index of each rollout prompt
    prompts = [split["prompts"][i] for i in index]
    triples = [split["triples"][i] for i in index]

    start = time.perf_counter()
    cache = Path(rollouts_cache) if rollouts_cache else None
    if cache is not None and cache.exists():
        with np.load(cache) as f:
            data = {key: f[key] for key in ("children", "rewards", "timesteps")}
        if data["rewards"].shape[1:] != (sc.prompts, sc.children):
            raise ConfigError(f"{cache}: rollouts of {data['rewards'].shape[1:]} (prompts, children), not "
                              f"({sc.prompts}, {sc.children}) as sibling_lrm asks; delete it")
        log.info("rollouts: loaded %s", cache)
    else:
        data = sibling_rollouts(cfg, load_pipeline_folder(base_dir), prompts, triples, sc.children, sc.seed)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_name(cache.name + ".partial.npz")  # never taken for a finished cache
            np.savez(partial, **data)
            partial.replace(cache)
    rollout_s = time.perf_counter() - start

    held_out = index % sc.held_out_every == 0
    tie = cfg.annotator.tie_margin
    train_rows = preference_pairs(data["rewards"], ~held_out, tie)
    val_rows = preference_pairs(data["rewards"], held_out, tie)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise ConfigError(f"sibling_lrm: the judge told no sibling pair apart in the "
                          f"{'train' if len(train_rows) == 0 else 'held-out'} prompts (annotator.tie_margin {tie}); "
                          "raise sibling_lrm.prompts or children")
    swapped = 0.0
    if sc.labels == "annotator":
        train_rows, swapped = annotator_labels(data["rewards"], train_rows, cfg.annotator,
                                               np.random.default_rng(sc.seed + 1))
        log.info("annotator labels: %.3f of the train pairs ordered against the noiseless reward", swapped)
    log.info("pairs: %d train, %d held out (%d prompts)", len(train_rows), len(val_rows), int(held_out.sum()))

    lrm = LatentRewardModel.from_pretrained(lrm_dir)
    groups = lrm.trainable_parameters(train_text_encoder=False)
    optimizer = torch.optim.AdamW([{"params": groups["backbone"], "lr": sc.lr},
                                   {"params": groups["heads"], "lr": sc.head_lr_scale * sc.lr}], weight_decay=0.01)
    with torch.no_grad():
        enc = lrm.encode_text(prompts)
        null_enc = lrm.encode_text([""]) if lrm.vfe_scale != 1.0 else None
    history = [{"step": 0, "held_out": held_out_concordance(lrm, data, val_rows, enc, null_enc, num_train_timesteps)}]
    log.info("step 0: held-out concordance %.3f", history[0]["held_out"]["all"]["value"])
    rng = np.random.default_rng(sc.seed)
    best, best_step = -1.0, 0
    with atomic_dir(out_dir) as tmp:
        lrm.train()
        bar = tqdm(range(1, sc.steps + 1), desc="sibling_lrm", unit="step", mininterval=5)
        for step in bar:
            rows = train_rows[rng.integers(0, len(train_rows), sc.batch_size)]
            s_w, s_l = score_pairs(lrm, data, rows, enc, null_enc)
            loss = bradley_terry_loss(s_w, s_l, torch.ones_like(s_w), torch.zeros_like(s_w))  # -log sigmoid(s_w - s_l)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(groups["backbone"] + groups["heads"], 1.0)
            optimizer.step()
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if step % sc.eval_every == 0 or step == sc.steps:
                result = held_out_concordance(lrm, data, val_rows, enc, null_enc, num_train_timesteps)
                history.append({"step": step, "loss": float(loss.detach()), "held_out": result})
                log.info("step %d: loss %.3f; held-out concordance %s", step, float(loss.detach()),
                         " ".join(f"{k} {v['value']:.3f}" for k, v in result.items() if v["value"] is not None))
                if result["all"]["value"] > best:
                    best, best_step = result["all"]["value"], step
                    lrm.eval()
                    lrm.save_pretrained(tmp / "model")
                    lrm.train()
        summary = {
            "init_lrm": str(lrm_dir), "base": str(base_dir), "config": to_dict(sc),
            "pairs_train": int(len(train_rows)), "pairs_held_out": int(len(val_rows)),
            "held_out_prompts": int(held_out.sum()), "train_pairs_swapped_by_annotator": swapped,
            "best_step": best_step, "best_held_out_concordance": best, "history": history,
            "rollout_seconds": round(rollout_s, 1), "seconds": round(time.perf_counter() - start, 1),
        }
        write_json(tmp / "sibling_lrm.json", summary)
    log.info("wrote %s (best held-out concordance %.3f at step %d)", out_dir, best, best_step)
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--rollouts", default=None, metavar="NPZ",
                            help="cache of the judged rollouts: loaded if the file exists, else written")

    return stage_main("sibling_lrm", __doc__,
                      lambda cfg, a: {k: v for k, v in run(cfg, a.base, a.lrm, a.world, a.out, a.rollouts).items()
                                      if k != "history"},
                      argv, inputs=("base", "lrm", "world"), out=("DIR", "output folder: model/ and sibling_lrm.json"),
                      arguments=arguments, user_errors=(BackboneError,))


if __name__ == "__main__":
    sys.exit(main())
