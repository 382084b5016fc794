"""Rule `demo_checkpoint`: train the demo GPT with real DeepSpeed on CPU processes and save it."""

from ucpflow.demo.job import demo_checkpoint_job
from ucpflow.smk import run


def main():
    demo_checkpoint_job(
        snakemake.params.demo, snakemake.output.latest, snakemake.log.training
    )


run(snakemake, main)
