"""What each workflow rule does, as plain functions of paths and parameters (the scripts in scripts/
only unpack `snakemake` and call these), so every step can be tested and reused without Snakemake."""

import collections
import csv
import json
import os
import pickle
import shutil
from pathlib import Path

from . import dsconst as C
from .errors import CheckpointError
from .extract import KIND_MODEL, KIND_ZERO3, KIND_ZERO12
from .fileio import atomic_directory, atomic_writer, copy_file, remove_leftovers, write_text

STAGING = "tmp"
ZERO = "zero"
OPTIMIZER_STATE_FILE = "optimizer_state.pt"
LATEST_UNIVERSAL = "latest_universal"


def source_name(path):
    """The extraction target name of a source file: its file name without `.pt`."""
    return Path(path).name[: -len(".pt")]


def latest_universal_path(output_folder):
    return os.path.join(os.path.dirname(os.path.normpath(output_folder)), LATEST_UNIVERSAL)


def check_output_folder(output_folder, copy_names):
    """Refuse an output folder that holds anything a conversion would not write there."""
    folder = Path(output_folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise CheckpointError(f"Output folder {folder} exists and is a file.")
    allowed = {ZERO, STAGING} | set(copy_names)
    for entry in sorted(folder.iterdir()):
        if entry.name not in allowed and not entry.name.startswith("."):
            raise CheckpointError(
                f"Output folder {folder} already holds {entry.name}, which is not part of a universal checkpoint "
                "of this input; choose an empty or new output folder."
            )


def index_job(input_folder, output_folder, outputs, *, strict, inject_missing_state, job_bytes, min_jobs):
    from .index import build_index, layout_record
    from .plan import assign_buckets, bucket_sources

    layout, info, fragments, params = build_index(input_folder, strict=strict, inject_missing_state=inject_missing_state)
    check_output_folder(output_folder, [Path(p).name for p in layout.copy_files])
    params = assign_buckets(params, job_bytes=job_bytes, min_jobs=min_jobs)
    record = layout_record(layout, outputs["info"])
    record["output_folder"] = str(output_folder)
    record["optimizer_state_source"] = optimizer_state_source(layout)
    record["sources"] = source_kinds(layout, params)
    record["bucket_sources"] = {b: [source_name(p) for p in files] for b, files in bucket_sources(fragments, params).items()}
    with atomic_writer(outputs["info"], "wb") as handle:
        pickle.dump(info, handle)
    with atomic_writer(outputs["fragments"]) as handle:
        fragments.to_csv(handle, sep="\t", index=False)
    with atomic_writer(outputs["params"]) as handle:
        params.to_csv(handle, sep="\t", index=False)
    write_text(outputs["layout"], json.dumps(record, indent=1))
    return layout, params


def report_tables_job(layout_path, info_path, fragments_path, params_path, summary_path, plot_path):
    """The inspect tables and the bytes-per-parameter plot of the indexed checkpoint, for `snakemake --report`."""
    from .index import layout_from_record, read_index_table
    from .inspect import conversion_tables, plot_parameter_bytes, write_inspection

    with open(info_path, "rb") as handle:
        info = pickle.load(handle)
    layout = layout_from_record(load_layout(layout_path), info)
    summary, tables = conversion_tables(layout, info, read_index_table(fragments_path), read_index_table(params_path))
    write_inspection(summary, tables, Path(summary_path).parent)
    plot_parameter_bytes(tables["parameters"], plot_path)


def optimizer_state_source(layout):
    if layout.zero_stage > 2:
        return layout.rank_files[0].path
    return layout.rank_file(0, 0, 0).path


def source_kinds(layout, params):
    """{extraction name: {path, kind}} for every file a merge reads."""
    kind = KIND_ZERO3 if layout.zero_stage > 2 else KIND_ZERO12
    sources = {source_name(r.path): {"path": r.path, "kind": kind} for r in layout.rank_files}
    for path in sorted(set(p for p in params["source"] if p)):
        sources[source_name(path)] = {"path": path, "kind": KIND_MODEL}
    return sources


def load_layout(path):
    with open(path) as handle:
        return json.load(handle)


def extract_job(source_path, kind, output):
    from .extract import write_extraction

    write_extraction(source_path, kind, output)


def merge_job(bucket, layout_path, fragments_path, params_path, info_path, map_paths, staging, output_folder, done,
              keep_staging=False):
    """Merge one bucket's parameters into `staging` (which appears only once all are merged), then move each
    parameter folder into OUT/zero/ with one rename, and write `done` listing them."""
    from .extract import read_extraction
    from .merge import FragmentReader, merge_parameter
    from .patterns import classify

    layout = load_layout(layout_path)
    with open(info_path, "rb") as handle:
        info = pickle.load(handle)
    params = [row for row in read_table(params_path) if row["bucket"] == bucket]
    names = {row["param"] for row in params}
    by_param = {}
    for fragment in read_fragments(fragments_path):
        if fragment.param in names:
            by_param.setdefault(fragment.param, []).append(fragment)
    maps = {layout["sources"][source_name_of(p)]["path"]: read_extraction(p) for p in map_paths}
    remove_partial_folders(staging)
    reader = FragmentReader(maps)
    try:
        with atomic_directory(staging) as folder:
            for row in params:
                rule = classify(info, row["param"]) if row["merge"] else None
                merge_parameter(
                    reader, row, by_param.get(row["param"], []), rule, info, layout["tp_degree"],
                    os.path.join(folder, row["param"]),
                )
    finally:
        reader.close()
    names = [row["param"] for row in params]
    publish_parameters(staging, Path(output_folder) / ZERO, names, keep_staging=keep_staging)
    write_text(done, "\n".join(names) + "\n")


def read_table(path):
    """Rows of a TSV index table as dicts of strings (merge jobs read them without importing pandas)."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


Fragment = collections.namedtuple("Fragment", "param state tp pp dp file tensor offset numel shape")


def read_fragments(path):
    with open(path, newline="") as handle:
        rows = csv.reader(handle, delimiter="\t")
        if next(rows) != list(Fragment._fields):
            raise CheckpointError(f"{path} is not a fragment table written by this version of ucpflow.")
        for param, state, tp, pp, dp, file, tensor, offset, numel, shape in rows:
            yield Fragment(param, state, int(tp), int(pp), int(dp), file, tensor, int(offset), int(numel), shape)


def remove_partial_folders(final):
    """Leftovers of an interrupted atomic_directory(final): `.<name>.*.partial` beside it."""
    final = Path(final)
    for leftover in final.parent.glob(f".{final.name}.*.partial"):
        shutil.rmtree(leftover, ignore_errors=True)


def publish_parameters(staging, zero_folder, names, keep_staging=False):
    """Move staging/<name>/ to zero_folder/<name>/, each in one rename; with `keep_staging`, publish
    hard-linked copies and leave the staging folder in place."""
    zero_folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        source, target = Path(staging) / name, zero_folder / name
        if keep_staging:
            linked = zero_folder / f".{name}.publishing"
            shutil.rmtree(linked, ignore_errors=True)
            shutil.copytree(source, linked, copy_function=os.link)
            source = linked
        if target.exists():
            shutil.rmtree(target)
        os.rename(source, target)
    if not keep_staging:
        shutil.rmtree(staging)


def source_name_of(map_path):
    return Path(map_path).name[: -len(".tsv")]


def optimizer_state_job(layout_path, output):
    """zero/optimizer_state.pt: the first rank's optimizer state without its sharded tensors (as DeepSpeed)."""
    from . import ptfile

    layout = load_layout(layout_path)
    source = layout["optimizer_state_source"]
    structure = ptfile.load(source)
    optim = structure[C.OPTIMIZER_STATE_DICT]
    if layout["zero_stage"] > 2:
        state = optim
        state[C.PARAM_GROUPS] = optim[C.OPTIMIZER_STATE_DICT][C.PARAM_GROUPS]
    else:
        sharded = {C.BASE_OPTIMIZER_STATE, C.PARAM_SLICE_MAPPINGS, C.SINGLE_PARTITION_OF_FP32_GROUPS}
        state = {k: v for k, v in optim.items() if k not in sharded}
        if state.get(C.GROUP_PADDINGS):
            state[C.GROUP_PADDINGS] = [0] * len(state[C.GROUP_PADDINGS])
        if state.get(C.PARTITION_COUNT):
            state[C.PARTITION_COUNT] = [layout["dp_degree"]] * len(state[C.PARTITION_COUNT])
        state[C.PARAM_GROUPS] = optim[C.BASE_OPTIMIZER_STATE][C.PARAM_GROUPS]
    remove_leftovers(output)
    ptfile.save(state, output)


def copy_model_state_job(source, output):
    """A model-state file as ds_to_universal writes it: copied, or for AutoEP rewritten with its expert patterns."""
    from .autoep import universal_model_state

    structure = universal_model_state(source)
    if structure is None:
        copy_file(source, output)
    else:
        from . import ptfile

        remove_leftovers(output)
        ptfile.save(structure, output)


def finalize_job(output_folder, latest_path, keep_temp_folder):
    """Write `latest_universal` last, once every other output exists; drop the staging folder."""
    staging = Path(output_folder) / STAGING
    if staging.is_dir() and not keep_temp_folder:
        shutil.rmtree(staging)
    write_text(latest_path, Path(os.path.normpath(output_folder)).name)


def demo_checkpoint_job(spec, latest_output):
    """Train the demo GPT with DeepSpeed and save it; the folder appears complete or not at all."""
    from .demo.launch import build_checkpoint

    options = dict(spec)
    folder, num_procs = options.pop("folder"), options.pop("num_procs")
    with atomic_directory(folder) as staging:
        tag_folder = build_checkpoint(staging, num_procs=num_procs, **options)
    print(f"demo checkpoint {Path(folder) / tag_folder.name} built with {num_procs} processes")
    if not Path(latest_output).is_file():
        raise CheckpointError(f"DeepSpeed did not write {latest_output}.")
