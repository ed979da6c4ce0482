"""Tests of the optimize stage with method lpo (lpo/stages/optimize.py, lpo/methods/lpo.py; docs/method.md section 3).

Mechanics, not accuracy (docs/prototype.md recommendation 7): the loss starts at log 2 and falls on a toy
problem, tuples are kept, the reference equals the base, only LoRA trains, resume is exact, bad input fails
before any compute, a process without pairs never hangs a 2-process run. Models: a random shapes-tiny base
(the packaged MiniLM as text encoder) and a random LRM built from it; thresholds written here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lpo import backbones
from lpo.config import ConfigError, LrmConfig, load_config, replace
from lpo.methods import engine as M
from lpo.methods.lpo import Lpo
from lpo.policy import build_policy
from lpo.reward.lrm import LatentRewardModel
from lpo.stages import optimize
from lpo.utils import read_json, write_json

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a blue triangle on a yellow background", "a black circle on a white background"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _write_thresholds(path: Path, scheduler, steps: int, th: float = 0.0, trainable=None) -> Path:
    ts, _ = M.ddim_timesteps(scheduler, steps)
    n = len(ts)
    write_json(path, {"timesteps": ts.tolist(), "thresholds": [th] * n,
                      "trainable": list(trainable) if trainable is not None else [True] * n, "mode": "test"})
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A random shapes-tiny base pipeline folder, a random LRM folder, a world with train prompts, thresholds."""
    root = tmp_path_factory.mktemp("lpo_assets")
    bb = backbones.build_shapes_tiny(0)
    bb.save_pipeline(root / "base")
    LatentRewardModel.from_backbone(bb, LrmConfig()).save_pretrained(root / "lrm")
    write_json(root / "world" / "prompts.json", {"train": {"prompts": PROMPTS, "triples": []}})
    for steps in (4, 20):
        _write_thresholds(root / f"thresholds{steps}.json", bb.scheduler, steps)
    return {"root": root, "base": root / "base", "lrm": root / "lrm", "world": root / "world",
            "th4": root / "thresholds4.json", "th20": root / "thresholds20.json"}


def _cfg(**optimize_changes):
    cfg = load_config(REPO / "config" / "config.yaml", REPO / "config" / "smoke.yaml")
    return replace(cfg, optimize=optimize_changes) if optimize_changes else cfg


def _small(**changes):
    """4 DDIM steps, 2 prompts, 2 iterations: seconds per run."""
    return _cfg(**{"ddim_steps": 4, "prompts_per_iteration": 2, "iterations": 2, "checkpoint_every": 1, **changes})


def _run(cfg, assets, tmp: Path, thresholds=None, **kw):
    return optimize.run(cfg, "lpo", assets["base"], tmp / "work", tmp / "out", world_dir=assets["world"],
                        lrm_dir=assets["lrm"], thresholds=thresholds or assets["th4"], **kw)


# --------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------


