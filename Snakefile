# ucpflow: DeepSpeed checkpoint conversion as a Snakemake workflow.
#   per save: index -> extract (per source file) -> merge (per bucket of parameters, into staging)
#             -> publish (per parameter, into zero/) -> finalize (checks, summary last)
#   then latest_universal, naming the newest save's universal checkpoint.
# Each rule file's stage is the module of the same name in src/ucpflow/stages/; the saves (one checkpoint,
# or a run's saves chosen by `tags`) come from src/ucpflow/targets.py.
import os

from snakemake.utils import min_version

min_version("9.0")


# The shipped defaults; --configfile / --config override them from any working directory.
configfile: os.path.join(workflow.basedir, "config.yaml")


include: "rules/common.smk"


# Each save's paths hold one of these wildcards, whose values are the saves' own (rules/common.smk).
wildcard_constraints:
    **SAVE_WILDCARD_CONSTRAINTS,


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


# The conversion's outputs for every save, requested by the `universal` target and by `all`, the default
# target: each save's index tables (a save counts as done only with all of them present), its finalize
# summary, every file of its universal checkpoint (so a deleted one is converted again), the tables of what
# was converted (for `snakemake --report`), and latest_universal, last.
CONVERSION = [
    refuse_unconvertible,
    expand(rules.index.output, derived=[save.derived for save in SAVES]),
    finished_conversions,
    indexed_universal_files,
    expand(rules.report_tables.output, derived=[save.derived for save in SAVES]),
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
    exit_without_waiting()


onerror:
    print_failure_hint(log)
    exit_without_waiting()
