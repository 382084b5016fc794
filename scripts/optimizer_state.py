"""Rule `optimizer_state`: write zero/optimizer_state.pt from the first rank's optimizer state."""

from ucpflow.jobs import optimizer_state_job
from ucpflow.smk import run


def main():
    optimizer_state_job(snakemake.input.layout, snakemake.output[0])


run(snakemake, main)