def test_best_worst_and_pair_gap():
    scores = torch.tensor([[0.0, 2.0, -1.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    w, l, gap = M.best_worst(scores)
    assert w.tolist()[0] == 1 and l.tolist()[0] == 2
    assert gap[0].item() == pytest.approx(math.tanh(1.5))
    assert gap[1].item() == 0.0  # equal scores: nothing to learn, never kept (gap > th >= 0)


def test_score_timestep_and_buckets():
    assert M.score_timestep(999, 949, "parent") == 999
    assert M.score_timestep(999, 949, "child") == 949
    assert M.score_timestep(49, -1, "child") == 0
    with pytest.raises(ValueError):
        M.score_timestep(1, 0, "sibling")
    assert [M.timestep_bucket(t, 1000) for t in (999, 750, 749, 250, 0)] == [
        "t750-999", "t750-999", "t500-749", "t250-499", "t0-249"]


@pytest.mark.parametrize("counts,world", [([5, 0], 2), ([3, 4, 0], 3), ([1, 0, 0], 3), ([0, 0], 2), ([7], 1)])
def test_shared_indices_split_equally_and_drop_the_remainder(counts, world):
    total = sum(counts)
    shares = [M.shared_indices(counts, r, world, torch.Generator().manual_seed(11)) for r in range(world)]
    assert all(len(s) == total // world for s in shares)  # equal, so DDP runs equal step counts
    everything = torch.cat(shares).tolist()
    assert len(set(everything)) == len(everything) and all(0 <= i < total for i in everything)


def test_draw_prompts():
    g = torch.Generator().manual_seed(0)
    picks = M.draw_prompts(10, 4, g)
    assert len(set(picks)) == 4
    assert len(M.draw_prompts(2, 5, g)) == 5  # more prompts than the list: with replacement


def test_read_thresholds_rejects_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        M.read_thresholds(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        M.read_thresholds(bad)
    cases = {
        "trainable": {"timesteps": [1], "thresholds": [0.1]},
        "one length": {"timesteps": [1, 2], "thresholds": [0.1], "trainable": [True]},
        "null at t=2": {"timesteps": [1, 2], "thresholds": [0.1, None], "trainable": [True, True]},
        r"\[0, 1\)": {"timesteps": [1], "thresholds": [1.5], "trainable": [True]},
        "distinct integers": {"timesteps": [1, 1], "thresholds": [0.1, 0.1], "trainable": [True, True]},
    }
    for message, doc in cases.items():
        write_json(bad, doc)
        with pytest.raises(ConfigError, match=message):
            M.read_thresholds(bad)
    write_json(bad, {"timesteps": [5, 1], "thresholds": [None, 0.2], "trainable": [False, True], "extra": 1})
    table = M.read_thresholds(bad)
    assert table.lookup(5) == (math.inf, False) and table.lookup(1) == (0.2, True)


def test_step_plan_matches_the_grid_and_masks_untrained_steps(tmp_path):
    sched = backbones.shapes_scheduler()
    path = _write_thresholds(tmp_path / "th.json", sched, 4, 0.3, trainable=[True, False, True, True])
    table = M.read_thresholds(path)
    ocfg = _cfg(ddim_steps=4, t_min=300).optimize
    plan = M.step_plan(table, sched, ocfg)
    assert plan.timesteps == (999, 749, 499, 249) and plan.prev == (749, 499, 249, -1)
    assert plan.train == (True, False, True, False)  # calibrate says no at 749; t_min cuts 249
    with pytest.raises(ConfigError, match="no threshold for sampling timesteps"):
        M.step_plan(table, sched, _cfg(ddim_steps=5).optimize)


# --------------------------------------------------------------------------------------------------------
# Bad input: clear errors before any compute
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if the stage gets as far as loading the base model."""

    def refuse(*_a, **_k):
        raise AssertionError("the base model was loaded before the input check failed")

    monkeypatch.setattr(optimize, "load_pipeline_folder", refuse)
    monkeypatch.setattr(optimize, "make_accelerator", refuse)


@pytest.mark.parametrize("case,message", [
    ("no_thresholds", "thresholds file not found"),
    ("no_lrm", "not an LRM folder"),
    ("rank0", "optimize.lora.rank"),
    ("k1", "optimize.num_children"),
    ("eta0", "optimize.eta"),
    ("grid", "no threshold for sampling timesteps"),
    ("nothing_trainable", "no sampling step is trainable"),
])
def test_bad_input_fails_before_any_compute(case, message, assets, tmp_path, no_compute):
    cfg, kw = _small(), {}
    if case == "no_thresholds":
        kw["thresholds"] = tmp_path / "missing.json"
    elif case == "no_lrm":
        kw["lrm_dir"] = tmp_path / "no_lrm"
    elif case == "rank0":
        cfg = _small(lora={"rank": 0})
    elif case == "k1":
        cfg = _small(num_children=1)
    elif case == "eta0":
        cfg = _small(eta=0.0)
    elif case == "grid":
        cfg = _small(ddim_steps=5)
    elif case == "nothing_trainable":
        cfg = _small(t_min=0, t_max=100)
    args = {"world_dir": assets["world"], "lrm_dir": assets["lrm"], "thresholds": assets["th4"], **kw}
    with pytest.raises(ConfigError, match=message):
        optimize.run(cfg, "lpo", assets["base"], tmp_path / "work", tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, needs", [("spo", "--spm is required"), ("dpo", "--latents is required")])
def test_baselines_without_their_inputs_raise_a_clear_error(method, needs, assets, tmp_path, no_compute):
    with pytest.raises(ConfigError, match=needs):
        optimize.run(_small(), method, assets["base"], tmp_path / "w", tmp_path / "o", world_dir=assets["world"])
    assert not (tmp_path / "o").exists()


def test_cli_prints_one_line_and_exits_2(assets, tmp_path, capsys):
    from lpo import cli

    code = cli.main(["optimize", "--config", str(REPO / "config" / "config.yaml"), "--method", "lpo",
                     "--base", str(assets["base"]), "--lrm", str(assets["lrm"]),
                     "--thresholds", str(tmp_path / "missing.json"), "--world", str(assets["world"]),
                     "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("lpo optimize: error:") and "missing.json" in err[-1]


def test_data_prompts_read_train_captions(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["b cat", "a dog", "", "x"], "split": ["train", "train", "train", "test"]}),
                   tmp_path / "pairs.parquet")
    pq.write_table(pa.table({"caption": ["a dog", "c owl"]}), tmp_path / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"caption": ["z"]}), tmp_path / "validation_unique-00000-of-00001.parquet")
    assert optimize.data_prompts(tmp_path) == ["a dog", "b cat", "c owl"]


# --------------------------------------------------------------------------------------------------------
# The sampler and the update on a toy problem
# --------------------------------------------------------------------------------------------------------


def test_rollout_keeps_tuples_and_loss_starts_at_log2_and_falls(assets):
    from accelerate import Accelerator

    ocfg = _cfg(ddim_steps=4, lr=1e-3).optimize
    bb = backbones.load_pipeline_folder(assets["base"])
    policy = build_policy(bb, ocfg)
    lrm = M.load_lrm(assets["lrm"], torch.device("cpu"))
    plan = M.step_plan(M.read_thresholds(assets["th4"]), bb.scheduler, ocfg)
    gen = torch.Generator().manual_seed(0)
    cond, uncond = bb.encode_prompts(PROMPTS), bb.null_embeds(1)
    x_T = torch.randn((len(PROMPTS), 4, 8, 8), generator=gen)
    scorer = M.LrmScorer(lrm, PROMPTS, ocfg.num_children, lrm.encode_text([""]))
    method = Lpo(ocfg.lpo, lrm, ocfg.num_children)
    tuples, records = M.branching_rollout(policy.unet, bb.scheduler, cond, uncond, x_T, plan, ocfg.cfg, ocfg.eta,
                                          ocfg.num_children, scorer, gen, method)
    assert len(records) == 4 and sum(r.kept for r in records) == len(tuples) > 0
    assert tuples.data["x_w"].shape == (len(tuples), 4, 8, 8) and tuples.data["hidden"].shape[0] == len(tuples)
    assert not torch.equal(tuples.data["x_w"], tuples.data["x_l"])

    # the stored mean reproduces: policy == reference at init, so both log-probs match exactly
    with policy.reference() as ref:
        ref_w, _ = M.pair_log_probs(tuples, M.policy_step(ref, tuples, uncond, bb.scheduler, ocfg.cfg, ocfg.eta))
    pol_w, _ = M.pair_log_probs(tuples, M.policy_step(policy.unet, tuples, uncond, bb.scheduler, ocfg.cfg, ocfg.eta))
    assert torch.equal(ref_w, pol_w)

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=ocfg.lr)
    train_unet, optimizer = accelerator.prepare(policy.unet, optimizer)
    base_state = {n: p.detach().clone() for n, p in policy.unet.named_parameters() if not p.requires_grad}
    losses, accs = [], []
    for _ in range(6):  # several passes over the same tuples: the toy problem must be learnable
        stats = method.update(policy, train_unet, tuples, uncond, optimizer, accelerator, ocfg)
        losses.append(stats["loss"])
        accs.append(stats["implicit_acc"])
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < losses[0] - 0.1, losses
    assert accs[-1] > 0.5
    # only the adapters moved; the reference is still the base exactly
    assert all(torch.equal(p, base_state[n]) for n, p in policy.unet.named_parameters() if not p.requires_grad)
    with policy.reference() as ref:
        assert torch.equal(M.pair_log_probs(tuples, M.policy_step(ref, tuples, uncond, bb.scheduler, ocfg.cfg, ocfg.eta))[0], ref_w)


# --------------------------------------------------------------------------------------------------------
# The stage end to end
# --------------------------------------------------------------------------------------------------------


def test_run_on_the_smoke_config_end_to_end(assets, tmp_path):
    cfg = _cfg()  # config.yaml + smoke.yaml as the workflow runs them: 20 steps, K 4, 2 iterations
    summary = _run(cfg, assets, tmp_path, thresholds=assets["th20"])
    out, work = tmp_path / "out", tmp_path / "work"
    assert summary["iterations"] == 2 and summary["tuples_kept"] > 0 and summary["tuples_trained"] > 0
    assert set(summary["kept_by_bucket"]) == {"t750-999", "t500-749", "t250-499", "t0-249"}
    assert summary["loss_first"] < 0.75 and summary["cost"]["unet_passes_per_sampling_step"] == 1
    assert summary["cost"]["lrm_passes_per_sampling_step"] == 1.0
    assert summary["cost"]["seconds_per_sampling_step"] > 0 and summary["cost"]["seconds_per_update"] > 0
    assert read_json(work / "summary.json")["tuples_kept"] == summary["tuples_kept"]
    assert any(p.name.startswith("events.out.tfevents") for p in (work / "tb").iterdir())
    assert (work / "checkpoints" / "state.pt").is_file()

    # --out: the merged pipeline folder `evaluate` loads, plus lora/ for the stock LoRA loader
    merged = backbones.load_pipeline_folder(out)
    assert read_json(out / backbones.INFO_FILE)["method"] == "lpo"
    base = backbones.load_pipeline_folder(assets["base"])
    pipe = base.pipeline()
    pipe.load_lora_weights(str(out / "lora"))
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 49])
    ctx = base.encode_prompts(PROMPTS[:2]).hidden_states
    with torch.no_grad():
        a = merged.unet(x, t, encoder_hidden_states=ctx).sample
        b = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        c = backbones.load_pipeline_folder(assets["base"]).unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-7)  # training moved the model


def test_resume_after_kill_gives_the_same_weights(assets, tmp_path):
    full = _run(_small(), assets, tmp_path / "full")
    _run(_small(iterations=1), assets, tmp_path / "cut")  # "killed" after the checkpoint of iteration 1
    resumed = _run(_small(), assets, tmp_path / "cut")
    assert resumed["iterations"] == full["iterations"] == 2
    assert resumed["tuples_kept"] == full["tuples_kept"]
    a = torch.load(tmp_path / "full" / "work" / "checkpoints" / "state.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "work" / "checkpoints" / "state.pt", weights_only=False)
    assert a["iteration"] == b["iteration"] == 2
    assert a["trainable"].keys() == b["trainable"].keys()
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]


# --------------------------------------------------------------------------------------------------------
# Two processes, one without pairs
# --------------------------------------------------------------------------------------------------------

TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from lpo.config import load_config, replace
    from lpo.methods import engine as M
    from lpo.stages import optimize

    root, repo = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = load_config(repo / "config/config.yaml", repo / "config/smoke.yaml")
    cfg = replace(cfg, optimize={"ddim_steps": 4, "prompts_per_iteration": 2, "iterations": 2})
    accelerator = optimize.make_accelerator(cfg)
    rank = accelerator.process_index
    seen = {"kept": 0, "updates": 0}
    best_worst, rollout, update = M.best_worst, M.branching_rollout, M.PairwiseStepMethod.update

    def no_pairs_on_rank_1(scores):
        w, l, gap = best_worst(scores)
        return w, l, torch.zeros_like(gap) if rank == 1 else gap  # gap 0 is never > th

    def counting_rollout(*a, **k):
        tuples, records = rollout(*a, **k)
        seen["kept"] += len(tuples)
        return tuples, records

    def counting_update(*a, **k):
        seen["updates"] += 1
        return update(*a, **k)

    M.best_worst, M.branching_rollout, M.PairwiseStepMethod.update = no_pairs_on_rank_1, counting_rollout, counting_update
    optimize.run(cfg, "lpo", root / "base", root / "work", root / "out", world_dir=root / "world",
                 lrm_dir=root / "lrm", thresholds=root / "thresholds4.json", accelerator=accelerator)
    (root / f"rank{rank}.json").write_text(json.dumps(seen))
""")


@pytest.mark.slow
def test_two_processes_one_without_pairs_does_not_hang(assets, tmp_path):
    root = assets["root"]
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    for name in ("work", "out"):
        assert not (root / name).exists()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}
    # accelerate 1.15 starts ONE process for a MULTI_CPU config without mpirun; --multi_gpu makes it use
    # torch.distributed.run (2 processes), and the CPU Accelerator of the stage joins them over gloo.
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO / "config" / "accelerate" / "cpu2.yaml"), "--multi_gpu", str(script), str(root), str(REPO)],
        capture_output=True, text=True, timeout=420, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[1]["kept"] == 0 and ranks[0]["kept"] >= 2
    assert ranks[0]["updates"] == ranks[1]["updates"] > 0  # the tuples were shared out equally
    summary = read_json(root / "work" / "summary.json")
    assert summary["world_size"] == 2 and summary["tuples_kept"] == ranks[0]["kept"]
    backbones.load_pipeline_folder(root / "out")


def test_changed_settings_start_over_instead_of_resuming(assets, tmp_path, caplog):
    first = _run(_small(iterations=1), assets, tmp_path)
    with caplog.at_level("WARNING"):
        second = _run(_small(iterations=1, lr=1e-3), assets, tmp_path)  # same budget, another lr
    assert "starting over" in caplog.text and "lr" in caplog.text
    assert len(second["history"]) == 1  # it trained again instead of finding iteration 1 done
    assert second["loss_first_update"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["loss_first_update"] == pytest.approx(math.log(2), abs=1e-6)
