"""Stage `evaluate`, its shapes metrics and the real-world scorer registry, on tiny random models, offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

from lpo import backbones as B
from lpo.config import ConfigError, WorldConfig, from_dict
from lpo.data.pickapic import write_pairs
from lpo.diffusion import ddim_timesteps
from lpo.metrics import oracle_metrics, scorers
from lpo.reward.lrm import LatentRewardModel
from lpo.stages import evaluate, synthesize
from lpo.world.prompts import triple_indices
from lpo.world.render import render_indices
from pairs_helpers import pair_row

EVAL = {"n_prompts": 3, "images_per_prompt": 2, "ddim_steps": 2, "batch_size": 4, "bootstrap": 50, "device": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_clip_folder(path: Path, seed: int = 0) -> Path:
    """A random 2-layer CLIPModel (32 px images) with the real CLIP tokenizer and a PIL image processor, saved."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    config = CLIPConfig(text_config=B.tiny_clip_config().to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=B.build_clip_tokenizer()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return tiny_clip_folder(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, clip_dir) -> dict:
    """A tiny shapes experiment: world prompts, a random base, a different random policy, a copy of the base,
    a random LRM, and the tiny CLIP folder as the clip_score scorer."""
    root = tmp_path_factory.mktemp("shapes")
    cfg = from_dict({"experiment": {"name": "t", "seed": 0}, "synthesize": {"n_images": 4},
                     "evaluate": {**EVAL, "scorers": {"clip_score": str(clip_dir)}}})
    synthesize.run(cfg, root / "world", show_progress=False)
    base = B.build_shapes_tiny(seed=0)
    base.save_pipeline(root / "base")
    B.build_shapes_tiny(seed=1).save_pipeline(root / "other")
    shutil.copytree(root / "base", root / "copy")
    LatentRewardModel.from_backbone(base, cfg.lrm).save_pretrained(root / "lrm")
    out = {"root": root, "cfg": cfg}
    out["base_doc"] = evaluate.run(cfg, root / "base", root / "base", root / "world", root / "lrm",
                                   root / "eval" / "base", show_progress=False)
    return out


def _ordered(doc: dict) -> None:
    for name, m in doc["metrics"].items():
        assert m["lo"] <= m["mean"] + 1e-12 and m["mean"] <= m["hi"] + 1e-12, (name, m)


def test_base_run_writes_consistent_outputs(shapes):
    root, doc = shapes["root"], shapes["base_doc"]
    out = root / "eval" / "base"
    assert sorted(p.name for p in out.iterdir()) == sorted(evaluate.OUTPUT_FILES)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(doc))
    assert doc["model"] == "base" and doc["n_prompts"] == 3 and doc["images_per_prompt"] == 2
    for key in ("exact", "fg", "bg", "shape", "quality", "reward", "win_rate", "exact_delta", "lrm_score",
                "clip_score"):
        assert key in doc["metrics"], key
    _ordered(doc)
    # the base model against itself: expected win rate exactly 0.5, no paired change
    assert doc["metrics"]["win_rate"] == {**doc["metrics"]["win_rate"], "mean": 0.5, "lo": 0.5, "hi": 0.5}
    assert doc["metrics"]["exact_delta"]["mean"] == 0.0 and doc["metrics"]["exact_delta"]["hi"] == 0.0
    # the LRM scores at the lowest timestep of the DDIM grid
    assert doc["lrm_timestep"] == int(ddim_timesteps(B.shapes_scheduler(), 2)[0][-1])

    rows = [json.loads(line) for line in (out / "per_prompt.jsonl").read_text().splitlines()]
    test = json.loads((root / "world" / "prompts.json").read_text())["test"]
    assert len(rows) == 3
    for row in rows:
        assert row["prompt"] == test["prompts"][row["index"]] and row["triple"] == test["triples"][row["index"]]
        assert len(row["seeds"]) == 2
        assert all(len(v) == 2 for v in row["values"].values())  # every image scored, clip_score included
    values = np.array([v for r in rows for v in r["values"]["exact"]])
    assert values.mean() == pytest.approx(doc["metrics"]["exact"]["mean"])

    with np.load(out / "samples.npz", allow_pickle=False) as s:
        assert s["images"].shape == (3, 2, 32, 32, 3) and s["images"].dtype == np.uint8
        assert list(s["prompts"]) == [r["prompt"] for r in rows]
        assert s["seeds"].tolist() == [r["seeds"] for r in rows]


def test_same_model_same_seeds_same_metrics(shapes, tmp_path):
    """A copy of the base folder (so the base is resampled in the run) reproduces the base's images and metrics."""
    root, cfg = shapes["root"], shapes["cfg"]
    doc = evaluate.run(cfg, root / "copy", root / "base", root / "world", root / "lrm", tmp_path / "copy",
                       show_progress=False)
    assert doc["base_samples"].startswith("resampled")
    assert doc["metrics"] == shapes["base_doc"]["metrics"]
    with np.load(tmp_path / "copy" / "samples.npz") as a, np.load(root / "eval" / "base" / "samples.npz") as b:
        assert np.array_equal(a["images"], b["images"])


