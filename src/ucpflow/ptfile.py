"""Read and write PyTorch zip checkpoints (the `torch.save` format) without importing torch.

Every workflow job is a fresh Python process, and `import torch` / `import deepspeed` cost seconds
each. The jobs only need a checkpoint's structure and exact byte ranges of its tensors, so this
module parses the zip directory and unpickles `data.pkl` into light stand-ins:

* tensors and `nn.Parameter`s become `TensorRef` (dtype, shape, strides and the absolute file
  offset of their bytes); their data is read on request with positioned reads;
* `torch.Size`, torch dtypes and `torch.device` become `Size`, `DType` and `Device`;
* a short list of harmless stdlib and numpy globals is imported for real (allowlist.real_callables);
* every other global (DeepSpeed classes, enums, dataclasses, ...) becomes an `Opaque` stand-in
  that remembers how the pickle built it, so `save` can emit the same global again and
  `torch.load` rebuilds the real object;
* nothing a pickle names is ever run: a file naming a global outside the allowlist (allowlist.py)
  is refused, and so is a data.pkl that would make the unpickler allocate more than its size
  (untrusted.py). `save` writes no global outside the allowlist either.

`save` writes the same zip layout as `torch.save` (records aligned to 64 bytes, CRC-32 checked,
zip64 when needed), streaming tensor bytes from their source files or from numpy arrays.
"""

import _compat_pickle
import argparse
import builtins
import codecs
import collections
import copyreg
import datetime
import hashlib
import io
import math
import os
import pathlib
import pickle
import reprlib
import secrets
import struct
import zipfile

import numpy as np

try:  # ISA-L's CRC32 is an order of magnitude faster than zlib's, with the same results
    from isal.isal_zlib import crc32
except ImportError:
    from zlib import crc32

from . import allowlist, untrusted
from .errors import CheckpointError

__all__ = [
    "ArrayTensor",
    "DType",
    "Device",
    "Opaque",
    "Size",
    "StorageRef",
    "TensorRef",
    "bfloat16_bits_to_float32",
    "float32_to_bfloat16_bits",
    "load",
    "numpy_dtype",
    "save",
]

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

_ALIGNMENT = 64  # torch's default storage_alignment; every record's data starts on it
_COPY_CHUNK = 16 << 20
_LEGACY_MAGIC = b"l\xfc\x9cF\xf9 j\xa8P\x19"  # pickled magic number that starts pre-1.6 files
_U32_MAX = 0xFFFFFFFF


def _dtype_info(name):
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported torch dtype name {name!r}") from None


def numpy_dtype(name):
    """The numpy dtype that holds the raw elements of torch dtype `name` (bfloat16 -> uint16 bits)."""
    return np.dtype(_dtype_info(name)[1])


def bfloat16_bits_to_float32(bits):
    """Exact float32 values of bfloat16 elements given as uint16 bits."""
    bits = np.asarray(bits)
    if bits.dtype != np.uint16:
        raise ValueError(f"bfloat16 bits must be a uint16 array, got {bits.dtype}")
    return np.left_shift(bits, 16, dtype=np.uint32).view(np.float32)


def float32_to_bfloat16_bits(values):
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


# ---------------------------------------------------------------------------------------------
# Stand-ins for torch objects


class DType:
    """A torch dtype named in a pickle (`torch.bfloat16` -> `DType("bfloat16")`)."""

    __slots__ = ("name",)

    def __init__(self, name):
        _dtype_info(name)
        self.name = name

    @property
    def itemsize(self):
        return _DTYPES[self.name][0]

    def __eq__(self, other):
        return isinstance(other, DType) and other.name == self.name

    def __hash__(self):
        return hash(("DType", self.name))

    def __repr__(self):
        return f"DType({self.name!r})"


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
    def type(self):
        return str(self.args[0]).split(":")[0]

    @property
    def index(self):
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
    def itemsize(self):
        return _DTYPES[self.dtype][0]

    @property
    def nbytes(self):
        return self.numel * self.itemsize

    def read(self, start=0, count=None):
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
    def path(self):
        return self.storage.path

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def itemsize(self):
        return _DTYPES[self.dtype][0]

    @property
    def nbytes(self):
        return self.numel * self.itemsize

    @property
    def byte_offset(self):
        """Absolute file offset of element 0."""
        return self.storage.byte_offset + self.storage_offset * self.itemsize

    @property
    def is_contiguous(self):
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

    def read(self, start=0, count=None):
        """Flat elements [start, start+count) of a contiguous tensor as a 1-D numpy array.

        Reads exactly those bytes from the file. bfloat16 comes back as uint16 bits.
        """
        if not self.is_contiguous:
            raise ValueError(f"read() needs a contiguous tensor, not strides {self.stride}; use read_array()")
        count = self.numel - start if count is None else count
        if start < 0 or count < 0 or start + count > self.numel:
            raise ValueError(f"elements [{start}, {start + count}) are outside a tensor of {self.numel} elements")
        return _read_elements(self.path, self.byte_offset + start * self.itemsize, self.dtype, count)

    def read_array(self):
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
    def numel(self):
        return self.array.size

    @property
    def nbytes(self):
        return self.array.nbytes

    def __repr__(self):
        return f"ArrayTensor(dtype={self.dtype}, shape={self.shape})"


