"""Rule `inspect`: describe the checkpoint, or each save of a run folder, from metadata and print a summary."""

import sys

from ucpflow.inspect import inspect_checkpoint, plot_parameter_bytes, summary_text, write_inspection
from ucpflow.runs import OutputFolders, runs_table, runs_text, write_runs
from ucpflow.smk import run


def inspect_run():
    folder = snakemake.params.input_folder
    table, notes = runs_table(folder, OutputFolders(**snakemake.params.output_folders))
    text = runs_text(folder, table, notes)
    write_runs(table, text, snakemake.output.runs.rsplit("/", 1)[0])
    print(text, end="")
    print(text, end="", file=sys.__stdout__)


def main():
    if snakemake.params.run_folder:
        return inspect_run()
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
