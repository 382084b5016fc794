"""ucpflow: DeepSpeed checkpoint conversion as a Snakemake workflow."""

__version__ = "0.1.0"
