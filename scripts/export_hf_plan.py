"""Rule `export_hf_plan`: the GPT-2 config, tensor names and safetensors files of the transformers export."""

from ucpflow.export.hf import hf_plan_job
from ucpflow.smk import run


def main():
    hf_plan_job(
        snakemake.input.params,
        snakemake.params.universal_folder,
        snakemake.input.model_state,
        snakemake.params.hf_folder,
        snakemake.params.max_shard_size,
        snakemake.output[0],
    )


run(snakemake, main)
