"""One checkpoint format and one fingerprint for every training loop (train_lrm, train_spm, lpo.policy).

A checkpoint is a ``torch.save`` dict with an envelope, ``{"format": FORMAT, "fingerprint": str | None, ...}``,
written by ``save_state`` to a temporary file and renamed, so a killed process never leaves half a checkpoint
that a later run could take for a finished one. ``load_state`` returns None for a missing file and, with a
warning, for a checkpoint of another format or fingerprint (a stale or foreign checkpoint is never resumed).

``StepCheckpoints`` keeps a folder of them, as the pair trainer (lpo.training.trainer) writes it:

    <root>/step-NNNNNNN/state.pt       the main process's state (weights, optimiser, run state, ...)
    <root>/step-NNNNNNN/rng-rank<r>.pt every process's global generators (``rng_state``)
    <root>/latest.json                 {"dir", "step", "fingerprint"}: written last, after the rename

``fingerprint(config, digests)`` is what a checkpoint must match to be resumed: the JSON of the config parts
that change the computation and content digests of the inputs (``input_digest``:
lpo.utils.training_inputs_digest), never file times.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from lpo.utils import read_json, training_inputs_digest, write_json

log = logging.getLogger("lpo.checkpoint")

FORMAT = 2
STATE_FILE = "state.pt"
LATEST_FILE = "latest.json"


# --------------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------------


def input_digest(latents_dir: str | Path, base_dir: str | Path) -> str:
    """Content digest of a reward model's training inputs (latent split indexes, base model configs and weights)."""
    return training_inputs_digest(Path(latents_dir), Path(base_dir))


def fingerprint(config: Any, digests: Sequence[str] = (), length: int = 20) -> str:
    """sha256 (first `length` hex digits) of the JSON of `config` (sorted keys) and the content `digests`."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for digest in digests:
        h.update(digest.encode())
    return h.hexdigest()[:length]


# --------------------------------------------------------------------------------------------------------
# One file
# --------------------------------------------------------------------------------------------------------


def save_state(path: str | Path, state: dict[str, Any], fingerprint: Optional[str] = None) -> Path:
    """torch.save the envelope + `state` to `path`, atomically (a temporary file renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"format": FORMAT, "fingerprint": fingerprint, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_state(path: str | Path, fingerprint: Optional[str] = None, what: str = "checkpoint") -> Optional[dict]:
    """The state saved at `path`; None when there is none, or (with a warning) when it is of another format or,
    given `fingerprint`, of another run (config, world size or inputs)."""
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        log.warning("%s: %s of another format; starting over", path, what)
        return None
    if fingerprint is not None and state.get("fingerprint") != fingerprint:
        log.warning("%s: %s of another config, world size or input; starting over", path, what)
        return None
    return state


# --------------------------------------------------------------------------------------------------------
# Global random generators
# --------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's global generators: python, numpy, torch (CPU) and every CUDA device."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state`` output (the parts it holds)."""
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------------
# A folder of step checkpoints (several processes)
# --------------------------------------------------------------------------------------------------------


class StepCheckpoints:
    """``<root>/step-NNNNNNN/`` checkpoints of one run (module docstring), the newest `keep` kept.

    ``sync`` is a barrier over the processes (accelerator.wait_for_everyone); every process calls ``save``
    and ``resume`` together.
    """

    def __init__(self, root: str | Path, fingerprint: str, keep: int, rank: int = 0, is_main: bool = True,
                 sync: Callable[[], None] = lambda: None) -> None:
        self.root, self.fingerprint, self.keep = Path(root), fingerprint, keep
        self.rank, self.is_main, self.sync = rank, is_main, sync

    @property
    def latest_file(self) -> Path:
        return self.root / LATEST_FILE

    def latest(self) -> Optional[tuple[Path, int]]:
        """(folder, step) of the newest checkpoint of this run, or None."""
        if not self.latest_file.is_file():
            return None
        pointer = read_json(self.latest_file)
        if pointer.get("fingerprint") != self.fingerprint:
            return None
        return self.root / pointer["dir"], int(pointer["step"])

    def resume(self) -> Optional[tuple[Path, dict[str, Any]]]:
        """(folder, main state) of the newest checkpoint of this run, this process's generators restored; None
        (the folder removed, with a warning) when the checkpoints are of another run, or there are none."""
        result = None
        if self.latest_file.is_file():
            found = self.latest()
            state = load_state(found[0] / STATE_FILE, self.fingerprint) if found is not None else None
            if state is None:
                log.warning("%s: checkpoints of another config, world size or input; starting over", self.root)
                self.sync()
                if self.is_main:
                    shutil.rmtree(self.root)
            else:
                set_rng_state(torch.load(found[0] / f"rng-rank{self.rank}.pt", map_location="cpu",
                                         weights_only=False))
                result = found[0], state
        self.sync()
        return result

    def save(self, step: int, state: Callable[[], dict[str, Any]]) -> Path:
        """Write step `step`: `state()` (called on the main process only) and every process's generators, into
        a hidden folder renamed when complete; then latest.json; then drop all but the newest `keep`."""
        name = f"step-{step:07d}"
        step_dir, tmp = self.root / name, self.root / f".{name}.partial"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.sync()
        torch.save(rng_state(), tmp / f"rng-rank{self.rank}.pt")
        if self.is_main:
            save_state(tmp / STATE_FILE, state(), self.fingerprint)
        self.sync()
        if self.is_main:
            shutil.rmtree(step_dir, ignore_errors=True)
            os.replace(tmp, step_dir)
            write_json(self.latest_file, {"dir": name, "step": step, "fingerprint": self.fingerprint})
            for path in sorted(p for p in self.root.glob("step-*") if p.is_dir())[: -self.keep]:
                shutil.rmtree(path)
        self.sync()
        return step_dir
