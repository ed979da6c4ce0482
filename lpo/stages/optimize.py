"""Stage `optimize`: fine-tune the base model with one preference-optimisation method (lpo.methods.METHODS).

    lpo optimize --config CFG --method lpo --base DIR --lrm DIR --thresholds JSON (--world DIR | --data DIR)
                 --workdir DIR --out DIR

Prompts: the shapes world's train-split prompts (--world: results/<name>/world/prompts.json), or the train
split captions of the downloaded Pick-a-Pic parquet files (--data). Each method is one module with a
:class:`lpo.methods.Method` (``check`` before any compute, then ``train``), registered in
``lpo.methods.METHODS``.

Outputs:
- --out: a complete diffusers pipeline folder with the trained U-Net merged (what `evaluate` loads with
  ``lpo.backbones.load_pipeline_folder``), and for LoRA a lora/ subfolder in diffusers' LoRA format
  (``pipe.load_lora_weights(out/"lora")`` on the base pipeline gives the same model);
- --workdir: checkpoints/state.pt (resume after kill: rerun the same command), tb/ (TensorBoard: loss,
  implicit accuracy, kept pairs per timestep bucket), summary.json (settings, kept pairs, loss, per-step cost).

Runs on one process or under ``accelerate launch`` (each process samples its own prompts; kept tuples are
shared out equally, see lpo/methods/engine.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pyarrow.parquet as pq
import torch

from lpo.backbones import BackboneError, load_pipeline_folder
from lpo.config import Config, ConfigError, to_dict
from lpo.data.pickapic import SPLIT_NAMES, split_from_filename
from lpo.methods import METHODS, Method, MethodInputs, get_method
from lpo.policy import WEIGHT_DTYPES, build_policy, check_policy_config
from lpo.stage_main import stage_main
from lpo.utils import atomic_dir, file_digest, read_json, seed_everything, write_json

log = logging.getLogger("lpo.optimize")

LORA_SUBDIR = "lora"
FINGERPRINT_FILE = "fingerprint.json"


# --------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------


def world_prompts(world_dir: Path) -> list[str]:
    """The shapes world's train-split prompts (synthesize's prompts.json)."""
    path = Path(world_dir) / "prompts.json"
    if not path.is_file():
        raise ConfigError(f"{path}: missing (run the synthesize rule first)")
    doc = read_json(path)
    prompts = doc.get("train", {}).get("prompts") if isinstance(doc, dict) else None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"{path}: train.prompts: expected a list of strings")
    return prompts


def data_prompts(data_dir: Path) -> list[str]:
    """Distinct train-split captions of the Pick-a-Pic parquet files in `data_dir`, sorted (reproducible).

    The split is the file's `split` column, else its hub-style file-name prefix (lpo.data.pickapic).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ConfigError(f"{data_dir}: data folder not found (run the download rule first)")
    files = sorted(data_dir.rglob("*.parquet"))
    if not files:
        raise ConfigError(f"{data_dir}: no parquet files")
    captions: set[str] = set()
    for path in files:
        names = pq.read_schema(path).names
        if "caption" not in names:
            raise ConfigError(f"{path}: no 'caption' column (not a Pick-a-Pic file)")
        if "split" in names:
            table = pq.read_table(path, columns=["caption", "split"]).to_pydict()
            captions.update(c for c, s in zip(table["caption"], table["split"]) if SPLIT_NAMES.get(s) == "train")
        elif split_from_filename(path) == "train":
            captions.update(pq.read_table(path, columns=["caption"]).to_pydict()["caption"])
    return sorted(c for c in captions if isinstance(c, str) and c.strip())


# --------------------------------------------------------------------------------------------------------
# Stage
# --------------------------------------------------------------------------------------------------------


def path_signature(path: Optional[Path]) -> Optional[list]:
    """(relative path, content digest) of every file under `path` (lpo.utils.file_digest: whole small files,
    size and both ends of big ones): changes when an upstream rule writes other content, not when it only
    rewrites the same bytes."""
    if path is None or not Path(path).exists():
        return None
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(f.relative_to(path)) if f != path else f.name, file_digest(f)] for f in files]


def run_fingerprint(cfg: Config, method: str, inputs: MethodInputs) -> dict:
    """What a checkpoint in the work folder must have been trained with to be resumed: the method, the seed,
    the shared optimize keys (except the budget keys iterations and checkpoint_every) with the method's own
    section (not the other methods'), and the inputs' files."""
    section = {k: v for k, v in to_dict(cfg.optimize).items()
               if k not in ("iterations", "checkpoint_every") and (k not in METHODS or k == method)}
    paths = {"base": inputs.base_dir, "lrm": inputs.lrm_dir, "thresholds": inputs.thresholds, "spm": inputs.spm_dir,
             "latents": inputs.latents_dir, "world": inputs.world_dir, "data": inputs.data_dir}
    return {"method": method, "seed": cfg.experiment.seed, "optimize": section,
            "inputs": {k: path_signature(v) for k, v in paths.items() if v is not None}}


def prepare_workdir(workdir: Path, fingerprint: dict) -> None:
    """Keep a checkpoint only if it was made by this very configuration; otherwise start over (a changed
    config or input makes Snakemake rerun the rule, and resuming would mix two runs or skip training)."""
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = workdir / FINGERPRINT_FILE
    old = read_json(stamp) if stamp.is_file() else None
    current = json.loads(json.dumps(fingerprint, default=str))  # as it reads back from JSON
    if old is not None and old != current:
        changed = sorted(k for k in set(old) | set(current) if old.get(k) != current.get(k))
        if old.get("optimize") != current.get("optimize"):
            changed += sorted(k for k in current["optimize"] if old.get("optimize", {}).get(k) != current["optimize"][k])
        log.warning("%s: the checkpoint was made with other settings or inputs (%s differ); starting over",
                    workdir, ", ".join(changed))
        for name in ("checkpoints", "tb"):
            shutil.rmtree(workdir / name, ignore_errors=True)
    write_json(stamp, current)


