# Paths and input functions of the export rules (rules/export.smk).

from ucpflow.export.hf_common import shard_memory_mb, shard_runtime_minutes

EXPORT = f"{DERIVED}/export"
MEGATRON_FOLDER = os.path.join(SELECTION.root("megatron"), "{megatron}")
HF_FOLDER = os.path.join(SELECTION.root("hf"), "{hf}")


def universal_model_state(wildcards):
    """The copied model-states file that holds Megatron's args, iteration and checkpoint version."""
    save = save_of(wildcards)
    copied = indexed_layout(save).layout.copy_files[0]
    return f"{save.universal}/{os.path.basename(copied)}"


def megatron_plan(save):
    plan = checkpoints.export_megatron_plan.get(derived=save.derived).output[0]
    return _read_index_file(plan, _read_json)


def hf_plan(save):
    plan = checkpoints.export_hf_plan.get(derived=save.derived).output[0]
    return _read_index_file(plan, _read_json)


def universal_weights(save, params):
    return [
        f"{save.universal}/{ZERO}/{param}/{FP32_FILE}"
        for param in dict.fromkeys(params)
    ]


def megatron_shard_weights(wildcards):
    # A rank of an outdated plan asks for nothing: the DAG drops it once the plan is rewritten.
    save = save_of(wildcards)
    plan = megatron_plan(save)
    if wildcards.rank not in plan["ranks"]:
        return []
    stage = plan["ranks"][wildcards.rank][1]
    return universal_weights(save, (entry["param"] for entry in plan["stages"][stage]))


def megatron_shards(wildcards):
    save = save_of(wildcards)
    plan = megatron_plan(save)
    return [
        f"{save.megatron}/{plan['iteration_folder']}/{rank}/model_optim_rng.pt"
        for rank in plan["ranks"]
    ]


def reads_rank_files(save):
    """A transformers model's hf export merges its tensors from the rank files, without the universal output."""
    return indexed_layout(save).hf_config_folder is not None


def hf_rank_maps(save):
    return save_maps(save) if reads_rank_files(save) else []


def hf_plan_sources(wildcards):
    save = save_of(wildcards)
    if reads_rank_files(save):
        return {"model_states": indexed_layout(save).layout.model_files}
    return {
        "universal": universal_files(save),
        "model_state": universal_model_state(wildcards),
    }


def hf_shard_sources(wildcards):
    save = save_of(wildcards)
    plan = hf_plan(save)
    names = plan["shards"].get(wildcards.stem, [])
    if plan.get("source") == "transformers":
        return {
            **index_of(save)._asdict(),
            "maps": save_maps(save),
            "model_states": indexed_layout(save).layout.model_files,
        }
    params = (plan["tensors"][name].get("param") for name in names)
    return {"weights": universal_weights(save, (param for param in params if param))}


def hf_files(wildcards):
    save = save_of(wildcards)
    plan = hf_plan(save)
    shards = [f"{save.hf}/{stem}.safetensors" for stem in plan["shards"]]
    index = [f"{save.hf}/model.safetensors.index.json"] if plan["index"] else []
    return shards + index


def hf_shard_mem_mb(wildcards):
    return shard_memory_mb(hf_plan(save_of(wildcards)), wildcards.stem)


def hf_shard_runtime(wildcards):
    return shard_runtime_minutes(hf_plan(save_of(wildcards)), wildcards.stem)


def hf_targets(wildcards):
    """Every save's finished transformers model, and the extraction maps of a transformers model, so that its
    extractions run beside its plan (for a run's saves, those already indexed: one index raising here would
    hold back the others)."""
    files = [f"{save.hf}/config.json" for save in SAVES]
    for save in SAVES:
        if len(SAVES) == 1 or is_indexed(save):
            files += hf_rank_maps(save)
    return refuse_unconvertible(wildcards) + files
