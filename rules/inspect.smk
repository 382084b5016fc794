# A checkpoint that cannot be converted is reported, not failed on; so is each save of a run folder.
rule inspect:
    """Target: print and write tables of the checkpoint (files, parameters, degrees, args) or of each save of a run folder."""
    input:
        inspect_input,
    output:
        **inspect_outputs(INSPECT),
    log:
        f"{LOGS}/inspect.log",
    benchmark:
        f"{BENCHMARKS}/inspect.tsv"
    conda:
        "../envs/ucpflow.yaml"
    params:
        input_folder=SETTINGS.input_folder,
        strict=config["strict"],
        inject_missing_state=config["inject_missing_state"],
        merge_job_bytes=config["merge_job_bytes"],
        merge_min_jobs=config["merge_min_jobs"],
        hf_config=config["hf_config"],
        run_folder=SETTINGS.run_folder,
        # A run folder changes while training saves into it: its saves are listed anew on every run.
        listed_at=STARTED if SETTINGS.run_folder else 0,
        output_folders=inspected_output_folders(),
    script:
        "../scripts/inspect.py"


rule report_tables:
    """The inspect tables and plot of the checkpoint being converted, from the index, for
    `snakemake --report` (a job of its own: a checkpoint rule's outputs must all be requested).
    """
    input:
        unpack(index_inputs),
    output:
        **inspection_outputs(f"{DERIVED}/report", category="Conversion"),
    log:
        f"{LOGS}/{{derived}}/report_tables.log",
    benchmark:
        f"{BENCHMARKS}/{{derived}}/report_tables.tsv"
    localrule: True
    conda:
        "../envs/ucpflow.yaml"
    script:
        "../scripts/report_tables.py"
