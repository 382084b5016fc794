"""Rule `reshard_rank_file`: one model- or optimizer-states file of the resharded tag folder."""

from ucpflow.reshard.jobs import rank_file_job
from ucpflow.smk import named_index_files, run


def main():
    rank_file_job(snakemake.input.plan, named_index_files(snakemake.input), list(snakemake.input.maps),
                  snakemake.params.reshard_folder, snakemake.output[0])


run(snakemake, main)
