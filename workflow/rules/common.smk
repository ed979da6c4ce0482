# Shared set-up: schema validation, the resolved config every stage reads, input functions and launchers.
import json
import os
import sys

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)
from lpo.methods import INPUT_KINDS, METHODS as METHOD_REGISTRY  # the method registry (light: no torch)


# Fills schema defaults in place, so `config` below is complete. The lpo stages validate again (lpo/config.py).
validate(config, schema="../schemas/config.schema.yaml")

NAME = config["experiment"]["name"]
WORLD = config["experiment"]["world"]
RES = f"results/{NAME}"
DATASET = config["download"]["dataset"]
METHODS = list(config["optimize"]["methods"])
MODELS = ["base"] + METHODS
# The LRM that LPO's calibrate and the LRM-scored methods' optimize read: train_lrm's (the paper's recipe), or, with sibling_lrm.enabled,
# the same model fine-tuned on rollout-judged sibling pairs (rule sibling_lrm; README "LPO"). evaluate and
# eval_lrm always use train_lrm's.
LPO_LRM = f"{RES}/sibling_lrm/model" if config["sibling_lrm"]["enabled"] else f"{RES}/lrm/model"
# Shipped weights of the shapes base model (what SD1.5 on the hub is to the real worlds).
SHIPPED_SHAPES_BASE = "lpo/assets/shapes_base"
# How rules start Python. With --use-conda: the env's `python`; otherwise the interpreter running Snakemake (the
# venv's, even when Snakemake was started as .venv/bin/snakemake without activating the venv: a bare `python`
# would then be the system one, without the lock's packages). PYTHONPATH is inline because Snakemake drops an
# exported one for conda jobs (docs/ecosystem.md section 5), and with --use-conda `lpo` itself is not installed.
USES_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
PYTHON = "python" if USES_CONDA else sys.executable
PY = f"PYTHONPATH={workflow.basedir} {PYTHON}"


