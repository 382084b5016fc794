# `snakemake reshard`: a native DeepSpeed checkpoint for target_dp ranks at target_zero_stage, written from
# the source's rank files through the index and the extraction maps (no universal checkpoint is written).
# A plan checkpoint decides the tag folder's files; one job writes each rank file; a finalize job writes
# `latest` last.


include: "reshard_common.smk"


checkpoint reshard_plan:
    """Decide the target's degree, stage and precision and its files; refuse TP/PP/EP sources."""
    input:
        layout=index_input("layout"),
        params=index_input("params"),
        model_states=reshard_model_states,
    output:
        f"{RESHARD_WORK}/plan.json",
    log:
        f"{LOGS}/{{derived}}/reshard/plan.log",
    benchmark:
        f"{BENCHMARKS}/{{derived}}/reshard/plan.tsv"
    conda:
        "../envs/ucpflow.yaml"
    params:
        reshard_folder=lambda wildcards: save_of(wildcards).reshard,
        target_dp=config["target_dp"],
        target_zero_stage=config["target_zero_stage"],
        target_dtype=config["target_dtype"],
        sub_group_size=config["reshard_sub_group_size"],
    script:
        "../scripts/reshard_plan.py"


rule reshard_rank_file:
    """Write one model- or optimizer-states file of the target tag folder from the source's rank files."""
    input:
        unpack(index_inputs),
        plan=work_input("reshard/plan.json"),
        maps=reshard_maps,
        model_states=reshard_model_states,
    output:
        f"{RESHARD_FOLDER}/{{tag}}/{{name}}_states.pt",
    log:
        f"{LOGS}/reshard/{{reshard}}/{{tag}}/{{name}}.log",
    benchmark:
        f"{BENCHMARKS}/reshard/{{reshard}}/{{tag}}/{{name}}.tsv"
    wildcard_constraints:
        tag=r"[^/]+",
        name=r"[^/]+_(model|optim)",
    # A target of many ranks: batch its files into fewer cluster jobs (see profiles/slurm).
    group:
        "reshard_files"
    conda:
        "../envs/ucpflow.yaml"
    resources:
        # A piece of one parameter at a time (4M elements per state), whatever the file's size.
        mem_mb=1024,
        runtime=reshard_runtime,
    params:
        # <reshard_folder>/<tag>/<file>
        reshard_folder=lambda wildcards, output: os.path.dirname(
            os.path.dirname(output[0])
        ),
    script:
        "../scripts/reshard_rank_file.py"


rule reshard_carry:
    """Copy the HF Trainer's files beside the tag folder (pickles only with allowed globals)."""
    input:
        plan=work_input("reshard/plan.json"),
    output:
        f"{RESHARD_WORK}/carried.json",
    log:
        f"{LOGS}/{{derived}}/reshard/carry.log",
    conda:
        "../envs/ucpflow.yaml"
    params:
        reshard_folder=lambda wildcards: save_of(wildcards).reshard,
    script:
        "../scripts/reshard_carry.py"


rule reshard_repair_request:
    """The reshard folder lost a file: this new, empty request file reruns its finalize."""
    output:
        f"{RESHARD_WORK}/repair/{{stamp}}",
    log:
        f"{LOGS}/{{derived}}/reshard/repair/{{stamp}}.log",
    wildcard_constraints:
        stamp=r"\d+",
    localrule: True
    threads: 0
    run:
        Path(output[0]).touch()


rule reshard_finalize:
    """Remove files of an earlier plan, add DeepSpeed's recovery scripts, then write `latest` last."""
    input:
        plan=work_input("reshard/plan.json"),
        files=reshard_files,
        carried=work_input("reshard/carried.json"),
        repair=reshard_repair_request,
    output:
        f"{RESHARD_FOLDER}/latest",
    log:
        f"{LOGS}/reshard/{{reshard}}/finalize.log",
    conda:
        "../envs/ucpflow.yaml"
    params:
        reshard_folder=lambda wildcards, output: os.path.dirname(output[0]),
    script:
        "../scripts/reshard_finalize.py"


rule reshard:
    """Target: a native DeepSpeed checkpoint for target_dp ranks at target_zero_stage in reshard_folder (latest last)."""
    input:
        refuse_unconvertible,
        [f"{save.reshard}/latest" for save in SAVES],
    localrule: True


rule reshard_inspect:
    """What `reshard` would write for one save: files and tensor bytes per rank."""
    input:
        checkpoint_input,
    output:
        f"{INSPECT}/{{inspect_reshard}}.md",
    log:
        f"{LOGS}/inspect/{{inspect_reshard}}.log",
    conda:
        "../envs/ucpflow.yaml"
    params:
        input_folder=lambda wildcards: save_of(wildcards).input_folder,
        target_dp=config["target_dp"],
        target_zero_stage=config["target_zero_stage"],
        target_dtype=config["target_dtype"],
        sub_group_size=config["reshard_sub_group_size"],
    script:
        "../scripts/reshard_inspect.py"


rule inspect_reshard:
    """Target: what `reshard` would write for target_dp and target_zero_stage: files and tensor bytes per rank."""
    input:
        refuse_unconvertible,
        [f"{INSPECT}/{save.inspect_reshard}.md" for save in SAVES],
    localrule: True
