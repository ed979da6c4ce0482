"""WebDataset latent shards: shard count, atomic writing, the index and its checks, no pickle."""

import json
import tarfile

import numpy as np
import pytest
from pairs_helpers import make_samples

from lpo.data.shards import ShardError, decode_npy, read_split_index, shard_count, write_shards


@pytest.mark.parametrize(
    "n,per_shard,world,workers,expected",
    [(1000, 500, 1, 1, 2), (1000, 500, 2, 2, 4), (1001, 500, 2, 1, 4), (10, 500, 3, 2, 6), (0, 500, 2, 1, 2),
     (4000, 500, 4, 1, 8)],
)
def test_shard_count_is_a_multiple_of_readers(n, per_shard, world, workers, expected):
    assert shard_count(n, per_shard, world, workers) == expected
    assert expected % (world * workers) == 0


def test_shard_count_rejects_zero():
    with pytest.raises(ValueError, match="samples_per_shard"):
        shard_count(10, 0, 1, 1)


def test_write_read_roundtrip_balanced_and_without_pickle(tmp_path):
    index = write_shards(make_samples(11), tmp_path, "train", 4, stats={"rows": 12, "corrupt_jpeg": 1})
    assert [p.name for p in sorted(tmp_path.glob("train-*.tar"))] == [f"train-{i:06d}.tar" for i in range(4)]
    assert [s["n_samples"] for s in index["shards"]] == [3, 3, 3, 2]  # round-robin: sizes differ by <= 1
    assert index["n_samples"] == 11 and index["latent_shape"] == [4, 2, 2] and index["dtype"] == "float16"
    assert index["stats"] == {"rows": 12, "corrupt_jpeg": 1}
    assert read_split_index(tmp_path, "train") == index
    assert not list(tmp_path.glob(".*"))  # no temp file left
    with tarfile.open(tmp_path / "train-000001.tar") as tar:
        names = tar.getnames()
        members = ("json", "mean0.npy", "std0.npy", "mean1.npy", "std1.npy")
        assert sorted(names[:5]) == sorted(f"pairs-r0000001.{m}" for m in members)
        assert all(n.endswith((".npy", ".json")) for n in names)
        mean1 = decode_npy(tar.extractfile("pairs-r0000005.mean1.npy").read())  # allow_pickle=False inside
        meta = json.loads(tar.extractfile("pairs-r0000005.json").read())
    assert mean1.dtype == np.float16 and mean1.shape == (4, 2, 2) and float(mean1[0, 0, 0]) == -5.0
    assert meta["caption"] == "c5" and meta["prompt_key"] == "p2"


def test_missing_or_empty_split_is_a_clear_error(tmp_path):
    write_shards(make_samples(3), tmp_path, "train", 1)
    with pytest.raises(ShardError, match=r"val-index.json: no index for split 'val'.*train-index.json"):
        read_split_index(tmp_path, "val")
    write_shards(make_samples(0), tmp_path, "test", 2)
    with pytest.raises(ShardError, match="split 'test' is empty"):
        read_split_index(tmp_path, "test")


def test_truncated_or_missing_shard_makes_the_split_incomplete(tmp_path):
    write_shards(make_samples(8), tmp_path, "train", 2)
    shard = tmp_path / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])
    with pytest.raises(ShardError, match=r"train-000001.tar: \d+ bytes, but train-index.json records \d+ \(truncated"):
        read_split_index(tmp_path, "train")
    shard.unlink()
    with pytest.raises(ShardError, match="train-000001.tar: listed in train-index.json but missing"):
        read_split_index(tmp_path, "train")


def test_interrupted_write_leaves_nothing_a_reader_accepts(tmp_path):
    write_shards(make_samples(6), tmp_path, "train", 2)  # an earlier, complete run

    def killed():
        yield from make_samples(3)
        raise KeyboardInterrupt("killed mid-way")

    with pytest.raises(KeyboardInterrupt):
        write_shards(killed(), tmp_path, "train", 2)
    with pytest.raises(ShardError, match="no index for split 'train'"):
        read_split_index(tmp_path, "train")
    assert not list(tmp_path.glob(".*partial"))
    write_shards(make_samples(5), tmp_path, "train", 1)  # a later run replaces the stale shards
    assert [p.name for p in tmp_path.glob("train-*.tar")] == ["train-000000.tar"]
    assert read_split_index(tmp_path, "train")["n_samples"] == 5


def test_bad_samples_are_rejected(tmp_path):
    bad_key = [{**next(make_samples(1)), "key": "a.b"}]
    with pytest.raises(ValueError, match="'a.b' contains '.'"):
        write_shards(bad_key, tmp_path, "train", 1)
    mixed = list(make_samples(2))
    mixed[1]["std1"] = mixed[1]["std1"].astype(np.float32)
    with pytest.raises(ValueError, match=r"pairs-r0000001.std1 is float32\(4, 2, 2\), expected float16"):
        write_shards(mixed, tmp_path, "train", 1)
