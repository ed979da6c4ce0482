"""Tests of the `calibrate` stage (lpo/stages/calibrate.py; docs/design.md "Threshold calibration", docs/method.md §3).

Tiny random models, offline: a tiny SD1.5-layout pipeline (SD's scheduler, for the paper's sigma table) and a
random shapes-tiny pipeline with a random LRM built from it (rollout mode). The pure threshold math is tested
in tests/test_calibration.py; here: the stage's JSON, the chance gate, the rollout bookkeeping and the errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import yaml

from lpo import backbones as B
from lpo.config import ConfigError, LrmConfig, from_dict
from lpo.stages import calibrate as C
from lpo.world.judge import Judge

# docs/method.md §3: sigma (SD scaled-linear, DDIM-20, eta 1) and th(t) for SD1.5 [0.35, 0.5], for t = 1, 51, ..., 951.
METHOD_SIGMAS = [0.0206, 0.0406, 0.1673, 0.2144, 0.2509, 0.2836, 0.3144, 0.3442, 0.3732, 0.4016,
                 0.4293, 0.4565, 0.4829, 0.5087, 0.5336, 0.5576, 0.5807, 0.6029, 0.6241, 0.6444]
METHOD_TH = [0.350, 0.355, 0.385, 0.397, 0.405, 0.413, 0.421, 0.428, 0.435, 0.442, 0.448, 0.455,
             0.461, 0.467, 0.473, 0.479, 0.485, 0.490, 0.495, 0.500]
SD_GRID = list(range(951, 0, -50))  # 951, 901, ..., 1
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Pipeline folders (tiny SD1.5, shapes-tiny), a random shapes LRM and a shapes prompts.json."""
    from lpo.reward.lrm import LatentRewardModel
    from lpo.world.prompts import format_prompt, split_triples

    root = tmp_path_factory.mktemp("calibrate")
    B.build_tiny_sd15(seed=0).save_pipeline(root / "sd15_base")
    shapes = B.build_shapes_tiny(seed=0)
    shapes.save_pipeline(root / "shapes_base")
    LatentRewardModel.from_backbone(shapes, LrmConfig(vfe_scale=2.0)).save_pretrained(root / "lrm")
    splits = split_triples(from_dict({"experiment": {"name": "t"}}).world)
    world = root / "world"
    world.mkdir()
    doc = {name: {"prompts": [format_prompt(t) for t in triples], "triples": [list(t) for t in triples]}
           for name, triples in splits.items()}
    (world / "prompts.json").write_text(json.dumps(doc))
    return {"sd15_base": root / "sd15_base", "shapes_base": root / "shapes_base", "lrm": root / "lrm",
            "world": world}


def write_accuracy(path: Path, lo_by_t: dict[int, Optional[float]], key: str = "by_t") -> Path:
    """An eval_lrm accuracy.json; lo None = a timestep without pairs (n = 0, acc/lo/hi null, as eval_lrm writes)."""
    rows = [{"t": t, "n": 300, "acc": min(1.0, lo + 0.05), "lo": lo, "hi": min(1.0, lo + 0.1), "above_chance": lo > 0.5}
            if lo is not None else {"t": t, "n": 0, "acc": None, "lo": None, "hi": None, "above_chance": False}
            for t, lo in lo_by_t.items()]
    path.write_text(json.dumps({"timesteps": sorted(lo_by_t), key: rows}))
    return path


def optimize_reads(path: Path) -> None:
    """The optimize stage's LPO method accepts the file (its reader is the contract)."""
    from lpo.methods.engine import read_thresholds

    table = read_thresholds(path)
    data = json.loads(path.read_text())
    assert list(table.trainable) == data["trainable"] and list(table.timesteps) == data["timesteps"]


def config(world: str = "shapes", **sections) -> object:
    return from_dict({"experiment": {"name": "t", "world": world}, **sections})


def run_stage(cfg, models, tmp_path, base: str, accuracy: Path, **kw) -> dict:
    C.run(cfg, models["lrm"], accuracy, models[base], models["world"], tmp_path / "out" / "thresholds.json",
          tmp_path / "out" / "thresholds.png", show_progress=False, **kw)
    return json.loads((tmp_path / "out" / "thresholds.json").read_text())


# --------------------------------------------------------------------------------------------------------
# Sigma mode
# --------------------------------------------------------------------------------------------------------