# ---------------------------------------------------------------------------------------------
# Stand-ins for globals that are not imported


class _OpaqueClass(type):
    """Metaclass of the stand-in classes that replace globals this module does not import."""

    def __repr__(cls):
        return f"<opaque global {cls.opaque_module}.{cls.opaque_qualname}>"


class Opaque(metaclass=_OpaqueClass):
    """An object of a class that was not imported, recorded as the pickle built it.

    `opaque_module` / `opaque_qualname` name the global; `opaque_created_by` is "REDUCE" when the
    pickle called it with `opaque_args`, or "NEWOBJ" when it made an instance via
    `cls.__new__(cls, *opaque_args, **opaque_kwargs)`. `opaque_state` is the BUILD state,
    `opaque_items` / `opaque_entries` the list items and dict entries set on it. Attributes read
    from a dict state (`scaler.cur_scale`), `int(obj)` gives an int enum's value, and `save`
    emits all of it again so that `torch.load` rebuilds the real object.
    """

    opaque_module = ""
    opaque_qualname = ""
    opaque_created_by = "NEWOBJ"
    opaque_args = ()
    opaque_kwargs = {}
    opaque_state = None
    opaque_items = ()
    opaque_entries = {}

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.opaque_args = args
        if kwargs:
            obj.opaque_kwargs = kwargs
        return obj

    def __init__(self, *args, **kwargs):
        # Python runs __init__ only when the pickle calls the global (REDUCE), not for NEWOBJ.
        self.opaque_created_by = "REDUCE"

    def __setstate__(self, state):
        self.opaque_state = state

    def append(self, item):
        self.extend([item])

    def extend(self, items):
        if "opaque_items" not in self.__dict__:
            self.opaque_items = []
        self.opaque_items.extend(items)

    def __setitem__(self, key, value):
        if "opaque_entries" not in self.__dict__:
            self.opaque_entries = {}
        self.opaque_entries[key] = value

    def _state_dicts(self):
        state = self.opaque_state
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
        return [part for part in parts if isinstance(part, dict)]

    def __getattr__(self, name):
        if not name.startswith("__"):
            for part in self._state_dicts():
                if name in part:
                    return part[name]
        raise AttributeError(f"{type(self).opaque_qualname} object (not imported) has no attribute {name!r}")

    def __int__(self):
        if len(self.opaque_args) == 1 and isinstance(self.opaque_args[0], int):
            return int(self.opaque_args[0])
        raise TypeError(f"{type(self).opaque_qualname} object was not built from a single int")

    @reprlib.recursive_repr()
    def __repr__(self):
        parts = [repr(arg) for arg in self.opaque_args]
        parts += [f"{key}={value!r}" for key, value in self.opaque_kwargs.items()]
        for state in self._state_dicts():
            parts += [f"{key}={value!r}" for key, value in state.items()]
        return f"{type(self).opaque_module}.{type(self).opaque_qualname}({', '.join(parts)})"


_opaque_classes = {}


def _opaque_class(module, qualname):
    key = (module, qualname)
    if key not in _opaque_classes:
        name = qualname.rpartition(".")[2]
        namespace = {
            "opaque_module": module,
            "opaque_qualname": qualname,
            "__qualname__": qualname,
            "__module__": module,
        }
        _opaque_classes[key] = _OpaqueClass(name, (Opaque,), namespace)
    return _opaque_classes[key]


def opaque_instance(module, qualname, state):
    """An instance of the (not imported) class `module.qualname` with `state` as its __dict__, as
    pickle protocol 2 records a plain object or dataclass; `save` writes it as the real class."""
    obj = _opaque_class(module, qualname)()
    obj.opaque_created_by = "NEWOBJ"
    obj.opaque_state = dict(state)
    return obj


def _pickled_getattr(target, name):
    """`getattr` as protocol-2 pickles use it to name nested classes; never runs on real objects."""
    if isinstance(target, _OpaqueClass):
        return _opaque_class(target.opaque_module, f"{target.opaque_qualname}.{name}")
    return _opaque_class("builtins", "getattr")(target, name)


