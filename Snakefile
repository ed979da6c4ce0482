# lpo: step-level preference optimisation with a noise-aware latent reward model (arXiv 2502.01051).
#
#   snakemake --cores all                              # the default shapes experiment (config/config.yaml)
#   snakemake --cores all --configfile config/sd15.yaml    # SD1.5 (merged over the defaults)
#   snakemake --workflow-profile profiles/slurm ...    # on a SLURM cluster
#
# The Snakefile is glue only: every rule calls one `lpo` stage (`python -m lpo <stage>`), whose code lives in
# lpo/stages/. Outputs of one experiment go to results/<experiment.name>/ (logs/ and benchmarks/ inside).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    method="|".join(METHOD_REGISTRY),
    model="|".join(["base", *METHOD_REGISTRY]),


include: "workflow/rules/data.smk"
include: "workflow/rules/reward.smk"
include: "workflow/rules/optimize.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        final_targets(),
    default_target: True
