"""pretrain_base: trains, writes weights + metrics, and a killed run resumes to the same weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lpo.config import from_dict
from lpo.stages import pretrain, synthesize


def tiny_cfg():
    return from_dict({
        "experiment": {"name": "t"},
        "backbone": {"shapes_base": "pretrain"},
        "synthesize": {"n_images": 128},
        "pretrain": {"vae_steps": 4, "vae_batch_size": 8, "unet_steps": 6, "unet_batch_size": 8,
                     "checkpoint_every": 2, "eval_images": 8, "eval_steps": 3},
    })


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "world"
    synthesize.run(tiny_cfg(), out, show_progress=False)
    return out


def weights(out):
    unet = load_file(next((out / "weights" / "unet").glob("*.safetensors")))
    vae = load_file(next((out / "weights" / "vae").glob("*.safetensors")))
    return unet, vae


def test_writes_weights_and_metrics(tmp_path, world):
    result = pretrain.run(tiny_cfg(), world, tmp_path / "pre")
    metrics = json.loads((tmp_path / "pre" / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"fg", "bg", "shape", "exact", "quality"}
    for m in metrics["metrics"].values():
        assert m["lo"] <= m["mean"] <= m["hi"] and m["n"] == 8
    assert result["scaling_factor"] > 0
    assert (tmp_path / "pre" / "weights" / "unet" / "config.json").exists()


def test_resume_after_kill_gives_identical_weights(tmp_path, world, monkeypatch):
    straight = tmp_path / "straight"
    pretrain.run(tiny_cfg(), world, straight)

    killed = tmp_path / "killed"
    real_save = pretrain.save_state
    calls = {"n": 0}

    def save_then_die(path, state):
        real_save(path, state)
        calls["n"] += 1
        if state["phase"] == "unet" and state["step"] == 4:
            raise KeyboardInterrupt("simulated kill after the step-4 checkpoint")

    monkeypatch.setattr(pretrain, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(tiny_cfg(), world, killed)
    assert not (killed / "weights").exists()  # no finished-looking output after a kill
    monkeypatch.setattr(pretrain, "save_state", real_save)
    pretrain.run(tiny_cfg(), world, killed)  # resumes at U-Net step 4

    (u1, v1), (u2, v2) = weights(straight), weights(killed)
    for a, b in ((u1, u2), (v1, v2)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_refuses_other_presets(tmp_path, world):
    from lpo.config import ConfigError, replace

    with pytest.raises(ConfigError, match="backbone.preset"):
        pretrain.run(replace(tiny_cfg(), backbone={"preset": "tiny-sd15"}), world, tmp_path / "x")
