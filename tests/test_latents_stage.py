"""Stage precompute_latents on tiny parquet files and a tiny random VAE: shards, MPCF, atomicity, CLI."""

import io
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pairs_helpers import aux_scores, pair_row, save_tiny_vae
from PIL import Image

from lpo.config import from_dict
from lpo.data.loader import PairLoader
from lpo.data.pickapic import write_pairs
from lpo.data.shards import ShardError, read_split_index
from lpo.stages import latents
from lpo.utils import read_json


def make_cfg(**latents_cfg):
    return from_dict({"experiment": {"name": "t"}, "latents": {"batch_size": 4, "samples_per_shard": 4,
                                                              "dtype": "float32", **latents_cfg}})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("base"))


@pytest.fixture()
def data(tmp_path):
    """train: 6 good pairs (2 fail MPCF strategy 2), a tie, a corrupt JPEG; hub-style val and test files."""
    d = tmp_path / "data"
    train = [pair_row(i, aux=aux_scores(0.1, 0.01, 0.01)) for i in range(4)]
    train += [pair_row(4, aux=aux_scores(-0.8, 0.0, 0.0)),  # aesthetic gap below -0.5
              pair_row(5, label=(0.0, 1.0), aux=aux_scores(0.0, 0.05, 0.0)),  # winner (image 1) worse on CLIP
              pair_row(6, label=(0.5, 0.5), aux=aux_scores(0.1, 0.0, 0.0)),  # tie passing the tie rule
              pair_row(7, aux=aux_scores())]
    train[7]["jpg_0"] = b"garbage"
    write_pairs(d / "pairs-train.parquet", train)
    hub = pa.Table.from_pylist([pair_row(10 + i, aux=aux_scores()) for i in range(3)]).drop(["split"])
    pq.write_table(hub, d / "validation_unique-00000-of-00001-x.parquet")
    pq.write_table(hub.slice(0, 2), d / "test_unique-00000-of-00001-x.parquet")
    return d


def test_stage_writes_shards_applies_mpcf_and_reports_speed(tmp_path, base, data):
    out = tmp_path / "latents"
    summary = latents.run(make_cfg(), data, base, out)
    assert summary["resolution"] == 32 and summary["latent_shape"] == [4, 8, 8]
    train = summary["splits"]["train"]
    assert train["n_samples"] == 5  # 8 rows - 1 corrupt JPEG - 2 dropped by MPCF
    assert train["stats"]["corrupt_jpeg"] == 1 and train["stats"]["mpcf_win_lose_dropped"] == 2
    assert train["stats"]["mpcf_win_lose_fail_aesthetic"] == 1 and train["stats"]["mpcf_win_lose_fail_clip"] == 1
    assert train["stats"]["mpcf_tie_kept"] == 1
    assert train["n_shards"] == 2 and summary["mpcf"]["applied"] is True
    assert summary["splits"]["val"]["n_samples"] == 3 and summary["splits"]["test"]["n_samples"] == 2
    assert summary["images"] == 2 * (5 + 3 + 2)  # MPCF drops pairs before encoding
    assert summary["encode_images_per_s"] > 0 and summary["images_per_s"] > 0
    assert read_json(out / "latents.json") == summary
    assert read_split_index(out, "train")["stats"]["mpcf_win_lose_dropped"] == 2

    batch = next(PairLoader(out, "val", 3, shuffle=False).iterate(0))
    assert batch["mean"].shape == (3, 2, 4, 8, 8) and bool((batch["std"] > 0).all())
    assert batch["keys"][0].startswith("validation_unique-00000-of-00001-x-r")
    # The stored mean is the VAE posterior mean of the resized image, times the scaling factor.
    vae = latents.load_vae(base)
    row = next(r for r in [pair_row(10 + i) for i in range(3)] if r["caption"] == batch["captions"][0])
    pixels = latents.image_to_array(Image.open(io.BytesIO(row["jpg_1"])).convert("RGB"), 32)
    with torch.no_grad():
        expected = vae.encode(torch.from_numpy(pixels)[None]).latent_dist.mean[0] * 0.5
    torch.testing.assert_close(batch["mean"][0, 1], expected, atol=1e-5, rtol=1e-4)
    assert batch["meta"][0]["split"] == "val" and batch["meta"][0]["aux"]["aux_clip_0"] == pytest.approx(0.3)


