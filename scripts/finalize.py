"""Rule `finalize`: check the universal checkpoint complete, then write latest_universal last."""

from ucpflow.finalize import finalize_job
from ucpflow.jobs import load_layout
from ucpflow.smk import run


def main():
    finalize_job(
        snakemake.params.output_folder,
        snakemake.output.latest,
        snakemake.input.params,
        load_layout(snakemake.input.layout)["copy_files"],
        snakemake.output.summary,
        snakemake.params.keep_temp_folder,
    )


run(snakemake, main)
