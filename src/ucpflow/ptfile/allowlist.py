"""The globals a DeepSpeed or Megatron-DeepSpeed checkpoint legitimately holds, and nothing else.

A pickle names globals (`module.name`) that `torch.load(weights_only=False)` imports and calls; a
planted one (`posix.system`, `builtins.eval`, ...) runs code. ucpflow's reader never imports a
checkpoint's globals except the harmless constructors of `real_callables()`, and it refuses every
file that names a global outside `ALLOWED` (or the user's `allow_globals`), so such a file is never
converted, exported or copied forward.

`ALLOWED` was found by scanning every kind of checkpoint the test suite builds with DeepSpeed itself
(ZeRO-1/2/3, bf16/fp32/fp16, Megatron-DeepSpeed TP x PP layer files, AutoTP; see
tests/test_untrusted.py) and from DeepSpeed's source (the classes and enums `save_checkpoint` pickles).
"""

import argparse
import builtins
import codecs
import collections
import copyreg
import datetime
import math
import os
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

try:  # numpy >= 2 moved numpy.core to numpy._core; old pickles still name numpy.core
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray

ENVIRONMENT_VARIABLE = "UCPFLOW_ALLOW_GLOBALS"  # set by the Snakefile from config `allow_globals`

# torch: tensors, parameters, storages, dtypes, sizes and devices (read as ptfile stand-ins).
TORCH = {
    "torch._utils._rebuild_tensor",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2",
    # Other tensor kinds torch itself loads with weights_only (ucpflow then says it cannot read them).
    "torch._utils._rebuild_sparse_tensor",
    "torch._utils._rebuild_qtensor",
    "torch._utils._rebuild_meta_tensor_no_storage",
    "torch.serialization._get_layout",
    "torch.Tensor",
    "torch.Size",
    "torch.device",
    "torch.storage.UntypedStorage",
    "torch.UntypedStorage",
}
TORCH |= {f"torch.{name}" for name in (
    "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8 bool complex128 complex64 uint16 uint32 "
    "uint64 float8_e5m2 float8_e4m3fn float8_e5m2fnuz float8_e4m3fnuz float8_e8m0fnu "
    "float double half long int short cfloat cdouble"
).split()}
TORCH |= {f"torch.{name}Storage" for name in (
    "Double Float Half BFloat16 Long Int Short Char Byte Bool ComplexDouble ComplexFloat"
).split()}

# The standard library: containers, argparse's Namespace (Megatron's `args`) and protocol 2's helpers.
PYTHON = {
    "collections.OrderedDict",
    "collections.defaultdict",
    "collections.deque",
    "collections.Counter",
    "argparse.Namespace",
    "copyreg._reconstructor",
    "_codecs.encode",
    *(f"builtins.{name}" for name in "set frozenset slice complex bytes bytearray list dict tuple".split()),
    *(f"datetime.{name}" for name in "datetime date time timedelta timezone".split()),
    *(f"pathlib.{name}" for name in "Path PosixPath WindowsPath PurePath PurePosixPath PureWindowsPath".split()),
}

# numpy scalars, arrays and dtypes (numpy 1 and 2 module names).
NUMPY = {
    "numpy.core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct",
    "numpy._core.multiarray.scalar",
    "numpy.ndarray",
    "numpy.dtype",
}

# DeepSpeed's classes and enums that `save_checkpoint` pickles.
DEEPSPEED = {
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # optimizer_state_dict.zero_stage
    "deepspeed.utils.tensor_fragment.fragment_address",  # param_slice_mappings
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # optimizer_state_dict.loss_scaler
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.checkpoint.universal_checkpoint.SubparamShape",  # sub-parameter shapes of universal files
    "deepspeed.runtime.zero.partition_parameters.ZeroParamStatus",
    "deepspeed.runtime.zero.config.DeepSpeedZeroOffloadParamConfig",
    "deepspeed.runtime.zero.offload_config.OffloadDeviceEnum",
}

# Megatron-DeepSpeed's enums, saved inside `args`.
MEGATRON = {
    "megatron.model.enums.PositionEmbeddingType",
    "megatron.model.enums.AttnMaskType",
    "megatron.model.enums.AttnType",
    "megatron.model.enums.LayerType",
    "megatron.enums.PositionEmbeddingType",
    "megatron.enums.AttnMaskType",
}

