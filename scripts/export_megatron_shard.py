"""Rule `export_megatron_shard`: write one (tp, pp) rank's model_optim_rng.pt of the Megatron-LM checkpoint."""

from ucpflow.export.megatron import megatron_shard_job
from ucpflow.smk import run


def main():
    megatron_shard_job(
        snakemake.input.plan,
        f"iter_{snakemake.wildcards.iteration}",
        snakemake.wildcards.rank,
        snakemake.output[0],
    )


run(snakemake, main)
