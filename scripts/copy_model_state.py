"""Rule `copy_model_state`: copy one model-states file into the universal checkpoint."""

import os

from ucpflow.smk import run
from ucpflow.stages.finalize import copy_model_state_job


def main():
    copy_model_state_job(snakemake.params.source, snakemake.output[0], os.path.dirname(snakemake.output[0]))


run(snakemake, main)