def test_other_model_is_compared_on_the_same_seeds(shapes, tmp_path):
    root, cfg = shapes["root"], shapes["cfg"]
    doc = evaluate.run(cfg, root / "other", root / "base", root / "world", root / "lrm", tmp_path / "lpo",
                       show_progress=False)
    _ordered(doc)
    base = shapes["base_doc"]["metrics"]
    with np.load(tmp_path / "lpo" / "samples.npz") as a, np.load(root / "eval" / "base" / "samples.npz") as b:
        assert np.array_equal(a["seeds"], b["seeds"]) and not np.array_equal(a["images"], b["images"])
    # the paired difference is the difference of the two means (same images per prompt)
    for key in ("exact", "fg", "reward"):
        assert doc["metrics"][f"{key}_delta"]["mean"] == pytest.approx(doc["metrics"][key]["mean"] - base[key]["mean"])
    assert 0.0 <= doc["metrics"]["win_rate"]["mean"] <= 1.0
    assert doc["metrics"]["win_rate"]["mean"] != 0.5


def test_seeds_are_a_fixed_function_of_prompt_and_image():
    both = evaluate.image_seeds(0, [3, 5], 4)
    assert np.array_equal(evaluate.image_seeds(0, [5], 4)[0], both[1])  # independent of which prompts run
    assert len(np.unique(both)) == 8
    assert not np.array_equal(evaluate.image_seeds(1, [3], 4), both[:1])


def test_prompt_selection():
    assert evaluate.select_prompts(5, None).tolist() == [0, 1, 2, 3, 4]
    assert evaluate.select_prompts(10, 3).tolist() == [0, 4, 9]  # spread over the split, not the first three
    assert len(set(evaluate.select_prompts(34, 33).tolist())) == 33
    with pytest.raises(ConfigError, match="evaluate.n_prompts"):
        evaluate.select_prompts(4, 5)


