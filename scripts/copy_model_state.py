"""Rule `copy_model_state`: copy one model-states file into the universal checkpoint."""

import os

from ucpflow.jobs import copy_model_state_job
from ucpflow.smk import run


def main():
    copy_model_state_job(snakemake.params.source, snakemake.output[0], os.path.dirname(snakemake.output[0]))


run(snakemake, main)
