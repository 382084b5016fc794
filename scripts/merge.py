"""Rule `merge`: merge one bucket of parameters into their universal files, staged for publishing."""

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
        snakemake.output[0],
    )


run(snakemake, main)
