# `snakemake reshard`: a native DeepSpeed checkpoint for target_dp ranks at target_zero_stage, written from
# the universal output. A plan checkpoint decides the tag folder's files; one job writes each rank file;
# a finalize job writes `latest` last.

RESHARD_FOLDER = os.path.normpath(
    config["reshard_folder"] or os.path.join(os.path.dirname(OUT), "reshard")
)
RESHARD_WORK = f"{DERIVED}/reshard"


def _check_reshard_folder(folder):
    """An explicit reshard_folder must lie outside the input and the universal output."""
    if not config["reshard_folder"]:
        return
    target = os.path.abspath(folder)
    source = os.path.abspath(SETTINGS.input_folder)
    if target == source or target.startswith(source + os.sep):
        sys.exit(
            f"ucpflow error: Config key `reshard_folder`: {folder} lies inside the input folder {SETTINGS.input_folder}."
        )
    if target == os.path.dirname(source):
        sys.exit(
            f"ucpflow error: Config key `reshard_folder`: {folder} holds the input tag folder {SETTINGS.input_folder}, whose files the reshard would overwrite."
        )
    universal = os.path.abspath(OUT)
    if target == universal or target.startswith(universal + os.sep):
        sys.exit(
            f"ucpflow error: Config key `reshard_folder`: {folder} lies inside the universal output folder {OUT}."
        )


_check_reshard_folder(RESHARD_FOLDER)


def reshard_plan():
    return _read_index_file(checkpoints.reshard_plan.get().output[0], _read_json)


def reshard_model_states(wildcards):
    return indexed_layout()["model_files"]


def reshard_files(wildcards):
    plan = reshard_plan()
    names = list(plan["model_files"]) + list(plan["optim_files"])
    return [f"{RESHARD_FOLDER}/{plan['tag']}/{name}" for name in names]


checkpoint reshard_plan:
    """Decide the target's degree, stage and precision and its files; refuse TP/PP/EP sources."""
    input:
        layout=rules.index.output.layout,
        model_states=reshard_model_states,
    output:
        f"{RESHARD_WORK}/plan.json",
    log:
        f"{LOGS}/reshard/plan.log",
    conda:
        "../envs/ucpflow.yaml"
    params:
        reshard_folder=RESHARD_FOLDER,
        target_dp=config["target_dp"],
        target_zero_stage=config["target_zero_stage"],
        target_dtype=config["target_dtype"],
        sub_group_size=config["reshard_sub_group_size"],
    script:
        "../scripts/reshard_plan.py"


rule reshard_rank_file:
    """Write one model- or optimizer-states file of the target tag folder from the universal output."""
    input:
        plan=rules.reshard_plan.output[0],
        universal=universal_outputs,
    output:
        f"{RESHARD_FOLDER}/{{tag}}/{{name}}_states.pt",
    log:
        f"{LOGS}/reshard/{{tag}}/{{name}}.log",
    wildcard_constraints:
        tag=r"[^/]+",
        name=r"[^/]+_(model|optim)",
    conda:
        "../envs/ucpflow.yaml"
    params:
        universal_folder=OUT,
        reshard_folder=RESHARD_FOLDER,
    script:
        "../scripts/reshard_rank_file.py"


rule reshard_carry:
    """Copy the HF Trainer's files beside the tag folder (pickles only with allowed globals)."""
    input:
        plan=rules.reshard_plan.output[0],
    output:
        f"{RESHARD_WORK}/carried.json",
    log:
        f"{LOGS}/reshard/carry.log",
    conda:
        "../envs/ucpflow.yaml"
    params:
        reshard_folder=RESHARD_FOLDER,
    script:
        "../scripts/reshard_carry.py"


rule reshard_finalize:
    """Remove files of an earlier plan, add DeepSpeed's recovery scripts, then write `latest` last."""
    input:
        plan=rules.reshard_plan.output[0],
        files=reshard_files,
        carried=rules.reshard_carry.output[0],
    output:
        f"{RESHARD_FOLDER}/latest",
    log:
        f"{LOGS}/reshard/finalize.log",
    conda:
        "../envs/ucpflow.yaml"
    params:
        reshard_folder=RESHARD_FOLDER,
    script:
        "../scripts/reshard_finalize.py"


rule reshard:
    """Target: the DeepSpeed checkpoint for target_dp ranks in reshard_folder."""
    input:
        rules.reshard_finalize.output[0],
    localrule: True
