"""Teach the LRM to rank siblings: fine-tune it on rollout-judged sibling pairs (issue #5 experiment).

The paper's LRM learns from pairs of *different* images, noised by the forward process; LPO asks it to rank
*siblings*, the K children of one x_t (scripts/sibling_ranking.py: with the shapes default, it orders the
sibling pairs the judge tells apart at 0.44 for t >= 750). This script gives the same model (the diffusion
model's U-Net encoder half on x_t, the same heads) the question LPO asks, with the shapes judge as the teacher:

1. data: LPO's branching sampler with the BASE model (one CFG pass, K children, a random child goes on) on
   `--prompts` train-split prompts (cycled); every child rolled out (deterministic DDIM) and judged (oracle +
   the annotator's noiseless reward, as `calibrate.mode: rollout`). Every pair of siblings whose rewards differ
   by >= annotator.tie_margin is a preference pair (x_w, x_l, parent t, prompt);
2. training: Bradley-Terry on those pairs (lpo.losses.bradley_terry_loss), the children scored at the parent's
   t (`optimize.lrm_timestep: parent`), starting from `--lrm`, AdamW on the U-Net encoder half and the heads;
   with `--labels annotator` each train pair is ordered by one draw of the simulated annotator (noisy, as the
   preference data's labels) instead of the noiseless reward;
3. held-out: the pairs of every 5th prompt are never trained on; their concordance per timestep quarter is
   measured every `--eval-every` steps; the best checkpoint by overall held-out concordance is written to
   `--out` (an LRM folder `optimize --lrm` loads), with `sibling_lrm.json` beside it.

Not the paper's recipe (its LRM never sees siblings); the judge is the shapes world's, so this runs there only.
Usage:
    OMP_NUM_THREADS=2 .venv/bin/python scripts/sibling_lrm.py --config results/shapes/config.yaml \
        --base results/shapes/base --lrm results/shapes/lrm/model --world results/shapes/world \
        --out results/shapes/sibling_lrm/model
~19 min of rollouts (128 prompts x K = 8 on 2 busy cores) + ~2 min of training. Then LPO with it:
`python -m lpo calibrate|optimize|evaluate ... --lrm results/shapes/sibling_lrm/model` with
`calibrate: {gate_on_accuracy: false}` and `optimize: {t_min: 549}` (README "LPO").
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
from lpo.config import load_config  # noqa: E402
from lpo.diffusion import cfg_noise_pred, ddim_step_split, ddim_timesteps, sample_children  # noqa: E402
from lpo.losses import bradley_terry_loss  # noqa: E402
from lpo.reward.lrm import LatentRewardModel  # noqa: E402
from lpo.sampling import decode_images  # noqa: E402
from lpo.stages.calibrate import rollout_to_x0, shapes_judge  # noqa: E402
from lpo.utils import read_json, write_json  # noqa: E402
from lpo.world.annotator import annotate  # noqa: E402

BUCKETS = ((750, 999), (500, 749), (250, 499), (0, 249))
HELD_OUT_EVERY = 5  # prompts whose index in the train split is a multiple of this are held out


@torch.no_grad()
def sibling_rollouts(cfg, backbone, prompts: list[str], triples: list, k: int, seed: int) -> dict[str, np.ndarray]:
    """LPO's branching sampler on `prompts`; every child rolled out and judged.

    Returns children (N, B, K, C, h, w) float32 at level prev[i], rewards (N, B, K), timesteps (N,) = parent t.
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
    x = torch.randn((batch, *shape), generator=gen) * backbone.scheduler.init_noise_sigma
    children_all, rewards_all = [], []
    start = time.perf_counter()
    for i in range(len(timesteps)):
        t, t_prev = int(timesteps[i]), int(prev[i])
        out = cfg_noise_pred(backbone.unet, x, t, embeds.hidden_states, null.hidden_states, opt.cfg,
                             embeds.added_cond_kwargs(), null.added_cond_kwargs())
        children = sample_children(ddim_step_split(out, x, t, t_prev, backbone.scheduler, opt.eta), k, gen)
        x0 = rollout_to_x0(backbone, children.flatten(0, 1), i + 1, timesteps, prev, child_embeds, null, opt.cfg)
        rewards_all.append(judge.reward(decode_images(backbone.vae, x0), child_prompt.numpy()).reshape(batch, k))
        children_all.append(children.float().numpy())
        x = children[torch.arange(batch), torch.randint(k, (batch,), generator=gen)]  # a random child goes on
        print(f"rollouts: t={t} ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"children": np.stack(children_all), "rewards": np.stack(rewards_all),
            "timesteps": timesteps.numpy().astype(np.int64)}


