"""The shapes source of `download`: pairs in the Pick-a-Pic schema, labelled by the simulated annotator."""

import json

import numpy as np
import pytest

from lpo import backbones
from lpo.config import from_dict
from lpo.data.pickapic import AUX_COLUMNS, count_rows_by_split, iter_rows
from lpo import generate as download_shapes


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "base"
    backbones.build_shapes_tiny(seed=0).save_pipeline(path)
    return path


def small_cfg(**download):
    d = {"n_train_prompts": 12, "n_val_prompts": 4, "n_test_prompts": 4, "batch_size": 16, "dataset": "t"}
    d.update(download)
    return from_dict({"experiment": {"name": "t"}, "download": d})


def test_pairs_schema_labels_and_manifest(tmp_path, base_dir):
    out = tmp_path / "data"
    summary = download_shapes.run(small_cfg(), out, base_dir)
    files = sorted(p.name for p in out.glob("*.parquet"))
    assert files == ["test-00000.parquet", "train-00000.parquet", "val-00000.parquet"]
    assert count_rows_by_split(sorted(out.glob("*.parquet"))) == {"train": 12, "val": 4, "test": 4}
    rows = list(iter_rows(sorted(out.glob("*.parquet"))))
    assert len(rows) == 20  # no row is skipped: every label valid, every caption non-empty
    for row in rows:
        assert (row.label_0, row.label_1) in {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}
        assert set(row.aux) == set(AUX_COLUMNS)
        assert row.image_0.size == (32, 32)
    manifest = json.loads((out / "manifest.json").read_text())
    names = {f["name"] for f in manifest["files"]}
    assert {"train-00000.parquet", "pairs_meta.jsonl"} <= names
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    assert 0.0 <= summary["splits"]["train"]["annotator_agreement"] <= 1.0 or np.isnan(
        summary["splits"]["train"]["annotator_agreement"]
    )
    meta = [json.loads(line) for line in (out / "pairs_meta.jsonl").read_text().splitlines()]
    assert len(meta) == 20 and all(set(m["differ"]) <= {"fg", "bg", "shape"} for m in meta)


def test_test_prompts_come_from_test_triples(tmp_path, base_dir):
    from lpo.world.prompts import format_prompt, split_triples

    cfg = small_cfg()
    out = tmp_path / "data"
    download_shapes.run(cfg, out, base_dir)
    test_prompts = {format_prompt(t) for t in split_triples(cfg.world)["test"]}
    rows = list(iter_rows([out / "test-00000.parquet"]))
    assert rows and all(r.caption in test_prompts for r in rows)


def test_deterministic_by_seed(tmp_path, base_dir):
    a = download_shapes.run(small_cfg(), tmp_path / "a", base_dir)
    b = download_shapes.run(small_cfg(), tmp_path / "b", base_dir)
    assert [f["sha256"] for f in a["files"] if f["name"].endswith(".parquet")] == [
        f["sha256"] for f in b["files"] if f["name"].endswith(".parquet")
    ]
