# ucpflow: DeepSpeed checkpoint conversion as a Snakemake workflow.
#   index -> extract (per source file) -> merge (per bucket of parameters, into staging)
#         -> publish (per parameter, into zero/) -> finalize (checks, then latest_universal)
import os

from snakemake.utils import min_version

min_version("9.0")


# The shipped defaults; --configfile / --config override them from any working directory.
configfile: os.path.join(workflow.basedir, "config.yaml")


include: "rules/common.smk"
include: "rules/demo.smk"
include: "rules/index.smk"
include: "rules/extract.smk"
include: "rules/merge.smk"
include: "rules/finalize.smk"
include: "rules/inspect.smk"
include: "rules/reshard.smk"
include: "rules/export.smk"
include: "rules/verify.smk"


rule all:
    default_target: True
    input:
        # Every index table: a checkpoint counts as done only with all its outputs present.
        rules.index.output,
        # Every parameter's files too, so that a deleted parameter folder is converted again.
        universal_outputs,
        SETTINGS.latest_universal,
        # For `snakemake --report`: the tables of what was converted.
        rules.report_tables.output,


onsuccess:
    print_conversion_summary()
