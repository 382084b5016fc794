"""Rule `report_tables`: the inspect tables and plot of the indexed checkpoint, for `snakemake --report`."""

from ucpflow.inspect import report_tables_job
from ucpflow.smk import named_index_files, run


def main():
    report_tables_job(
        named_index_files(snakemake.input),
        snakemake.output.summary,
        snakemake.output.plot,
    )


run(snakemake, main)
