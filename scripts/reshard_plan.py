"""Rule `reshard_plan`: the target's degree, ZeRO stage and precision, and the files of its tag folder."""

from ucpflow.reshard.jobs import plan_job
from ucpflow.smk import run


def main():
    options = snakemake.params
    return plan_job(
        snakemake.input.layout, snakemake.input.params, snakemake.output[0], reshard_folder=options.reshard_folder,
        target_dp=options.target_dp, target_stage=options.target_zero_stage, target_dtype=options.target_dtype,
        sub_group_size=options.sub_group_size,
    )


run(snakemake, main, announce=True)
