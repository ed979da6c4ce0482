"""train_spm (docs/method.md section 5, SPM): a separable toy set the SPM learns, outputs, resume after a kill with
identical weights, bad config values and foreign checkpoints. A random shapes-tiny base (packaged MiniLM),
the toy latents of test_train_lrm (the winner's posterior mean is +1 on every element), low noise only."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lpo import cli
from lpo.backbones import build_shapes_tiny
from lpo.config import ConfigError, from_dict
from lpo.reward.pixel import StepAwarePixelModel
from lpo.stages import train_spm as T

sys.path.insert(0, str(Path(__file__).parent))
from latents_helpers import run_killed, write_toy_latents  # noqa: E402


def toy_config(**train_spm):
    base = {"steps": 10, "batch_size": 8, "lr": 3e-3, "weight_decay": 0.0, "t_max": 20, "eval_every": 5,
            "checkpoint_every": 5, "eval_timesteps": [0, 10], "channels": [8, 16]}
    return from_dict({"experiment": {"name": "toy", "seed": 0}, "train_spm": {**base, **train_spm}})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "base"
    build_shapes_tiny(0).save_pipeline(path)
    return path


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    return write_toy_latents(tmp_path_factory.mktemp("latents") / "latents", n_train=40, n_val=16, n_test=8)


def read_log(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "train_log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_and_writes_the_best_model(base_dir, latents, tmp_path):
    work = tmp_path / "spm"
    summary = T.run(toy_config(), latents, base_dir, work)
    losses = [r["loss"] for r in read_log(work) if "loss" in r]
    assert len(losses) == 10
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    assert summary["best_step"] in (5, 10) and summary["best_metric"] >= 0.75, summary["validations"]
    assert list(summary["best_acc_by_t"]) == ["0", "10"]
    for name in ("model/spm_config.json", "model/model.safetensors", "model/train_spm.json", "summary.json",
                 "checkpoints/latest.json", "checkpoints/step-0000010/state.pt", "checkpoints/best/best.json"):
        assert (work / name).is_file(), name
    assert list((work / "tb").glob("events.out.tfevents.*"))
    cost = summary["cost"]
    assert cost["steps_timed"] == 10 and all(cost[k] > 0 for k in (
        "seconds_unet_per_step", "seconds_decode_per_step", "seconds_score_update_per_step"))
    assert all(set(r["seconds"]) == {"unet", "decode", "score"} for r in read_log(work) if "loss" in r)
    spm = StepAwarePixelModel.from_pretrained(work / "model")
    best = summary["best_step"]
    state = torch.load(work / "checkpoints" / "step-0000010" / "state.pt", weights_only=False)
    assert state["run"]["best_step"] == best == json.loads((work / "checkpoints" / "best" / "best.json").read_text())["step"]
    kept = StepAwarePixelModel.from_pretrained(work / "checkpoints" / "best").state_dict()
    for name, p in spm.state_dict().items():
        assert torch.equal(p, kept[name]), name  # model/ = the best step
    if best == 10:
        assert all(torch.equal(spm.state_dict()[n], v) for n, v in state["trainable"].items())


def test_resume_after_a_kill_ends_with_identical_weights(base_dir, latents, tmp_path, monkeypatch):
    """7 steps over 5 batches per epoch with checkpoints every 3: a kill in step 5 resumes from step 3."""
    cfg = toy_config(steps=7, eval_every=100, checkpoint_every=3, eval_timesteps=[0])
    straight = tmp_path / "straight"
    T.run(cfg, latents, base_dir, straight)

    killed = tmp_path / "killed"
    run_killed(monkeypatch, T, "bradley_terry_loss", 5, lambda: T.run(cfg, latents, base_dir, killed))
    assert json.loads((killed / "checkpoints" / "latest.json").read_text())["step"] == 3
    assert not (killed / "model").exists()  # the model folder appears only at the end
    T.run(cfg, latents, base_dir, killed)

    a = torch.load(straight / "checkpoints" / "step-0000007" / "state.pt", weights_only=False)
    b = torch.load(killed / "checkpoints" / "step-0000007" / "state.pt", weights_only=False)
    assert a["step"] == b["step"] == 7 and a["trainable"].keys() == b["trainable"].keys()
    for name in a["trainable"]:
        assert torch.equal(a["trainable"][name], b["trainable"][name]), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_log(straight)) == strip(read_log(killed))  # same losses step by step, no duplicates


def test_a_checkpoint_of_another_config_or_other_inputs_is_not_resumed(base_dir, latents, tmp_path, caplog):
    work = tmp_path / "spm"
    T.run(toy_config(steps=2, eval_every=2, checkpoint_every=2, eval_timesteps=[0]), latents, base_dir, work)
    caplog.set_level("INFO", logger="lpo.training")
    T.run(toy_config(steps=3, eval_every=3, checkpoint_every=3, eval_timesteps=[0]), latents, base_dir, work)
    assert "resumed from" in caplog.text and "starting over" not in caplog.text  # same config: extends the run

    caplog.clear()
    T.run(toy_config(steps=2, lr=1e-4, eval_timesteps=[0]), latents, base_dir, work)
    assert "starting over" in caplog.text and "resumed from" not in caplog.text

    # The same config on other latents (an upstream rule re-ran): the index files' bytes differ.
    other = tmp_path / "latents2"
    shutil.copytree(latents, other)
    index = other / "train-index.json"
    index.write_text(json.dumps(json.loads(index.read_text()), indent=3))
    caplog.clear()
    T.run(toy_config(steps=2, lr=1e-4, eval_timesteps=[0]), other, base_dir, work)
    assert "starting over" in caplog.text and "resumed from" not in caplog.text


@pytest.mark.parametrize("change,match", [
    ({"steps": 0}, "train_spm.steps"),
    ({"lr": 0.0}, "train_spm.lr"),
    ({"eval_timesteps": []}, "train_spm.eval_timesteps"),
    ({"t_max": 2000}, "train_spm.t_max 2000"),
    ({"eval_timesteps": [1000]}, "train_spm.eval_timesteps"),
    ({"pickscore": "/nowhere"}, "train_spm.pickscore"),
])
def test_bad_config_values_name_the_key(base_dir, latents, tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        T.run(toy_config(**change), latents, base_dir, tmp_path / "spm")


def test_clip_warm_start_on_the_corpus_then_preference_training(base_dir, latents, tmp_path):
    world = tmp_path / "world"
    world.mkdir()
    rng = np.random.default_rng(0)
    captions = np.array(["a red circle on a blue background", "a green square on a white background"] * 16)
    images = np.zeros((32, 32, 32, 3), np.uint8)
    images[::2, :, :, 0] = 255  # the "red" captions get red images, the others green ones
    images[1::2, :, :, 1] = 255
    images = np.clip(images + rng.integers(0, 30, images.shape), 0, 255).astype(np.uint8)
    np.savez(world / "corpus.npz", images=images, captions=captions)
    cfg = toy_config(steps=2, eval_every=2, checkpoint_every=2, eval_timesteps=[0], clip_steps=12,
                     clip_batch_size=8, clip_lr=3e-3)
    with pytest.raises(ConfigError, match="needs --world"):
        T.run(cfg, latents, base_dir, tmp_path / "no_world")
    summary = T.run(cfg, latents, base_dir, tmp_path / "spm", world_dir=world)
    warm = summary["clip_warm_start"]
    assert warm["steps"] == 12 and warm["corpus_images"] == 32 and warm["captions"] == 2
    assert warm["loss_last"] < warm["loss_first"]  # two captions, two colours: separable
    clip_rows = [r for r in read_log(tmp_path / "spm") if r.get("event") == "clip"]
    assert [r["clip_step"] for r in clip_rows] == [1, 11, 12]
    assert summary["steps"] == 2 and (tmp_path / "spm" / "model" / "spm_config.json").is_file()
    assert T.run(toy_config(steps=2, eval_every=2, eval_timesteps=[0]), latents, base_dir,
                 tmp_path / "off")["clip_warm_start"] is None  # the default: from scratch, no --world needed


def test_real_world_spm_starts_from_a_pickscore_folder(latents, tmp_path):
    """tiny-sd15 base (CLIP text encoder) -> the CLIP kind, initialised from a tiny random CLIPModel folder."""
    from transformers import CLIPConfig, CLIPModel

    from lpo.backbones import build_clip_tokenizer, build_tiny_sd15

    build_tiny_sd15(0).save_pipeline(tmp_path / "base")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16))
    clip.save_pretrained(tmp_path / "pickscore")
    build_clip_tokenizer().save_pretrained(tmp_path / "pickscore")
    cfg = toy_config(steps=2, eval_every=2, checkpoint_every=2, eval_timesteps=[0], pickscore=str(tmp_path / "pickscore"))
    summary = T.run(cfg, latents, tmp_path / "base", tmp_path / "spm")
    assert summary["kind"] == "clip" and summary["steps"] == 2
    spm = StepAwarePixelModel.from_pretrained(tmp_path / "spm" / "model")
    assert spm.kind == "clip" and spm.image.image_size == 32
    with pytest.raises(ConfigError, match="train_spm.pickscore: required"):
        T.run(toy_config(steps=1), latents, tmp_path / "base", tmp_path / "nope")


def test_cli_prints_one_line_for_a_missing_split(base_dir, tmp_path, capsys):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({"experiment": {"name": "toy"}}))
    code = cli.main(["train_spm", "--config", str(cfg_path), "--latents", str(tmp_path / "none"), "--base",
                     str(base_dir), "--out", str(tmp_path / "spm")])
    assert code == 2
    assert "no index for split 'train'" in capsys.readouterr().err
