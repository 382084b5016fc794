"""Rule `copy_model_state`: copy one model-states file into the universal checkpoint."""

from ucpflow.jobs import copy_model_state_job
from ucpflow.smk import run


def main():
    copy_model_state_job(snakemake.params.source, snakemake.output[0], snakemake.params.output_folder)


run(snakemake, main)
