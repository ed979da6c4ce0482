"""PairLoader: batches, seeded order, resume, DDP rank split with equal batch counts, bad shards."""

import logging

import numpy as np
import pytest
import torch
from pairs_helpers import make_samples

from lpo.data.loader import PairLoader
from lpo.data.shards import ShardError, write_shards


@pytest.fixture()
def shards(tmp_path):
    write_shards(make_samples(40), tmp_path, "train", 4)  # 4 shards x 10 samples
    return tmp_path


def keys_of(loader, epoch=0, start_batch=0):
    return [b["keys"] for b in loader.iterate(epoch, start_batch)]


def as_rank(monkeypatch, rank, world):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


def test_batches_have_the_documented_layout(shards):
    loader = PairLoader(shards, "train", 8, seed=1)
    batches = list(loader.iterate(0))
    assert len(batches) == len(loader) == 5
    batch = batches[0]
    assert batch["mean"].shape == (8, 2, 4, 2, 2) and batch["mean"].dtype == torch.float32
    assert batch["std"].shape == (8, 2, 4, 2, 2) and batch["labels"].shape == (8, 2)
    i = int(batch["keys"][0][-7:])  # make_samples fills sample i's arrays with i
    assert torch.all(batch["mean"][0, 0] == i) and torch.all(batch["mean"][0, 1] == -i)
    assert torch.all(batch["std"][0, 0] == i + 1) and torch.all(batch["std"][0, 1] == i + 2)
    assert batch["labels"][0].tolist() == [1.0, 0.0] and batch["captions"][0] == f"c{i}"
    assert batch["prompt_keys"][0] == f"p{i % 3}"
    seen = [k for b in batches for k in b["keys"]]
    assert sorted(seen) == [f"pairs-r{i:07d}" for i in range(40)]  # one epoch = every sample once


def test_order_is_deterministic_per_seed_and_epoch(shards):
    a = PairLoader(shards, "train", 4, seed=3, shuffle_buffer=16)
    b = PairLoader(shards, "train", 4, seed=3, shuffle_buffer=16)
    assert keys_of(a, epoch=2) == keys_of(b, epoch=2)
    assert keys_of(a, epoch=2) != keys_of(a, epoch=3)
    assert keys_of(a, epoch=2) != keys_of(PairLoader(shards, "train", 4, seed=4, shuffle_buffer=16), epoch=2)
    unshuffled = PairLoader(shards, "train", 4, shuffle=False)
    assert keys_of(unshuffled)[0] == [f"pairs-r{i:07d}" for i in (0, 4, 8, 12)]  # shard 0 in written order


def test_resume_skips_exactly_the_first_batches(shards):
    loader = PairLoader(shards, "train", 4, seed=0)
    full = keys_of(loader, epoch=1)
    assert keys_of(loader, epoch=1, start_batch=3) == full[3:]
    assert keys_of(loader, epoch=1, start_batch=len(loader)) == []
    with pytest.raises(ValueError, match="start_batch 11"):
        keys_of(loader, epoch=1, start_batch=11)


def test_two_ranks_get_disjoint_samples_and_equal_batch_counts(shards, monkeypatch):
    per_rank = {}
    for rank in (0, 1):
        as_rank(monkeypatch, rank, 2)
        loader = PairLoader(shards, "train", 4, seed=7)
        assert len(loader) == 5  # 40 samples // (2 ranks x 4)
        per_rank[rank] = keys_of(loader, epoch=0)
        assert per_rank[rank] == keys_of(loader, epoch=0)  # deterministic per rank
        assert len(per_rank[rank]) == 5
    flat = {r: {k for b in batches for k in b} for r, batches in per_rank.items()}
    assert not flat[0] & flat[1]
    assert len(flat[0] | flat[1]) == 40


def test_uneven_ranks_replay_to_the_same_batch_count(tmp_path, monkeypatch, caplog):
    write_shards(make_samples(30), tmp_path, "train", 3)  # 3 shards on 2 ranks: 20 vs 10 samples
    counts = {}
    for rank in (0, 1):
        as_rank(monkeypatch, rank, 2)
        with caplog.at_level(logging.WARNING, logger="lpo.data.loader"):
            loader = PairLoader(tmp_path, "train", 5, shuffle=False)
        assert "not a multiple of 2 readers" in caplog.text
        batches = keys_of(loader)
        counts[rank] = (len(batches), loader.last_stats["read"], loader.last_stats["repeated"])
    assert counts[0] == (3, 15, 0)  # 30 // (2 x 5) = 3 batches: rank 0 stops early
    assert counts[1] == (3, 10, 5)  # rank 1 replays 5 of its 10 samples


def test_non_finite_samples_are_skipped_and_counted(tmp_path, caplog):
    samples = list(make_samples(12))
    samples[5]["mean1"] = samples[5]["mean1"].copy()
    samples[5]["mean1"][0, 0, 0] = np.inf
    samples[7]["std0"] = np.full((4, 2, 2), np.nan, dtype=np.float16)
    write_shards(samples, tmp_path, "train", 2)
    loader = PairLoader(tmp_path, "train", 2, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="lpo.data.loader"):
        seen = [k for b in keys_of(loader) for k in b]
    assert len(seen) == 12  # 6 batches, the two bad ones replaced by replayed samples
    assert "pairs-r0000005" not in seen and "pairs-r0000007" not in seen
    assert loader.last_stats["nonfinite_skipped"] == 2
    assert "sample pairs-r0000005 has non-finite latents" in caplog.text


def test_truncated_shard_is_an_error_naming_it(shards):
    shard = shards / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:-1536])
    with pytest.raises(ShardError, match=r"train-000002.tar: \d+ bytes, but train-index.json records"):
        PairLoader(shards, "train", 4)


def test_corrupt_shard_of_the_right_size_is_an_error_naming_it(shards):
    loader = PairLoader(shards, "train", 4, seed=0)
    shard = shards / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[3000:3600] = b"x" * 600  # garbage over a tar header, size unchanged
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000002.tar: corrupt or truncated shard"):
        keys_of(loader)


def test_too_few_shards_for_the_readers_is_an_error(tmp_path, monkeypatch):
    write_shards(make_samples(8), tmp_path, "train", 2)
    as_rank(monkeypatch, 0, 4)
    with pytest.raises(ShardError, match="2 shards for 4 readers"):
        PairLoader(tmp_path, "train", 1)


def test_rank_change_after_construction_is_refused(shards, monkeypatch):
    loader = PairLoader(shards, "train", 4)
    as_rank(monkeypatch, 1, 2)
    with pytest.raises(RuntimeError, match="built for rank/world 0/1"):
        keys_of(loader)


def test_dataloader_workers_read_the_same_samples(shards):
    single = PairLoader(shards, "train", 4, seed=5)
    workers = PairLoader(shards, "train", 4, seed=5, num_workers=2)
    a, b = keys_of(single), keys_of(workers)
    assert len(a) == len(b) == 10
    assert sorted(k for batch in a for k in batch) == sorted(k for batch in b for k in batch)
    assert keys_of(workers) == b  # deterministic with workers too