def preference_pairs(rewards: np.ndarray, use_prompt: np.ndarray, tie_margin: float) -> np.ndarray:
    """(P, 4) int rows (step, prompt, winner child, loser child) of all sibling pairs the judge tells apart,
    for the prompts (columns of rewards (N, B, K)) where use_prompt (B,) is true."""
    steps, batch, k = rewards.shape
    rows = []
    for i in range(steps):
        for b in np.flatnonzero(use_prompt):
            for w in range(k):
                for l in range(k):
                    if rewards[i, b, w] - rewards[i, b, l] >= tie_margin:
                        rows.append((i, b, w, l))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


def annotator_labels(rewards: np.ndarray, rows: np.ndarray, annotator, rng: np.random.Generator) -> tuple[np.ndarray, float]:
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


def score_pairs(lrm, data: dict, rows: np.ndarray, enc, null_enc) -> tuple[torch.Tensor, torch.Tensor]:
    """LRM scores (P,) of the winners and the losers of `rows`, at the parent's t."""
    idx_step, idx_prompt = rows[:, 0], rows[:, 1]
    t = torch.from_numpy(data["timesteps"][idx_step])
    text = enc[torch.from_numpy(idx_prompt)]
    x_w = torch.from_numpy(data["children"][idx_step, idx_prompt, rows[:, 2]])
    x_l = torch.from_numpy(data["children"][idx_step, idx_prompt, rows[:, 3]])
    return lrm.score(x_w, t, text, null_enc), lrm.score(x_l, t, text, null_enc)


