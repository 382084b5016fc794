# No torch or DeepSpeed needed; fails naming the first parameters whose files do not match.
rule verify:
    """Target: check each universal checkpoint against its source fragments; `snakemake -f verify` checks again."""
    input:
        refuse_unconvertible,
        # Every save's index, maps and finished conversion (finalize's summary, and latest_universal for the
        # save it names): a later conversion writes them again and so reruns this check.
        finished_conversions,
        verify_inputs,
    output:
        report=[f"{WORK}/{save.verify}/report.tsv" for save in SAVES],
        partitions=[f"{WORK}/{save.verify}/partitions.tsv" for save in SAVES],
        summary=[f"{WORK}/{save.verify}/summary.txt" for save in SAVES],
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
        saves=verified_saves,
    script:
        "../scripts/verify.py"
