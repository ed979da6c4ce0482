"""Preference-optimisation methods behind the ``optimize`` stage, and their registry.

Adding a method is three things: one module here that defines ``METHOD`` (a :class:`Method`), one entry in
``METHODS`` below, and its own config section ``optimize.<name>`` (lpo/config.py, ``METHOD_NAMES``). The
Snakefile's rules, the optimize stage and the report read this registry; tests/test_methods.py keeps
registry, config and workflow in agreement.

A method's ``check(cfg, inputs)`` rejects bad input with a ``ConfigError`` before any model is loaded, and
``train(cfg, policy, inputs, workdir, accelerator) -> dict`` trains ``policy`` in place (resuming from
``workdir`` when a checkpoint is there) and returns the numbers for ``workdir/summary.json``.

Step-level methods (LPO, SPO, GRPO) are small modules on the engine of lpo/methods/engine.py (sampling,
sharing, checkpoints, logs, summary): each supplies its scorer, what it keeps of a step, its update and the
names of its stats. Diffusion-DPO (offline pairs) has its own loop.

This module is light on purpose (no torch): the Snakefile imports it to build the DAG.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from lpo.config import METHOD_NAMES, Config

if TYPE_CHECKING:  # heavy imports only for type checkers
    from accelerate import Accelerator

    from lpo.policy import Policy

# What a method may ask the optimize rule for, besides the base model and the prompts (each a CLI flag of
# `lpo optimize` and a key of the rule's input).
INPUT_KINDS = ("lrm", "thresholds", "spm", "latents")


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


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry. inputs: the rule inputs the method reads (INPUT_KINDS); reward_stages: the rules whose
    compute is part of the method's cost in the report (its reward model's training and checks)."""

    module: str
    inputs: tuple[str, ...]
    reward_stages: tuple[str, ...]
    summary: str

    def load(self) -> Method:
        return importlib.import_module(self.module).METHOD


METHODS: dict[str, MethodSpec] = {
    "lpo": MethodSpec("lpo.methods.lpo", ("lrm", "thresholds"), ("train_lrm", "eval_lrm", "calibrate"),
                      "LPO: the LRM's best/worst child per step, step-level DPO (the paper's method)"),
    "spo": MethodSpec("lpo.methods.spo", ("spm",), ("train_spm",),
                      "SPO: the best/worst child by a step-aware pixel reward of the decoded x0-hat"),
    "dpo": MethodSpec("lpo.methods.dpo", ("latents",), (),
                      "Diffusion-DPO: offline preference pairs, no sampling"),
    "grpo": MethodSpec("lpo.methods.grpo", ("lrm", "thresholds"), ("train_lrm", "eval_lrm", "calibrate"),
                       "step-level GRPO: all K children with LRM-group-normalised advantages, clipped ratio, KL"),
}

assert tuple(METHODS) == METHOD_NAMES, "lpo.methods.METHODS and lpo.config.METHOD_NAMES must list the same methods"


def get_method(name: str) -> Method:
    """The method called `name`; an unknown name is a ConfigError listing the known ones."""
    from lpo.config import ConfigError

    if name not in METHODS:
        raise ConfigError(f"optimize: unknown method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name].load()
