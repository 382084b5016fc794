"""Rule `finalize`: write latest_universal once every file of the universal checkpoint is in place."""

from ucpflow.jobs import finalize_job
from ucpflow.smk import run


def main():
    finalize_job(snakemake.params.output_folder, snakemake.output[0], snakemake.params.keep_temp_folder)


run(snakemake, main)