def test_sigma_mode_reproduces_the_paper_table(models, tmp_path):
    accuracy = write_accuracy(tmp_path / "acc.json", {t: 0.7 for t in SD_GRID})
    cfg = config("real", calibrate={"mode": "sigma", "th_min": 0.35, "th_max": 0.5},
                 optimize={"ddim_steps": 20, "eta": 1.0})
    out = run_stage(cfg, models, tmp_path, "sd15_base", accuracy)

    assert out["mode"] == "sigma"
    assert out["timesteps"] == SD_GRID
    assert [round(s, 4) for s in out["sigmas"]] == METHOD_SIGMAS[::-1]
    assert [round(th, 3) for th in out["thresholds"]] == METHOD_TH[::-1]
    assert out["trainable"] == [True] * 20
    assert out["expected_kept_share"] is None and out["agreement"] is None
    assert out["config"]["calibrate"]["th_min"] == 0.35 and out["config"]["optimize"]["ddim_steps"] == 20
    assert (tmp_path / "out" / "thresholds.png").read_bytes()[:8] == PNG_MAGIC
    optimize_reads(tmp_path / "out" / "thresholds.json")


def test_trainable_flags_follow_the_accuracy_file(models, tmp_path):
    # LRM blind from t = 701 up (lower bound exactly 0.5 counts as chance), good below, and no pairs at t = 1.
    lo = {t: (0.5 if t >= 701 else 0.7) for t in SD_GRID} | {1: None}
    accuracy = write_accuracy(tmp_path / "acc.json", lo, key="per_t")  # the first agreed key works too
    cfg = config("real", calibrate={"mode": "sigma"}, optimize={"ddim_steps": 20})
    out = run_stage(cfg, models, tmp_path, "sd15_base", accuracy)
    assert out["trainable"] == [1 < t < 701 for t in SD_GRID]
    assert out["untrainable_reason"] == [None if 1 < t < 701 else "lrm_at_chance" for t in SD_GRID]
    assert [e["t"] for e in out["lrm_accuracy"]] == SD_GRID

    # A margin above the good bound: nothing is trainable.
    cfg = config("real", calibrate={"mode": "sigma", "chance_margin": 0.2}, optimize={"ddim_steps": 20})
    assert not any(run_stage(cfg, models, tmp_path, "sd15_base", accuracy)["trainable"])


def test_accuracy_on_another_grid_uses_the_nearest_evaluated_t(models, tmp_path):
    # eval_lrm evaluated on a coarse grid only: 0 (good), 500 (good), 1000 (blind).
    accuracy = write_accuracy(tmp_path / "acc.json", {0: 0.8, 500: 0.6, 1000: 0.4})
    cfg = config("real", calibrate={"mode": "sigma"}, optimize={"ddim_steps": 20})
    out = run_stage(cfg, models, tmp_path, "sd15_base", accuracy)
    nearest = [0 if t < 250 else 500 if t < 750 else 1000 for t in SD_GRID]
    assert [e["t"] for e in out["lrm_accuracy"]] == nearest
    assert out["trainable"] == [t != 1000 for t in nearest]


def test_nearest_accuracy_breaks_ties_towards_the_cautious_entry():
    entries = [{"t": 0, "acc": 0.9, "lo": 0.8}, {"t": 100, "acc": 0.5, "lo": 0.4}]
    assert C.nearest_accuracy(entries, [50])[0]["t"] == 100  # equidistant: the lower bound that is lower
    assert C.nearest_accuracy(entries, [49])[0]["t"] == 0
    assert C.lrm_above_chance([0.5, 0.51, 0.6], margin=0.05) == [False, False, True]


# --------------------------------------------------------------------------------------------------------
# Rollout mode
# --------------------------------------------------------------------------------------------------------


