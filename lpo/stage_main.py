"""The one command-line wrapper every stage's ``main(argv)`` goes through.

A stage module (lpo/stages/*.py) holds ``run(cfg, ...) -> dict`` (importable, testable) and a ``main(argv)`` of
a few lines that names its own arguments and calls :func:`stage_main`, which does the rest the same way for
every stage:

- ``--config PATH`` (repeatable, later files deep-merged over earlier ones, as Snakemake's --configfile);
- logging to stderr on the main process only (Snakemake's ``log:`` captures it; other ranks stay quiet);
- a user's error (a ``ConfigError`` naming the file and key, or one of the stage's own input errors) becomes
  ONE line ``lpo <stage>: error: ...`` on stderr and exit status 2, never a traceback;
- the distributed process group, when a stage started one (accelerate), is torn down on every exit path;
- the stage's summary (a dict) is printed as one JSON line on the main process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Optional, Sequence

from lpo.config import Config, ConfigError, load_config
from lpo.utils import setup_logging

AddArguments = Callable[[argparse.ArgumentParser], None]
RunFn = Callable[[Config, argparse.Namespace], Optional[dict]]

# The folders stages pass to each other, with one help text each (a stage names the ones it reads).
STANDARD_INPUTS: dict[str, tuple[str, str]] = {
    "base": ("DIR", "base pipeline folder (results/<name>/base)"),
    "lrm": ("DIR", "LRM folder (train_lrm's results/<name>/lrm/model)"),
    "latents": ("DIR", "latent shards folder (precompute_latents' results/<name>/latents)"),
    "world": ("DIR", "shapes world folder (synthesize's results/<name>/world)"),
    "data": ("DIR", "preference pairs folder, data/<dataset> (Pick-a-Pic parquet files)"),
    "prompts": ("DIR", "prompt source: results/<name>/world (shapes) or data/<dataset> (real worlds)"),
}


def is_main_process() -> bool:
    """Rank 0, as torchrun / accelerate launch set RANK (a plain run is rank 0)."""
    return int(os.environ.get("RANK", "0")) == 0


def _end_distributed() -> None:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency; only a broken install lacks it
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def stage_main(
    name: str,
    doc: Optional[str],
    run: RunFn,
    argv: Optional[Sequence[str]] = None,
    *,
    inputs: Sequence[str] = (),
    optional_inputs: Sequence[str] = (),
    out: Optional[tuple[str, str]] = None,
    arguments: Optional[AddArguments] = None,
    user_errors: tuple[type[BaseException], ...] = (),
    summary_keys: Optional[Sequence[str]] = None,
) -> int:
    """Parse `argv`, load the config, call ``run(cfg, args)``; returns the exit status (0, or 2 for a user's
    error).

    The arguments: --config; --<name> for each of `inputs` (required) and `optional_inputs` (STANDARD_INPUTS);
    --out with `out` = (metavar, help); then the stage's own (`arguments(parser)`). user_errors: the stage's
    input errors besides ConfigError (e.g. BackboneError, ShardError) that become one line and exit 2.
    summary_keys: print only these keys of the summary (all when None).
    """
    parser = argparse.ArgumentParser(prog=f"lpo {name}", description=(doc or name).strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", action="append", required=True, metavar="PATH",
                        help="config YAML; repeat to deep-merge several (later ones win)")
    for key in (*inputs, *optional_inputs):
        metavar, help_text = STANDARD_INPUTS[key]
        parser.add_argument(f"--{key}", required=key in inputs, default=None, metavar=metavar, help=help_text)
    if out is not None:
        parser.add_argument("--out", required=True, metavar=out[0], help=out[1])
    if arguments is not None:
        arguments(parser)
    args = parser.parse_args(argv)
    main_process = is_main_process()
    setup_logging(main_process)
    try:
        summary = run(load_config(*args.config), args)
    except (ConfigError, *user_errors) as err:
        print(f"lpo {name}: error: {err}", file=sys.stderr)
        return 2
    finally:
        _end_distributed()
    if main_process and isinstance(summary, dict):
        shown = summary if summary_keys is None else {k: summary[k] for k in summary_keys if k in summary}
        print(json.dumps(shown, default=str))
    return 0

