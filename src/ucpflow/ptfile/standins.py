"""Stand-ins for the torch objects of a checkpoint: `Size`, `Device`, `StorageRef` and `TensorRef`
(which read their elements from the file with positioned reads), and `ArrayTensor` and `StreamTensor` for
`save`."""

import math
import os
from collections.abc import Callable, Iterable

import numpy as np

from ..errors import CheckpointError
from .dtypes import _DTYPES, numpy_dtype


class Size(tuple):
    """`torch.Size`: a tuple of ints."""

    __slots__ = ()

    def __repr__(self):
        return f"Size({list(self)})"


class Device:
    """`torch.device`, kept as the arguments the pickle passed to it (e.g. `("cuda", 0)`)."""

    __slots__ = ("args",)

    def __init__(self, *args):
        self.args = args

    @property
    def type(self) -> str:
        return str(self.args[0]).split(":")[0]

    @property
    def index(self) -> int | None:
        if len(self.args) > 1:
            return self.args[1]
        _, _, index = str(self.args[0]).partition(":")
        return int(index) if index else None

    def __eq__(self, other):
        return isinstance(other, Device) and (other.type, other.index) == (self.type, self.index)

    def __hash__(self):
        return hash(("Device", self.type, self.index))

    def __repr__(self):
        return f"Device({str(self)!r})"

    def __str__(self):
        return self.type if self.index is None else f"{self.type}:{self.index}"


def _open_for_reading(path):
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CheckpointError(f"Checkpoint file {path} cannot be opened for reading: {exc.strerror}.") from None


def _pread_into(fd, path, target, byte_offset):
    """Fill memoryview `target` with the bytes at `byte_offset` of open file `fd` (named `path`)."""
    done = 0
    while done < len(target):
        got = os.preadv(fd, [target[done:]], byte_offset + done)
        if got == 0:
            raise CheckpointError(
                f"Checkpoint file {path} is truncated: it ends inside tensor data at byte {byte_offset + done}."
            )
        done += got


def _read_elements(path, byte_offset, dtype, count):
    """`count` elements of `dtype` at `byte_offset` of `path`, read with positioned reads into
    the result array itself: exactly those bytes are read, nothing is mapped or buffered."""
    array = np.empty(count, dtype=numpy_dtype(dtype))
    fd = _open_for_reading(path)
    try:
        _pread_into(fd, path, memoryview(array.view(np.uint8)), byte_offset)
    finally:
        os.close(fd)
    return array


class StorageRef:
    """One storage record (`<archive>/data/<key>`) of a checkpoint: where its bytes are in the file."""

    __slots__ = ("path", "record", "key", "dtype", "numel", "location", "byte_offset", "record_size")

    def __init__(self, path, record, key, dtype, numel, location, byte_offset, record_size):
        self.path = path
        self.record = record  # full zip record name, e.g. "mp_rank_00_model_states/data/0"
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.location = location  # device the storage was saved from, e.g. "cuda:0"
        self.byte_offset = byte_offset  # absolute file offset of the record's first byte
        self.record_size = record_size

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def read(self, start: int = 0, count: int | None = None) -> np.ndarray:
        """Elements [start, start+count) of the storage as a 1-D numpy array."""
        count = self.numel - start if count is None else count
        if start < 0 or count < 0 or start + count > self.numel:
            raise ValueError(f"elements [{start}, {start + count}) are outside storage of {self.numel} elements")
        return _read_elements(self.path, self.byte_offset + start * self.itemsize, self.dtype, count)

    def __repr__(self):
        return f"StorageRef({self.path!r}, {self.record!r}, dtype={self.dtype}, numel={self.numel})"


