"""Rule `optimizer_state`: write zero/optimizer_state.pt from the first rank's optimizer state."""

from ucpflow.smk import run
from ucpflow.stages.finalize import optimizer_state_job


def main():
    optimizer_state_job(snakemake.input.layout, snakemake.output[0])


run(snakemake, main)
