"""`python -m lpo <stage> ...` (what the Snakemake rules call)."""

import sys

from lpo.cli import main

sys.exit(main())
