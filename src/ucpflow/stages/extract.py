"""The extract stage: per-file extraction maps, where each flat tensor a merge needs lies inside one
checkpoint file, and `FragmentReader`, which reads fragments through them.

Merge jobs read fragment bytes straight from the rank files (no temp copy of the optimizer state),
so extraction writes, per source file, one row per flat tensor: its dtype, absolute byte offset and
element count (or the plain value of a non-tensor Adam `step`). Reading the file's structure here
also checks that every storage record the merges will read is present and complete.
"""

import mmap
import os
from typing import Any

import numpy as np

from .. import dsconst as C
from .. import ptfile
from ..errors import CheckpointError
from ..fileio import FileRange
from ..ptfile import ArrayTensor, TensorRef, load
from ..tables import KIND_MODEL, KIND_ZERO3, Located, write_extraction


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


def flat_tensors(path: str, kind: str) -> list[tuple[str, Any]]:
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


def extraction_rows(path: str, kind: str) -> list[tuple[str, Located]]:
    rows = []
    for key, value in flat_tensors(path, kind):
        if isinstance(value, TensorRef):
            if not value.is_contiguous:
                raise CheckpointError(f"{path}: tensor {key} is not contiguous, which ucpflow cannot slice in place.")
            rows.append((key, Located(value.dtype, value.byte_offset, value.numel, None)))
        elif isinstance(value, (int, float, bool)):
            rows.append((key, Located(None, None, None, value)))
    return rows


def extract_job(source_path: str, kind: str, output: str) -> None:
    """The map of one source file's tensors."""
    write_extraction(output, extraction_rows(source_path, kind))


class FragmentReader:
    """Reads element ranges of flat tensors located by the extraction maps.

    A fragment that is used whole is a read-only view of the memory-mapped rank file: its bytes go
    from the page cache to the output file with one copy, instead of being read into a new array
    and written from it. `release()` unmaps the pages touched so far, so that the resident memory
    of a merge stays at about one tensor.
    """

    def __init__(self, maps):
        self.maps = maps
        self._handles = {}
        self._mappings = {}
        self._touched = []

    def _fd(self, path):
        if path not in self._handles:
            self._handles[path] = os.open(path, os.O_RDONLY)
        return self._handles[path]

    def locate(self, path: str, key: str) -> Located:
        try:
            return self.maps[path][key]
        except KeyError:
            raise CheckpointError(f"{path} has no tensor {key} although the index lists fragments in it.")

    def read_into(self, target: np.ndarray, path: str, key: str, offset: int) -> None:
        dtype, base, numel, _ = self.locate(path, key)
        if offset + target.size > numel:
            raise CheckpointError(f"{path}: a fragment of {key} runs past the end of the tensor.")
        view = memoryview(target.reshape(-1).view(np.uint8))
        position = base + offset * target.itemsize
        while len(view):
            count = os.preadv(self._fd(path), [view], position)
            if count == 0:
                raise CheckpointError(f"{path} ends before the data of {key}: the file is truncated.")
            view, position = view[count:], position + count

    def _mapping(self, path):
        if path not in self._mappings:
            try:
                self._mappings[path] = mmap.mmap(self._fd(path), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # a file system without mmap: read instead
                self._mappings[path] = None
        return self._mappings[path]

    def view(self, path: str, key: str, offset: int, numel: int) -> tuple[np.ndarray, str]:
        """(read-only array, dtype) of elements [offset, offset + numel) of a tensor, without copying."""
        dtype, base, total, _ = self.locate(path, key)
        if offset + numel > total:
            raise CheckpointError(f"{path}: a fragment of {key} runs past the end of the tensor.")
        mapping = self._mapping(path)
        if mapping is None:
            return self.read(path, key, offset, numel)
        array_dtype = ptfile.numpy_dtype(dtype)
        start = base + offset * array_dtype.itemsize
        if start + numel * array_dtype.itemsize > len(mapping):
            raise CheckpointError(f"{path} ends before the data of {key}: the file is truncated.")
        self._touched.append((mapping, start, numel * array_dtype.itemsize))
        return np.frombuffer(mapping, dtype=array_dtype, count=numel, offset=start), dtype

    def byte_range(self, path: str, key: str, offset: int, numel: int) -> FileRange:
        """Where elements [offset, offset + numel) of a tensor lie in its file, checked against the file's size."""
        dtype, base, total, _ = self.locate(path, key)
        if offset + numel > total:
            raise CheckpointError(f"{path}: a fragment of {key} runs past the end of the tensor.")
        itemsize = ptfile.numpy_dtype(dtype).itemsize
        start, nbytes = base + offset * itemsize, numel * itemsize
        if start + nbytes > os.fstat(self._fd(path)).st_size:
            raise CheckpointError(f"{path} ends before the data of {key}: the file is truncated.")
        return FileRange(path, start, nbytes)

    def release(self) -> None:
        """Drop the mapped pages read so far from this process; they stay in the page cache."""
        for mapping, start, nbytes in self._touched:
            aligned = start - start % mmap.PAGESIZE
            mapping.madvise(mmap.MADV_DONTNEED, aligned, nbytes + start - aligned)
        self._touched.clear()

    def read(self, path: str, key: str, offset: int, numel: int) -> tuple[np.ndarray, str]:
        dtype = self.locate(path, key)[0]
        out = np.empty(numel, dtype=ptfile.numpy_dtype(dtype))
        self.read_into(out, path, key, offset)
        return out, dtype

    def value(self, path: str, key: str) -> Any:
        """A scalar state such as Adam's step: a 0-d ArrayTensor, or the plain Python value DeepSpeed stored."""
        dtype, _, _, plain = self.locate(path, key)
        if dtype is None:
            return plain
        data, dtype = self.read(path, key, 0, 1)
        return ArrayTensor(data.reshape(()), dtype)

    def close(self) -> None:
        # A mapping closes itself once no array views it any more.
        self.release()
        self._mappings.clear()
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()
