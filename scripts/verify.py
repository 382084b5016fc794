"""Rule `verify`: check each save's universal checkpoint against its source fragments."""

import sys

from ucpflow.smk import run
from ucpflow.tables import IndexFiles
from ucpflow.verify import verify_job


def main():
    outputs = snakemake.output
    for number, save in enumerate(snakemake.params.saves):
        line = verify_job(
            IndexFiles(**save["index"]),
            save["maps"],
            save["output_folder"],
            save["latest"],
            dict(report=outputs.report[number], partitions=outputs.partitions[number],
                 summary=outputs.summary[number]),
            snakemake.log[0],
            workers=snakemake.threads,
        )
        prefix = f"{save['tag']}: " if len(snakemake.params.saves) > 1 else ""
        print(f"ucpflow verify: {prefix}{line}", file=sys.__stderr__)


run(snakemake, main)
