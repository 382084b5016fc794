rule extract:
    """Map where each flat tensor of one rank (or model-states) file lies, for in-place reads (stages/extract.py)."""
    input:
        layout=index_input("layout"),
        source=lambda wildcards: extraction_source(wildcards).path,
    output:
        f"{DERIVED}/extract/{{source}}.tsv",
    log:
        f"{LOGS}/{{derived}}/extract/{{source}}.log",
    benchmark:
        f"{BENCHMARKS}/{{derived}}/extract/{{source}}.tsv"
    wildcard_constraints:
        source=r"[^/]+",
    # Ahead of every other ready job: the merges, the longest jobs, wait for these maps.
    priority: 2
    retries: config["retries"]
    # Hundreds of rank files: batch their extractions into few cluster jobs (see profiles/slurm).
    group:
        "extract"
    conda:
        "../envs/ucpflow.yaml"
    resources:
        mem_mb=1024,
        runtime=15,
    params:
        source=lambda wildcards: extraction_source(wildcards).path,
        kind=lambda wildcards: extraction_source(wildcards).kind,
    script:
        "../scripts/extract.py"
