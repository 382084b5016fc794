"""Rule `merge`: merge one bucket of parameters into their universal files and move them into place."""

from ucpflow.jobs import merge_job
from ucpflow.smk import run


def main():
    merge_job(
        snakemake.wildcards.bucket,
        snakemake.input.layout,
        snakemake.input.fragments,
        snakemake.input.params,
        snakemake.input.info,
        list(snakemake.input.maps),
        snakemake.params.staging,
        snakemake.params.output_folder,
        snakemake.output.done,
        keep_staging=snakemake.params.keep_temp_folder,
    )


run(snakemake, main)
