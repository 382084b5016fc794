"""Rule `report_tables`: the inspect tables and plot of the indexed checkpoint, for `snakemake --report`."""

from ucpflow.jobs import report_tables_job
from ucpflow.smk import run


def main():
    report_tables_job(
        snakemake.input.layout,
        snakemake.input.info,
        snakemake.input.fragments,
        snakemake.input.params,
        snakemake.output.summary,
        snakemake.output.plot,
    )


run(snakemake, main)
