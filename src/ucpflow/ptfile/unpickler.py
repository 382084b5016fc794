"""The restricted unpickler of data.pkl: allowlisted globals are imported, torch's tensors, storages,
dtypes, sizes and devices become stand-ins, every other global an `Opaque` (reported as untrusted)."""

import _compat_pickle
import io
import os
import pickle
import struct
import zipfile

from ..errors import CheckpointError
from . import allowlist, guard
from .dtypes import _DTYPE_ALIASES, _DTYPE_BY_STORAGE_CLASS, _DTYPES, DType
from .opaque import _opaque_class, _OpaqueClass, _pickled_getattr
from .standins import Device, Size, StorageRef, TensorRef

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
            with guard.memory_cap(len(data)):
                result = Unpickler(io.BytesIO(data)).load()
        except Exception as exc:
            if self.untrusted:  # whatever else went wrong, name the globals the pickle plants
                findings = [guard.Finding(self.path, "(unpickling stopped)", name) for name in self.untrusted]
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
        found, problem = guard.check_structure(result, self.untrusted)
        if problem:
            raise self.error(f"is refused: its data.pkl holds {problem}")
        unreferenced = "(none: built and dropped while unpickling)"
        findings = [guard.Finding(self.path, found.get(name, unreferenced), name) for name in self.untrusted]
        return result, findings

    def pickled_getattr(self, target, name):
        """`getattr` as protocol-2 pickles use it to name nested classes; never runs on real objects."""
        if not isinstance(target, _OpaqueClass):  # getattr on a real object: the start of a chain to os.system
            self.untrusted.setdefault("builtins.getattr")
            return _opaque_class("builtins", "getattr")
        result = _pickled_getattr(target, name)
        if not allowlist.is_allowed(guard.global_name(result)):
            self.untrusted.setdefault(guard.global_name(result))
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


class UntrustedGlobalError(CheckpointError):
    """A checkpoint names globals outside the allowlist (`findings`: file, key path, global)."""

    def __init__(self, findings):
        super().__init__(guard.refusal(findings))
        self.findings = findings
