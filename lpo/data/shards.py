"""WebDataset shards of latent pairs (docs/design.md "Latent shards", docs/ecosystem.md section 8).

Layout of a latents folder, per split (train / val / test):
- ``<split>-000000.tar`` ... : one WebDataset sample per pair, key ``<file stem>-r<row>`` (no dots), members
  ``mean0.npy``, ``std0.npy``, ``mean1.npy``, ``std1.npy`` (VAE posterior mean and std, times the scaling
  factor, (C, h, w), float16 or float32) and ``json`` (caption, label_0, label_1, aux scores, split,
  prompt_key, source). Never a pickle: .npy is written and read with allow_pickle=False.
- ``<split>-index.json``: written last, after every shard of the split was renamed into place. It lists the
  shards with their sample counts and byte sizes, so a reader can tell a complete split from a killed run's
  leftovers (`read_split_index`).

Samples are dealt round-robin over the shards, so shard sizes differ by at most one sample, and the shard
count is a multiple of world_size x num_workers (`shard_count`): every rank and worker gets the same number
of shards and about the same number of samples.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import resource
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import webdataset as wds

from lpo.utils import read_json, write_json

log = logging.getLogger(__name__)

ARRAYS = ("mean0", "std0", "mean1", "std1")
FORMAT_VERSION = 1
SHARD_PATTERN = "{split}-{index:06d}.tar"


class ShardError(RuntimeError):
    """A missing, incomplete or corrupt shard folder; the message names the file."""


def index_path(out_dir: str | Path, split: str) -> Path:
    return Path(out_dir) / f"{split}-index.json"


def shard_count(n_samples: int, samples_per_shard: int, world_size: int, num_workers: int) -> int:
    """Shards for `n_samples`: about `samples_per_shard` each, rounded up to a multiple of world_size*num_workers.

    A multiple, so `wds.split_by_node` and `split_by_worker` hand every rank and worker the same number of
    shards (docs/ecosystem.md section 8: fewer or uneven shards leave a rank short and DDP hangs).
    """
    if samples_per_shard < 1 or world_size < 1 or num_workers < 1:
        raise ValueError(
            f"latents: samples_per_shard, world_size and num_workers must be >= 1, "
            f"got {samples_per_shard}, {world_size}, {num_workers}"
        )
    unit = world_size * num_workers
    wanted = max(1, math.ceil(n_samples / samples_per_shard))
    return unit * math.ceil(wanted / unit)


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _raise_open_file_limit(needed: int) -> None:
    """Round-robin keeps one file open per shard; lift the soft limit when needed (or say why we cannot)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed + 64 <= soft:
        return
    if hard != resource.RLIM_INFINITY and needed + 64 > hard:
        raise ShardError(
            f"writing {needed} shards at once needs {needed + 64} open files, above the hard limit {hard}; "
            f"raise latents.samples_per_shard"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed + 64 if hard == resource.RLIM_INFINITY else hard, hard))


def write_shards(
    samples: Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    split: str,
    n_shards: int,
    stats: Optional[Mapping[str, Any]] = None,
) -> dict:
    """Write a split's samples to `n_shards` WebDataset shards; return the index (also written to disk).

    Each sample: ``key`` (str, no dots), the four ARRAYS (np.ndarray, (C, h, w), all of one shape and dtype)
    and ``meta`` (a JSON-able dict). Shards are written under temporary names and renamed only when all are
    complete; the split's index json is written after that, and the old one is deleted first, so an
    interrupted call leaves nothing `read_split_index` accepts. `stats` (e.g. a live skip Counter) is read
    after `samples` is exhausted and stored in the index.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if n_shards < 1:
        raise ValueError(f"write_shards: n_shards must be >= 1, got {n_shards}")
    index_path(out_dir, split).unlink(missing_ok=True)
    _raise_open_file_limit(n_shards)
    names = [SHARD_PATTERN.format(split=split, index=i) for i in range(n_shards)]
    tmp_paths = [out_dir / f".{name}.partial" for name in names]
    counts = [0] * n_shards
    shape: Optional[tuple[int, ...]] = None
    dtype: Optional[str] = None
    writers = [wds.TarWriter(str(p), encoder=False, mtime=0.0) for p in tmp_paths]
    try:
        for i, sample in enumerate(samples):
            key = sample["key"]
            if "." in key or "/" in key:
                raise ValueError(f"write_shards: sample key {key!r} contains '.' or '/' (WebDataset splits keys there)")
            arrays = [np.ascontiguousarray(sample[name]) for name in ARRAYS]
            if shape is None:
                shape, dtype = tuple(arrays[0].shape), str(arrays[0].dtype)
            for name, arr in zip(ARRAYS, arrays):
                if tuple(arr.shape) != shape or str(arr.dtype) != dtype:
                    raise ValueError(f"write_shards: {key}.{name} is {arr.dtype}{arr.shape}, expected {dtype}{shape}")
            record = {"__key__": key, "json": json.dumps(sample["meta"]).encode("utf-8")}
            record.update({f"{name}.npy": encode_npy(arr) for name, arr in zip(ARRAYS, arrays)})
            writers[i % n_shards].write(record)
            counts[i % n_shards] += 1
    except BaseException:
        for writer in writers:
            writer.close()
        for tmp in tmp_paths:
            tmp.unlink(missing_ok=True)
        raise
    for writer in writers:
        writer.close()
    # Every shard is complete here: rename them into place, then drop shards an earlier, larger run left.
    for tmp, name in zip(tmp_paths, names):
        os.replace(tmp, out_dir / name)
    for stale in out_dir.glob(f"{split}-*.tar"):
        if stale.name not in names:
            stale.unlink()
    index = {
        "format_version": FORMAT_VERSION,
        "split": split,
        "n_samples": sum(counts),
        "n_shards": n_shards,
        "latent_shape": list(shape) if shape is not None else None,
        "dtype": dtype,
        "shards": [
            {"name": name, "n_samples": n, "bytes": (out_dir / name).stat().st_size} for name, n in zip(names, counts)
        ],
        "stats": dict(stats) if stats is not None else {},
    }
    write_json(index_path(out_dir, split), index)
    log.info("split %s: %d samples in %d shards (%s)", split, index["n_samples"], n_shards, out_dir)
    return index


def read_split_index(shard_dir: str | Path, split: str) -> dict:
    """The index of a complete split; ShardError naming the file when it is missing, empty or incomplete."""
    shard_dir = Path(shard_dir)
    path = index_path(shard_dir, split)
    if not path.is_file():
        found = sorted(p.name for p in shard_dir.glob("*-index.json")) if shard_dir.is_dir() else []
        raise ShardError(
            f"{path}: no index for split {split!r} (the split is missing, or precompute_latents did not finish; "
            f"indexes here: {', '.join(found) or 'none'})"
        )
    try:
        index = read_json(path)
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: not valid JSON ({err})") from None
    if index.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format_version {index.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    if index["n_samples"] == 0:
        raise ShardError(f"{path}: split {split!r} is empty (0 samples); see its stats for why rows were skipped")
    for shard in index["shards"]:
        shard_path = shard_dir / shard["name"]
        if not shard_path.is_file():
            raise ShardError(f"{shard_path}: listed in {path.name} but missing (incomplete latents folder)")
        size = shard_path.stat().st_size
        if size != shard["bytes"]:
            raise ShardError(
                f"{shard_path}: {size} bytes, but {path.name} records {shard['bytes']} (truncated or rewritten shard)"
            )
    return index
