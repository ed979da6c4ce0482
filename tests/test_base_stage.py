"""Stage `base`: writes a complete diffusers pipeline folder; bad inputs are one clear line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline

from lpo import backbones as B
from lpo.config import from_dict
from lpo.stages import base


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy models on a shared 2-core machine: 2 threads run 10-60x slower than 1 under contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config_file(tmp_path: Path, **backbone) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"experiment": {"name": "t", "seed": 3}, "backbone": backbone}))
    return path


def test_run_tiny_sd15_writes_a_stock_pipeline_folder(tmp_path):
    cfg = from_dict({"experiment": {"name": "t", "seed": 3}, "backbone": {"preset": "tiny-sd15"}})
    out = tmp_path / "results" / "t" / "base"
    summary = base.run(cfg, out)
    assert summary["kind"] == "sd15" and summary["source"] == "random init, seed 3"
    assert summary["latent_shape"] == [4, 8, 8] and summary["params"]["unet"] > 0
    pipe = StableDiffusionPipeline.from_pretrained(out)  # stock class, no extra arguments
    assert pipe.safety_checker is None and type(pipe.scheduler).__name__ == "DDIMScheduler"
    info = json.loads((out / B.INFO_FILE).read_text())
    assert info["config"]["backbone"]["preset"] == "tiny-sd15" and info["versions"]["diffusers"]
    # seeded by experiment.seed: the same config builds the same model
    again = B.build_tiny_sd15(3)
    assert torch.equal(next(iter(again.unet.parameters())), next(iter(pipe.unet.parameters())))


def test_main_shapes_from_weights_folder(tmp_path, capsys):
    weights = B.build_shapes_tiny(seed=5).save_weights(tmp_path / "weights")
    out = tmp_path / "base"
    cfg = _config_file(tmp_path, preset="shapes-tiny")
    rc = base.main(["--config", str(cfg), "--out", str(out), "--weights", str(weights)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kind"] == "shapes" and summary["source"] == str(weights) and summary["resolution"] == 32
    back = B.load_pipeline_folder(out)
    assert back.kind == "shapes" and type(back.text_encoder).__name__ == "BertModel"
    src = B.load_backbone(from_dict({"experiment": {"name": "t"}}).backbone, weights=weights)
    for p, q in zip(back.unet.parameters(), src.unet.parameters()):
        assert torch.equal(p, q)


def _main_error(tmp_path, capsys, argv: list[str]) -> str:
    rc = base.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("lpo base: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    return lines[0]


def test_main_missing_weights_folder(tmp_path, capsys):
    missing = tmp_path / "no-weights"
    cfg = _config_file(tmp_path, preset="shapes-tiny")
    argv = ["--config", str(cfg), "--out", str(tmp_path / "o"), "--weights", str(missing)]
    line = _main_error(tmp_path, capsys, argv)
    assert str(missing) in line
    assert not (tmp_path / "o").exists()


def test_main_unknown_preset(tmp_path, capsys):
    cfg = _config_file(tmp_path, preset="sd99")
    line = _main_error(tmp_path, capsys, ["--config", str(cfg), "--out", str(tmp_path / "o")])
    assert "backbone.preset" in line and "'sd99'" in line


def test_main_missing_local_sd15_folder(tmp_path, capsys):
    missing = tmp_path / "sd15-mirror"
    cfg = _config_file(tmp_path, preset="sd15", pretrained=str(missing))
    line = _main_error(tmp_path, capsys, ["--config", str(cfg), "--out", str(tmp_path / "o")])
    assert str(missing) in line and "backbone.pretrained" in line


def test_shapes_weights_resolution(tmp_path, monkeypatch):
    cfg = from_dict({"experiment": {"name": "t"}, "backbone": {"shapes_base": "pretrain"}})
    with pytest.raises(B.BackboneError, match="pass --weights"):
        base.run(cfg, tmp_path / "o")
    monkeypatch.setattr(base, "SHIPPED_SHAPES_BASE", tmp_path / "not-shipped-yet")
    with pytest.raises(B.BackboneError, match="shipped shapes base not found"):
        base.run(from_dict({"experiment": {"name": "t"}}), tmp_path / "o")
    weights = B.build_shapes_tiny(seed=0).save_weights(tmp_path / "w")
    monkeypatch.setattr(base, "SHIPPED_SHAPES_BASE", weights)
    assert base.resolve_weights(from_dict({"experiment": {"name": "t"}}), None) == weights
    wrong = from_dict({"experiment": {"name": "t"}, "world": {"resolution": 64}})
    with pytest.raises(B.BackboneError, match="world.resolution is 64"):
        base.run(wrong, tmp_path / "o")
    assert not (tmp_path / "o").exists()