# ---------------------------------------------------------------------------------------------
# Reading


_SAFE_GLOBALS = allowlist.real_callables()  # the only globals imported for real
_TENSOR_TYPE = object()  # what `torch.Tensor` resolves to; only meaningful in _rebuild_from_type_v2


class _StorageType:
    """A torch storage class named in a persistent id (`torch.FloatStorage` -> float32)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype


class _Reader:
    """Unpickles one checkpoint's data.pkl, turning storages into StorageRefs as they appear."""

    def __init__(self, path, fd, records):
        self.path = path
        self.fd = fd
        self.file_size = os.fstat(fd).st_size
        self.records = records  # record name without the archive prefix -> ZipInfo
        self.storages = {}
        self.untrusted = {}  # globals outside the allowlist that the pickle names, in order
        self.rebuilders = {
            ("torch._utils", "_rebuild_tensor"): self.rebuild_tensor,
            ("torch._utils", "_rebuild_tensor_v2"): self.rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self.rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self.rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self.rebuild_parameter_with_state,
            ("torch._tensor", "_rebuild_from_type_v2"): self.rebuild_from_type_v2,
        }

    def error(self, what):
        return CheckpointError(f"Checkpoint file {self.path} {what}.")

    def unpickle(self, data):
        reader = self

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                return reader.find_class(module, name)

            def persistent_load(self, pid):
                return reader.persistent_load(pid)

        try:
            with untrusted.memory_cap(len(data)):
                result = Unpickler(io.BytesIO(data)).load()
        except Exception as exc:
            if self.untrusted:  # whatever else went wrong, name the globals the pickle plants
                findings = [untrusted.Finding(self.path, "(unpickling stopped)", name) for name in self.untrusted]
                raise UntrustedGlobalError(findings) from None
            if isinstance(exc, CheckpointError):
                raise
            if isinstance(exc, MemoryError):
                raise self.error(
                    f"is refused: unpickling its {len(data)}-byte data.pkl asks for more memory than any checkpoint "
                    "needs"
                ) from None
            if isinstance(exc, allowlist.LimitError):
                raise self.error(f"is refused: its data.pkl asks for {exc}, more than any checkpoint needs") from None
            raise self.error(f"has a data.pkl that cannot be unpickled ({type(exc).__name__}: {exc})") from None
        found, problem = untrusted.check_structure(result, self.untrusted)
        if problem:
            raise self.error(f"is refused: its data.pkl holds {problem}")
        unreferenced = "(none: built and dropped while unpickling)"
        findings = [untrusted.Finding(self.path, found.get(name, unreferenced), name) for name in self.untrusted]
        return result, findings

    def pickled_getattr(self, target, name):
        """`getattr` as protocol-2 pickles use it to name nested classes; never runs on real objects."""
        if not isinstance(target, _OpaqueClass):  # getattr on a real object: the start of a chain to os.system
            self.untrusted.setdefault("builtins.getattr")
            return _opaque_class("builtins", "getattr")
        result = _pickled_getattr(target, name)
        if not allowlist.is_allowed(untrusted.global_name(result)):
            self.untrusted.setdefault(untrusted.global_name(result))
        return result

    def find_class(self, module, name):
        # Protocol 2 pickles name Python 3 builtins by their Python 2 names (`__builtin__.bytes`).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "torch.tensor":  # renamed in torch 1.8; torch.load maps it the same way
            module = "torch._tensor"
        if (module, name) == ("builtins", "getattr"):
            return self.pickled_getattr
        if module.startswith("torch") and name.startswith("_rebuild") and (module, name) not in self.rebuilders:
            return self.unsupported(f"{module}.{name}")  # torch's own kinds of tensor: refused, never run
        if not allowlist.is_allowed(f"{module}.{name}"):
            self.untrusted.setdefault(f"{module}.{name}")
            return _opaque_class(module, name)
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" or module == "torch.storage":
            if name in _DTYPES or name in _DTYPE_ALIASES:
                return DType(_DTYPE_ALIASES.get(name, name))
            if name == "UntypedStorage":
                return _StorageType(name, "uint8")
            if name.endswith("Storage"):
                return _StorageType(name, _DTYPE_BY_STORAGE_CLASS.get(name))
            if name == "Size":
                return Size
            if name == "device":
                return Device
            if name == "Tensor":
                return _TENSOR_TYPE
        if (module, name) in self.rebuilders:
            return self.rebuilders[(module, name)]
        return _opaque_class(module, name)

    def unsupported(self, what):
        def refuse(*args):
            raise self.error(f"contains a {what} object, which ucpflow cannot read")

        return refuse

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise self.error(f"refers to an unknown persistent object {pid!r} in its data.pkl")
        _, storage_type, key, location, numel = pid
        if key in self.storages:
            return self.storages[key]
        if not isinstance(storage_type, _StorageType) or storage_type.dtype is None:
            name = getattr(storage_type, "name", storage_type)
            raise self.error(f"stores a tensor as {name}, a storage type that ucpflow cannot read")
        info = self.records.get(f"data/{key}")
        if info is None:
            raise self.error(f"has no record data/{key} for one of its tensors")
        nbytes = numel * _DTYPES[storage_type.dtype][0]
        if info.compress_type != zipfile.ZIP_STORED:
            raise self.error(f"has a compressed record {info.filename}, which torch never writes")
        if info.file_size < nbytes:
            size = info.file_size
            raise self.error(
                f"has a record {info.filename} of {size} bytes, shorter than the {nbytes} bytes it declares"
            )
        byte_offset = self.data_offset(info)
        if byte_offset + info.file_size > self.file_size:
            end = byte_offset + info.file_size
            raise self.error(f"is truncated: record {info.filename} ends at byte {end} of a {self.file_size}-byte file")
        storage = StorageRef(
            self.path, info.filename, key, storage_type.dtype, numel, location, byte_offset, info.file_size
        )
        self.storages[key] = storage
        return storage

    def data_offset(self, info):
        header = os.pread(self.fd, 30, info.header_offset)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise self.error(f"has a damaged zip header for record {info.filename}")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_length + extra_length

    def tensor(self, storage, dtype, storage_offset, size, stride, requires_grad, metadata):
        if not isinstance(storage, StorageRef):
            raise self.error(f"has a tensor whose storage is a {type(storage).__name__}, which ucpflow cannot read")
        tensor = TensorRef(storage, dtype, size, stride, storage_offset, bool(requires_grad), metadata=metadata or None)
        if tensor.nbytes > max(self.file_size, 1 << 20):
            raise self.error(
                f"is refused: it has a tensor of shape {tensor.shape} ({tensor.nbytes} bytes), larger than the whole "
                f"{self.file_size}-byte file"
            )
        if tensor.numel:
            last = storage_offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride))
            if (last + 1) * tensor.itemsize > storage.nbytes or storage_offset < 0:
                raise self.error(
                    f"has a tensor of shape {tensor.shape} that reaches past the end of its storage {storage.record}"
                )
        return tensor

    def rebuild_tensor(self, storage, storage_offset, size, stride):
        return self.tensor(storage, getattr(storage, "dtype", None), storage_offset, size, stride, False, None)

    def rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
        return self.tensor(
            storage, getattr(storage, "dtype", None), storage_offset, size, stride, requires_grad, metadata
        )

    def rebuild_tensor_v3(
        self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
    ):
        if not isinstance(dtype, DType):
            raise self.error(f"has a tensor of dtype {dtype!r}, which ucpflow cannot read")
        return self.tensor(storage, dtype.name, storage_offset, size, stride, requires_grad, metadata)

    def rebuild_parameter(self, data, requires_grad, backward_hooks):
        return self.rebuild_parameter_with_state(data, requires_grad, backward_hooks, None)

    def rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        if not isinstance(data, TensorRef):
            raise self.error(f"has an nn.Parameter around a {type(data).__name__}, which ucpflow cannot read")
        return data._replace(is_parameter=True, requires_grad=bool(requires_grad), python_state=state or None)

    def rebuild_from_type_v2(self, func, new_type, args, state):
        if new_type is not _TENSOR_TYPE:
            raise self.error(f"contains a tensor subclass {new_type!r}, which ucpflow cannot read")
        tensor = func(*args)
        return tensor._replace(python_state=state or None) if isinstance(tensor, TensorRef) else tensor


