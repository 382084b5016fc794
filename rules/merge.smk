rule merge:
    """Merge one bucket of parameters into staged universal files (OUT/tmp/<bucket>/<param>/*.pt)."""
    input:
        layout=rules.index.output.layout,
        fragments=rules.index.output.fragments,
        params=rules.index.output.params,
        info=rules.index.output.info,
        maps=bucket_maps,
    output:
        staging_output(f"{OUT}/tmp/{{bucket}}"),
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
    script:
        "../scripts/merge.py"


rule publish:
    """Move one parameter's staged folder to OUT/zero/<param> in one rename; hard links keep the staged
    copy until every parameter is published, so an interrupted publish can simply run again.
    """
    input:
        staged_parameter,
    output:
        # Each parameter folder holds fp32.pt; its other files (exp_avg, exp_avg_sq, step) arrive with it.
        f"{OUT}/zero/{{param}}/fp32.pt",
    log:
        f"{LOGS}/publish/{{param}}.log",
    wildcard_constraints:
        param=r"[^/]+",
    localrule: True
    conda:
        "../envs/ucpflow.yaml"
    params:
        folder=lambda wildcards, output: os.path.dirname(output[0]),
        link=lambda wildcards, input: f"{input[0]}/.{wildcards.param}.publish",
    shell:
        "(rm -rf {params.link:q} && cp -al {input:q}/{wildcards.param:q} {params.link:q}"
        " && rm -rf {params.folder:q} && mv -T {params.link:q} {params.folder:q}) > {log:q} 2>&1"
