"""Pickling a checkpoint's data.pkl without importing torch: torch's globals and tensors emitted by
name, every tensor given a fresh storage record, and no global outside the allowlist written."""

import collections
import copyreg
import io
import os
import pickle
import struct

import numpy as np

from ..errors import CheckpointError
from . import allowlist
from .dtypes import _DTYPES, DType, _contiguous_strides
from .opaque import Opaque, _opaque_class, _OpaqueClass
from .standins import (
    ArrayTensor,
    Device,
    Size,
    StorageRef,
    StreamTensor,
    TensorRef,
    _open_for_reading,
    _pread_into,
)

_COPY_CHUNK = 16 << 20


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
        if isinstance(source, StreamTensor):
            yield from source.chunks()
        elif isinstance(source, ArrayTensor):
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
        if isinstance(obj, (ArrayTensor, StreamTensor)):
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
