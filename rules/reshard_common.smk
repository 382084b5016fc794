# Paths, checks and input functions of the reshard rules (rules/reshard.smk).

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
