"""The method registry (lpo.methods.METHODS) agrees with the config (each method's own section under
`optimize`), with the optimize stage's CLI and with the workflow (the rule's inputs and wildcards)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from lpo.config import METHOD_NAMES, OptimizeConfig
from lpo.methods import INPUT_KINDS, METHODS, Method, get_method

REPO = Path(__file__).resolve().parent.parent


def test_registry_and_config_list_the_same_methods():
    assert tuple(METHODS) == METHOD_NAMES
    sections = {f.name for f in dataclasses.fields(OptimizeConfig) if dataclasses.is_dataclass(f.type) or
                dataclasses.is_dataclass(typing.get_type_hints(OptimizeConfig)[f.name])}
    assert sections - {"lora"} == set(METHODS)  # every method has its own section, and only methods do
    allowed = typing.get_args(typing.get_args(typing.get_type_hints(OptimizeConfig)["methods"])[0])
    assert set(allowed) == set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_entry_loads_a_method_with_known_inputs(name):
    method = get_method(name)
    assert isinstance(method, Method) and callable(method.check) and callable(method.train)
    assert set(METHODS[name].inputs) <= set(INPUT_KINDS)


def test_an_unknown_method_is_a_config_error():
    from lpo.config import ConfigError

    with pytest.raises(ConfigError, match="unknown method 'nope'.*lpo, spo, dpo, grpo"):
        get_method("nope")


def test_the_optimize_cli_offers_every_method_and_an_input_flag_per_kind():
    out = subprocess.run([sys.executable, "-m", "lpo", "optimize", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120).stdout
    choices = re.search(r"--method \{([^}]*)\}", out).group(1).split(",")
    assert choices == list(METHODS)
    for kind in INPUT_KINDS:
        assert f"--{kind} " in out


def test_the_workflow_reads_the_registry(tmp_path):
    """common.smk builds each method's optimize inputs from its registry entry: a dry run of every method's
    evaluation target asks exactly for the inputs the entry lists."""
    from test_workflow import snakemake, workflow_copy

    wf = workflow_copy(REPO, tmp_path)
    (wf / "all.yaml").write_text(f"optimize:\n  methods: [{', '.join(METHODS)}]\n")
    proc = snakemake(wf, "-n", "-p", "--configfile", "all.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    commands = [line for line in proc.stdout.splitlines() if " -m lpo optimize " in line]
    for name, spec in METHODS.items():
        command = next(c for c in commands if f"--method {name} " in c)
        flags = set(re.findall(r"--(lrm|thresholds|spm|latents) ", command))
        assert flags == set(spec.inputs), (name, command)
