"""Rule `inspect`: describe the checkpoint from its metadata and print a summary."""

import sys

from ucpflow.inspect import inspect_checkpoint, plot_parameter_bytes, summary_text, write_inspection
from ucpflow.smk import run


def main():
    summary, tables = inspect_checkpoint(
        snakemake.params.input_folder,
        strict=snakemake.params.strict,
        inject_missing_state=snakemake.params.inject_missing_state,
        job_bytes=snakemake.params.merge_job_bytes,
        min_jobs=snakemake.params.merge_min_jobs,
        hf_config=snakemake.params.hf_config,
    )
    write_inspection(summary, tables, snakemake.output.summary.rsplit("/", 1)[0])
    plot_parameter_bytes(tables.get("parameters"), snakemake.output.plot)
    print(summary_text(summary))
    print(summary_text(summary), file=sys.__stdout__)


run(snakemake, main)
