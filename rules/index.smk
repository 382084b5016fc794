checkpoint index:
    """Read the checkpoint's metadata (no tensor data): layout, fragment table, merge plan (stages/index.py)."""
    input:
        checkpoint_input,
    output:
        **index_files(INDEX)._asdict(),
    log:
        f"{LOGS}/{{derived}}/index.log",
    benchmark:
        f"{BENCHMARKS}/{{derived}}/index.tsv"
    conda:
        "../envs/ucpflow.yaml"
    params:
        input_folder=lambda wildcards: save_of(wildcards).input_folder,
        output_folder=universal_folder,
        strict=config["strict"],
        inject_missing_state=config["inject_missing_state"],
        hf_config=config["hf_config"],
        merge_job_bytes=config["merge_job_bytes"],
        merge_min_jobs=config["merge_min_jobs"],
    script:
        "../scripts/index.py"
