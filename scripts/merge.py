"""Rule `merge`: merge one bucket of parameters into their universal files in the bucket's staging folder."""

from ucpflow.jobs import merge_job
from ucpflow.smk import run


def main():
    rows = merge_job(
        snakemake.wildcards.bucket,
        snakemake.input.layout,
        snakemake.input.fragments,
        snakemake.input.params,
        snakemake.input.info,
        list(snakemake.input.maps),
        snakemake.output.staged,
        snakemake.params.output_folder,
    )
    return f"merged {len(rows)} parameters"


run(snakemake, main, announce=True)
