# Paths, checks and input functions of the reshard rules (rules/reshard.smk).

RESHARD_FOLDER = SETTINGS.reshard_folder
RESHARD_WORK = f"{DERIVED}/reshard"


def reshard_plan():
    return _read_index_file(checkpoints.reshard_plan.get().output[0], _read_json)


def reshard_model_states(wildcards):
    return indexed_layout().layout.model_files


def reshard_maps(wildcards):
    """The extraction maps of the source's rank files, through which rank-file jobs read them."""
    sources = indexed_layout().sources
    return [
        f"{DERIVED}/extract/{name}.tsv"
        for name, source in sources.items()
        if source.kind != KIND_MODEL
    ]


def reshard_files(wildcards):
    plan = reshard_plan()
    names = list(plan["model_files"]) + list(plan["optim_files"])
    return [f"{RESHARD_FOLDER}/{plan['tag']}/{name}" for name in names]


def reshard_repair_request(wildcards):
    """A reshard folder whose `latest` exists but that lost a planned file asks for a new, never-seen request
    file, so that its finalize reruns and the lost file is written again (Snakemake reruns no job for a
    missing file whose consumers are up to date)."""
    latest = f"{RESHARD_FOLDER}/latest"
    if not os.path.exists(latest):
        return []
    if all(os.path.exists(path) for path in reshard_files(wildcards)):
        return []
    return [f"{RESHARD_WORK}/repair/{os.stat(latest).st_mtime_ns}"]


def reshard_runtime(wildcards):
    """Minutes for one rank's file: its share of the parameters' states at a pessimistic 50 MB/s, plus start-up."""
    sizes = _read_index_file(index_output().params, _read_bucket_sizes)
    total = sum(size["bytes"] for size in sizes.values())
    return job_runtime_minutes(total / reshard_plan()["target"]["dp"])
