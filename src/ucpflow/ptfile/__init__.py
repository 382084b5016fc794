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
  (guard.py). `save` writes no global outside the allowlist either.

`save` writes the same zip layout as `torch.save` (records aligned to 64 bytes, CRC-32 checked,
zip64 when needed), streaming tensor bytes from their source files or from numpy arrays.
"""

from .dtypes import (
    DType,
    bfloat16_bits_to_float32,
    float32_to_bfloat16_bits,
    numpy_dtype,
)
from .opaque import Opaque, opaque_instance
from .reader import check_container, load
from .standins import ArrayTensor, Device, Size, StorageRef, StreamTensor, TensorRef, same_value
from .unpickler import UntrustedGlobalError
from .writer import save

__all__ = [
    "ArrayTensor",
    "DType",
    "Device",
    "Opaque",
    "Size",
    "StorageRef",
    "StreamTensor",
    "TensorRef",
    "UntrustedGlobalError",
    "bfloat16_bits_to_float32",
    "check_container",
    "float32_to_bfloat16_bits",
    "load",
    "numpy_dtype",
    "opaque_instance",
    "same_value",
    "save",
]