def _open_error(path, exc):
    if isinstance(exc, FileNotFoundError):
        return CheckpointError(f"Checkpoint file {path} does not exist.")
    if isinstance(exc, IsADirectoryError):
        return CheckpointError(f"Checkpoint file {path} is a directory, not a file.")
    return CheckpointError(f"Checkpoint file {path} cannot be read: {exc.strerror or exc}.")


class UntrustedGlobalError(CheckpointError):
    """A checkpoint names globals outside the allowlist (`findings`: file, key path, global)."""

    def __init__(self, findings):
        super().__init__(untrusted.refusal(findings))
        self.findings = findings


def load(path, findings=None):
    """The object pickled in checkpoint `path`, with tensors as `TensorRef` (no tensor data is read).

    Raises CheckpointError when the file is missing, not a PyTorch zip checkpoint, truncated,
    in the legacy pre-1.6 format, inconsistent with its own records or beyond the resource limits,
    and UntrustedGlobalError when it names a global outside the allowlist — unless `findings` is a
    list, which then receives them (untrusted.Finding) while the stand-ins are returned.
    """
    path = os.fspath(path)
    try:
        file = open(path, "rb")
    except OSError as exc:
        raise _open_error(path, exc) from None
    with file:
        head = file.read(32)
        if not head.startswith(b"PK\x03\x04"):
            if head.startswith(b"\x80") and _LEGACY_MAGIC in head:
                raise CheckpointError(
                    f"Checkpoint file {path} is in PyTorch's legacy pre-1.6 format; load and re-save it "
                    f"with a current torch.save to convert it to the zip format."
                )
            raise CheckpointError(f"Checkpoint file {path} is not a PyTorch checkpoint (it is not a zip archive).")
        try:
            zip_file = zipfile.ZipFile(file)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            raise CheckpointError(
                f"Checkpoint file {path} is truncated or corrupt: its zip central directory cannot be read."
            ) from None
        infos = zip_file.infolist()
        prefix = infos[0].filename.split("/")[0] + "/" if infos and "/" in infos[0].filename else ""
        records = {info.filename[len(prefix) :]: info for info in infos if info.filename.startswith(prefix)}
        if "data.pkl" not in records:
            raise CheckpointError(f"Checkpoint file {path} has no data.pkl record, so torch.save did not write it.")
        file_size = os.fstat(file.fileno()).st_size
        byteorder = records.get("byteorder")
        if byteorder is not None and _read_record(path, zip_file, byteorder, file_size) != b"little":
            raise CheckpointError(f"Checkpoint file {path} was saved big-endian, which ucpflow cannot read.")
        data = _read_record(path, zip_file, records["data.pkl"], file_size)
        result, found = _Reader(path, file.fileno(), records).unpickle(data)
    if found and findings is None:
        raise UntrustedGlobalError(found)
    if findings is not None:
        findings.extend(found)
    return result


