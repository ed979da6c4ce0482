"""lpo: step-level preference optimisation of latent diffusion models with a noise-aware latent reward model.

Reference implementation of arXiv 2502.01051 as a Snakemake pipeline; see README.md.
"""

__version__ = "0.1.0"
