"""The index stage: checking the output folder, indexing the input, and the report tables of the index."""

import json
import shutil
from pathlib import Path

from ..errors import CheckpointError
from ..extract import KIND_MODEL, KIND_ZERO3, KIND_ZERO12
from ..fileio import atomic_writer, write_text
from ..markers import retract_latest_universal
from ..signature import is_signature
from .common import (
    MODEL_STATES_SUFFIX,
    STAGING,
    ZERO,
    load_layout,
    load_universal_info,
    source_name,
)


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
    from ..index import build_index, layout_record
    from ..plan import assign_buckets, bucket_sources
    from ..untrusted import refuse_untrusted_folder

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
    record["hf_config_folder"] = hf_config_folder(layout, model_config)
    from .. import ptfile

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
    from ..index import layout_from_record, read_index_table
    from ..inspect import conversion_tables, plot_parameter_bytes, write_inspection

    info = load_universal_info(info_path)
    layout = layout_from_record(load_layout(layout_path), info)
    summary, tables = conversion_tables(layout, info, read_index_table(fragments_path), read_index_table(params_path))
    write_inspection(summary, tables, Path(summary_path).parent)
    plot_parameter_bytes(tables["parameters"], plot_path)


def hf_config_folder(layout, model_config):
    """The transformers config the `hf` export of this checkpoint uses (str), or None (a Megatron model's)."""
    from ..hfconfig import export_config_folder

    folder = export_config_folder(layout.folder, model_config, layout.megatron_model)
    return None if folder is None else str(folder)


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
