rule extract:
    """Map where each flat tensor of one rank (or model-states) file lies, for in-place reads."""
    input:
        layout=rules.index.output.layout,
        source=lambda wildcards: extraction_source(wildcards)["path"],
    output:
        f"{WORK}/extract/{{source}}.tsv",
    log:
        f"{LOGS}/extract/{{source}}.log",
    wildcard_constraints:
        source=r"[^/]+",
    conda:
        "../envs/ucpflow.yaml"
    params:
        source=lambda wildcards: extraction_source(wildcards)["path"],
        kind=lambda wildcards: extraction_source(wildcards)["kind"],
    script:
        "../scripts/extract.py"
