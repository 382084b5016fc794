"""Rule `export_hf_shard`: write one safetensors file of the transformers export."""

from ucpflow.export.hf import hf_shard_job
from ucpflow.smk import run


def main():
    inputs = snakemake.input
    # A transformers model's tensors are merged from the rank files that the index and extraction maps locate.
    index = [inputs.get(key) for key in ("layout", "fragments", "params", "info")] + [list(inputs.get("maps", []))]
    hf_shard_job(inputs.plan, snakemake.wildcards.stem, snakemake.output[0], index)


run(snakemake, main)
