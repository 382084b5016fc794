# Paths, checks and input functions of the reshard rules (rules/reshard.smk).

RESHARD_FOLDER = os.path.join(SELECTION.root("reshard"), "{reshard}")
RESHARD_WORK = f"{DERIVED}/reshard"


def reshard_plan(save):
    plan = checkpoints.reshard_plan.get(derived=save.derived).output[0]
    return _read_index_file(plan, _read_json)


def reshard_model_states(wildcards):
    return indexed_layout(save_of(wildcards)).layout.model_files


def reshard_maps(wildcards):
    """The extraction maps of the source's rank files, through which rank-file jobs read them."""
    save = save_of(wildcards)
    sources = indexed_layout(save).sources
    ranks = [name for name, source in sources.items() if source.kind != KIND_MODEL]
    return extraction_maps(save, ranks)


def reshard_files(wildcards):
    save = save_of(wildcards)
    plan = reshard_plan(save)
    names = list(plan["model_files"]) + list(plan["optim_files"])
    return [f"{save.reshard}/{plan['tag']}/{name}" for name in names]


def reshard_repair_request(wildcards):
    """A reshard folder whose `latest` exists but that lost a planned file asks for a new, never-seen request
    file, so that its finalize reruns and the lost file is written again (Snakemake reruns no job for a
    missing file whose consumers are up to date)."""
    save = save_of(wildcards)
    latest = f"{save.reshard}/latest"
    if not os.path.exists(latest):
        return []
    if all(os.path.exists(path) for path in reshard_files(wildcards)):
        return []
    return [f"{derived_of(save)}/reshard/repair/{os.stat(latest).st_mtime_ns}"]


def reshard_runtime(wildcards):
    """Minutes for one rank's file: its share of the parameters' states at a pessimistic 50 MB/s, plus start-up."""
    total = sum(size["bytes"] for size in bucket_sizes(wildcards).values())
    return job_runtime_minutes(total / reshard_plan(save_of(wildcards))["target"]["dp"])