def _read_record(path, zip_file, info, file_size):
    """A small record's bytes, refusing what no torch.save writes: compressed records (a decompression bomb
    would expand without bound) and sizes beyond the file's."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(
            f"Checkpoint file {path} is refused: its record {info.filename} is compressed, which torch.save never does."
        )
    if info.file_size > file_size:
        raise CheckpointError(
            f"Checkpoint file {path} is refused: its record {info.filename} claims {info.file_size} bytes, "
            f"more than the file's {file_size}."
        )
    try:
        return zip_file.read(info)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"Checkpoint file {path} has a damaged {info.filename} record ({exc}).") from None


# ---------------------------------------------------------------------------------------------
# Writing


_FLAGS = 0x0808  # sizes and CRC follow the data (bit 3), names are UTF-8 (bit 11)
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")


def _zip64_extra(size, header_offset):
    """The zip64 extra field miniz adds when a size or an offset needs 64 bits, else b""."""
    fields = struct.pack("<QQ", size, size) if size >= _U32_MAX else b""
    fields += struct.pack("<Q", header_offset) if header_offset >= _U32_MAX else b""
    return struct.pack("<HH", 1, len(fields)) + fields if fields else b""


class _ZipWriter:
    """Writes records the way torch's PyTorchStreamWriter (miniz) does, so torch reads them back,
    including with mmap=True and with the storage offsets it computes without reading headers."""

    def __init__(self, file, archive_name):
        self.file = file
        self.prefix = archive_name + "/"
        self.offset = 0
        self.entries = []  # (name bytes, crc, size, local header offset)

    def write(self, data):
        self.file.write(data)
        self.offset += len(data)

    def add(self, name, size, chunks):
        full_name = (self.prefix + name).encode("utf-8")
        header_offset = self.offset
        zip64 = _zip64_extra(size, header_offset)
        # An extra field "FB" of 'Z' bytes pads the header so that the data starts aligned.
        data_start = header_offset + _LOCAL_HEADER.size + len(full_name) + len(zip64) + 4
        padding = -data_start % _ALIGNMENT
        extra = zip64 + b"FB" + struct.pack("<H", padding) + b"Z" * padding
        # Like miniz: version, method, time, date, CRC and sizes 0; the data descriptor has them.
        self.write(_LOCAL_HEADER.pack(0x04034B50, 0, _FLAGS, 0, 0, 0, 0, 0, 0, len(full_name), len(extra)))
        self.write(full_name + extra)
        crc, written = 0, 0
        for chunk in chunks:
            crc = crc32(chunk, crc)
            written += len(chunk)
            self.write(chunk)
        if written != size:
            raise RuntimeError(f"record {name} got {written} bytes instead of {size}")
        descriptor = "<IIQQ" if zip64 else "<IIII"
        self.write(struct.pack(descriptor, 0x08074B50, crc, size, size))
        self.entries.append((full_name, crc, size, header_offset))

    def finish(self):
        directory_offset = self.offset
        for full_name, crc, size, header_offset in self.entries:
            extra = _zip64_extra(size, header_offset)
            size32, offset32 = min(size, _U32_MAX), min(header_offset, _U32_MAX)
            self.write(
                _CENTRAL_HEADER.pack(
                    0x02014B50,
                    0,
                    0,
                    _FLAGS,
                    0,
                    0,
                    0,
                    crc,
                    size32,
                    size32,
                    len(full_name),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    offset32,
                )
            )
            self.write(full_name + extra)
        size, count, zip64_end_offset = self.offset - directory_offset, len(self.entries), self.offset
        # miniz always ends with the zip64 end record and its locator, then the classic end record.
        self.write(
            struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x002D, 0, 0, count, count, size, directory_offset)
        )
        self.write(struct.pack("<IIQI", 0x07064B50, 0, zip64_end_offset, 1))
        count16, size32, offset32 = min(count, 0xFFFF), min(size, _U32_MAX), min(directory_offset, _U32_MAX)
        self.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count16, count16, size32, offset32, 0))

    def serialization_id(self):
        """40 digits identifying the contents, like torch's (a hash of the record names, one of the CRCs)."""
        names = hashlib.blake2b(b"\0".join(entry[0] for entry in self.entries), digest_size=8).digest()
        crcs = hashlib.blake2b(b"".join(struct.pack("<I", entry[1]) for entry in self.entries), digest_size=8).digest()
        return f"{int.from_bytes(names, 'little'):020d}{int.from_bytes(crcs, 'little'):020d}"


