"""Rule `export_hf_shard`: write one safetensors file of the transformers export."""

from ucpflow.export.hf import hf_shard_job
from ucpflow.smk import named_index_files, run


def main():
    inputs = snakemake.input
    # A transformers model's tensors are merged from the rank files that the index and extraction maps locate.
    hf_shard_job(inputs.plan, snakemake.wildcards.stem, snakemake.output[0], named_index_files(inputs),
                 list(inputs.get("maps", [])))


run(snakemake, main)
