rule optimizer_state:
    """zero/optimizer_state.pt: the first rank's optimizer state without its sharded tensors."""
    input:
        layout=index_input("layout"),
        # The rank file it is read from: a changed rank file writes it again.
        source=optimizer_state_file,
    output:
        f"{UNIVERSAL_FOLDER}/{ZERO}/{OPTIMIZER_STATE_FILE}",
    log:
        f"{LOGS}/{{universal}}/optimizer_state.log",
    benchmark:
        f"{BENCHMARKS}/{{universal}}/optimizer_state.tsv"
    conda:
        "../envs/ucpflow.yaml"
    script:
        "../scripts/optimizer_state.py"


rule copy_model_state:
    """Copy one model-states file into the universal checkpoint, as DeepSpeed does."""
    input:
        layout=index_input("layout"),
        source=model_state_source,
    output:
        f"{UNIVERSAL_FOLDER}/{{model_file}}",
    log:
        f"{LOGS}/{{universal}}/copy/{{model_file}}.log",
    benchmark:
        f"{BENCHMARKS}/{{universal}}/copy/{{model_file}}.tsv"
    wildcard_constraints:
        model_file=rf"[^/]+_{re.escape(MODEL_STATES_SUFFIX)}",
    conda:
        "../envs/ucpflow.yaml"
    params:
        source=model_state_source,
    script:
        "../scripts/copy_model_state.py"


rule finalize:
    """Check the save's universal checkpoint against its index (removing what an earlier input left), then
    write its summary last: its presence means that universal checkpoint is complete."""
    input:
        universal=universal_outputs,
        layout=index_input("layout"),
        params=index_input("params"),
    output:
        summary=f"{DERIVED}/summary.json",
    log:
        f"{LOGS}/{{derived}}/finalize.log",
    benchmark:
        f"{BENCHMARKS}/{{derived}}/finalize.tsv"
    conda:
        "../envs/ucpflow.yaml"
    params:
        output_folder=universal_folder,
        keep_temp_folder=config["keep_temp_folder"],
    script:
        "../scripts/finalize.py"


rule latest_universal:
    """Write latest_universal last, naming the newest save's universal checkpoint once it is complete
    (DeepSpeed's load_universal reads it)."""
    input:
        [summary_of(save) for save in SAVES[-1:]],
    output:
        LATEST_UNIVERSAL_FILE,
    log:
        f"{LOGS}/latest_universal.log",
    localrule: True
    threads: 0
    run:
        run_in_process(log[0], write_latest_universal, output[0], SAVES[-1].universal)
