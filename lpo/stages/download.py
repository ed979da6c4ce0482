"""Stage `download`: preference pairs in the Pick-a-Pic parquet schema -> data/<dataset>/.

download.source = "pickapic": the real Pick-a-Pic v1 files from a local mirror or the hub
(lpo.data.pickapic.download_pickapic); "shapes": pairs sampled from the shapes base model and labelled by the
simulated annotator (lpo.generate, which needs the base model folder).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

from lpo.config import Config
from lpo.data.pickapic import download_pickapic
from lpo.stage_main import stage_main

log = logging.getLogger(__name__)


def run(cfg: Config, out_dir: str | Path, base_dir: Optional[str | Path] = None) -> dict:
    """Fetch or make the pairs of `cfg.download.source` into `out_dir`; returns that source's summary."""
    source = cfg.download.source
    log.info("download: source %s -> %s", source, out_dir)
    if source == "pickapic":
        return download_pickapic(cfg.download, out_dir)
    if source == "shapes":
        if base_dir is None:
            raise ValueError("download: source 'shapes' samples pairs from the base model; pass base_dir (--base)")
        from lpo import generate  # imported here: it pulls in the shapes world and diffusers

        return generate.run(cfg, out_dir, base_dir)
    raise ValueError(f"download.source: unknown source {source!r}")  # the config's Literal makes this a bug


def main(argv: Optional[list[str]] = None) -> int:
    return stage_main("download", __doc__, lambda cfg, a: run(cfg, a.out, a.base), argv,
                      optional_inputs=("base",), out=("DIR", "output folder, data/<dataset>/ (--base: shapes only)"))


if __name__ == "__main__":
    sys.exit(main())
