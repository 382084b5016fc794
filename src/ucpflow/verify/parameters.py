"""Per parameter and state: the universal file's keys, metadata, dtype, shape and position checksum,
against what the source fragments and the index imply (`placement.geometry`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import dsconst as C
from .. import ptfile
from ..errors import CheckpointError
from ..source.patterns import AFFINE, AVERAGE, REPLICATED, classify
from ..tables import FORMAT_EXPERT, FORMAT_MODULE, OPTIMIZER_STATES, STEP, ZERO, Fragment, Parameter
from .digest import CHUNK, Checksum, position_sum, run_sum, structure_text, tensor_checksum
from .placement import DROPPED, Geometry, expert_geometry, geometry
from .report import (
    MISMATCH,
    MISSING,
    NOT_CHECKED,
    OK,
    TP_RANKS_DIFFER,
    UNEXPECTED,
    UNREADABLE,
    WRONG_METADATA,
    WRONG_SHAPE,  # fmt: skip
    row,
)

if TYPE_CHECKING:
    from ..stages.extract import FragmentReader


class Universal:
    """Reads the state files of the universal checkpoint folder."""

    def __init__(self, folder):
        self.folder = folder

    def load(self, param: str, state: str) -> Any:
        """The file's structure, or the status word saying why there is none."""
        path = os.path.join(self.folder, ZERO, param, f"{state}.pt")
        if not os.path.isfile(path):
            return MISSING
        try:
            return ptfile.load(path)
        except (CheckpointError, ValueError):
            return UNREADABLE


def content_text(keys: Iterable[str] | None, dtype: str, shape: Sequence[int], checksum: Checksum) -> str:
    """One report cell: `{cat_dim=0, param} float32(64, 16) 1024:9f3a…` (no braces for a bare tensor)."""
    tensor = f"{dtype}{tuple(shape)} {checksum}"
    return tensor if keys is None else "{" + ", ".join(keys) + "} " + tensor


def actual_content(structure: object) -> tuple[tuple[str, ...] | None, str, Sequence[int], Checksum] | None:
    """(keys, dtype, shape, checksum) of a universal state file, or None when it holds no tensor."""
    keys, tensor = None, structure
    if isinstance(structure, dict):
        keys = tuple(k if k == C.PARAM else f"{k}={structure_text(v)}" for k, v in structure.items())
        tensor = structure.get(C.PARAM)
    if not isinstance(tensor, ptfile.TensorRef):
        return None
    return keys, tensor.dtype, tensor.shape, tensor_checksum(tensor)


def compare(param: str, state: str, expected: tuple[tuple[str, ...] | None, str, Sequence[int], Checksum], structure: object,
            status: str = OK) -> dict[str, str]:
    """The report row of one state file: `expected` is (keys, dtype, shape, checksum)."""
    expected_text = content_text(*expected)
    if structure in (MISSING, UNREADABLE):
        return row(param, state, expected_text, structure, structure)
    actual = actual_content(structure)
    if actual is None:
        return row(param, state, expected_text, f"no tensor: {type(structure).__name__}", WRONG_METADATA)
    actual_text = content_text(*actual)
    if actual[0] != expected[0]:
        return row(param, state, expected_text, actual_text, WRONG_METADATA)
    if tuple(actual[1:3]) != (expected[1], tuple(expected[2])):
        return row(param, state, expected_text, actual_text, WRONG_SHAPE)
    if status != OK:
        return row(param, state, expected_text, actual_text, status)
    return row(param, state, expected_text, actual_text, OK if actual[3] == expected[3] else MISMATCH)


class SourceSlices:
    """One state of one parameter in the source: per tensor-parallel rank, its fragments in dp order,
    read as one flat slice in chunks."""

    def __init__(self, reader, fragments):
        self.reader = reader
        self.by_tp = {}
        for fragment in sorted(fragments, key=lambda f: (f.tp, f.dp)):
            self.by_tp.setdefault(fragment.tp, []).append(fragment)

    def dtype(self) -> str:
        first = next(iter(self.by_tp.values()))[0]
        return self.reader.locate(first.file, first.tensor)[0]

    def numel(self, tp: int) -> int:
        return sum(f.numel for f in self.by_tp.get(tp, []))

    def chunks(self, tp: int) -> Iterator[tuple[int, np.ndarray]]:
        """(local start, elements) of tp rank `tp`'s slice, in order, at most CHUNK at a time."""
        position = 0
        for f in self.by_tp.get(tp, []):
            for start in range(0, f.numel, CHUNK):
                count = min(CHUNK, f.numel - start)
                yield position + start, self.reader.read(f.file, f.tensor, f.offset + start, count)[0]
            position += f.numel

    def read(self, tp: int, start: int, count: int) -> np.ndarray:
        """Elements [start, start + count) of tp rank `tp`'s slice."""
        pieces, position = [], 0
        for f in self.by_tp.get(tp, []):
            lo, hi = max(start, position), min(start + count, position + f.numel)
            if lo < hi:
                pieces.append(self.reader.read(f.file, f.tensor, f.offset + lo - position, hi - lo)[0])
            position += f.numel
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=ptfile.numpy_dtype(self.dtype()))


