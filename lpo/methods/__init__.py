"""Preference-optimisation methods behind the ``optimize`` stage: one module per method.

A method is a :class:`Method`: ``check(cfg, inputs)`` rejects bad input with a ``ConfigError`` before any
model is loaded, and ``train(cfg, policy, inputs, workdir, accelerator) -> dict`` trains ``policy`` in place
(resuming from ``workdir`` when a checkpoint is there) and returns the numbers for ``workdir/summary.json``.
The ``optimize`` stage (lpo/stages/optimize.py) holds the registry (a dict name -> Method), loads the base
model, builds the policy, calls the method and writes the outputs.

Step-level methods (LPO, SPO) share the branching sampler and the update of lpo/methods/lpo.py: SPO is LPO
with another scorer (a pixel reward of the decoded x0-hat at the child's timestep), another beta and a fixed
threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from lpo.config import Config

if TYPE_CHECKING:  # heavy imports only for type checkers
    from accelerate import Accelerator

    from lpo.policy import Policy


@dataclass(frozen=True)
class MethodInputs:
    """What the optimize stage was given (paths a method may need) and the training prompts.

    prompts: the train split's prompts (shapes: the world's train triples; real: the downloaded train
    captions), every rank gets the full list and draws its own. Paths a method does not use are None.
    """

    base_dir: Path
    prompts: tuple[str, ...]
    lrm_dir: Optional[Path] = None
    thresholds: Optional[Path] = None
    spm_dir: Optional[Path] = None
    latents_dir: Optional[Path] = None
    world_dir: Optional[Path] = None
    data_dir: Optional[Path] = None


CheckFn = Callable[[Config, MethodInputs], None]
TrainFn = Callable[[Config, "Policy", MethodInputs, Path, "Accelerator"], dict[str, Any]]


@dataclass(frozen=True)
class Method:
    """One preference-optimisation method: an input check (before any compute) and a training loop."""

    check: CheckFn
    train: TrainFn
