"""Rule `verify`: check the universal checkpoint against the source fragments."""

import sys

from ucpflow.smk import named_index_files, run
from ucpflow.verify import verify_job


def main():
    line = verify_job(
        named_index_files(snakemake.input),
        list(snakemake.input.maps),
        snakemake.params.output_folder,
        snakemake.input.latest,
        dict(snakemake.output.items()),
        snakemake.log[0],
        workers=snakemake.threads,
    )
    print(f"ucpflow verify: {line}", file=sys.__stderr__)


run(snakemake, main)
