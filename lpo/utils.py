"""Small shared helpers: logging, seeding, atomic outputs, JSON I/O."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever sys.stderr is when a record is emitted, not the one current at
    set-up (a caller, e.g. a test's output capture, may have replaced and closed that one since)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property above always wins
        pass


def setup_logging(is_main: bool = True, level: int = logging.INFO) -> None:
    """Log to stderr (Snakemake's `log:` captures it), on the main process only, with timestamps.

    Replaces the handlers of earlier calls only; other handlers on the root logger (e.g. pytest's) stay."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_lpo", False):
            root.removeHandler(handler)
    handler = _StderrHandler() if is_main else logging.NullHandler()
    handler._lpo = True  # type: ignore[attr-defined]
    if is_main:
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if is_main else logging.WARNING)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (when installed) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency in practice
        return
    torch.manual_seed(seed)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to `path` only when the block succeeds.

    A killed or failed stage leaves `.<name>.partial` behind, never `path` itself, so Snakemake (and a
    later run) can never take a half-written output folder for a finished one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def file_digest(path: Path) -> str:
    """sha256 of a small file, or of (size, first and last MiB) of a big one (weights of GBs)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size <= 4 << 20:
            h.update(fh.read())
        else:
            h.update(str(size).encode())
            h.update(fh.read(1 << 20))
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read())
    return h.hexdigest()


def training_inputs_digest(latents_dir: Path, base_dir: Path) -> str:
    """Content digest of a reward model's training inputs: the latent shards' split indexes and the base model's
    configs and weights. Part of the checkpoint fingerprints of train_lrm and train_spm, so that a checkpoint
    made on other data (an upstream rule re-ran) is never resumed."""
    h = hashlib.sha256()
    files = sorted(Path(latents_dir).glob("*-index.json")) + sorted(
        p for p in Path(base_dir).rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin")
    )
    for path in files:
        h.update(str(path.relative_to(base_dir) if path.is_relative_to(base_dir) else path.name).encode())
        h.update(file_digest(path).encode())
    return h.hexdigest()