def _check_writable(module, name):
    if not allowlist.is_allowed(f"{module}.{name}"):
        raise CheckpointError(
            f"ucpflow refuses to write the global `{module}.{name}`, which is outside its allowlist "
            "(torch.load would import and run it)."
        )


class _GlobalName:
    """A module-level name for the pickler to emit as GLOBAL without importing it."""

    __slots__ = ("module", "name")

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle only accepts callables as reduce functions; never called
        raise TypeError(f"{self.module}.{self.name} is not imported")


class _NewStorage:
    """One storage record to write: a tensor's elements, copied out of a file or an array."""

    __slots__ = ("key", "dtype", "source")

    def __init__(self, key, dtype, source):
        self.key, self.dtype, self.source = key, dtype, source

    @property
    def nbytes(self):
        return self.source.nbytes

    def chunks(self):
        source = self.source
        if isinstance(source, ArrayTensor):
            data = memoryview(np.ascontiguousarray(source.array).reshape(-1).view(np.uint8))
            for start in range(0, len(data), _COPY_CHUNK):
                yield data[start : start + _COPY_CHUNK]
        elif isinstance(source, StorageRef) or source.is_contiguous:
            yield from _copy_file_range(source.path, source.byte_offset, source.nbytes)
        else:
            yield memoryview(source.read_array().reshape(-1).view(np.uint8))


def _copy_file_range(path, byte_offset, nbytes):
    """`nbytes` of `path` from `byte_offset`, in chunks read into one reused buffer."""
    buffer = memoryview(bytearray(min(nbytes, _COPY_CHUNK)))
    fd = _open_for_reading(path)
    try:
        for start in range(0, nbytes, _COPY_CHUNK):
            chunk = buffer[: min(_COPY_CHUNK, nbytes - start)]
            _pread_into(fd, path, chunk, byte_offset + start)
            yield chunk
    finally:
        os.close(fd)


class _NeedsProtocol4(Exception):
    """An object was created with keyword arguments, which only pickle protocol 4 can express."""


