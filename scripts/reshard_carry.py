"""Rule `reshard_carry`: copy the HF Trainer's files beside the tag folder into the reshard folder."""

from ucpflow.reshard.jobs import carry_job
from ucpflow.smk import run


def main():
    carry_job(snakemake.input.plan, snakemake.params.reshard_folder, snakemake.output[0])


run(snakemake, main)