class TensorRef:
    """A tensor (or `nn.Parameter`) of a checkpoint file: its metadata and where its elements are.

    `python_state` holds Python attributes pickled with the tensor, `metadata` torch's extra
    tensor metadata; both are None normally and are written back by `save` when present.
    """

    __slots__ = (
        "storage",
        "dtype",
        "shape",
        "stride",
        "storage_offset",
        "requires_grad",
        "is_parameter",
        "python_state",
        "metadata",
    )

    def __init__(
        self,
        storage,
        dtype,
        shape,
        stride,
        storage_offset=0,
        requires_grad=False,
        is_parameter=False,
        python_state=None,
        metadata=None,
    ):
        self.storage = storage
        self.dtype = dtype
        self.shape = tuple(shape)
        self.stride = tuple(stride)
        self.storage_offset = storage_offset
        self.requires_grad = requires_grad
        self.is_parameter = is_parameter
        self.python_state = python_state
        self.metadata = metadata

    def _replace(self, **changes):
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields.update(changes)
        return TensorRef(**fields)

    @property
    def path(self) -> str:
        return self.storage.path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def byte_offset(self) -> int:
        """Absolute file offset of element 0."""
        return self.storage.byte_offset + self.storage_offset * self.itemsize

    @property
    def is_contiguous(self) -> bool:
        """Same rule as `torch.Tensor.is_contiguous()`: row-major, ignoring dimensions of size 1."""
        if self.numel == 0:
            return True
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1:
                if stride != expected:
                    return False
                expected *= size
        return True

    def read(self, start: int = 0, count: int | None = None) -> np.ndarray:
        """Flat elements [start, start+count) of a contiguous tensor as a 1-D numpy array.

        Reads exactly those bytes from the file. bfloat16 comes back as uint16 bits.
        """
        if not self.is_contiguous:
            raise ValueError(f"read() needs a contiguous tensor, not strides {self.stride}; use read_array()")
        count = self.numel - start if count is None else count
        if start < 0 or count < 0 or start + count > self.numel:
            raise ValueError(f"elements [{start}, {start + count}) are outside a tensor of {self.numel} elements")
        return _read_elements(self.path, self.byte_offset + start * self.itemsize, self.dtype, count)

    def read_array(self) -> np.ndarray:
        """The whole tensor as a numpy array of its shape (non-contiguous views are gathered)."""
        if self.numel == 0:
            return np.empty(self.shape, dtype=numpy_dtype(self.dtype))
        if self.is_contiguous:
            return self.read().reshape(self.shape)
        span = 1 + sum((size - 1) * stride for size, stride in zip(self.shape, self.stride))
        covering = _read_elements(self.path, self.byte_offset, self.dtype, span)
        view = np.lib.stride_tricks.as_strided(
            covering, shape=self.shape, strides=[stride * self.itemsize for stride in self.stride]
        )
        return np.ascontiguousarray(view)

    def __repr__(self):
        kind = "Parameter" if self.is_parameter else "Tensor"
        where = f"storage={self.storage.key}, storage_offset={self.storage_offset}"
        return f"TensorRef({kind}, dtype={self.dtype}, shape={self.shape}, {where})"


class ArrayTensor:
    """Computed data for `save` to write as a tensor: a numpy array stored as torch dtype `dtype`.

    The array's dtype must be `numpy_dtype(dtype)` (bfloat16 as uint16 bits); `shape` defaults to
    the array's shape and may reshape it.
    """

    __slots__ = ("array", "dtype", "shape")

    def __init__(self, array, dtype, shape=None):
        array = np.asarray(array)
        if array.dtype != numpy_dtype(dtype):
            raise ValueError(f"a {dtype} tensor needs a {numpy_dtype(dtype)} array, got {array.dtype}")
        shape = tuple(array.shape if shape is None else shape)
        if math.prod(shape) != array.size:
            raise ValueError(f"shape {shape} does not match an array of {array.size} elements")
        self.array, self.dtype, self.shape = array, dtype, shape

    @property
    def numel(self) -> int:
        return self.array.size

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    def __repr__(self):
        return f"ArrayTensor(dtype={self.dtype}, shape={self.shape})"


def same_value(a: object, b: object) -> bool:
    """Whether two unpickled values are equal, comparing ArrayTensors by dtype and elements."""
    if isinstance(a, ArrayTensor) and isinstance(b, ArrayTensor):
        return a.dtype == b.dtype and np.array_equal(a.array, b.array)
    return a == b
class StreamTensor:
    """A tensor for `save` whose bytes come from `chunks()`, a callable returning an iterable of
    bytes-like pieces that together hold exactly `nbytes`: a record built piece by piece (e.g. one
    parameter's slice at a time) is written without ever holding the whole tensor in memory."""

    __slots__ = ("dtype", "shape", "chunks")

    def __init__(self, dtype: str, shape: tuple[int, ...], chunks: Callable[[], Iterable[bytes]]) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported torch dtype name {dtype!r}")
        self.dtype, self.shape, self.chunks = dtype, tuple(shape), chunks

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPES[self.dtype][0]

    def __repr__(self) -> str:
        return f"StreamTensor(dtype={self.dtype}, shape={self.shape})"
