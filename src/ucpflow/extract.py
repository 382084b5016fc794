"""Per-file extraction maps: where each flat tensor a merge needs lies inside one checkpoint file.

Merge jobs read fragment bytes straight from the rank files (no temp copy of the optimizer state),
so extraction writes, per source file, one row per flat tensor: its dtype, absolute byte offset and
element count (or the plain value of a non-tensor Adam `step`). Reading the file's structure here
also checks that every storage record the merges will read is present and complete.
"""

import csv
import json

from . import dsconst as C
from .errors import CheckpointError
from .ptfile import TensorRef, load

KIND_ZERO12 = "zero12"
KIND_ZERO3 = "zero3"
KIND_MODEL = "model"

COLUMNS = ["tensor", "dtype", "byte_offset", "numel", "value"]


def _flat_tensors_zero12(optim):
    groups = optim[C.BASE_OPTIMIZER_STATE]["state"]
    fp32_groups = optim[C.SINGLE_PARTITION_OF_FP32_GROUPS]
    for group in range(len(groups)):
        yield f"fp32/{group}", fp32_groups[group]
        for state, value in groups[group].items():
            yield f"{state}/{group}", value


def _flat_tensors_zero3(optim):
    groups = optim[C.OPTIMIZER_STATE_DICT]["state"]
    for group, tensor in enumerate(optim[C.FP32_FLAT_GROUPS]):
        yield f"fp32/{group}", tensor
        for state, value in groups.get(group, {}).items():
            yield f"{state}/{group}", value


def flat_tensors(path, kind):
    structure = load(path)
    if kind == KIND_MODEL:
        return list((f"module/{name}", t) for name, t in (structure.get("module") or {}).items())
    optim = structure.get(C.OPTIMIZER_STATE_DICT) if isinstance(structure, dict) else None
    if not isinstance(optim, dict):
        raise CheckpointError(f"{path} has no `{C.OPTIMIZER_STATE_DICT}`: it is not a DeepSpeed optimizer-state file.")
    try:
        return list(_flat_tensors_zero3(optim) if kind == KIND_ZERO3 else _flat_tensors_zero12(optim))
    except (KeyError, TypeError, IndexError) as missing:
        raise CheckpointError(f"{path} lacks the optimizer key {missing} that its index entry needs.")


def extraction_rows(path, kind):
    rows = []
    for key, value in flat_tensors(path, kind):
        if isinstance(value, TensorRef):
            if not value.is_contiguous:
                raise CheckpointError(f"{path}: tensor {key} is not contiguous, which ucpflow cannot slice in place.")
            rows.append([key, value.dtype, value.byte_offset, value.numel, ""])
        elif isinstance(value, (int, float, bool)):
            rows.append([key, "", "", "", json.dumps(value)])
    return rows


def write_extraction(path, kind, output):
    from .fileio import atomic_writer

    with atomic_writer(output) as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows(extraction_rows(path, kind))


def read_extraction(table_path):
    """{tensor key: (dtype, byte_offset, numel, value)} from an extraction table."""
    located = {}
    with open(table_path, newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            if row["dtype"]:
                located[row["tensor"]] = (row["dtype"], int(row["byte_offset"]), int(row["numel"]), None)
            else:
                located[row["tensor"]] = (None, None, None, json.loads(row["value"]))
    return located
