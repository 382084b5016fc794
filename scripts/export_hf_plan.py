"""Rule `export_hf_plan`: the config, tensor names and safetensors files of the transformers export."""

from ucpflow.export.hf import hf_plan_job
from ucpflow.smk import run


def main():
    options = snakemake.params
    hf_plan_job(
        snakemake.input.params, options.universal_folder, snakemake.input.get("model_state"), options.hf_folder,
        options.max_shard_size, snakemake.output[0], layout_path=snakemake.input.layout, hf_dtype=options.hf_dtype,
        exclude_frozen=options.exclude_frozen, qkv_layout=options.qkv_layout,
    )


run(snakemake, main)