def test_rollout_mode_on_shapes_tiny_writes_consistent_arrays(models, tmp_path, monkeypatch):
    steps, prompts, k = 4, 6, 3
    accuracy = write_accuracy(tmp_path / "acc.json", {999: 0.45, 749: 0.7, 0: 0.7})
    cfg = config(calibrate={"mode": "rollout", "n_prompts": prompts, "min_pairs": 2, "precision": 0.5,
                            "batch_size": 7},  # 7: chunks cut across prompts
                 optimize={"ddim_steps": steps, "num_children": k})
    out = run_stage(cfg, models, tmp_path, "shapes_base", accuracy)

    ts = out["timesteps"]
    assert ts == [999, 749, 499, 249]  # shapes scheduler, trailing spacing
    for key in ("sigmas", "thresholds", "trainable", "untrainable_reason", "expected_kept_share", "lrm_accuracy"):
        assert len(out[key]) == steps, key
    agreement = out["agreement"]
    for key in ("n", "agree_all", "agree_kept", "tie_rate", "mean_gap"):
        assert len(agreement[key]) == steps, key
    gap, agree, tie = (np.array(agreement[key]) for key in ("gap", "agree", "tie"))
    assert gap.shape == agree.shape == tie.shape == (steps, prompts)
    assert ((gap >= 0) & (gap < 1)).all()
    assert not (agree & tie).any()  # a judge tie is never agreement
    assert out["trainable"][0] is False and out["untrainable_reason"][0] == "lrm_at_chance"  # t=999 nearest 0.45
    for i in range(steps):
        th = out["thresholds"][i]
        assert th is None or 0.0 <= th < 1.0
        if out["untrainable_reason"][i] == "no_rollout_threshold":
            assert th is None  # optimize reads null as "never kept"
        if out["trainable"][i]:
            assert out["expected_kept_share"][i] == pytest.approx(float((gap[i] > th).mean()))
        else:
            assert out["expected_kept_share"][i] == 0.0
    assert (tmp_path / "out" / "thresholds.png").read_bytes()[:8] == PNG_MAGIC
    optimize_reads(tmp_path / "out" / "thresholds.json")

    # Second run: one chunk for all children, and a judge with random continuous rewards (the random model's
    # images all tie under the oracle) so thresholds are found. Seeded: the LRM's gaps are the same, whatever
    # the chunking; the trainable steps keep exactly the pairs above their threshold.
    rng = np.random.default_rng(0)
    monkeypatch.setattr(C, "shapes_judge", lambda cfg, triples: Judge(
        "random", lambda images, idx: rng.random(len(idx)), tie_margin=0.0))
    cfg = config(calibrate={"mode": "rollout", "n_prompts": prompts, "min_pairs": 1, "precision": 0.01},
                 optimize={"ddim_steps": steps, "num_children": k})
    again = run_stage(cfg, models, tmp_path, "shapes_base", accuracy)
    assert np.allclose(np.array(again["agreement"]["gap"]), gap, atol=1e-5)
    assert again["trainable"] == [False, True, True, True]  # t=999: LRM at chance; elsewhere a threshold
    for i in range(1, steps):
        kept = gap[i] > again["thresholds"][i]
        assert again["expected_kept_share"][i] == pytest.approx(float(kept.mean())) and kept.any()
        assert again["agreement"]["agree_kept"][i] >= 0.01
    optimize_reads(tmp_path / "out" / "thresholds.json")


def test_rollout_calibration_thresholds_and_ties():
    cfg = config(calibrate={"mode": "rollout", "precision": 0.85, "min_pairs": 4})
    gap = np.array([[0.9, 0.8, 0.7, 0.6, 0.2, 0.1],   # top 4 agree (top 5: 0.8 < 0.85) -> th 0.4
                    [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])  # all ties
    agree = np.array([[1, 1, 1, 1, 0, 0], [0] * 6], dtype=bool)
    tie = np.array([[0, 0, 0, 0, 1, 1], [1] * 6], dtype=bool)
    rows = {"gap": gap, "agree": agree, "tie": tie, "reward_w": np.zeros((2, 6)), "reward_l": np.zeros((2, 6))}
    out = C.rollout_calibration(rows, cfg)
    assert out["thresholds"][0] == pytest.approx(0.4) and out["found"] == [True, False]
    assert out["thresholds"][1] is None and out["kept_share"] == [pytest.approx(4 / 6), 0.0]
    assert out["agreement"]["agree_all"][0] == pytest.approx(4 / 6)
    assert out["agreement"]["agree_kept"] == [1.0, None]

    # ties "exclude": step 1 has no decided pair left; step 0's threshold rests on the 4 decided pairs only
    # (all agree: every one is kept, th halfway down to 0); the kept share still counts all 6 pairs.
    cfg = config(calibrate={"mode": "rollout", "precision": 0.85, "min_pairs": 4, "ties": "exclude"})
    out = C.rollout_calibration(rows, cfg)
    assert out["found"] == [True, False]
    assert out["thresholds"][0] == pytest.approx(0.3) and out["kept_share"][0] == pytest.approx(4 / 6)
    assert out["agreement"]["agree_all"] == [1.0, None]


def test_judge_agreement_counts_ties_as_no_agreement():
    agree, tie = C.judge_agreement(np.array([1.0, 0.5, 0.52, 0.3]), np.array([0.5, 0.5, 0.5, 0.6]), 0.05)
    assert agree.tolist() == [True, False, False, False]
    assert tie.tolist() == [False, True, True, False]
    agree, tie = C.judge_agreement(np.array([0.5]), np.array([0.5]), 0.0)  # equal rewards tie at margin 0
    assert tie.tolist() == [True] and agree.tolist() == [False]


# --------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------


def cli(models, tmp_path, cfg_dict, **paths) -> tuple[int, list[str]]:
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg_dict))
    args = {"lrm": models["lrm"], "accuracy": tmp_path / "acc.json", "base": models["sd15_base"],
            "prompts": models["world"], "out": tmp_path / "o" / "th.json", "plot": tmp_path / "o" / "th.png"}
    args.update(paths)
    argv = ["--config", str(cfg_file)] + [x for key, value in args.items() for x in (f"--{key}", str(value))]
    return C.main(argv), args


