# ucpflow: DeepSpeed checkpoint conversion as a Snakemake workflow.
#   index -> extract (per source file) -> merge (per bucket of parameters, into staging)
#         -> publish (per parameter, into zero/) -> finalize (checks, then latest_universal)
# Each rule file's stage is the module of the same name in src/ucpflow/stages/.
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
include: "rules/publish.smk"
include: "rules/finalize.smk"
include: "rules/inspect.smk"
include: "rules/reshard.smk"
include: "rules/export.smk"
include: "rules/verify.smk"


# The conversion's outputs, requested by the `universal` target and by `all`, the default target.
CONVERSION = [
    # Every index table: a checkpoint counts as done only with all its outputs present.
    rules.index.output,
    # Every parameter's files too, so that a deleted parameter folder is converted again.
    universal_outputs,
    SETTINGS.latest_universal,
    # For `snakemake --report`: the tables of what was converted.
    rules.report_tables.output,
]


rule universal:
    """Target (default): convert input_folder into a universal checkpoint in output_folder (latest_universal last)."""
    input:
        CONVERSION,
    localrule: True


rule all:
    """Target: the default, the same as `universal`."""
    default_target: True
    input:
        CONVERSION,
    localrule: True


rule help:
    """Target: print the targets and every config key with its default and meaning."""
    log:
        f"{LOGS}/help.log",
    localrule: True
    run:
        print_help(log[0])


onsuccess:
    print_conversion_summary()


onerror:
    print_failure_hint(log)
