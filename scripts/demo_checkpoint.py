"""Rule `demo_checkpoint`: train the demo model (demo.kind) with real DeepSpeed on CPU processes and save it."""

from ucpflow.demo import training_line
from ucpflow.demo.job import demo_checkpoint_job
from ucpflow.smk import run, tell


def main():
    tell(training_line(snakemake.params.demo))
    demo_checkpoint_job(
        snakemake.params.demo, snakemake.output.latest, snakemake.log.training
    )


run(snakemake, main)