@torch.no_grad()
def held_out_concordance(lrm, data: dict, rows: np.ndarray, enc, null_enc, chunk: int = 512) -> dict:
    """Share of held-out pairs the LRM orders like the judge, overall and per quarter of the timestep range."""
    lrm.eval()
    right = [np.zeros(0, dtype=bool)]
    for i in range(0, len(rows), chunk):
        s_w, s_l = score_pairs(lrm, data, rows[i:i + chunk], enc, null_enc)
        right.append((s_w > s_l).numpy())
    right = np.concatenate(right)
    lrm.train()
    t = data["timesteps"][rows[:, 0]]
    out = {"all": {"value": float(right.mean()) if len(right) else None, "pairs": int(len(right))}}
    for lo, hi in BUCKETS:
        mask = (t >= lo) & (t <= hi)
        out[f"t{lo}-{hi}"] = {"value": float(right[mask].mean()) if mask.any() else None, "pairs": int(mask.sum())}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="config YAML (repeat to merge)")
    parser.add_argument("--base", required=True, help="base pipeline folder (makes the rollouts)")
    parser.add_argument("--lrm", required=True, help="LRM folder to start from (train_lrm's model/)")
    parser.add_argument("--world", required=True, help="shapes world folder (synthesize's prompts.json)")
    parser.add_argument("--out", required=True, help="output LRM folder (sibling_lrm.json is written beside it)")
    parser.add_argument("--prompts", type=int, default=128, help="train-split prompts (cycled)")
    parser.add_argument("--children", type=int, default=8, help="K of the data rollouts (K(K-1)/2 pairs a step)")
    parser.add_argument("--steps", type=int, default=400, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per step")
    parser.add_argument("--lr", type=float, default=1e-4, help="U-Net learning rate (heads: 3x)")
    parser.add_argument("--eval-every", type=int, default=100, help="held-out evaluation every N steps")
    parser.add_argument("--seed", type=int, default=11, help="seed of the rollouts and the pair sampling")
    parser.add_argument("--labels", choices=("reward", "annotator"), default="reward",
                        help="train-pair order: the judge's noiseless reward, or the simulated annotator's sampled "
                             "labels (noisy, as the preference data); held-out pairs always use the reward")
    parser.add_argument("--rollouts", default=None, metavar="NPZ",
                        help="cache of the judged rollouts: loaded if the file exists, written after computing if not")
    args = parser.parse_args(argv)
    cfg = load_config(*args.config)
    if cfg.experiment.world != "shapes":
        raise SystemExit(f"sibling_lrm: needs the shapes world's judge (experiment.world is {cfg.experiment.world!r})")
    torch.manual_seed(args.seed)
    split = read_json(Path(args.world) / "prompts.json")["train"]
    n_train = len(split["prompts"])
    index = np.arange(args.prompts) % n_train  # (B,) the train-split index of each rollout prompt
    prompts = [split["prompts"][i] for i in index]
    triples = [split["triples"][i] for i in index]

    start = time.perf_counter()
    cache = Path(args.rollouts) if args.rollouts else None
    if cache is not None and cache.exists():
        with np.load(cache) as f:
            data = {key: f[key] for key in ("children", "rewards", "timesteps")}
        if data["rewards"].shape[1:] != (args.prompts, args.children):
            raise SystemExit(f"sibling_lrm: {cache} holds rollouts of {data['rewards'].shape[1:]} (prompts, children), "
                             f"not ({args.prompts}, {args.children}); delete it or pass matching --prompts/--children")
        print(f"rollouts: loaded {cache}", flush=True)
    else:
        data = sibling_rollouts(cfg, load_pipeline_folder(args.base), prompts, triples, args.children, args.seed)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_name(cache.name + ".partial.npz")  # never taken for a finished cache
            np.savez(partial, **data)
            partial.replace(cache)
    rollout_s = time.perf_counter() - start
    held_out = index % HELD_OUT_EVERY == 0
    tie = cfg.annotator.tie_margin
    train_rows = preference_pairs(data["rewards"], ~held_out, tie)
    val_rows = preference_pairs(data["rewards"], held_out, tie)
    swapped = 0.0
    if args.labels == "annotator":
        train_rows, swapped = annotator_labels(data["rewards"], train_rows, cfg.annotator,
                                               np.random.default_rng(args.seed + 1))
        print(f"annotator labels: {swapped:.3f} of the train pairs ordered against the noiseless reward", flush=True)
    print(f"pairs: {len(train_rows)} train, {len(val_rows)} held out ({int(held_out.sum())} prompts)", flush=True)
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise SystemExit(f"sibling_lrm: the judge told no sibling pair apart in the {'train' if len(train_rows) == 0 else 'held-out'} "
                         f"prompts (annotator.tie_margin {tie}); use more --prompts or --children")

    lrm = LatentRewardModel.from_pretrained(args.lrm)
    groups = lrm.trainable_parameters(train_text_encoder=False)
    optimizer = torch.optim.AdamW([{"params": groups["backbone"], "lr": args.lr},
                                   {"params": groups["heads"], "lr": 3 * args.lr}], weight_decay=0.01)
    with torch.no_grad():
        enc = lrm.encode_text(prompts)
        null_enc = lrm.encode_text([""]) if lrm.vfe_scale != 1.0 else None
    history = [{"step": 0, "held_out": held_out_concordance(lrm, data, val_rows, enc, null_enc)}]
    print(f"step 0: held-out concordance {history[0]['held_out']['all']['value']:.3f}", flush=True)
    rng = np.random.default_rng(args.seed)
    best, out = -1.0, Path(args.out)
    lrm.train()
    for step in range(1, args.steps + 1):
        rows = train_rows[rng.integers(0, len(train_rows), args.batch_size)]
        s_w, s_l = score_pairs(lrm, data, rows, enc, null_enc)
        ones = torch.ones_like(s_w)
        loss = bradley_terry_loss(s_w, s_l, ones, torch.zeros_like(s_w))  # strict: -log sigmoid(s_w - s_l)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(groups["backbone"] + groups["heads"], 1.0)
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            result = held_out_concordance(lrm, data, val_rows, enc, null_enc)
            history.append({"step": step, "loss": float(loss.detach()), "held_out": result})
            line = " ".join(f"{k} {v['value']:.3f}" for k, v in result.items() if v["value"] is not None)
            print(f"step {step}: loss {float(loss.detach()):.3f}; held-out concordance {line}", flush=True)
            if result["all"]["value"] > best:
                best = result["all"]["value"]
                lrm.eval()
                lrm.save_pretrained(out)
                lrm.train()
    write_json(out.parent / "sibling_lrm.json", {
        "init_lrm": args.lrm, "base": args.base, "prompts": args.prompts, "children": args.children,
        "seed": args.seed, "labels": args.labels, "train_pairs_swapped_by_annotator": swapped,
        "pairs_train": int(len(train_rows)), "pairs_held_out": int(len(val_rows)),
        "best_held_out_concordance": best, "history": history, "rollout_seconds": round(rollout_s, 1),
        "seconds": round(time.perf_counter() - start, 1)})
    print(f"wrote {out} (best held-out concordance {best:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