class _Pickler(pickle._Pickler):
    """The pure-Python pickler, taught to emit torch's globals and tensors without importing torch.

    (The C pickler insists on importing every global it writes.)
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, protocol):
        super().__init__(file, protocol)
        self.storages = []  # _NewStorage in key order
        self.storage_keys = {}  # id(StorageRef) -> (StorageRef, _NewStorage): a pickled storage is written once
        self.global_names = {}

    def global_name(self, module, name):
        key = (module, name)
        if key not in self.global_names:
            self.global_names[key] = _GlobalName(module, name)
        return self.global_names[key]

    def write_global(self, module, name, obj):
        _check_writable(module, name)
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("utf-8"))
        self.memoize(obj)

    def save_global(self, obj, name=None):
        # real objects (numpy arrays, OrderedDicts, ...) name their classes and helpers here; getattr
        # only names the nested classes that save_opaque_class checked
        if obj is not getattr:
            module = getattr(obj, "__module__", None) or pickle.whichmodule(obj, name or obj.__qualname__)
            _check_writable(module, name or getattr(obj, "__qualname__", obj.__name__))
        super().save_global(obj, name)

    def save_global_name(self, obj):
        self.write_global(obj.module, obj.name, obj)

    def save_dtype(self, obj):
        self.write_global("torch", obj.name, obj)

    def save_opaque_class(self, cls):
        outer, _, inner = cls.opaque_qualname.rpartition(".")
        if outer and self.proto < 4:  # protocol 2 names nested classes via getattr(outer, inner)
            self.save_reduce(getattr, (_opaque_class(cls.opaque_module, outer), inner), obj=cls)
        else:
            self.write_global(cls.opaque_module, cls.opaque_qualname, cls)

    dispatch[_GlobalName] = save_global_name
    dispatch[DType] = save_dtype
    dispatch[_OpaqueClass] = save_opaque_class

    def new_storage(self, dtype, source):
        storage = _NewStorage(str(len(self.storages)), dtype, source)
        self.storages.append(storage)
        return storage

    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            if id(obj) not in self.storage_keys:
                self.storage_keys[id(obj)] = (obj, self.new_storage(obj.dtype, obj))
            obj = self.storage_keys[id(obj)][1]
        if not isinstance(obj, _NewStorage):
            return None
        itemsize, _, storage_class = _DTYPES[obj.dtype]
        if storage_class is None:  # torch pickles these dtypes as bytes plus the dtype
            return ("storage", self.global_name("torch.storage", "UntypedStorage"), obj.key, "cpu", obj.nbytes)
        return ("storage", self.global_name("torch", storage_class), obj.key, "cpu", obj.nbytes // itemsize)

    def tensor_reduce(self, tensor, requires_grad):
        """torch's own reduce of a plain tensor, with a fresh contiguous storage of its elements."""
        storage = self.new_storage(tensor.dtype, tensor)
        shape, hooks = tuple(tensor.shape), collections.OrderedDict()
        args = (storage, 0, shape, _contiguous_strides(shape), requires_grad, hooks)
        if _DTYPES[tensor.dtype][2] is None:
            rebuild = self.global_name("torch._utils", "_rebuild_tensor_v3")
            args += (DType(tensor.dtype),)
        else:
            rebuild = self.global_name("torch._utils", "_rebuild_tensor_v2")
        if getattr(tensor, "metadata", None):
            args += (tensor.metadata,)
        return rebuild, args

    def reducer_override(self, obj):
        if isinstance(obj, ArrayTensor):
            return self.tensor_reduce(obj, False)
        if isinstance(obj, TensorRef):
            if obj.is_parameter:
                args = (_ParameterData(obj), obj.requires_grad, collections.OrderedDict())
                if obj.python_state:
                    return self.global_name("torch._utils", "_rebuild_parameter_with_state"), args + (obj.python_state,)
                return self.global_name("torch._utils", "_rebuild_parameter"), args
            rebuild, args = self.tensor_reduce(obj, obj.requires_grad)
            if obj.python_state:  # a plain tensor with Python attributes, pickled the way torch does
                args = (rebuild, self.global_name("torch", "Tensor"), args, obj.python_state)
                return self.global_name("torch._tensor", "_rebuild_from_type_v2"), args
            return rebuild, args
        if isinstance(obj, _ParameterData):
            return self.tensor_reduce(obj.tensor, False)
        if isinstance(obj, Size):
            return self.global_name("torch", "Size"), (tuple(obj),)
        if isinstance(obj, Device):
            return self.global_name("torch", "device"), obj.args
        if isinstance(obj, Opaque):
            return self.opaque_reduce(obj)
        return NotImplemented

    def opaque_reduce(self, obj):
        cls = type(obj)
        items = iter(obj.opaque_items) if obj.opaque_items else None
        entries = iter(obj.opaque_entries.items()) if obj.opaque_entries else None
        if obj.opaque_created_by == "REDUCE":
            return cls, obj.opaque_args, obj.opaque_state, items, entries
        if obj.opaque_kwargs:
            if self.proto < 4:
                raise _NeedsProtocol4()
            return copyreg.__newobj_ex__, (cls, obj.opaque_args, obj.opaque_kwargs), obj.opaque_state, items, entries
        return copyreg.__newobj__, (cls, *obj.opaque_args), obj.opaque_state, items, entries


