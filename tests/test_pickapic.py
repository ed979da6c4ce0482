"""Pick-a-Pic parquet layer: schema checks, bad rows skipped and counted, writer, download from mirror / hub."""

import logging
import sys
import types
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pairs_helpers import aux_scores, jpeg_bytes, pair_row

from lpo.config import DownloadConfig, from_dict
from lpo.data import pickapic
from lpo.data.pickapic import (
    DataError,
    DownloadError,
    count_rows_by_split,
    download_pickapic,
    iter_rows,
    validate_table,
    write_pairs,
)
from lpo.utils import read_json


def _rows(path, **kw):
    stats = Counter()
    rows = list(iter_rows([path], stats=stats, **kw))
    return rows, stats


def test_roundtrip_yields_valid_rows(tmp_path):
    path = tmp_path / "pairs.parquet"
    write_pairs(path, [pair_row(0), pair_row(1, "val", (0.0, 1.0)), pair_row(2, "test", (0.5, 0.5))])
    rows, stats = _rows(path)
    assert [r.split for r in rows] == ["train", "val", "test"]
    assert [(r.label_0, r.label_1) for r in rows] == [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]
    assert rows[0].key == "pairs-r0000000" and "." not in rows[0].key
    assert rows[0].image_0.mode == "RGB" and rows[0].image_0.size == (32, 32)
    assert rows[0].aux is None and rows[2].is_tie
    assert stats == Counter(rows=3, kept=3, ties_kept=1)
    only_val, _ = _rows(path, split="val")
    assert [r.ranking_id for r in only_val] == [1]


def test_aux_scores_are_read(tmp_path):
    path = tmp_path / "pairs.parquet"
    write_pairs(path, [pair_row(0, aux=aux_scores(0.25, -0.5, 0.0))])
    (row,), _ = _rows(path)
    assert row.aux["aux_aesthetic_0"] - row.aux["aux_aesthetic_1"] == pytest.approx(0.25)
    assert row.aux["aux_clip_0"] - row.aux["aux_clip_1"] == pytest.approx(-0.5)


def test_corrupt_jpeg_is_skipped_counted_and_logged_with_file_and_row(tmp_path, caplog):
    bad = pair_row(1)
    bad["jpg_1"] = b"\xff\xd8\xff\xe0 not a jpeg at all"
    truncated = pair_row(2)
    truncated["jpg_0"] = jpeg_bytes(99)[:200]  # a valid header, then nothing
    path = tmp_path / "pairs.parquet"
    write_pairs(path, [pair_row(0), bad, truncated])
    with caplog.at_level(logging.WARNING, logger="lpo.data.pickapic"):
        rows, stats = _rows(path)
    assert [r.ranking_id for r in rows] == [0]
    assert stats["corrupt_jpeg"] == 2 and stats["rows"] == 3 and stats["kept"] == 1
    assert f"{path} row 1: skipped, corrupt_jpeg" in caplog.text
    assert f"{path} row 2: skipped, corrupt_jpeg" in caplog.text


def test_empty_caption_is_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "pairs.parquet"
    write_pairs(path, [pair_row(0, caption=""), pair_row(1, caption="   "), pair_row(2)])
    with caplog.at_level(logging.WARNING, logger="lpo.data.pickapic"):
        rows, stats = _rows(path)
    assert [r.ranking_id for r in rows] == [2]
    assert stats["empty_caption"] == 2
    assert f"{path} row 0: skipped, empty_caption" in caplog.text


def test_identical_images_are_skipped_and_counted(tmp_path):
    same = pair_row(0)
    same["jpg_1"] = same["jpg_0"]
    flagged = pair_row(1)
    flagged["are_different"] = False
    path = tmp_path / "pairs.parquet"
    write_pairs(path, [same, flagged, pair_row(2)])
    rows, stats = _rows(path)
    assert [r.ranking_id for r in rows] == [2]
    assert stats["identical_images"] == 2


def test_bad_labels_and_unlabelled_rows_are_skipped(tmp_path):
    unlabelled = pair_row(4)
    unlabelled["has_label"] = False
    rows_in = [pair_row(0, label=(1.0, 1.0)), pair_row(1, label=(0.3, 0.7)), pair_row(2, label=(float("nan"), 0.0)),
               pair_row(3), unlabelled]
    path = tmp_path / "pairs.parquet"
    write_pairs(path, rows_in)
    rows, stats = _rows(path)
    assert [r.ranking_id for r in rows] == [3]
    assert stats["bad_label"] == 3 and stats["no_label"] == 1


def test_tie_is_kept_or_dropped_by_config_and_counted(tmp_path):
    path = tmp_path / "pairs.parquet"
    write_pairs(path, [pair_row(0, label=(0.5, 0.5)), pair_row(1)])
    kept, stats = _rows(path, keep_ties=True)
    assert [r.is_tie for r in kept] == [True, False] and stats["ties_kept"] == 1
    dropped, stats = _rows(path, keep_ties=False)
    assert [r.ranking_id for r in dropped] == [1] and stats["tie_dropped"] == 1