def test_cli_errors_are_one_line(shapes, tmp_path, capsys):
    root = shapes["root"]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"experiment": {"name": "t"}, "evaluate": {**EVAL}}))
    args = ["--config", str(cfg_file), "--model", str(root / "base"), "--base", str(root / "base"),
            "--lrm", str(root / "lrm"), "--out", str(tmp_path / "out")]
    assert evaluate.main(args + ["--prompts", str(tmp_path)]) == 2
    assert "prompts.json" in capsys.readouterr().err
    assert evaluate.main([*args[:3], str(tmp_path / "nope"), *args[4:], "--prompts", str(root / "world")]) == 2
    assert "not found" in capsys.readouterr().err
    cfg_file.write_text(yaml.safe_dump({"experiment": {"name": "t"}, "evaluate": {**EVAL, "images_per_prompt": 0}}))
    assert evaluate.main(args + ["--prompts", str(root / "world")]) == 2
    assert "evaluate.images_per_prompt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_real_world_tiny_sd15_with_pickscore(tmp_path, clip_dir):
    """Real-world path: Pick-a-Pic test captions (unique), a tiny SD1.5-layout model, PickScore on every image."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [pair_row(i, split=s, caption=c) for i, (s, c) in enumerate(
        [("train", "a cat"), ("test", "a dog"), ("test", "a red car"), ("test", "a dog"), ("test", "a boat")])]
    write_pairs(data / "pairs.parquet", rows)
    assert evaluate.real_test_prompts(data) == ["a dog", "a red car", "a boat"]

    bb = B.build_tiny_sd15(seed=0)
    bb.save_pipeline(tmp_path / "base")
    cfg = from_dict({"experiment": {"name": "t", "world": "real"}, "backbone": {"preset": "tiny-sd15"},
                     "evaluate": {**EVAL, "n_prompts": 2, "scorers": {"pickscore": str(clip_dir)}}})
    LatentRewardModel.from_backbone(bb, cfg.lrm).save_pretrained(tmp_path / "lrm")
    doc = evaluate.run(cfg, tmp_path / "base", tmp_path / "base", data, tmp_path / "lrm", tmp_path / "eval",
                       show_progress=False)
    assert set(doc["metrics"]) == {"lrm_score", "pickscore"} and doc["base_samples"] is None
    _ordered(doc)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "per_prompt.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a dog", "a boat"]
    assert all(len(r["values"]["pickscore"]) == 2 for r in rows)
    with np.load(tmp_path / "eval" / "samples.npz") as s:
        assert s["images"].shape == (2, 2, 64, 64, 3) and "triples" not in s.files


# --------------------------------------------------------------------------------------------------------
# Pure metric functions
# --------------------------------------------------------------------------------------------------------


def test_expected_win_rate_is_the_annotator_probability():
    r_model, r_base = np.array([1.0, 0.5, 0.2]), np.array([0.5, 0.5, 0.7])
    win = oracle_metrics.expected_win_rate(r_model, r_base, temperature=0.1)
    assert win == pytest.approx(1 / (1 + np.exp(-(r_model - r_base) / 0.1)))
    assert win[1] == 0.5
    with pytest.raises(ValueError, match="differ in shape"):
        oracle_metrics.expected_win_rate(r_model, r_base[:2], 0.1)


def test_interval_table_resamples_prompts():
    groups = oracle_metrics.prompt_groups(4, 3)
    assert groups.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    const = np.full(12, 0.5)
    varied = np.repeat([0.0, 1.0, 0.0, 1.0], 3)
    table = oracle_metrics.interval_table({"c": const, "v": varied}, groups, n_boot=200, seed=0)
    assert (table["c"]["lo"], table["c"]["mean"], table["c"]["hi"]) == (0.5, 0.5, 0.5)
    assert table["v"]["lo"] < 0.5 < table["v"]["hi"] and table["v"]["groups"] == 4
    with pytest.raises(ValueError, match="metric c"):
        oracle_metrics.interval_table({"c": const[:5]}, groups, 10, 0)


def test_oracle_values_on_clean_renders():
    world = WorldConfig()
    triples = [["red", "circle", "blue"], ["green", "square", "white"]]
    images = render_indices(triple_indices(triples, world), np.random.default_rng(0), world)
    annot = from_dict({"experiment": {"name": "t"}}).annotator
    vals = oracle_metrics.oracle_values(images, triples, world, annot)
    assert vals["exact"].tolist() == [1.0, 1.0]
    wrong = oracle_metrics.oracle_values(images, triples[::-1], world, annot)
    assert (wrong["reward"] < vals["reward"]).all()


# --------------------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------------------


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 40, 40, 3), dtype=np.uint8)


def test_pickscore_equals_clip_logits_and_scores_every_image(clip_dir):
    prompts = ["a red circle", "a dog", "a blue square on a white background", "x", "a cat"]
    images = _images(5)
    got = scorers.build_scorers({"pickscore": str(clip_dir)}, torch.device("cpu"), batch_size=2)["pickscore"]
    scores = got(images, prompts)
    assert scores.shape == (5,) and np.isfinite(scores).all()
    # the diagonal of CLIPModel's own logits_per_image (exp(logit_scale) * cos) is PickScore
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert scores == pytest.approx(torch.diagonal(logits).double().numpy(), abs=1e-4)
    # batching does not change scores
    assert scorers.build_scorers({"pickscore": str(clip_dir)}, torch.device("cpu"), 5)["pickscore"](
        images, prompts) == pytest.approx(scores, abs=1e-5)


def test_clip_score_is_clipped_scaled_cosine(clip_dir):
    scorer = scorers.build_scorers({"clip_score": str(clip_dir)}, torch.device("cpu"), 4)["clip_score"]
    images, prompts = _images(3, seed=1), ["a", "b", "c"]
    got = scorer(images, prompts)
    img, txt = scorer.embed_images(images), scorer.embed_texts(prompts)
    cos = torch.nn.functional.cosine_similarity(img, txt).double().numpy()
    assert got == pytest.approx(100 * np.maximum(cos, 0), abs=1e-4)
    assert (got >= 0).all()


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_aesthetic_mlp_on_normalised_embedding(clip_dir, tmp_path, fmt):
    folder = tmp_path / "aes"
    shutil.copytree(clip_dir, folder)
    torch.manual_seed(3)
    mlp = scorers.AestheticMLP(16)
    state = {k: v.contiguous() for k, v in mlp.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(folder / "aesthetic_mlp.safetensors"))
    else:
        torch.save(state, folder / "sac+logos+ava1-l14-linearMSE.pth")
    scorer = scorers.build_scorers({"aesthetic": str(folder)}, torch.device("cpu"), 2)["aesthetic"]
    images = _images(3, seed=2)
    got = scorer(images, ["p"] * 3)
    model, processor = CLIPModel.from_pretrained(folder), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        emb = model.get_image_features(**processor(images=list(images), return_tensors="pt")).pooler_output
        expected = mlp.eval()(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1).double().numpy()
    assert got == pytest.approx(expected, abs=1e-5)


def test_scorer_errors_name_the_key_and_what_is_missing(clip_dir, tmp_path):
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match=r"evaluate.scorers.pickscor: unknown scorer.*pickscore"):
        scorers.build_scorers({"pickscor": "x"}, cpu, 1)
    with pytest.raises(ConfigError, match=r"evaluate.scorers.clip_score: weights folder not found"):
        scorers.build_scorers({"clip_score": str(tmp_path / "nope")}, cpu, 1)
    with pytest.raises(ConfigError, match=r"evaluate.scorers.aesthetic: .* has none of aesthetic_mlp"):
        scorers.build_scorers({"aesthetic": str(clip_dir)}, cpu, 1)
    for key, package in (("hpsv2", "hpsv2"), ("hpsv2.1", "hpsv2"), ("imagereward", "ImageReward")):
        with pytest.raises(ConfigError, match=rf"evaluate.scorers.{key}: .*not importable here: .*{package}"):
            scorers.build_scorers({key: str(tmp_path)}, cpu, 1)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorers.build_scorers({"clip_score": str(clip_dir)}, cpu, 1)["clip_score"](_images(2), ["a"])
