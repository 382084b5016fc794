"""Rule `export_hf_finalize`: generation_config.json and, last, config.json of the transformers export."""

from ucpflow.export.hf import hf_finalize_job
from ucpflow.smk import run


def main():
    hf_finalize_job(snakemake.input.plan, snakemake.output.generation_config, snakemake.output.config)


run(snakemake, main)
