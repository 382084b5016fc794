rule merge:
    """Merge one bucket of parameters into its staging folder <universal folder>/tmp/<bucket>/<param>/ (stages/merge.py)."""
    input:
        unpack(index_inputs),
        maps=bucket_maps,
    output:
        # Removed once all its parameters are published (kept with keep_temp_folder, as ds_to_universal).
        staged=staging_folder(f"{UNIVERSAL_FOLDER}/{STAGING}/{{bucket}}"),
    log:
        f"{LOGS}/{{universal}}/merge/{{bucket}}.log",
    benchmark:
        f"{BENCHMARKS}/{{universal}}/merge/{{bucket}}.tsv"
    wildcard_constraints:
        bucket=r"b\d+",
    # Ahead of the side jobs (model-state copies, optimizer_state, report tables): short, needed only at the end.
    priority: 1
    retries: config["retries"]
    conda:
        "../envs/ucpflow.yaml"
    resources:
        mem_mb=merge_mem_mb,
        runtime=merge_runtime,
    params:
        output_folder=universal_folder,
    script:
        "../scripts/merge.py"
