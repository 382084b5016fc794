"""Rule `inspect_reshard`: the files `reshard` would write for target_dp and target_zero_stage, and their bytes."""

import sys

from ucpflow.reshard.jobs import inspect_job
from ucpflow.smk import run


def main():
    options = snakemake.params
    text = inspect_job(
        options.input_folder, snakemake.output[0], target_dp=options.target_dp,
        target_stage=options.target_zero_stage, target_dtype=options.target_dtype,
        sub_group_size=options.sub_group_size,
    )
    print(text, file=sys.__stdout__)


run(snakemake, main)
