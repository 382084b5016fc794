rule optimizer_state:
    """zero/optimizer_state.pt: the first rank's optimizer state without its sharded tensors."""
    input:
        layout=rules.index.output.layout,
        # The rank file it is read from: a changed rank file writes it again.
        source=optimizer_state_file,
    output:
        f"{OUT}/{ZERO}/{OPTIMIZER_STATE_FILE}",
    log:
        f"{LOGS}/optimizer_state.log",
    benchmark:
        f"{BENCHMARKS}/optimizer_state.tsv"
    conda:
        "../envs/ucpflow.yaml"
    script:
        "../scripts/optimizer_state.py"


rule copy_model_state:
    """Copy one model-states file into the universal checkpoint, as DeepSpeed does."""
    input:
        layout=rules.index.output.layout,
        source=model_state_source,
    output:
        f"{OUT}/{{model_file}}",
    log:
        f"{LOGS}/copy/{{model_file}}.log",
    benchmark:
        f"{BENCHMARKS}/copy/{{model_file}}.tsv"
    wildcard_constraints:
        model_file=rf"[^/]+_{re.escape(MODEL_STATES_SUFFIX)}",
    conda:
        "../envs/ucpflow.yaml"
    params:
        source=model_state_source,
    script:
        "../scripts/copy_model_state.py"


rule finalize:
    """Check the output against the index (removing what an earlier input left), then write
    latest_universal last: its presence means the universal checkpoint is complete."""
    input:
        universal=universal_outputs,
        layout=rules.index.output.layout,
        params=rules.index.output.params,
    output:
        latest=SETTINGS.latest_universal,
        summary=f"{DERIVED}/summary.json",
    log:
        f"{LOGS}/finalize.log",
    benchmark:
        f"{BENCHMARKS}/finalize.tsv"
    conda:
        "../envs/ucpflow.yaml"
    params:
        output_folder=OUT,
        keep_temp_folder=config["keep_temp_folder"],
    script:
        "../scripts/finalize.py"