def placed_checksum(shape_geometry: Geometry, tp: int, start: int, data: np.ndarray) -> Checksum:
    """The Checksum of elements `data` of tp rank `tp`'s slice, from local element `start` on, each at its
    universal position (elements the merge leaves out are skipped)."""
    runs = shape_geometry.runs[tp]
    positions, run = runs.positions(start, data.size)
    if runs.scaled:
        data = data / runs.scales[run].astype(np.float32)  # torch divides float32 by the factor as float32
    keep = positions != DROPPED
    if shape_geometry.limit is not None:
        keep &= positions < shape_geometry.limit
    return position_sum(positions[keep], data[keep])


def expected_checksum(slices: SourceSlices, shape_geometry: Geometry, tp_degree: int, state: str) -> tuple[Checksum, str]:
    """(Checksum of the source elements at their universal positions, status): status is
    TP_RANKS_DIFFER or NOT_CHECKED when the checksum alone cannot tell."""
    kind, dtype = shape_geometry.kind, slices.dtype()
    if kind == AFFINE and any(r.scaled for r in shape_geometry.runs.values()) and dtype != "float32":
        return Checksum(), NOT_CHECKED
    if kind in (REPLICATED, AVERAGE):
        count = slices.numel(0)
        if any(slices.numel(tp) != count for tp in range(tp_degree)):
            return Checksum(), TP_RANKS_DIFFER
        total = Checksum()
        for start in range(0, count, CHUNK):
            size = min(CHUNK, count - start)
            first = slices.read(0, start, size)
            if kind == REPLICATED:
                if any(not np.array_equal(slices.read(tp, start, size), first) for tp in range(1, tp_degree)):
                    return Checksum(), TP_RANKS_DIFFER
                merged = first
            else:
                merged = 0
                for tp in range(tp_degree):
                    merged = merged + slices.read(tp, start, size)
                merged = merged / tp_degree
            total = total + placed_checksum(shape_geometry, 0, start, merged)
        return total, OK
    total = Checksum()
    for tp, runs in sorted(shape_geometry.runs.items()):
        for start, data in slices.chunks(tp):
            total = total + placed_checksum(shape_geometry, tp, start, data)
    return total, OK


def _value_text(value):
    if isinstance(value, ptfile.TensorRef):
        value = ptfile.ArrayTensor(value.read_array(), value.dtype)
    if isinstance(value, ptfile.ArrayTensor):
        return f"{value.dtype}:{value.array.reshape(-1).tolist()}"
    return f"{type(value).__name__}:{value!r}"


def _module_checksum(reader, source, tensor):
    numel = reader.locate(source, tensor)[2]
    total = Checksum()
    for start in range(0, numel, CHUNK):
        data, dtype = reader.read(source, tensor, start, min(CHUNK, numel - start))
        as_float = ptfile.bfloat16_bits_to_float32(data) if dtype == "bfloat16" else data.astype(np.float32)
        total = total + run_sum(start, as_float)
    return total


def verify_parameter(reader: FragmentReader, universal: Universal, param_row: Parameter, fragments: Iterable[Fragment],
                     info: Mapping[str, Any], tp_degree: int) -> list[dict[str, str]]:
    """Report rows for every state file of one parameter, and for files its folder should not hold."""
    param = param_row.param
    expected_files = set(param_row.files)
    folder = os.path.join(universal.folder, ZERO, param)
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    rows = [row(param, name, "", "present", UNEXPECTED) for name in present if name not in expected_files]
    rule = classify(info, param) if param_row.merge else None

    if param_row.format == FORMAT_MODULE:
        shape_geometry = geometry(param_row, rule, info, tp_degree, "fp32")
        checksum = _module_checksum(reader, param_row.source, param_row.tensor)
        expected = (shape_geometry.keys, "float32", shape_geometry.shape, checksum)
        rows.append(compare(param, "fp32", expected, universal.load(param, "fp32")))
        return rows

    by_state = {}
    for fragment in fragments:
        by_state.setdefault(fragment.state, []).append(fragment)
    if STEP in by_state:
        first = min(by_state[STEP], key=lambda f: (f.tp, f.dp))
        expected = _value_text(reader.value(first.file, first.tensor))
        structure = universal.load(param, STEP)
        actual = structure if structure in (MISSING, UNREADABLE) else _value_text(structure)
        status = actual if actual in (MISSING, UNREADABLE) else (OK if actual == expected else MISMATCH)
        rows.append(row(param, STEP, expected, actual, status))
    for state in OPTIMIZER_STATES:
        if state not in by_state:
            continue
        slices = SourceSlices(reader, by_state[state])
        if param_row.format == FORMAT_EXPERT:
            shape_geometry = expert_geometry(param_row, by_state[state])
        else:
            shape_geometry = geometry(param_row, rule, info, tp_degree, state)
        checksum, status = expected_checksum(slices, shape_geometry, tp_degree, state)
        expected = (shape_geometry.keys, slices.dtype(), shape_geometry.shape, checksum)
        rows.append(compare(param, state, expected, universal.load(param, state), status))
    return rows