def _write_resolved_config():
    """Every stage reads results/<name>/config.yaml: all --configfile files merged, schema defaults filled.

    It is rewritten only when its content changes, so mtimes stay stable; rules re-run on a change of their
    own section through `params` (Snakemake's params rerun trigger), not through this file.
    """
    path = f"{RES}/config.yaml"
    text = yaml.safe_dump(config, sort_keys=False)
    if os.path.exists(path):
        with open(path) as fh:
            if fh.read() == text:
                return path
    os.makedirs(RES, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


CFG = _write_resolved_config()


def section(*names):
    """A rule's config sections as one JSON string: a change re-runs the rule (params trigger)."""
    return json.dumps({n: config[n] for n in names}, sort_keys=True)


def optimize_section(wildcards):
    """What one method's optimize run reads: the shared optimize keys and its own section, not the other
    methods' sections (a change to SPO's beta must not re-run LPO)."""
    shared = {k: v for k, v in config["optimize"].items() if k not in METHOD_REGISTRY}
    return json.dumps({"optimize": shared, wildcards.method: config["optimize"][wildcards.method]}, sort_keys=True)


def gpus(rule):
    return int(config["resources"]["gpus"].get(rule, 0))


def launcher(rule):
    """`python` for one process; `accelerate launch` with one process per GPU when the config asks for >1."""
    n = gpus(rule)
    if n > 1:
        return (
            f"{PY} -m accelerate.commands.launch --config_file config/accelerate/ddp.yaml"
            f" --num_processes {n} -m lpo"
        )
    return f"{PY} -m lpo"


def stage_cmd(stage, rule=None):
    """The command that starts an lpo stage on the resolved config (one process, or accelerate for >1 GPU)."""
    return f"{launcher(rule or stage)} {stage} --config {CFG}"


def rule_resources(name, gpus_of=None):
    """Scheduler resources of one rule, from the config's `resources` section (used as `**rule_resources(name)`).

    `gpu` always (0 = none; `gpus_of` names another rule's entry); `mem_mb` and `runtime` only where the config
    sets them, so that a profile's default-resources apply to the others (a fixed fallback here would hide them).
    """
    res = config["resources"]
    out = {"gpu": gpus(gpus_of or name)}
    if name in res["mem_mb"]:
        out["mem_mb"] = int(res["mem_mb"][name])
    if name in res["runtime"]:
        out["runtime"] = int(res["runtime"][name])
    return out


def base_inputs(wildcards):
    """The `base` rule's weights: shipped shapes weights, a pretrain_base run, or nothing (hub/local folder)."""
    if config["backbone"]["preset"] != "shapes-tiny":
        return []
    if config["backbone"]["shapes_base"] == "pretrain":
        return [f"{RES}/pretrain/weights"]
    return [SHIPPED_SHAPES_BASE]


def download_inputs(wildcards):
    if config["download"]["source"] == "shapes":
        return {"base": f"{RES}/base"}
    return {}


def policy_dir(model):
    return f"{RES}/base" if model == "base" else f"{RES}/policy/{model}"


def final_targets():
    """The default targets (`all`): the report, which pulls in every stage."""
    return [f"{RES}/report.md"]


# Where each kind of method input (lpo.methods.INPUT_KINDS) comes from.
METHOD_INPUT_PATHS = {
    "lrm": LPO_LRM,
    "thresholds": f"{RES}/calibration/thresholds.json",
    "spm": f"{RES}/spm/model",
    "latents": f"{RES}/latents",
}
assert set(METHOD_INPUT_PATHS) == set(INPUT_KINDS), "common.smk: METHOD_INPUT_PATHS must cover lpo.methods.INPUT_KINDS"


def method_spec(method):
    if method not in METHOD_REGISTRY:
        raise WorkflowError(f"optimize: unknown method {method!r} (lpo.methods.METHODS: {', '.join(METHOD_REGISTRY)})")
    return METHOD_REGISTRY[method]


def optimize_inputs(wildcards):
    """Each method's inputs, as its registry entry lists them (an input kind without a path is an error)."""
    spec = method_spec(wildcards.method)
    unknown = [kind for kind in spec.inputs if kind not in METHOD_INPUT_PATHS]
    if unknown:
        raise WorkflowError(f"optimize {wildcards.method}: no rule provides the inputs {unknown}")
    inputs = {"base": f"{RES}/base"} | {kind: METHOD_INPUT_PATHS[kind] for kind in spec.inputs}
    if WORLD == "shapes":
        inputs |= {"world": f"{RES}/world"}
    else:
        inputs |= {"data": f"data/{DATASET}"}
    return inputs


def eval_lrm_inputs(wildcards):
    """The LRM's test accuracy needs the shards and the pairs' metadata (per-attribute accuracy)."""
    return {
        "model": f"{RES}/lrm/model",
        "latents": f"{RES}/latents",
        "data": f"data/{DATASET}",
        "base": f"{RES}/base",
    }


def train_spm_inputs(wildcards):
    """SPO's pixel model trains on the same latent pairs as the LRM, through the base model."""
    return {"latents": f"{RES}/latents", "base": f"{RES}/base"}


def prompt_source(wildcards):
    """Held-out prompts: the shapes world's test split, or the downloaded test split of a real dataset."""
    return f"{RES}/world" if WORLD == "shapes" else f"data/{DATASET}"


def report_inputs(wildcards):
    inputs = {
        "metrics": expand(f"{RES}/eval/{{model}}/metrics.json", model=MODELS),
        "lrm_accuracy": f"{RES}/lrm/accuracy.json",
        "thresholds": f"{RES}/calibration/thresholds.json",
    }
    if any("spm" in method_spec(m).inputs for m in METHODS):  # eval_spm: the pixel model next to the LRM
        inputs["reward_models"] = f"{RES}/spm/accuracy.json"
    return inputs
