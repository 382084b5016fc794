"""Position-dependent checksums of tensor elements, and canonical text of checkpoint structures.

The checksum of a tensor is the sum, mod 2^64, of mix(position * K ^ bits) over its elements (mix:
splitmix64's finalizer, K odd), where `position` is the element's flat (row-major) index in the
universal tensor and `bits` its raw value bits. A sum can be accumulated in any order, so the source
side can add each fragment's elements as it reads them, each at the position the merge rule puts it;
but moving any element to another position changes the sum, so a wrong data-parallel order,
tensor-parallel order, axis, transposition or sub-parameter interleave does not pass.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .. import ptfile

CHUNK = 1 << 20  # elements read at a time
_BLOCK = 1 << 16  # elements hashed at a time
_MASK = (1 << 64) - 1
_POSITION_FACTOR = np.uint64(0xD6E8FEB86659FD93)  # odd: position -> position * factor is one-to-one
_SPLITMIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31))


@dataclass(frozen=True)
class Checksum:
    """Digest of (position, value) pairs: how many, and the sum of their mixed hashes."""

    count: int = 0
    total: int = 0

    def __add__(self, other):
        return Checksum(self.count + other.count, (self.total + other.total) & _MASK)

    def __str__(self):
        return f"{self.count}:{self.total:016x}"


def _mixed_sum(z, scratch):
    """Sum over elements of splitmix64's finalizer of z (uint64, changed in place), mod 2^64."""
    z += _SPLITMIX[0]
    for shift, factor in zip(_SHIFTS, (_SPLITMIX[1], _SPLITMIX[2], None)):
        np.right_shift(z, shift, out=scratch)
        z ^= scratch
        if factor is not None:
            z *= factor
    return int(z.sum(dtype=np.uint64))


def bits_of(array: np.ndarray) -> np.ndarray:
    """The raw bits of a numpy array's elements as unsigned integers (bfloat16 arrives as uint16 already)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return flat.view(f"u{flat.itemsize}") if flat.dtype.kind != "u" else flat


def _sum(array, block_positions):
    """Checksum of `array`'s elements; block_positions(start, stop) gives the positions of [start, stop)
    as a new uint64 array. Hashed in blocks small enough to stay in the CPU cache."""
    bits = bits_of(array)
    total, scratch = 0, np.empty(min(_BLOCK, bits.size), dtype=np.uint64)
    for start in range(0, bits.size, _BLOCK):
        stop = min(start + _BLOCK, bits.size)
        z = block_positions(start, stop)
        z *= _POSITION_FACTOR
        z ^= bits[start:stop]
        total += _mixed_sum(z, scratch[: stop - start])
    return Checksum(int(bits.size), total & _MASK)


def position_sum(positions: np.ndarray, array: np.ndarray) -> Checksum:
    """The Checksum of elements `array` (flat) placed at `positions` (non-negative, same length)."""
    return _sum(array, lambda start, stop: positions[start:stop].astype(np.uint64))


def run_sum(first: int, array: np.ndarray) -> Checksum:
    """The Checksum of elements `array` (flat) at the consecutive positions first, first + 1, ..."""
    return _sum(array, lambda start, stop: np.arange(first + start, first + stop, dtype=np.uint64))


def tensor_checksum(tensor: ptfile.TensorRef) -> Checksum:
    """The Checksum of a tensor of a checkpoint file, each element at its row-major position."""
    if not tensor.is_contiguous:
        return run_sum(0, tensor.read_array())
    result = Checksum()
    for start in range(0, tensor.numel, CHUNK):
        result = result + run_sum(start, tensor.read(start, min(CHUNK, tensor.numel - start)))
    return result


def tensor_text(tensor: ptfile.TensorRef | ptfile.ArrayTensor, checksum: Checksum | None = None) -> str:
    """dtype, shape and checksum of a TensorRef or ArrayTensor, e.g. `float32(64, 16) 1024:9f3a…`."""
    if checksum is None:
        if isinstance(tensor, ptfile.ArrayTensor):
            checksum = run_sum(0, tensor.array)
        else:
            checksum = tensor_checksum(tensor)
    return f"{tensor.dtype}{tuple(tensor.shape)} {checksum}"


def structure_text(value: object) -> str:
    """Canonical text of a pickled structure: containers in order, tensors as dtype, shape and checksum,
    objects of classes that were not imported as their class name and state."""
    if isinstance(value, (ptfile.TensorRef, ptfile.ArrayTensor)):
        return tensor_text(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{structure_text(k)}: {structure_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(structure_text(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + "".join(f"{structure_text(v)}, " for v in value) + ")"
    if isinstance(value, ptfile.Opaque):
        kind = type(value)
        parts = [structure_text(arg) for arg in value.opaque_args]
        parts += [f"{k}={structure_text(v)}" for k, v in dict(value.opaque_kwargs).items()]
        if isinstance(value.opaque_state, dict):
            parts += [f"{k}={structure_text(v)}" for k, v in value.opaque_state.items()]
        elif value.opaque_state is not None:
            parts.append(f"state={structure_text(value.opaque_state)}")
        parts += [structure_text(item) for item in value.opaque_items]
        parts += [f"{structure_text(k)}: {structure_text(v)}" for k, v in dict(value.opaque_entries).items()]
        return f"{kind.opaque_module}.{kind.opaque_qualname}({', '.join(parts)})"
    return repr(value)


def short_text(text: str, limit: int = 300) -> str:
    """`text` itself when short, else its length and a digest (for report cells)."""
    if len(text) <= limit:
        return text
    return f"{len(text)} chars, blake2b {hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}"
