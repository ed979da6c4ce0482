"""`lpo <stage> ...`: one entry point for every pipeline stage (each rule in workflow/rules calls one).

Each stage module in lpo/stages/ has `run(cfg, ...) -> dict` (importable) and `main(argv)` (this CLI).
User errors (a bad config key, a missing folder, an unknown preset) print one line and exit 2, no traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

from lpo.config import ConfigError

# stage name -> module (a plain registry: the CLI's choices come from it)
STAGES: dict[str, str] = {
    "synthesize": "lpo.stages.synthesize",
    "pretrain": "lpo.stages.pretrain",
    "base": "lpo.stages.base",
    "download": "lpo.stages.download",
    "latents": "lpo.stages.latents",
    "train_lrm": "lpo.stages.train_lrm",
    "eval_lrm": "lpo.stages.eval_lrm",
    "sibling_lrm": "lpo.stages.sibling_lrm",
    "calibrate": "lpo.stages.calibrate",
    "train_spm": "lpo.stages.train_spm",
    "optimize": "lpo.stages.optimize",
    "evaluate": "lpo.stages.evaluate",
    "report": "lpo.stages.report",
    "bench": "lpo.tools.bench",
}

USAGE = "usage: lpo <stage> [options]   (lpo <stage> --help for a stage's options)\nstages: " + ", ".join(STAGES)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"lpo: unknown stage {stage!r}\n{USAGE}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    module = importlib.import_module(STAGES[stage])
    try:
        result = module.main(rest)
    except ConfigError as err:
        print(f"lpo {stage}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