def test_missing_column_is_rejected_naming_file_and_column(tmp_path):
    path = tmp_path / "train-00000.parquet"
    table = pa.table({"caption": ["x"], "jpg_0": [b"a"], "label_0": [1.0], "label_1": [0.0]})
    pq.write_table(table, path)
    with pytest.raises(DataError, match=r"train-00000\.parquet: missing column 'jpg_1'"):
        list(iter_rows([path]))
    with pytest.raises(DataError, match="missing column 'jpg_1'"):
        count_rows_by_split([path])


def test_incomplete_aux_columns_and_unknown_split_are_rejected(tmp_path):
    row = pair_row(0, aux=aux_scores())
    table = pa.Table.from_pylist([row]).drop(["aux_vqa_1"])
    with pytest.raises(DataError, match="x.parquet: aux columns come all six or none; missing column 'aux_vqa_1'"):
        validate_table(table, "x.parquet")
    no_split = pa.Table.from_pylist([pair_row(0)]).drop(["split"])
    with pytest.raises(DataError, match="pairs.parquet: missing column 'split'"):
        validate_table(no_split, "pairs.parquet")
    validate_table(no_split, "validation_unique-00000-of-00001-abc.parquet")  # the hub's naming gives the split


def test_hub_file_name_gives_the_split(tmp_path):
    table = pa.Table.from_pylist([pair_row(0), pair_row(1)]).drop(["split"])
    pq.write_table(table, tmp_path / "validation_unique-00000-of-00001-abc.parquet")
    pq.write_table(table, tmp_path / "test_unique-00000-of-00001-abc.parquet")
    paths = sorted(tmp_path.glob("*.parquet"))
    assert count_rows_by_split(paths) == {"test": 2, "val": 2}
    val = list(iter_rows(paths, split="val", decode=False))
    assert [r.split for r in val] == ["val", "val"] and val[0].image_0 is None


def test_write_pairs_rejects_missing_and_unknown_keys(tmp_path):
    row = pair_row(0)
    del row["has_label"]
    with pytest.raises(DataError, match=r"p.parquet: row 1: missing key 'has_label'"):
        write_pairs(tmp_path / "p.parquet", [pair_row(1), row])
    with pytest.raises(DataError, match="unknown key 'colour'"):
        write_pairs(tmp_path / "p.parquet", [{**pair_row(0), "colour": "red"}])
    with pytest.raises(DataError, match="split 'validation'"):
        write_pairs(tmp_path / "p.parquet", [pair_row(0, split="validation")])
    assert not (tmp_path / "p.parquet").exists()


# --------------------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------------------


def _hub_table(n: int, start: int = 0) -> pa.Table:
    return pa.Table.from_pylist([pair_row(start + i) for i in range(n)]).drop(["split"])


@pytest.fixture()
def mirror(tmp_path):
    root = tmp_path / "mirror"
    (root / "data").mkdir(parents=True)
    pq.write_table(_hub_table(3, 0), root / "data" / "train-00000-of-00002-a.parquet")
    pq.write_table(_hub_table(3, 3), root / "data" / "train-00001-of-00002-b.parquet")
    pq.write_table(_hub_table(2, 6), root / "data" / "validation_unique-00000-of-00001-c.parquet")
    pq.write_table(_hub_table(2, 8), root / "data" / "validation-00000-of-00001-d.parquet")  # not asked for
    pq.write_table(_hub_table(2, 10), root / "data" / "test_unique-00000-of-00001-e.parquet")
    return root


def test_download_from_mirror_writes_files_and_manifest(tmp_path, mirror):
    out = tmp_path / "data" / "pickapic"
    manifest = download_pickapic(DownloadConfig(source="pickapic", mirror=str(mirror)), out)
    names = sorted(p.name for p in out.glob("*.parquet"))
    assert names == [
        "test_unique-00000-of-00001-e.parquet",
        "train-00000-of-00002-a.parquet",
        "train-00001-of-00002-b.parquet",
        "validation_unique-00000-of-00001-c.parquet",
    ]
    assert manifest["rows"] == {"train": 6, "validation_unique": 2, "test_unique": 2}
    on_disk = read_json(out / "manifest.json")
    assert on_disk == manifest
    entry = next(e for e in on_disk["files"] if e["name"].startswith("train-00001"))
    assert entry["sha256"] == pickapic.sha256_file(out / entry["name"])
    assert entry["bytes"] == (out / entry["name"]).stat().st_size and entry["rows"] == 3
    assert count_rows_by_split(sorted(out.glob("*.parquet"))) == {"train": 6, "val": 2, "test": 2}