def test_cli_writes_outputs_and_missing_inputs_are_one_line_errors(models, tmp_path, capsys):
    cfg = {"experiment": {"name": "t", "world": "real"}, "optimize": {"ddim_steps": 20}}
    write_accuracy(tmp_path / "acc.json", {t: 0.7 for t in SD_GRID})
    code, args = cli(models, tmp_path, cfg)
    assert code == 0 and Path(args["out"]).is_file() and Path(args["plot"]).is_file()
    capsys.readouterr()

    code, _ = cli(models, tmp_path, cfg, accuracy=tmp_path / "nope.json")
    err = capsys.readouterr().err
    assert code == 2 and "nope.json" in err and "eval_lrm" in err and len(err.strip().splitlines()) == 1

    code, _ = cli(models, tmp_path, cfg, lrm=tmp_path / "no_lrm")
    err = capsys.readouterr().err
    assert code == 2 and "no_lrm" in err and "train_lrm" in err

    (tmp_path / "bad.json").write_text(json.dumps({"per_t": [{"t": 1, "acc": 0.6}]}))
    code, _ = cli(models, tmp_path, cfg, accuracy=tmp_path / "bad.json")
    assert code == 2 and "per_t[0].lo" in capsys.readouterr().err

    code, _ = cli(models, tmp_path, cfg, base=tmp_path / "no_base")
    assert code == 2 and "no_base" in capsys.readouterr().err


def test_config_errors_name_the_field(models, tmp_path):
    accuracy = write_accuracy(tmp_path / "acc.json", {t: 0.7 for t in SD_GRID})
    with pytest.raises(ConfigError, match="rollout needs"):
        run_stage(config("real", calibrate={"mode": "rollout"}), models, tmp_path, "sd15_base", accuracy)
    with pytest.raises(ConfigError, match="optimize.eta"):
        run_stage(config("real", optimize={"eta": 0.0}), models, tmp_path, "sd15_base", accuracy)
    with pytest.raises(ConfigError, match="calibrate.th_max"):
        run_stage(config("real", calibrate={"th_max": 1.0}), models, tmp_path, "sd15_base", accuracy)
    with pytest.raises(ConfigError, match="optimize.num_children"):
        run_stage(config(calibrate={"mode": "rollout"}, optimize={"num_children": 1}), models, tmp_path,
                  "shapes_base", accuracy)
    assert not (tmp_path / "out" / "thresholds.json").exists()  # nothing half-written on errors


def test_ddim_rollout_is_plain_deterministic_ddim(models):
    """A child's rollout from x_T equals lpo.sampling.ddim_sample with eta 0 (same grid, same CFG)."""
    import torch

    from lpo.diffusion import ddim_timesteps
    from lpo.sampling import ddim_rollout, ddim_sample

    backbone = B.load_pipeline_folder(models["shapes_base"])
    prompts = ["a red circle on a blue background", "a green square on a white background"]
    cond, null = backbone.encode_prompts(prompts), backbone.null_embeds(1)
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    timesteps, prev = ddim_timesteps(backbone.scheduler, 4)
    ours = ddim_rollout(backbone.unet, backbone.scheduler, x_T, 0, timesteps, prev, cond, null, 4.0)
    reference = ddim_sample(backbone.unet, backbone.scheduler, cond.hidden_states,
                            backbone.null_embeds(2).hidden_states, x_T, 4, 4.0, eta=0.0)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.equal(ddim_rollout(backbone.unet, backbone.scheduler, x_T, 4, timesteps, prev, cond, null, 4.0),
                       x_T)  # already x_0
