"""Rule `finalize`: check the universal checkpoint complete, then write latest_universal last."""

from ucpflow.smk import run
from ucpflow.stages.finalize import finalize_job
from ucpflow.tables import read_index_record


def main():
    finalize_job(
        snakemake.params.output_folder,
        snakemake.input.params,
        read_index_record(snakemake.input.layout).layout.copy_files,
        snakemake.output.summary,
        snakemake.params.keep_temp_folder,
    )


run(snakemake, main)
