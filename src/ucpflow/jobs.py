"""What each workflow rule does, as plain functions of paths and parameters (the scripts in scripts/
only unpack `snakemake` and call these), so every step can be tested and reused without Snakemake."""

import collections
import csv
import json
import os
import shutil
from pathlib import Path

from . import dsconst as C
from .errors import CheckpointError
from .extract import KIND_MODEL, KIND_ZERO3, KIND_ZERO12
from .fileio import atomic_directory, atomic_writer, copy_file, remove_leftovers, write_text
from .markers import retract_latest_universal
from .signature import is_signature

STAGING = "tmp"
ZERO = "zero"
OPTIMIZER_STATE_FILE = "optimizer_state.pt"
MODEL_STATES_SUFFIX = "model_states.pt"


def source_name(path):
    """The extraction target name of a source file: its file name without `.pt`."""
    return Path(path).name[: -len(".pt")]


def check_output_folder(output_folder):
    """Refuse an output folder that holds anything a universal checkpoint would not (an earlier
    conversion's files are fine: finalize removes those that the current input does not make)."""
    folder = Path(output_folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise CheckpointError(f"Output folder {folder} exists and is a file.")
    for entry in sorted(folder.iterdir()):
        universal = entry.name in {ZERO, STAGING} or entry.name.endswith(MODEL_STATES_SUFFIX)
        if not universal and not entry.name.startswith("."):
            raise CheckpointError(
                f"Output folder {folder} already holds {entry.name}, which is not part of a universal checkpoint "
                "of this input; choose an empty or new output folder."
            )


def index_job(input_folder, output_folder, outputs, *, strict, inject_missing_state, job_bytes, min_jobs,
              model_config=None):
    from .index import build_index, layout_record
    from .plan import assign_buckets, bucket_sources
    from .untrusted import refuse_untrusted_folder

    retract_latest_universal(output_folder)
    remove_other_derivations(Path(outputs["layout"]).parent.parent)
    refuse_untrusted_folder(input_folder)
    layout, info, fragments, params = build_index(input_folder, strict=strict, inject_missing_state=inject_missing_state,
                                                  model_config=model_config)
    check_output_folder(output_folder)
    params = assign_buckets(params, job_bytes=job_bytes, min_jobs=min_jobs)
    record = layout_record(layout, outputs["info"])
    record["output_folder"] = str(output_folder)
    record["optimizer_state_source"] = optimizer_state_source(layout)
    record["sources"] = source_kinds(layout, params)
    record["bucket_sources"] = {b: [source_name(p) for p in files] for b, files in bucket_sources(fragments, params).items()}
    from . import ptfile

    ptfile.save(info, outputs["info"])  # read back through the restricted loader, like every input
    with atomic_writer(outputs["fragments"]) as handle:
        fragments.to_csv(handle, sep="\t", index=False)
    with atomic_writer(outputs["params"]) as handle:
        params.to_csv(handle, sep="\t", index=False)
    write_text(outputs["layout"], json.dumps(record, indent=1))
    return layout, params


def remove_other_derivations(derived):
    """Index tables and maps of other inputs (named by their signatures) beside `derived`: once this input is
    indexed they are stale, and a later return to that input must index it afresh."""
    derived = Path(derived)
    for entry in derived.parent.iterdir():
        if entry != derived and entry.is_dir() and is_signature(entry.name):
            shutil.rmtree(entry, ignore_errors=True)


def report_tables_job(layout_path, info_path, fragments_path, params_path, summary_path, plot_path):
    """The inspect tables and the bytes-per-parameter plot of the indexed checkpoint, for `snakemake --report`."""
    from .index import layout_from_record, read_index_table
    from .inspect import conversion_tables, plot_parameter_bytes, write_inspection

    info = load_universal_info(info_path)
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


class BucketMerger:
    """What the merges of one bucket read: its index rows, fragments and the extraction maps."""

    def __init__(self, bucket, layout_path, fragments_path, params_path, info_path, map_paths):
        from .extract import read_extraction
        from .merge import FragmentReader

        self.layout = load_layout(layout_path)
        self.info = load_universal_info(info_path)
        self.rows = [row for row in read_table(params_path) if row["bucket"] == bucket]
        names = {row["param"] for row in self.rows}
        self.fragments = {}
        for fragment in read_fragments(fragments_path):
            if fragment.param in names:
                self.fragments.setdefault(fragment.param, []).append(fragment)
        maps = {self.layout["sources"][source_name_of(p)]["path"]: read_extraction(p) for p in map_paths}
        self.reader = FragmentReader(maps)

    def merge(self, row, folder):
        from .merge import merge_parameter
        from .patterns import classify

        rule = classify(self.info, row["param"]) if row["merge"] else None
        merge_parameter(
            self.reader, row, self.fragments.get(row["param"], []), rule, self.info, self.layout["tp_degree"], folder
        )

    def merge_one(self, name, folder):
        rows = [row for row in self.rows if row["param"] == name]
        if not rows:
            raise CheckpointError(f"{name} is not a parameter of its merge job's index rows.")
        self.merge(rows[0], folder)

    def close(self):
        self.reader.close()


def load_universal_info(path):
    """The index's universal_checkpoint_info, read through the restricted loader like every input."""
    from .ptfile import load

    return load(path)


def merge_job(bucket, layout_path, fragments_path, params_path, info_path, map_paths, staging, output_folder):
    """Merge one bucket's parameters into the folder `staging`/<param>/, which appears only once all are merged."""
    retract_latest_universal(output_folder)
    remove_partial_folders(staging)
    merger = BucketMerger(bucket, layout_path, fragments_path, params_path, info_path, map_paths)
    try:
        with atomic_directory(staging) as folder:
            for row in merger.rows:
                merger.merge(row, os.path.join(folder, row["param"]))
    finally:
        merger.close()
    return merger.rows


def publish_job(name, staged_bucket, output_folder, files, merge_inputs):
    """Put one parameter's folder (holding `files`) into OUT/zero/, from its bucket's staging (or merged again)."""
    from .publish import publish_parameter

    def merge_again(folder):
        merger = BucketMerger(*merge_inputs)
        try:
            merger.merge_one(name, folder)
        finally:
            merger.close()

    publish_parameter(staged_bucket, output_folder, name, files, merge_again)


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
    retract_latest_universal(layout["output_folder"])
    remove_leftovers(output)
    ptfile.save(state, output)


def copy_model_state_job(source, output, output_folder):
    """A model-state file as ds_to_universal writes it: copied, or for AutoEP rewritten with its expert patterns
    (either way read first through the restricted loader, so a file naming a disallowed global is refused)."""
    from . import ptfile
    from .autoep import universal_model_state

    retract_latest_universal(output_folder)
    structure = universal_model_state(source)
    if structure is None:
        copy_file(source, output)
    else:
        remove_leftovers(output)
        ptfile.save(structure, output)


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
