"""Rule `export_megatron_plan`: decide what every file of the Megatron-LM checkpoint holds."""

from ucpflow.export.megatron import megatron_plan_job
from ucpflow.smk import run


def main():
    megatron_plan_job(
        snakemake.input.params,
        snakemake.params.universal_folder,
        snakemake.input.model_state,
        snakemake.params.megatron_folder,
        snakemake.params.target_tp,
        snakemake.params.target_pp,
        snakemake.output[0],
        snakemake.params.qkv_layout,
    )


run(snakemake, main)
