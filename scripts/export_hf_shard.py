"""Rule `export_hf_shard`: write one safetensors file of the transformers export."""

from ucpflow.export.hf import hf_shard_job
from ucpflow.smk import run


def main():
    hf_shard_job(snakemake.input.plan, snakemake.wildcards.stem, snakemake.output[0])


run(snakemake, main)
