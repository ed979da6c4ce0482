"""LPO with a perfect step-level reward: how much could step-level preference optimisation give? (issue #5)

The LRM predicts, from a noisy latent, how good the image at the end of the trajectory will be. This script
replaces it by the truth in the shapes world: every child x_{t-1}^k is rolled out to an image with the
CURRENT policy (deterministic DDIM, the evaluation sampler) and scored by the judge of `calibrate.mode:
rollout` (the shapes oracle + the annotator's noiseless reward). Everything else is the `optimize` stage with
`method: lpo` as the pipeline runs it (branching sampler, best/worst pair, clipped step-level DPO loss, LoRA,
checkpoints and resume, the diffusers-format output), registered here as the method `lpo-oracle`.

Pairs are kept when the judge tells the two rollouts apart: pair_gap = tanh((r_w - r_l) / 2) >
tanh(annotator.tie_margin / 2) (the threshold table is written to --workdir/oracle_thresholds.json); every
sampling step between optimize.t_min and optimize.t_max is trained (no LRM, so no accuracy gate).

The output folder is a policy like the pipeline's; evaluate it with the evaluate stage:
    OMP_NUM_THREADS=2 .venv/bin/python scripts/oracle_lpo.py --config results/shapes/config.yaml \
        --config over.yaml --base results/shapes/base --world results/shapes/world \
        --workdir results/oracle/work --out results/oracle/policy
    .venv/bin/python -m lpo evaluate --config results/shapes/config.yaml --model results/oracle/policy \
        --base results/shapes/base --prompts results/shapes/world --lrm results/shapes/lrm/model \
        --out results/oracle/eval
with over.yaml = `optimize: {iterations: 60}`: ~31 min on 2 CPU cores (the rollouts: ~30 s per iteration
against LPO's 2.6 s). Not part of the test suite (its one-iteration smoke run is).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lpo.config import Config, ConfigError, load_config  # noqa: E402
from lpo.diffusion import ddim_timesteps  # noqa: E402
from lpo.methods import Method, MethodInputs  # noqa: E402
from lpo.backbones import load_scheduler  # noqa: E402
from lpo.methods import engine  # noqa: E402
from lpo.methods.lpo import Lpo  # noqa: E402
from lpo.sampling import decode_images  # noqa: E402
from lpo.stages import optimize as optimize_stage  # noqa: E402
from lpo.sampling import ddim_rollout  # noqa: E402
from lpo.utils import setup_logging, write_json  # noqa: E402
from lpo.world.judge import shapes_judge  # noqa: E402
from lpo.world.prompts import parse_prompt  # noqa: E402

METHOD = "lpo-oracle"
THRESHOLDS_NAME = "oracle_thresholds.json"


class RolloutJudgeScorer:
    """The step-level reward of a child = the judge's reward of its deterministic rollout under `backbone`'s
    U-Net as it is now (the policy being trained). Same call as lpo.methods.engine.Scorer."""

    def __init__(self, cfg: Config, backbone: Any, prompts: list[str], num_children: int) -> None:
        triples = [list(parse_prompt(p, cfg.world)) for p in prompts]
        self.judge = shapes_judge(cfg, triples)
        self.backbone, self.guidance = backbone, cfg.optimize.cfg
        device = backbone.unet.device
        with torch.no_grad():
            self.cond = backbone.encode_prompts(list(prompts)).to(device)
            self.null = backbone.null_embeds(1).to(device)
        self.timesteps, self.prev = ddim_timesteps(backbone.scheduler, cfg.optimize.ddim_steps)
        self.grid = [int(t) for t in self.timesteps]
        self.child_prompt = torch.arange(len(prompts)).repeat_interleave(num_children)  # (B*K,)

    @torch.no_grad()
    def __call__(self, children: torch.Tensor, t: int) -> torch.Tensor:
        start = self.grid.index(int(t)) + 1  # the children live at the next grid level (lrm_timestep: parent)
        rows = self.child_prompt.to(children.device)
        x0 = ddim_rollout(self.backbone.unet, self.backbone.scheduler, children, start, self.timesteps, self.prev,
                          self.cond.index(rows), self.null, self.guidance)
        rewards = self.judge.reward(decode_images(self.backbone.vae, x0), self.child_prompt.numpy())  # (B*K,)
        return torch.as_tensor(rewards, dtype=torch.float32, device=children.device)


def write_thresholds(cfg: Config, base_dir: Path, path: Path) -> None:
    """Every grid step trainable with th = tanh(tie_margin / 2): keep the pairs the judge tells apart."""
    scheduler = load_scheduler(base_dir)
    timesteps, _ = ddim_timesteps(scheduler, cfg.optimize.ddim_steps)
    th = math.tanh(cfg.annotator.tie_margin / 2)
    n = len(timesteps)
    write_json(path, {"timesteps": [int(t) for t in timesteps], "thresholds": [th] * n, "trainable": [True] * n,
                      "source": "scripts/oracle_lpo.py: the judge's tie margin, no LRM gate"})


def check(cfg: Config, inputs: MethodInputs) -> None:
    if cfg.experiment.world != "shapes":
        raise ConfigError(f"{METHOD}: needs the shapes world's judge (experiment.world is {cfg.experiment.world!r})")
    engine.check_step_config(cfg.optimize)
    plan = engine.step_plan(engine.read_thresholds(inputs.thresholds), load_scheduler(inputs.base_dir), cfg.optimize)
    if not any(plan.train):
        raise ConfigError(f"optimize.t_min={cfg.optimize.t_min}, t_max={cfg.optimize.t_max}: no step to train")


class OracleLpo(Lpo):
    """LPO with the judge of each child's rollout as the step-level reward (no LRM)."""

    name = METHOD

    def __init__(self, cfg: Config, backbone: Any) -> None:
        super().__init__(cfg.optimize.lpo, None, cfg.optimize.num_children)
        self.cfg, self.backbone = cfg, backbone

    def make_scorer(self, prompts: list[str]) -> RolloutJudgeScorer:
        return RolloutJudgeScorer(self.cfg, self.backbone, prompts, self.num_children)


def train(cfg: Config, policy: Any, inputs: MethodInputs, workdir: Path, accelerator: Any) -> dict[str, Any]:
    ocfg = cfg.optimize
    plan = engine.step_plan(engine.read_thresholds(inputs.thresholds), policy.backbone.scheduler, ocfg)
    summary = engine.step_level_loop(cfg, policy, inputs.prompts, workdir, accelerator, plan,
                                     OracleLpo(cfg, policy.backbone))
    summary["step_reward"] = "the judge's reward of each child's deterministic rollout under the current policy"
    if accelerator.is_main_process:
        write_json(workdir / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", required=True, help="config YAML (repeat to merge)")
    parser.add_argument("--base", required=True, help="base pipeline folder")
    parser.add_argument("--world", required=True, help="shapes world folder (synthesize's prompts.json)")
    parser.add_argument("--workdir", required=True, help="work folder (checkpoints, TensorBoard, summary)")
    parser.add_argument("--out", required=True, help="output policy folder (diffusers format)")
    args = parser.parse_args(argv)
    cfg = load_config(*args.config)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    thresholds = workdir / THRESHOLDS_NAME
    write_thresholds(cfg, Path(args.base), thresholds)
    setup_logging()
    summary = optimize_stage.run(cfg, METHOD, args.base, args.workdir, args.out, world_dir=args.world,
                                 thresholds=thresholds, implementation=Method(check=check, train=train))
    print(json.dumps({k: summary[k] for k in ("method", "iterations", "tuples_kept", "loss_last") if k in summary}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
