"""Batches of latent pairs from a split's WebDataset shards, safe for DDP (docs/ecosystem.md section 8).

Guarantees of `PairLoader.iterate(epoch, start_batch)`:
- every rank yields exactly `batches_per_rank` full batches, computed from the index counts
  (n_samples // (world_size * batch_size)); a rank whose shards hold fewer usable samples replays its own
  stream from the start (counted as "repeated"), one with more stops early. So DDP never waits on a rank
  that ran dry;
- ranks read disjoint shards (`wds.split_by_node`, after a shard shuffle that all ranks share);
- the order is a pure function of (seed, epoch, rank, world size, num_workers): a resumed run that calls
  iterate(epoch, start_batch=n) gets exactly the batches n, n+1, ... of the uninterrupted run (the first n
  batches are read and dropped, which is cheap for latents);
- samples with non-finite latents are skipped and counted (`last_stats["nonfinite_skipped"]`);
- a truncated or corrupt shard is an error naming the shard (ShardError): the byte size of every shard is
  checked against the index when the loader is built, and a read error names the shard. We raise rather
  than skip: a silently shorter epoch would hide data loss.

Rank and world size come from RANK / WORLD_SIZE (or an initialised torch.distributed), exactly as
`wds.split_by_node` reads them, so the batch count and the shard split cannot disagree.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds

from lpo.data.shards import ARRAYS, ShardError, decode_npy, read_split_index

log = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) as webdataset's split_by_node sees them."""
    rank, world_size, _, _ = wds.utils.pytorch_worker_info()
    return rank, world_size


def _raise_shard_error(exn: Exception) -> bool:
    """webdataset error handler: re-raise as ShardError naming the shard (webdataset appends the url to args)."""
    shard = next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), "<unknown shard>")
    reason = exn.args[0] if exn.args else repr(exn)
    raise ShardError(f"{shard}: corrupt or truncated shard ({reason}); re-run precompute_latents") from exn


def _decode(src: Iterator[dict]) -> Iterator[dict]:
    for sample in src:
        url, key = sample.get("__url__", "<unknown shard>"), sample.get("__key__")
        try:
            out = {name: decode_npy(sample[f"{name}.npy"]) for name in ARRAYS}
            out["meta"] = json.loads(sample["json"])
        except (KeyError, ValueError) as err:
            raise ShardError(f"{url}: sample {key}: missing or unreadable member ({err})") from None
        out["key"], out["url"] = key, url
        yield out