def make_accelerator(cfg: Config) -> Any:
    """The run's Accelerator; without CUDA it is a CPU one (gloo), so `accelerate launch` of several CPU
    processes forms a MULTI_CPU group instead of independent single-process runs."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=cfg.optimize.mixed_precision, cpu=not torch.cuda.is_available())


def run(
    cfg: Config,
    method: str,
    base_dir: str | Path,
    workdir: str | Path,
    out_dir: str | Path,
    *,
    world_dir: Optional[str | Path] = None,
    data_dir: Optional[str | Path] = None,
    lrm_dir: Optional[str | Path] = None,
    thresholds: Optional[str | Path] = None,
    spm_dir: Optional[str | Path] = None,
    latents_dir: Optional[str | Path] = None,
    accelerator: Any = None,
    implementation: Optional[Method] = None,
) -> dict:
    """Train `method` on the base pipeline folder and write --out (merged pipeline + lora/) and --workdir.

    Every input check (method, folders, prompts, the method's own list) runs before any model is loaded.
    A checkpoint in workdir is resumed. Returns the method's summary. `implementation` runs a method that is not
    in the registry under the name `method` (the diagnostics in scripts/ do).
    """
    start = time.perf_counter()
    chosen = implementation if implementation is not None else get_method(method)
    base_dir, workdir, out_dir = Path(base_dir), Path(workdir), Path(out_dir)
    if not (base_dir / "model_index.json").is_file():
        raise ConfigError(f"{base_dir}: not a pipeline folder (no model_index.json; run the base rule first)")
    if (world_dir is None) == (data_dir is None):
        raise ConfigError("optimize: give exactly one prompt source, --world (shapes) or --data (real worlds)")
    prompts = world_prompts(Path(world_dir)) if world_dir is not None else data_prompts(Path(data_dir))
    if not prompts:
        raise ConfigError(f"{world_dir or data_dir}: no train-split prompts")
    path = lambda p: None if p is None else Path(p)  # noqa: E731
    inputs = MethodInputs(base_dir=base_dir, prompts=tuple(prompts), lrm_dir=path(lrm_dir),
                          thresholds=path(thresholds), spm_dir=path(spm_dir), latents_dir=path(latents_dir),
                          world_dir=path(world_dir), data_dir=path(data_dir))
    check_policy_config(cfg.optimize)
    chosen.check(cfg, inputs)

    accelerator = accelerator if accelerator is not None else make_accelerator(cfg)
    seed_everything(cfg.experiment.seed)  # the same on every process: identical LoRA init
    try:
        backbone = load_pipeline_folder(base_dir)
    except BackboneError as err:
        raise ConfigError(str(err)) from None
    weight_dtype = WEIGHT_DTYPES[cfg.optimize.mixed_precision]
    policy = build_policy(backbone, cfg.optimize, weight_dtype)
    if accelerator.is_main_process:
        prepare_workdir(workdir, run_fingerprint(cfg, method, inputs))
        write_json(workdir / "config.json", {"method": method, "config": to_dict(cfg),
                                             "inputs": {k: v for k, v in vars(inputs).items() if k != "prompts"},
                                             "n_prompts": len(prompts)})
    accelerator.wait_for_everyone()  # every process sees the prepared work folder
    log.info("optimize %s: %d train prompts, %d process(es), base %s", method, len(prompts),
             accelerator.num_processes, base_dir)

    summary = chosen.train(cfg, policy, inputs, workdir, accelerator)

    if accelerator.is_main_process:
        info = {"method": method, "base": str(base_dir), "policy": policy.mode,
                "lora": LORA_SUBDIR if policy.mode == "lora" else None}
        with atomic_dir(out_dir) as tmp:
            policy.save_merged(tmp, info=info)  # the pipeline files at the top of --out
            if policy.mode == "lora":
                policy.save_lora(tmp / LORA_SUBDIR)
        log.info("optimize %s: wrote %s in %.1f s", method, out_dir, time.perf_counter() - start)
    accelerator.wait_for_everyone()
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--method", required=True, choices=list(METHODS), help="preference-optimisation method")
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--world", metavar="DIR", help="shapes: synthesize output (train-split prompts)")
        source.add_argument("--data", metavar="DIR", help="real worlds: downloaded parquet folder (train captions)")
        parser.add_argument("--lrm", metavar="DIR", help="lpo, grpo: LRM folder (train_lrm output)")
        parser.add_argument("--thresholds", metavar="JSON", help="lpo, grpo: calibrate's thresholds.json")
        parser.add_argument("--spm", metavar="DIR", help="spo: step-aware pixel reward model folder")
        parser.add_argument("--latents", metavar="DIR", help="dpo: latent shards folder")
        parser.add_argument("--workdir", required=True, metavar="DIR", help="checkpoints/, tb/, summary.json")

    return stage_main("optimize", __doc__,
                      lambda cfg, a: run(cfg, a.method, a.base, a.workdir, a.out, world_dir=a.world, data_dir=a.data,
                                         lrm_dir=a.lrm, thresholds=a.thresholds, spm_dir=a.spm,
                                         latents_dir=a.latents),
                      argv, inputs=("base",), out=("DIR", "merged pipeline folder (+ lora/)"), arguments=arguments,
                      summary_keys=("method", "iterations", "tuples_kept", "loss_last"))


if __name__ == "__main__":
    sys.exit(main())
