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
        output_folders=dict(
            output_folder=config["output_folder"],
            hf_folder=config["hf_folder"],
            megatron_folder=config["megatron_folder"],
            reshard_folder=config["reshard_folder"],
            converted_save="" if SETTINGS.unconvertible else SETTINGS.tag_folder,
        ),
    script:
        "../scripts/inspect.py"


rule report_tables:
    """The inspect tables and plot of the checkpoint being converted, from the index, for
    `snakemake --report` (a job of its own: a checkpoint rule's outputs must all be requested).
    """
    input:
        layout=rules.index.output.layout,
        fragments=rules.index.output.fragments,
        params=rules.index.output.params,
        info=rules.index.output.info,
    output:
        **inspection_outputs(f"{DERIVED}/report", category="Conversion"),
    log:
        f"{LOGS}/report_tables.log",
    benchmark:
        f"{BENCHMARKS}/report_tables.tsv"
    localrule: True
    conda:
        "../envs/ucpflow.yaml"
    script:
        "../scripts/report_tables.py"
