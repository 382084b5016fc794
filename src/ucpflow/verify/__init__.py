"""`snakemake verify`: check a universal checkpoint against its source, without torch or DeepSpeed.

For users who cannot run DeepSpeed's converter beside ucpflow, the checks account for every element of
every rank's optimizer partitions, at its position:

- partitions (`partitions`): the index's fragments cover every rank file's flat optimizer tensors
  exactly once, apart from DeepSpeed's padding and pipeline stages' copies of tied parameters.
- parameters (`parameters`): per parameter and state, the universal file's keys and metadata
  (`cat_dim`, `param_n_sub_params`, `sub_param_shape`, `vocab_tensor`), dtype and shape equal what the
  index implies (`placement`), and a position-dependent checksum (`digest`) of the source elements,
  each placed where the merge rule puts it, equals that of the universal tensor. Replicated
  parameters are tp rank 0's slice (the other ranks must be equal), averaged ones the recomputed mean;
  steps are compared by value, model-weight fallbacks with the float32 conversion of the module tensor.
- files (`files`): copied model-states files byte for byte, zero/optimizer_state.pt entry by entry,
  latest_universal, and no file beside them.
"""

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ..errors import UcpflowError
from ..fileio import write_text
from ..stages.extract import FragmentReader
from ..tables import (
    IndexFiles,
    read_extraction,
    read_fragments,
    read_index_record,
    read_parameters,
    read_universal_info,
)
from .files import verify_files
from .parameters import Universal, verify_parameter
from .partitions import check_partitions
from .report import PARTITION_COLUMNS, PASSING, REPORT_COLUMNS, failure, summary, write_tsv

__all__ = ["verify", "verify_job", "summary", "failure"]


def _verify_bucket(task):
    """Worker: verify the parameters of one bucket (a process of its own when several run at once)."""
    map_paths, output_folder, info_path, tp_degree, rows, fragments = task
    info = read_universal_info(info_path)
    reader = FragmentReader({source: read_extraction(path) for source, path in map_paths.items()})
    universal = Universal(str(output_folder))
    by_param = {}
    for fragment in fragments:
        by_param.setdefault(fragment.param, []).append(fragment)
    try:
        report = []
        for row in rows:
            report += verify_parameter(reader, universal, row, by_param.get(row.param, []), info, tp_degree)
        return report
    finally:
        reader.close()


def verify(index: IndexFiles, map_paths: list[str], output_folder: str, latest_path: str | None,
           workers: int = 1) -> tuple[list[dict], list[dict], int]:
    """(report rows, partition rows, number of parameters): the universal checkpoint checked against its source."""
    record = read_index_record(index.layout)
    params = read_parameters(index.params)
    fragments = list(read_fragments(index.fragments))
    sources = {Path(path).name[: -len(".tsv")]: path for path in map_paths}
    source_maps = {record.source_path(name): path for name, path in sources.items()}
    maps = {source: read_extraction(path) for source, path in source_maps.items()}
    partitions = check_partitions(record, fragments, params, maps)

    by_bucket = {}
    for row in params:
        by_bucket.setdefault(row.bucket, []).append(row)
    bucket_of = {row.param: row.bucket for row in params}
    fragments_by_bucket = {}
    for fragment in fragments:
        if fragment.param in bucket_of:
            fragments_by_bucket.setdefault(bucket_of[fragment.param], []).append(fragment)
    tasks = [
        (source_maps, output_folder, index.info, record.layout.tp_degree, rows, fragments_by_bucket.get(bucket, []))
        for bucket, rows in sorted(by_bucket.items())
    ]
    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            results = list(pool.map(_verify_bucket, tasks))
    else:
        results = [_verify_bucket(task) for task in tasks]
    report = [row for rows in results for row in rows]
    report += verify_files(record, output_folder, latest_path, set(bucket_of))
    return report, partitions, len(params)


def verify_job(index: IndexFiles, map_paths: list[str], output_folder: str, latest_path: str | None, outputs: dict,
               log_path: str, workers: int) -> str:
    """Rule `verify`: write the report and summary; fail with one sentence when anything is off."""
    report, partitions, parameter_count = verify(index, map_paths, output_folder, latest_path, workers=workers)
    line = summary(report, partitions, parameter_count)
    print(line)
    error = failure(report, partitions, log_path)
    if error:
        for row in report:
            if row["status"] not in PASSING:
                print("\t".join(str(row[c]) for c in REPORT_COLUMNS))
        for row in partitions:
            if row["problem"]:
                print(f"{row['file']}\t{row['tensor']}\t{row['problem']}")
        raise UcpflowError(error)
    write_tsv(outputs["partitions"], PARTITION_COLUMNS, partitions)
    write_tsv(outputs["report"], REPORT_COLUMNS, report)
    write_text(outputs["summary"], line + "\n")
    return line