class _ParameterData:
    """The plain tensor inside an nn.Parameter (torch pickles `param.data` separately)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor


class _NotPlain(Exception):
    """The object holds something the fast pickler does not write (left to _Pickler)."""


class _PlainPickler:
    """Protocol-2 opcodes for the common case of merge outputs: containers of str/int/float/bool/None
    and ArrayTensors. The pure-Python pickler costs about half a millisecond per small file; this
    writes the same objects (as torch.load reads them) in a few microseconds."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")
        self.storages = []

    def dump(self, obj):
        self.save(obj)
        self.out += b"."
        return bytes(self.out), self.storages

    def save(self, obj):
        out = self.out
        kind = type(obj)
        if obj is None:
            out += b"N"
        elif kind is bool:
            out += b"\x88" if obj else b"\x89"
        elif kind is int:
            if 0 <= obj < 256:
                out += b"K" + bytes((obj,))
            elif 0 <= obj < 65536:
                out += b"M" + struct.pack("<H", obj)
            elif -(2**31) <= obj < 2**31:
                out += b"J" + struct.pack("<i", obj)
            else:
                raise _NotPlain()
        elif kind is float:
            out += b"G" + struct.pack(">d", obj)
        elif kind is str:
            encoded = obj.encode("utf-8", "surrogatepass")
            out += b"X" + struct.pack("<I", len(encoded)) + encoded
        elif kind is dict:
            out += b"}"
            if obj:
                out += b"("
                for key, value in obj.items():
                    self.save(key)
                    self.save(value)
                out += b"u"
        elif kind is list:
            out += b"]"
            if obj:
                out += b"("
                for item in obj:
                    self.save(item)
                out += b"e"
        elif kind is tuple:
            out += b"("
            for item in obj:
                self.save(item)
            out += b"t"
        elif kind is ArrayTensor and _DTYPES[obj.dtype][2] is not None:
            self.save_tensor(obj)
        else:
            raise _NotPlain()

    def save_tensor(self, tensor):
        itemsize, _, storage_class = _DTYPES[tensor.dtype]
        storage = _NewStorage(str(len(self.storages)), tensor.dtype, tensor)
        self.storages.append(storage)
        shape = tuple(tensor.shape)
        self.out += b"ctorch._utils\n_rebuild_tensor_v2\n(("
        self.save("storage")
        self.out += f"ctorch\n{storage_class}\n".encode()
        self.save(storage.key)
        self.save("cpu")
        self.save(storage.nbytes // itemsize)
        self.out += b"tQK\x00"
        self.save(shape)
        self.save(_contiguous_strides(shape))
        self.out += b"\x89ccollections\nOrderedDict\n)RtR"


def _pickle_checkpoint(obj, protocol=2):
    """data.pkl bytes and the storages they refer to; protocol 2 like torch unless obj needs 4."""
    if protocol == 2:
        try:
            return _PlainPickler().dump(obj)
        except _NotPlain:
            pass
    buffer = io.BytesIO()
    pickler = _Pickler(buffer, protocol)
    try:
        pickler.dump(obj)
    except _NeedsProtocol4:
        return _pickle_checkpoint(obj, protocol=4)
    return buffer.getvalue(), pickler.storages


def _archive_name(path):
    """torch's archive folder name: the file name without its last extension."""
    name = os.path.basename(path)
    stem = name.rpartition(".")[0] if "." in name else name
    return stem or "archive"


def save(obj, path, atomic=True):
    """Write `obj` to `path` as a torch.save checkpoint that `torch.load` reads back equal.

    `obj` may hold plain Python containers and scalars, `Size`, `DType`, `Device`, `Opaque`,
    `TensorRef` (bytes copied from its file in chunks), `ArrayTensor` and numpy arrays. Every
    tensor gets its own contiguous storage holding exactly its elements. The file appears
    atomically: it is written under a temporary name in the same directory and renamed — unless
    `atomic` is False, for files inside a folder that itself appears atomically.
    """
    path = os.fspath(path)
    data_pkl, storages = _pickle_checkpoint(obj)
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp") if atomic else path
    try:
        with open(temporary, "xb" if atomic else "wb") as file:
            writer = _ZipWriter(file, _archive_name(path))
            writer.add("data.pkl", len(data_pkl), [data_pkl])
            writer.add(".format_version", 1, [b"1"])
            writer.add(".storage_alignment", len(str(_ALIGNMENT)), [str(_ALIGNMENT).encode()])
            writer.add("byteorder", 6, [b"little"])
            for storage in storages:
                writer.add(f"data/{storage.key}", storage.nbytes, storage.chunks())
            writer.add("version", 2, [b"3\n"])
            serialization_id = writer.serialization_id().encode()
            writer.add(".data/serialization_id", len(serialization_id), [serialization_id])
            writer.finish()
        if atomic:
            os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


untrusted.register_leaves(TensorRef, StorageRef, DType, Size, Device, ArrayTensor)
