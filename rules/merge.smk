rule merge:
    """Merge one bucket of parameters and move each parameter's folder into OUT/zero/ with one rename."""
    input:
        layout=rules.index.output.layout,
        fragments=rules.index.output.fragments,
        params=rules.index.output.params,
        info=rules.index.output.info,
        maps=bucket_maps,
    output:
        # Removed once its parameters are declared done, so a deleted parameter folder reruns this job.
        done=temp(f"{WORK}/merge/{{bucket}}.done"),
    log:
        f"{LOGS}/merge/{{bucket}}.log",
    benchmark:
        f"{BENCHMARKS}/merge/{{bucket}}.tsv"
    wildcard_constraints:
        bucket=r"b\d+",
    retries: config["retries"]
    conda:
        "../envs/ucpflow.yaml"
    resources:
        mem_mb=merge_mem_mb,
        runtime=merge_runtime,
    params:
        output_folder=OUT,
        staging=lambda wildcards: f"{OUT}/tmp/{wildcards.bucket}",
        keep_temp_folder=config["keep_temp_folder"],
    script:
        "../scripts/merge.py"


# One target per parameter, written by its bucket's merge job: declaring them lets Snakemake see a missing
# or outdated parameter, while a job per parameter would cost a process each for a rename.
rule publish:
    """Declares OUT/zero/<param>/ (fp32.pt and the other states beside it) as made by its merge job."""
    input:
        merged_bucket,
    output:
        f"{OUT}/zero/{{param}}/fp32.pt",
    wildcard_constraints:
        param=r"[^/]+",
    localrule: True
    # Nothing runs, so no core is taken: all of a bucket's parameters are declared in one scheduling round.
    threads: 0