def test_download_max_pairs_cuts_the_last_file(tmp_path, mirror):
    out = tmp_path / "out"
    cfg = DownloadConfig(source="pickapic", mirror=str(mirror), splits=["train"], max_pairs=4)
    manifest = download_pickapic(cfg, out)
    assert [(e["name"][:11], e["rows"]) for e in manifest["files"]] == [("train-00000", 3), ("train-00001", 1)]
    assert pq.ParquetFile(out / "train-00001-of-00002-b.parquet").metadata.num_rows == 1


def test_download_missing_mirror_or_split_is_one_clear_error(tmp_path, mirror):
    with pytest.raises(DownloadError, match=r"download.mirror: .*nowhere is not a folder"):
        download_pickapic(DownloadConfig(source="pickapic", mirror=str(tmp_path / "nowhere")), tmp_path / "o")
    with pytest.raises(DownloadError, match="no parquet file of split 'test'"):
        download_pickapic(DownloadConfig(source="pickapic", mirror=str(mirror), splits=["test"]), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_download_unreachable_repo_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DownloadConfig(source="pickapic", repo_id="nobody/no-such-pickapic")
    with pytest.raises(DownloadError, match=r"cannot fetch dataset 'nobody/no-such-pickapic' \(revision main\)"):
        download_pickapic(cfg, tmp_path / "o")


def _fake_snapshot(hub_root: Path, calls: list):
    """A stand-in for huggingface_hub.snapshot_download over a local folder laid out like the hub repo."""
    import fnmatch

    def snapshot_download(repo_id, *, repo_type, revision, allow_patterns, dry_run=False):
        calls.append((repo_id, repo_type, revision, tuple(allow_patterns), dry_run))
        names = [p.relative_to(hub_root).as_posix() for p in sorted(hub_root.rglob("*.parquet"))]
        names = [n for n in names if any(fnmatch.fnmatch(n, pat) for pat in allow_patterns)]
        if dry_run:
            return [types.SimpleNamespace(filename=n) for n in names]
        return str(hub_root)

    return snapshot_download


def test_download_from_hub_fetches_only_needed_split_files(tmp_path, mirror, monkeypatch):
    import huggingface_hub

    calls: list = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot(mirror, calls))
    cfg = DownloadConfig(source="pickapic", repo_id="me/pickapic_v1", revision="abc", splits=["train", "test_unique"])
    manifest = download_pickapic(cfg, tmp_path / "all")
    assert manifest["source"] == "hub" and manifest["rows"] == {"train": 6, "test_unique": 2}
    assert calls[0][:3] == ("me/pickapic_v1", "dataset", "abc") and "data/train-*.parquet" in calls[0][3]
    assert not any("validation" in p for p in calls[0][3])
    calls.clear()
    capped = download_pickapic(DownloadConfig(source="pickapic", repo_id="me/x", splits=["train"], max_pairs=2),
                               tmp_path / "capped")
    assert capped["rows"] == {"train": 2}
    fetched = [c[3] for c in calls if not c[4]]
    assert fetched == [("data/train-00000-of-00002-a.parquet",)]  # the second train file is never downloaded
    with pytest.raises(DownloadError, match="dataset 'me/x' has no parquet file of split 'test'"):
        download_pickapic(DownloadConfig(source="pickapic", repo_id="me/x", splits=["train", "test"]), tmp_path / "n")
    with pytest.raises(DownloadError, match="download.splits: 'validation' is not a split the pipeline reads"):
        download_pickapic(DownloadConfig(source="pickapic", repo_id="me/x", splits=["validation"]), tmp_path / "n")


def test_download_stage_dispatches_on_source(tmp_path, mirror, monkeypatch):
    from lpo.stages import download

    cfg = from_dict({"experiment": {"name": "t"}, "download": {"source": "pickapic", "mirror": str(mirror)}})
    assert download.run(cfg, tmp_path / "p")["rows"]["train"] == 6
    shapes_cfg = from_dict({"experiment": {"name": "t"}, "download": {"source": "shapes"}})
    with pytest.raises(ValueError, match="pass base_dir"):
        download.run(shapes_cfg, tmp_path / "s")
    fake = types.ModuleType("lpo.generate")
    fake.run = lambda cfg, out_dir, base_dir: {"called": (str(out_dir), str(base_dir))}
    monkeypatch.setitem(sys.modules, "lpo.generate", fake)
    import lpo

    monkeypatch.setattr(lpo, "generate", fake, raising=False)
    assert download.run(shapes_cfg, tmp_path / "s", tmp_path / "base") == {
        "called": (str(tmp_path / "s"), str(tmp_path / "base"))
    }


def test_download_main_cli(tmp_path, mirror):
    from lpo.stages import download

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"experiment: {{name: t}}\ndownload: {{source: pickapic, mirror: '{mirror}', splits: [train]}}\n")
    assert download.main(["--config", str(cfg), "--out", str(tmp_path / "out")]) == 0
    assert read_json(tmp_path / "out" / "manifest.json")["rows"] == {"train": 6}
