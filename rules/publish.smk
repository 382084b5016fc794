rule repair_request:
    """A published parameter folder lost a file: this new, empty request file reruns its publish job."""
    output:
        f"{DERIVED}/repair/{{param}}.{{stamp}}",
    log:
        f"{LOGS}/{{derived}}/repair/{{param}}.{{stamp}}.log",
    wildcard_constraints:
        stamp=r"\d+",
    localrule: True
    threads: 0
    run:
        Path(output[0]).touch()


rule publish:
    """Hard-link one parameter's merged files into <universal folder>/zero/<param>/ (fp32.pt and the other states
    beside it); a staged copy that lost files is merged again here (stages/publish.py). Runs in Snakemake's
    own process.
    """
    input:
        # Only what it reads on every run: Snakemake checksums and tracks each input of each of these jobs.
        # The merge inputs it needs when a staged copy lost files are those of the merge that wrote it.
        staged=staged_bucket,
        repair=repair_request,
    output:
        f"{UNIVERSAL_FOLDER}/{ZERO}/{{param}}/{FP32_FILE}",
    log:
        f"{LOGS}/{{universal}}/publish/{{param}}.log",
    wildcard_constraints:
        param=r"[^/]+",
    localrule: True
    # A few file operations in Snakemake's process: no core taken, so a bucket's are started together.
    threads: 0
    run:
        publish_job(wildcards, input, log[0])
