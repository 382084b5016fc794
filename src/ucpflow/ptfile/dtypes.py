"""Torch dtypes without torch: element sizes, the numpy dtypes that hold their raw elements,
bfloat16 conversions, and `DType`, the stand-in for a torch dtype named in a pickle."""

import numpy as np
from numpy.typing import ArrayLike

# torch dtype name -> (itemsize, numpy dtype of the raw elements, legacy typed-storage class).
# bfloat16 and the float8 types have no numpy equivalent and are read as their raw bits.
# Dtypes without a storage class are pickled by torch as an UntypedStorage plus the dtype.
_DTYPES = {
    "float64": (8, "<f8", "DoubleStorage"),
    "float32": (4, "<f4", "FloatStorage"),
    "float16": (2, "<f2", "HalfStorage"),
    "bfloat16": (2, "<u2", "BFloat16Storage"),
    "int64": (8, "<i8", "LongStorage"),
    "int32": (4, "<i4", "IntStorage"),
    "int16": (2, "<i2", "ShortStorage"),
    "int8": (1, "i1", "CharStorage"),
    "uint8": (1, "u1", "ByteStorage"),
    "bool": (1, "?", "BoolStorage"),
    "complex128": (16, "<c16", "ComplexDoubleStorage"),
    "complex64": (8, "<c8", "ComplexFloatStorage"),
    "uint16": (2, "<u2", None),
    "uint32": (4, "<u4", None),
    "uint64": (8, "<u8", None),
    "float8_e5m2": (1, "u1", None),
    "float8_e4m3fn": (1, "u1", None),
    "float8_e5m2fnuz": (1, "u1", None),
    "float8_e4m3fnuz": (1, "u1", None),
    "float8_e8m0fnu": (1, "u1", None),
}
_DTYPE_ALIASES = {
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "cfloat": "complex64",
    "cdouble": "complex128",
}
_DTYPE_BY_STORAGE_CLASS = {storage: name for name, (_, _, storage) in _DTYPES.items() if storage}


def _dtype_info(name):
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported torch dtype name {name!r}") from None


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype that holds the raw elements of torch dtype `name` (bfloat16 -> uint16 bits)."""
    return np.dtype(_dtype_info(name)[1])


def bfloat16_bits_to_float32(bits: ArrayLike) -> np.ndarray:
    """Exact float32 values of bfloat16 elements given as uint16 bits."""
    bits = np.asarray(bits)
    if bits.dtype != np.uint16:
        raise ValueError(f"bfloat16 bits must be a uint16 array, got {bits.dtype}")
    return np.left_shift(bits, 16, dtype=np.uint32).view(np.float32)


def float32_to_bfloat16_bits(values: ArrayLike) -> np.ndarray:
    """Round float32 values to bfloat16 bits as `tensor.to(torch.bfloat16)` does: to nearest, ties
    to even, every NaN becoming 0xFFFF."""
    values = np.asarray(values)
    if values.dtype != np.float32:
        raise ValueError(f"values must be a float32 array, got {values.dtype}")
    bits = values.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0xFFFF), rounded)


def _contiguous_strides(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class DType:
    """A torch dtype named in a pickle (`torch.bfloat16` -> `DType("bfloat16")`)."""

    __slots__ = ("name",)

    def __init__(self, name):
        _dtype_info(name)
        self.name = name

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.name][0]

    def __eq__(self, other):
        return isinstance(other, DType) and other.name == self.name

    def __hash__(self):
        return hash(("DType", self.name))

    def __repr__(self):
        return f"DType({self.name!r})"
