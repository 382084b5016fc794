"""Rule `extract`: map where each flat tensor of one checkpoint file lies, for the merges to read in place."""

from ucpflow.jobs import extract_job
from ucpflow.smk import run


def main():
    extract_job(snakemake.params.source, snakemake.params.kind, snakemake.output[0])


run(snakemake, main)
