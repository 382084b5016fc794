"""A safetensors file written one tensor at a time, so that memory holds one tensor, not the whole file.

The header (names, dtypes, shapes, offsets) is known before any data is read; tensors are laid out as the
safetensors library lays them out (larger items first, then by name). A tensor whose bytes already lie in
other files, as they are to be written, is given as those files' byte ranges and copied by the kernel.
"""

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..fileio import FileRange, append_file_ranges, atomic_writer
from ..ptfile import float32_to_bfloat16_bits

# torch dtype name -> (safetensors dtype, bytes per element)
DTYPES = {"float64": ("F64", 8), "float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2),
          "int64": ("I64", 8), "int32": ("I32", 4), "int16": ("I16", 2), "int8": ("I8", 1), "uint8": ("U8", 1),
          "bool": ("BOOL", 1)}
FLOATS = ("float64", "float32", "bfloat16", "float16")


def tensor_bytes(dtype: str, shape: Sequence[int]) -> int:
    return math.prod(shape) * DTYPES[dtype][1]


def encode(array: np.ndarray, dtype: str) -> np.ndarray:
    """The little-endian bytes of a numpy array stored as torch dtype `dtype` (floats rounded as torch rounds)."""
    if dtype not in FLOATS:
        return np.ascontiguousarray(array).astype(np.dtype(array.dtype).newbyteorder("<"), copy=False)
    array = np.ascontiguousarray(array, dtype=np.float32)
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(array)
    if dtype == "float16":
        with np.errstate(over="ignore"):  # beyond fp16's range becomes inf, as in torch
            return array.astype("<f2")
    return array.astype("<f8") if dtype == "float64" else array


def write_safetensors(path: Path | str, tensors: Mapping[str, tuple[str, Sequence[int]]],
                      read: Callable[[str], np.ndarray | Sequence[FileRange]], metadata: dict[str, str] | None = None,
                      written: Callable[[], object] | None = None) -> None:
    """Write `tensors` ({name: (dtype, shape)}) to `path`; read(name) gives each one's values as a numpy array,
    or the byte ranges of files that hold exactly its little-endian bytes, and written(), when given, is
    called once each tensor's bytes are written (to free what read it)."""
    order = sorted(tensors, key=lambda name: (-DTYPES[tensors[name][0]][1], name))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name in order:
        dtype, shape = tensors[name]
        size = tensor_bytes(dtype, shape)
        header[name] = {"dtype": DTYPES[dtype][0], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_writer(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for name in order:
            dtype, shape = tensors[name]
            source = read(name)
            if isinstance(source, np.ndarray):
                data = encode(source, dtype)
                if data.size != math.prod(shape):
                    raise ValueError(f"{name}: {data.size} elements, not {math.prod(shape)} of shape {shape}")
                handle.write(np.ascontiguousarray(data).data)
            else:
                nbytes = sum(piece.nbytes for piece in source)
                if nbytes != tensor_bytes(dtype, shape):
                    raise ValueError(f"{name}: {nbytes} bytes, not the {tensor_bytes(dtype, shape)} of {dtype} {shape}")
                handle.flush()
                append_file_ranges(handle.fileno(), source)
            if written is not None:
                written()
