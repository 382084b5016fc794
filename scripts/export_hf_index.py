"""Rule `export_hf_index`: model.safetensors.index.json, naming the file of every tensor."""

from ucpflow.export.hf import hf_index_job
from ucpflow.smk import run


def main():
    hf_index_job(snakemake.input.plan, snakemake.output[0])


run(snakemake, main)
