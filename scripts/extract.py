"""Rule `extract`: map where each flat tensor of one checkpoint file lies, for the merges to read in place."""

from ucpflow.smk import run
from ucpflow.stages.extract import extract_job


def main():
    extract_job(snakemake.params.source, snakemake.params.kind, snakemake.output[0])


run(snakemake, main)
