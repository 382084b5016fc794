"""Rule `reshard_finalize`: write the reshard folder's `latest` last, once every file of the plan exists."""

from ucpflow.reshard.jobs import finalize_job
from ucpflow.smk import run


def main():
    return finalize_job(snakemake.input.plan, snakemake.params.reshard_folder, snakemake.output[0])


run(snakemake, main, announce=True)
