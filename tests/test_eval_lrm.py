"""eval_lrm: the noise protocol shared with training (same t, independent noise, fixed per-pair seeds), per-timestep
test accuracy with Wilson intervals, chance summary, annotator ceiling, accuracy by attribute, the optional SPO
pixel-model curve, the plot, and one-line input errors.

The LRM is trained for a few steps on test_train_lrm's separable toy set (winner = +1 mean offset), so its
accuracy at low t must be high.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMScheduler
from latents_helpers import write_toy_latents
from test_train_lrm import toy_config

from lpo import cli
from lpo.backbones import build_tiny_sd15, sd_scheduler
from lpo import diffusion as D
from lpo.calibration import accuracy_ci
from lpo.reward import pairs as PR
from lpo.stages import eval_lrm as E
from lpo.stages import train_lrm as T
from lpo.utils import write_json


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    build_tiny_sd15(0).save_pipeline(root / "base")
    latents = write_toy_latents(root / "latents")
    # the pairs folder the latents came from: a shapes-style manifest with the annotator's agreement
    data = root / "data"
    write_json(data / "manifest.json", {"splits": {"test": {"annotator_agreement": 0.97}}})
    write_json(latents / "latents.json", {"data_dir": str(data)})
    T.run(toy_config(steps=12), latents, root / "base", root / "lrm")
    return {"root": root, "model": root / "lrm" / "model", "latents": latents, "data": data}


# --------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------


def test_q_sample_matches_diffusers_add_noise():
    sched = sd_scheduler()
    x0, eps = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    t = torch.tensor([1, 100, 500, 900, 999])
    ref = DDPMScheduler.from_config(sched.config).add_noise(x0, eps, t)
    torch.testing.assert_close(D.q_sample(x0, eps, t, sched.alphas_cumprod), ref)


def test_noisy_pair_uses_one_t_per_pair_and_separate_noise_per_image():
    sched = sd_scheduler()
    mean, std = torch.randn(3, 2, 4, 8, 8), torch.rand(3, 2, 4, 8, 8)
    eps_post, eps = torch.randn(3, 2, 4, 8, 8), torch.randn(3, 2, 4, 8, 8)
    t = torch.tensor([10, 500, 990])
    out = D.noisy_pair(mean, std, t, sched.alphas_cumprod, eps_post, eps)
    assert out.shape == (3, 2, 4, 8, 8)
    for k in (0, 1):  # image k of every pair: its own posterior sample and noise, the pair's t
        x0 = mean[:, k] + std[:, k] * eps_post[:, k]
        torch.testing.assert_close(out[:, k], D.q_sample(x0, eps[:, k], t, sched.alphas_cumprod))


def test_pair_correct_excludes_ties_and_counts_equal_scores_wrong():
    s0 = torch.tensor([2.0, 0.0, 1.0, 1.0])
    s1 = torch.tensor([1.0, 3.0, 1.0, 0.0])
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    correct, decided = PR.pair_correct(s0, s1, labels)
    assert correct.tolist() == [True, False, False, False]
    assert decided.tolist() == [True, True, True, False]


def test_key_noise_depends_only_on_seed_and_key():
    a0, a1 = D.key_noise(0, "pair-1", (4, 8, 8))
    b0, b1 = D.key_noise(0, "pair-1", (4, 8, 8))
    assert torch.equal(a0, b0) and torch.equal(a1, b1) and a0.shape == (2, 4, 8, 8)
    assert not torch.allclose(a0[0], a0[1])  # the two images of a pair get different noise
    assert not torch.allclose(D.key_noise(1, "pair-1", (4, 8, 8))[0], a0)
    assert not torch.allclose(D.key_noise(0, "pair-2", (4, 8, 8))[0], a0)


def test_accuracy_table_uses_decided_pairs_and_wilson_intervals():
    correct = np.array([[1, 1], [1, 0], [1, 0], [0, 0], [1, 1]], dtype=bool)
    decided = np.array([True, True, True, True, False])  # the last pair is a tie
    rows = E.accuracy_table(correct, decided, [10, 900], margin=0.0)
    assert [r["t"] for r in rows] == [10, 900] and [r["n"] for r in rows] == [4, 4]
    assert rows[0]["acc"] == 0.75 and rows[1]["acc"] == 0.25
    assert (rows[0]["acc"], rows[0]["lo"], rows[0]["hi"]) == accuracy_ci([1, 1, 1, 0])
    assert rows[0]["above_chance"] is False  # 4 pairs: the interval still covers 0.5
    many = np.ones((40, 1), dtype=bool)
    assert E.accuracy_table(many, np.ones(40, bool), [1], margin=0.0)[0]["above_chance"] is True
    assert E.accuracy_table(many, np.ones(40, bool), [1], margin=0.45)[0]["above_chance"] is False


def test_chance_summary_finds_the_blind_upper_range():
    rows = [{"t": t, "above_chance": a} for t, a in [(1, True), (300, True), (600, False), (700, True), (800, False),
                                                    (900, False)]]
    assert E.chance_summary(rows) == {"highest_t_above_chance": 700, "blind_from_t": 800}
    rows[-1]["above_chance"] = True
    assert E.chance_summary(rows) == {"highest_t_above_chance": 900, "blind_from_t": None}
    assert E.chance_summary([{"t": 1, "above_chance": False}]) == {"highest_t_above_chance": None, "blind_from_t": 1}


def test_attribute_groups():
    assert E.attribute_group(["fg"]) == "colour" and E.attribute_group(["fg", "bg"]) == "colour"
    assert E.attribute_group(["shape"]) == "shape" and E.attribute_group(["bg", "shape"]) == "colour+shape"
    assert E.attribute_group([]) == "quality_only"


def test_pair_attributes_come_from_the_shard_json_or_pairs_meta(tmp_path):
    (tmp_path / "pairs_meta.jsonl").write_text(json.dumps({"ranking_id": 7, "differ": ["shape"]}) + "\n")
    records = [{"key": "a", "meta": {"differ": ["fg"]}}, {"key": "b", "meta": {"ranking_id": 7}},
               {"key": "c", "meta": {"ranking_id": 8}}]
    assert E.pair_attributes(records, tmp_path) == {"a": ["fg"], "b": ["shape"]}
    assert E.pair_attributes(records[1:], None) == {}


def test_annotator_ceiling_is_read_when_recorded(tmp_path):
    assert E.annotator_ceiling(None) == (None, None)
    assert E.annotator_ceiling(tmp_path) == (None, None)
    write_json(tmp_path / "manifest.json", {"splits": {"test": {"annotator_agreement": 0.9}}})
    assert E.annotator_ceiling(tmp_path) == (0.9, str(tmp_path / "manifest.json"))


# --------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------


def test_eval_writes_json_and_plot_with_high_accuracy_at_low_t(trained, tmp_path):
    cfg = toy_config()
    out, plot = tmp_path / "accuracy.json", tmp_path / "accuracy_by_t.png"
    result = E.run(cfg, trained["model"], trained["latents"], out, plot)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["timesteps"] == list(range(1, 952, 50))  # the tiny-sd15 DDIM grid, ascending
    assert [r["t"] for r in saved["by_t"]] == saved["timesteps"]
    assert saved["n_pairs"] == 16 and saved["n_ties_excluded"] == 2  # every 8th toy pair is a tie
    assert all(r["n"] == 14 for r in saved["by_t"])
    low = saved["lowest_t"]
    assert low["t"] == 1 and low["acc"] >= 0.85 and low["lo"] <= low["acc"] <= low["hi"]
    assert saved["by_t"][0]["above_chance"] and saved["highest_t_above_chance"] is not None
    assert saved["annotator_ceiling"] == 0.97 and saved["annotator_ceiling_source"].endswith("manifest.json")
    groups = saved["by_attribute"]
    assert groups["covered_pairs"] == 16 and {"colour", "shape", "colour+shape"} <= set(groups)
    assert sum(groups[g]["n"] for g in E.ATTRIBUTE_GROUPS if g in groups) == 14
    assert 0 <= saved["grid_mean"]["lo"] <= saved["grid_mean"]["mean"] <= saved["grid_mean"]["hi"] <= 1
    assert saved["spm"] is None
    # fixed noise seeds: a second evaluation gives the same numbers
    again = E.run(cfg, trained["model"], trained["latents"], tmp_path / "again.json", tmp_path / "again.png")
    assert again["by_t"] == result["by_t"]


def test_spm_curve_is_added_through_the_pixel_module(trained, tmp_path, monkeypatch, caplog):
    cfg = toy_config()
    result = E.run(cfg, trained["model"], trained["latents"], tmp_path / "a.json", tmp_path / "a.png",
                   spm_dir=tmp_path / "missing")
    assert result["spm"] is None and "no such folder" in caplog.text

    seen = {}

    class FakeSpm:  # stands in for lpo.reward.pixel.StepAwarePixelModel (its API, not its model)
        @classmethod
        def from_pretrained(cls, path):
            seen["spm"] = Path(path)
            return cls()

        def to(self, device):
            return self

    def pixel_correct_by_t(spm, backbone, loader, timesteps, seed, cfg_scale, batch_size):
        seen["base_unet"] = type(backbone.unet).__name__
        batches = list(PR.chunked_batches(loader, batch_size))
        out = {}
        for j, t in enumerate(timesteps):  # "correct" for every decided pair at low t, every other one above
            out[t] = {k: (t < 500 or i % 2 == 0) for b in batches for i, (k, lab) in
                      enumerate(zip(b["keys"], b["labels"].tolist())) if lab[0] != lab[1]}
        return out

    fake = types.ModuleType("lpo.reward.pixel")
    fake.__spec__ = importlib.machinery.ModuleSpec("lpo.reward.pixel", None)
    fake.StepAwarePixelModel, fake.pixel_correct_by_t = FakeSpm, pixel_correct_by_t
    monkeypatch.setitem(sys.modules, "lpo.reward.pixel", fake)
    (tmp_path / "spm").mkdir()
    result = E.run(cfg, trained["model"], trained["latents"], tmp_path / "b.json", tmp_path / "b.png",
                   spm_dir=tmp_path / "spm")  # the base model comes from the LRM's train_lrm.json
    assert seen == {"spm": tmp_path / "spm", "base_unet": "UNet2DConditionModel"}
    spm = result["spm"]["by_t"]
    assert [r["t"] for r in spm] == result["timesteps"] and all(r["n"] == 14 for r in spm)
    assert spm[0]["acc"] == 1.0 and spm[-1]["acc"] < 1.0
    assert json.loads((tmp_path / "b.json").read_text())["spm"]["dir"] == str(tmp_path / "spm")


def test_missing_scheduler_and_missing_test_split_are_one_line_errors(trained, tmp_path, capsys):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({"experiment": {"name": "toy"}, "backbone": {"preset": "tiny-sd15"}}))
    bare = tmp_path / "bare_model"
    bare.mkdir()
    argv = ["eval_lrm", "--config", str(cfg_file), "--model", str(bare), "--latents", str(trained["latents"]),
            "--out", str(tmp_path / "x.json"), "--plot", str(tmp_path / "x.png")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "scheduler_config.json" in err and "Traceback" not in err

    no_test = tmp_path / "no_test"
    no_test.mkdir()
    argv[4], argv[6] = str(trained["model"]), str(no_test)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "no index for split 'test'" in err and not (tmp_path / "x.json").exists()
