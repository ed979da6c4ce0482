"""Small shared helpers: logging, seeding, atomic outputs, JSON I/O."""

from __future__ import annotations

import contextlib
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


def setup_logging(is_main: bool = True, level: int = logging.INFO) -> None:
    """Log to stderr (Snakemake's `log:` captures it), on the main process only, with timestamps."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if is_main:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(level)
    else:
        root.addHandler(logging.NullHandler())
        root.setLevel(logging.WARNING)


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
