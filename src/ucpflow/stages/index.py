"""The index stage: check the output folder, index the input (fragments, parameters, layout record) and pack
the parameters into merge jobs.

Every merge job is a fresh process that pays for its imports, so parameters are packed into a few
jobs of similar size (bytes of universal output). Parameters keep their checkpoint order, so a job
reads a contiguous stretch of each rank's flat optimizer tensors.
"""

import math
import shutil
from pathlib import Path

from .. import ptfile
from ..errors import CheckpointError
from ..markers import retract_latest_universal
from ..source.fragments import build_index
from ..source.hfconfig import export_config_folder
from ..source.signature import is_signature
from ..source.trust import refuse_untrusted_folder
from ..tables import (
    KIND_MODEL,
    KIND_ZERO3,
    KIND_ZERO12,
    MODEL_STATES_SUFFIX,
    STAGING,
    ZERO,
    Fragment,
    IndexFiles,
    IndexRecord,
    Layout,
    Parameter,
    Source,
    source_name,
    write_fragments,
    write_index_record,
    write_parameters,
)


def check_output_folder(output_folder: str) -> None:
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


def index_job(input_folder: str, output_folder: str, outputs: IndexFiles, *, strict: bool,
              inject_missing_state: bool, job_bytes: int, min_jobs: int,
              model_config: str | None = None) -> tuple[Layout, list[Parameter]]:
    retract_latest_universal(output_folder)
    remove_other_derivations(Path(outputs.layout).parent.parent)
    refuse_untrusted_folder(input_folder)
    layout, info, fragments, params = build_index(input_folder, strict=strict, inject_missing_state=inject_missing_state,
                                                  model_config=model_config)
    check_output_folder(output_folder)
    assign_buckets(params, job_bytes=job_bytes, min_jobs=min_jobs)
    record = IndexRecord(
        layout=layout,
        universal_info_file=str(outputs.info),
        output_folder=str(output_folder),
        optimizer_state_source=optimizer_state_source(layout),
        sources=source_kinds(layout, params),
        bucket_sources={b: [source_name(p) for p in files] for b, files in bucket_sources(fragments, params).items()},
        hf_config_folder=hf_config_folder(layout, model_config),
    )
    ptfile.save(info, outputs.info)  # read back through the restricted loader, like every input
    write_fragments(outputs.fragments, fragments)
    write_parameters(outputs.params, params)
    write_index_record(outputs.layout, record)
    return layout, params


def remove_other_derivations(derived: str) -> None:
    """Index tables and maps of other inputs (named by their signatures) beside `derived`: once this input is
    indexed they are stale, and a later return to that input must index it afresh."""
    derived = Path(derived)
    for entry in derived.parent.iterdir():
        if entry != derived and entry.is_dir() and is_signature(entry.name):
            shutil.rmtree(entry, ignore_errors=True)


def hf_config_folder(layout: Layout, model_config: str | None) -> str | None:
    """The transformers config the `hf` export of this checkpoint uses (str), or None (a Megatron model's)."""
    folder = export_config_folder(layout.folder, model_config, layout.megatron_model)
    return None if folder is None else str(folder)


def optimizer_state_source(layout: Layout) -> str:
    if layout.zero_stage > 2:
        return layout.rank_files[0].path
    return layout.rank_file(0, 0, 0).path


def source_kinds(layout: Layout, params: list[Parameter]) -> dict[str, Source]:
    """{extraction name: source} for every file a merge reads."""
    kind = KIND_ZERO3 if layout.zero_stage > 2 else KIND_ZERO12
    sources = {source_name(r.path): Source(r.path, kind) for r in layout.rank_files}
    for path in sorted(set(p.source for p in params if p.source)):
        sources[source_name(path)] = Source(path, KIND_MODEL)
    return sources


def bucket_name(index: int) -> str:
    return f"b{index:04d}"


def assign_buckets(params: list[Parameter], *, job_bytes: int, min_jobs: int) -> list[Parameter]:
    """Set each parameter's `bucket` (merge job): at least `min_jobs` jobs, none much above `job_bytes`."""
    sizes = [max(1, p.bytes) for p in params]
    total = sum(sizes)
    jobs = max(1, min(len(sizes), max(min_jobs, math.ceil(total / job_bytes))))
    target = total / jobs
    index, filled = 0, 0.0
    for position, (param, size) in enumerate(zip(params, sizes)):
        remaining_params = len(sizes) - position
        remaining_jobs = jobs - index
        if filled > 0 and (filled + size / 2 > target or remaining_params < remaining_jobs) and index < jobs - 1:
            index, filled = index + 1, 0.0
        param.bucket = bucket_name(index)
        filled += size
    return params


def bucket_sources(fragments: list[Fragment], params: list[Parameter]) -> dict[str, list[str]]:
    """{bucket: sorted source files its merge reads} (optimizer rank files and, for module weights, model files)."""
    bucket_of = {p.param: p.bucket for p in params}
    sources = {p.bucket: set() for p in params}
    for fragment in fragments:
        if fragment.param in bucket_of:
            sources[bucket_of[fragment.param]].add(fragment.file)
    for param in params:
        if param.source:
            sources[param.bucket].add(param.source)
    return {bucket: sorted(files) for bucket, files in sources.items()}