def _shuffle(src: Iterator[dict], seed: int, epoch: int, bufsize: int) -> Iterator[dict]:
    """Buffer shuffle with a generator seeded by (seed, epoch, rank, worker): deterministic, unlike wds.shuffle."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    rng = random.Random(f"lpo-samples-{seed}-{epoch}-{rank}-{worker}")
    buf: list[dict] = []
    for sample in src:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        j = rng.randrange(bufsize)
        yield buf[j]
        buf[j] = sample
    rng.shuffle(buf)
    yield from buf


def _identity(x: Any) -> Any:
    return x


class PairLoader:
    """Epochs of full batches over one split of a latents folder (see the module docstring).

    A batch is a dict: ``mean``, ``std`` float32 (B, 2, C, h, w) (index 1 = image 0 / image 1),
    ``labels`` float32 (B, 2), ``captions``, ``keys``, ``prompt_keys`` (lists of str), ``meta`` (list of dicts).
    """

    def __init__(
        self,
        shard_dir: str | Path,
        split: str,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"PairLoader: batch_size must be >= 1, got {batch_size}")
        self.shard_dir = Path(shard_dir)
        self.split = split
        self.index = read_split_index(self.shard_dir, split)  # raises on a missing / incomplete split
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.num_workers = num_workers
        self.rank, self.world_size = rank_and_world()
        readers = self.world_size * max(1, num_workers)
        n_shards = self.index["n_shards"]
        if n_shards < readers:
            raise ShardError(
                f"{self.shard_dir}: split {split!r} has {n_shards} shards for {readers} readers "
                f"(world_size x num_workers); re-run precompute_latents with latents.world_size/num_workers set"
            )
        if n_shards % readers:
            log.warning(
                "split %s: %d shards is not a multiple of %d readers; ranks will replay more samples",
                split, n_shards, readers,
            )
        self.batches_per_rank = self.index["n_samples"] // (self.world_size * batch_size)
        self.last_stats: Counter = Counter()

    def __len__(self) -> int:
        return self.batches_per_rank

    def shard_order(self, epoch: int) -> list[str]:
        """All shard paths in this epoch's order (the same on every rank; split_by_node then deals them)."""
        urls = [str(self.shard_dir / shard["name"]) for shard in self.index["shards"]]
        if self.shuffle:
            random.Random(f"lpo-shards-{self.seed}-{epoch}").shuffle(urls)
        return urls

    def _pipeline(self, epoch: int) -> wds.DataPipeline:
        stages: list[Any] = [
            wds.SimpleShardList(self.shard_order(epoch)),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=_raise_shard_error),
        ]
        if self.shuffle:
            stages.append(functools.partial(_shuffle, seed=self.seed, epoch=epoch, bufsize=self.shuffle_buffer))
        stages.append(_decode)
        return wds.DataPipeline(*stages)

    def _one_pass(self, epoch: int) -> Iterator[dict]:
        pipeline = self._pipeline(epoch)
        if self.num_workers == 0:
            return iter(pipeline)
        loader = torch.utils.data.DataLoader(
            pipeline, batch_size=None, num_workers=self.num_workers, collate_fn=_identity
        )
        return iter(loader)

    def _samples(self, epoch: int, stats: Counter) -> Iterator[dict]:
        """This rank's usable samples, replayed from the start (same order) as often as needed."""
        for pass_index in itertools.count():
            usable = 0
            for sample in self._one_pass(epoch):
                if not all(np.isfinite(sample[name]).all() for name in ARRAYS):
                    stats["nonfinite_skipped"] += 1
                    if stats["nonfinite_skipped"] <= 5:
                        log.warning("%s: sample %s has non-finite latents; skipped", sample["url"], sample["key"])
                    continue
                usable += 1
                stats["repeated" if pass_index else "read"] += 1
                yield sample
            if usable == 0:
                raise ShardError(
                    f"{self.shard_dir}: rank {self.rank} found no usable sample of split {self.split!r} in its "
                    f"shards {', '.join(Path(u).name for u in self.shard_order(epoch)[self.rank::self.world_size])}"
                )

    def iterate(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        """Batches start_batch .. batches_per_rank-1 of `epoch` for this rank."""
        if rank_and_world() != (self.rank, self.world_size):
            raise RuntimeError(
                f"PairLoader was built for rank/world {self.rank}/{self.world_size}, now {rank_and_world()}"
            )
        if not 0 <= start_batch <= self.batches_per_rank:
            raise ValueError(f"PairLoader.iterate: start_batch {start_batch} not in [0, {self.batches_per_rank}]")
        stats: Counter = Counter()
        self.last_stats = stats
        if start_batch == self.batches_per_rank:
            return
        samples = self._samples(epoch, stats)
        try:
            # Skipping whole batches of the sample stream = skipping the batches themselves.
            for _ in itertools.islice(samples, start_batch * self.batch_size):
                pass
            for _ in range(start_batch, self.batches_per_rank):
                yield collate(list(itertools.islice(samples, self.batch_size)))
        finally:
            samples.close()  # closes open shard files when the caller stops early


def collate(samples: list[dict]) -> dict[str, Any]:
    """Stack decoded samples into a batch (see PairLoader)."""
    mean = np.stack([np.stack([s["mean0"], s["mean1"]]) for s in samples])  # (B, 2, C, h, w)
    std = np.stack([np.stack([s["std0"], s["std1"]]) for s in samples])  # (B, 2, C, h, w)
    labels = [[s["meta"]["label_0"], s["meta"]["label_1"]] for s in samples]
    return {
        "mean": torch.from_numpy(mean).float(),
        "std": torch.from_numpy(std).float(),
        "labels": torch.tensor(labels, dtype=torch.float32),  # (B, 2)
        "captions": [s["meta"]["caption"] for s in samples],
        "keys": [s["key"] for s in samples],
        "prompt_keys": [s["meta"]["prompt_key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }

