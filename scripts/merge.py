"""Rule `merge`: merge one bucket of parameters into their universal files in the bucket's staging folder."""

from ucpflow.smk import named_index_files, run
from ucpflow.stages.merge import merge_job


def main():
    rows = merge_job(
        snakemake.wildcards.bucket,
        named_index_files(snakemake.input),
        list(snakemake.input.maps),
        snakemake.output.staged,
        snakemake.params.output_folder,
    )
    return f"merged {len(rows)} parameters"


run(snakemake, main, announce=True)
