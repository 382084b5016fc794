"""Rule `export_megatron_finalize`: write latest_checkpointed_iteration.txt once every rank's file exists."""

from ucpflow.export.megatron import megatron_finalize_job
from ucpflow.smk import run


def main():
    megatron_finalize_job(snakemake.input.plan, snakemake.output[0])


run(snakemake, main)
