"""Rule `reshard_rank_file`: one model- or optimizer-states file of the resharded tag folder."""

from ucpflow.reshard.jobs import rank_file_job
from ucpflow.smk import run


def main():
    options = snakemake.params
    rank_file_job(snakemake.input.plan, options.universal_folder, options.reshard_folder, snakemake.output[0])


run(snakemake, main)