ALLOWED = frozenset(TORCH | PYTHON | NUMPY | DEEPSPEED | MEGATRON)


def user_allowed() -> frozenset[str]:
    """The globals the user allowed by name (config `allow_globals`, passed on to every job)."""
    return frozenset(name for name in os.environ.get(ENVIRONMENT_VARIABLE, "").split(",") if name)


def is_allowed(name: str) -> bool:
    return name in ALLOWED or name in user_allowed()


def configure(names: Iterable[str]) -> None:
    """Allow `names` in this process and the jobs it starts (what config `allow_globals` does)."""
    os.environ[ENVIRONMENT_VARIABLE] = ",".join(sorted(set(names)))


# ---------------------------------------------------------------------------------------------
# The only globals ptfile imports for real, each guarded so that a hostile pickle cannot make it
# allocate more than the pickle itself holds.

MAX_ELEMENTS = 1 << 24  # no legitimate checkpoint builds a bigger container or buffer from a call


class LimitError(ValueError):
    """A pickled call asks for more memory than any checkpoint needs."""


_SCALARS = (str, bytes, int, float, bool, complex, type(None))


def _guard(function, sizes=False, scalars=False):
    def guarded(*args, **kwargs):
        if sizes and args and isinstance(args[0], int) and args[0] > MAX_ELEMENTS:
            raise LimitError(f"{function.__name__}({args[0]})")
        if scalars and not all(isinstance(arg, _SCALARS) for arg in args):
            raise LimitError(f"{function.__name__}() of a {type(args[0]).__name__}")
        return function(*args, **kwargs)

    guarded.__name__ = function.__name__
    return guarded


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # protocol 2 pickles bytes as _codecs.encode(str, "latin1"); other codecs (hex, ...) grow their input
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise LimitError(f"_codecs.encode of a {type(text).__name__} with codec {encoding!r}")
    return codecs.encode(text, encoding, errors)


def _np_reconstruct(subtype, shape, dtype):
    # numpy pickles an empty array (shape (0,)) and fills it from the BUILD state, which holds the data
    if math.prod(shape if isinstance(shape, tuple) else (shape,)) > 1:
        raise LimitError(f"numpy _reconstruct of shape {shape}")
    return _np_multiarray._reconstruct(subtype, shape, dtype)


def _np_scalar(dtype, data=None):
    if isinstance(data, bytes) and isinstance(dtype, np.dtype) and len(data) != dtype.itemsize:
        raise LimitError(f"a numpy scalar of {dtype.itemsize} bytes from {len(data)} bytes")
    return _np_multiarray.scalar(dtype, data) if data is not None else _np_multiarray.scalar(dtype)


def real_callables() -> dict[tuple[str, str], Callable[..., Any]]:
    """{(module, name): callable} of the allowed globals that ptfile imports (all others are stand-ins)."""
    # Real types: they appear as values (a defaultdict's factory), and build at most what the pickle holds.
    table = {("builtins", name): getattr(builtins, name) for name in "set frozenset list tuple dict".split()}
    for name in ("slice", "complex"):
        table[("builtins", name)] = _guard(getattr(builtins, name), scalars=True)
    for name in ("bytes", "bytearray"):
        table[("builtins", name)] = _guard(getattr(builtins, name), sizes=True)
    for name in ("OrderedDict", "defaultdict", "deque", "Counter"):
        table[("collections", name)] = getattr(collections, name)
    table[("argparse", "Namespace")] = argparse.Namespace
    table[("copyreg", "_reconstructor")] = copyreg._reconstructor
    table[("_codecs", "encode")] = _codecs_encode
    for name in ("datetime", "date", "time", "timedelta", "timezone"):
        table[("datetime", name)] = getattr(datetime, name)
    for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"):
        table[("pathlib", name)] = getattr(pathlib, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = _np_reconstruct
        table[(module, "scalar")] = _np_scalar
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    for module, name in table:
        assert f"{module}.{name}" in ALLOWED, (module, name)
    return table
