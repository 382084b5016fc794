"""Rule `merge`: merge one bucket of parameters into their universal files in the bucket's staging folder."""

import os

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
        # The staging folder is <output_folder>/tmp/<bucket>.
        os.path.dirname(os.path.dirname(snakemake.output.staged)),
    )
    return f"merged {len(rows)} parameters"


run(snakemake, main, announce=True)