def test_without_aux_columns_the_log_says_no_filter_was_applied(tmp_path, base, caplog):
    d = tmp_path / "data"
    write_pairs(d / "p.parquet", [pair_row(i) for i in range(3)] + [pair_row(3, "val")])
    with caplog.at_level(logging.WARNING, logger="lpo.stages.latents"):
        summary = latents.run(make_cfg(resolution=16, dtype="float16"), d, base, tmp_path / "out")
    assert "NO MPCF filter could be applied" in caplog.text
    assert summary["mpcf"]["applied"] is False and summary["splits"]["train"]["n_samples"] == 3
    assert "test" not in summary["splits"] and "split test: no rows" in caplog.text
    assert summary["latent_shape"] == [4, 4, 4]  # resolution 16 -> 4x4 latents
    assert read_split_index(tmp_path / "out", "train")["dtype"] == "float16"


def test_resolution_comes_from_the_base_models_unet(tmp_path, base, data):
    import shutil

    full = tmp_path / "base"
    shutil.copytree(base, full)
    (full / "unet").mkdir()
    (full / "unet" / "config.json").write_text('{"sample_size": 4}')  # 4 x VAE factor 4 = 16 pixels
    summary = latents.run(make_cfg(mpcf={"strategy": "none"}), data, full, tmp_path / "out")
    assert summary["resolution"] == 16 and summary["latent_shape"] == [4, 4, 4]


def test_killed_run_leaves_nothing_taken_as_complete(tmp_path, base, data, monkeypatch):
    out = tmp_path / "latents"
    real = latents.encode_posterior
    calls = {"n": 0}

    def dies_on_third_batch(vae, pixels):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(vae, pixels)

    monkeypatch.setattr(latents, "encode_posterior", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        latents.run(make_cfg(), data, base, out)
    assert not out.exists()
    partial = tmp_path / ".latents.partial"
    with pytest.raises(ShardError, match="no index for split 'train'"):
        read_split_index(partial, "train")
    with pytest.raises(ShardError):
        PairLoader(out, "train", 1)

    monkeypatch.setattr(latents, "encode_posterior", real)
    summary = latents.run(make_cfg(), data, base, out)
    assert summary["splits"]["train"]["n_samples"] == 5 and not partial.exists()


def test_mixed_aux_presence_is_an_error(tmp_path, base):
    d = tmp_path / "data"
    write_pairs(d / "a.parquet", [pair_row(0, aux=aux_scores())])
    write_pairs(d / "b.parquet", [pair_row(1)])
    with pytest.raises(ValueError, match=r"b.parquet: no aux columns .* while .*a.parquet has them"):
        latents.run(make_cfg(), d, base, tmp_path / "out")


def test_empty_data_folder_and_missing_vae_are_clear_errors(tmp_path, base, data):
    with pytest.raises(ValueError, match="no \\*.parquet files"):
        latents.run(make_cfg(), tmp_path, base, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no VAE here"):
        latents.run(make_cfg(), data, tmp_path, tmp_path / "out")


def test_main_cli(tmp_path, base, data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("experiment: {name: t}\nlatents: {batch_size: 8, mpcf: {strategy: none}}\n")
    out = tmp_path / "latents"
    assert latents.main(["--config", str(cfg), "--data", str(data), "--base", str(base), "--out", str(out)]) == 0
    summary = read_json(out / "latents.json")
    assert summary["splits"]["train"]["n_samples"] == 7 and summary["mpcf"]["applied"] is False
    assert np.isfinite(summary["images_per_s"])
