# Paths and input functions of the export rules (rules/export.smk).

from ucpflow.export.hf_common import shard_memory_mb, shard_runtime_minutes

EXPORT = f"{DERIVED}/export"
MEGATRON_FOLDER = SETTINGS.megatron_folder
HF_FOLDER = SETTINGS.hf_folder


def universal_model_state(wildcards):
    """The copied model-states file that holds Megatron's args, iteration and checkpoint version."""
    return f"{OUT}/{os.path.basename(indexed_layout().layout.copy_files[0])}"


def megatron_plan():
    return _read_index_file(
        checkpoints.export_megatron_plan.get().output[0], _read_json
    )


def hf_plan():
    return _read_index_file(checkpoints.export_hf_plan.get().output[0], _read_json)


def universal_weights(params):
    return [f"{OUT}/{ZERO}/{param}/{FP32_FILE}" for param in dict.fromkeys(params)]


def megatron_shard_weights(wildcards):
    # A rank of an outdated plan asks for nothing: the DAG drops it once the plan is rewritten.
    plan = megatron_plan()
    if wildcards.rank not in plan["ranks"]:
        return []
    stage = plan["ranks"][wildcards.rank][1]
    return universal_weights(entry["param"] for entry in plan["stages"][stage])


def megatron_shards(wildcards):
    plan = megatron_plan()
    return [
        f"{MEGATRON_FOLDER}/{plan['iteration_folder']}/{rank}/model_optim_rng.pt"
        for rank in plan["ranks"]
    ]


def reads_rank_files():
    """A transformers model's hf export merges its tensors from the rank files, without the universal output."""
    return indexed_layout().hf_config_folder is not None


def hf_rank_maps(wildcards):
    return all_extraction_maps(wildcards) if reads_rank_files() else []


def hf_plan_sources(wildcards):
    if reads_rank_files():
        return {"model_states": indexed_layout().layout.model_files}
    return {
        "universal": universal_outputs(wildcards),
        "model_state": universal_model_state(wildcards),
    }


def hf_shard_sources(wildcards):
    plan = hf_plan()
    names = plan["shards"].get(wildcards.stem, [])
    if plan.get("source") == "transformers":
        return {
            **rules.index.output,
            "maps": all_extraction_maps(wildcards),
            "model_states": indexed_layout().layout.model_files,
        }
    params = (plan["tensors"][name].get("param") for name in names)
    return {"weights": universal_weights(param for param in params if param)}


def hf_files(wildcards):
    plan = hf_plan()
    shards = [f"{HF_FOLDER}/{stem}.safetensors" for stem in plan["shards"]]
    index = [rules.export_hf_index.output[0]] if plan["index"] else []
    return shards + index


def hf_shard_mem_mb(wildcards):
    return shard_memory_mb(hf_plan(), wildcards.stem)


def hf_shard_runtime(wildcards):
    return shard_runtime_minutes(hf_plan(), wildcards.stem)
