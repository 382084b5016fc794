# No torch or DeepSpeed needed; fails naming the first parameters whose files do not match.
rule verify:
    """Target: check the universal checkpoint against the source fragments; `snakemake -f verify` checks again."""
    input:
        **rules.index.output,
        maps=all_extraction_maps,
        # Verify a finished conversion; a later conversion writes it again and so reruns this check.
        latest=SETTINGS.latest_universal,
    output:
        report=f"{WORK}/verify/report.tsv",
        partitions=f"{WORK}/verify/partitions.tsv",
        summary=f"{WORK}/verify/summary.txt",
    log:
        f"{LOGS}/verify.log",
    conda:
        "../envs/ucpflow.yaml"
    # Buckets are checked in parallel processes; Snakemake lowers this to --cores.
    threads: 8
    resources:
        mem_mb=verify_mem_mb,
        runtime=verify_runtime,
    params:
        output_folder=OUT,
    script:
        "../scripts/verify.py"
