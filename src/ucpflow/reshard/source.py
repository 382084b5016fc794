"""What a reshard reads from the universal checkpoint of its source: the model states, the optimizer's
global state and, per parameter, the flat elements of its fp32 weight and Adam moments.

The universal output (`<output_folder>/zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt`,
`zero/optimizer_state.pt` and the copied model-states files) holds every byte training needs, in one
layout whatever the source's ZeRO stage, dtype or degree, so every target is written from it.
"""

import glob
import os
from dataclasses import dataclass, field

import numpy as np

from .. import dsconst as C
from .. import ptfile
from ..errors import CheckpointError
from ..source.layout import natural_keys
from ..ptfile import TensorRef

FP32 = "fp32"
STEP = "step"
MODULE = "module"
# Keys of DeepSpeed's model states that checkpoint/constants.py does not name (engine._common_checkpoint_state).
SHARED_PARAMS = "shared_params"
MOMENTS = ("exp_avg", "exp_avg_sq")
OPTIMIZER_STATE_FILE = "optimizer_state.pt"
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass
class SourceModel:
    """The source's model states and optimizer settings, read from its universal checkpoint."""

    universal_folder: str
    model_state_path: str
    model_state: dict
    optimizer_state: dict
    stage: int
    dtype: str  # bf16, fp16 or fp32: the training precision of the module weights
    groups: list  # per parameter group: [(name, shape), ...] of its trainable parameters, in order
    frozen: list = field(default_factory=list)  # [(name, shape)] of frozen parameters
    step: object = None  # Adam's step as saved (a 0-d tensor or a number)

    @property
    def module(self) -> dict:
        return self.model_state[MODULE]

    def tensor(self, name: str, state: str) -> TensorRef:
        """The universal tensor of one parameter's state (flat for ZeRO-3 sources, shaped otherwise)."""
        path = os.path.join(self.universal_folder, "zero", name, f"{state}.pt")
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: the universal checkpoint holds no {state} of {name}.")
        value = ptfile.load(path)
        if isinstance(value, dict):
            value = value.get(C.PARAM)
        if not isinstance(value, TensorRef) or not value.is_contiguous:
            raise CheckpointError(f"{path} does not hold a contiguous tensor.")
        return value

    def has_state(self, name: str, state: str) -> bool:
        return os.path.isfile(os.path.join(self.universal_folder, "zero", name, f"{state}.pt"))


def model_state_files(universal_folder: str) -> list[str]:
    """The copied model-states files of a universal checkpoint, in DeepSpeed's (natural) order."""
    return sorted(glob.glob(os.path.join(universal_folder, f"*{C.MODEL_FILE_SUFFIX}")), key=natural_keys)


def _module_dtype(path, module, groups):
    for group in groups:
        for name, _ in group:
            value = module.get(name)
            if isinstance(value, TensorRef) and value.dtype in DTYPE_NAMES:
                return DTYPE_NAMES[value.dtype]
    raise CheckpointError(f"{path}: the module holds none of the optimizer's parameters, so its precision is unknown.")


def saved_precision(path: str) -> str:
    """bf16, fp16 or fp32: the precision a model-states file's module weights were trained in."""
    model_state = ptfile.load(path)
    module = model_state.get(MODULE) if isinstance(model_state, dict) else None
    shapes = model_state.get(C.PARAM_SHAPES) if isinstance(model_state, dict) else None
    if not isinstance(module, dict) or not isinstance(shapes, list):
        raise CheckpointError(f"{path} holds no `module` and `{C.PARAM_SHAPES}`: it was not saved by a ZeRO optimizer.")
    return _module_dtype(path, module, [list(group.items()) for group in shapes])


def _step(universal_folder, stage, groups, optimizer_state):
    if stage > 2:
        states = (optimizer_state.get(C.OPTIMIZER_STATE_DICT) or {}).get("state") or {}
        first = states.get(0) or next(iter(states.values()), {})
        return first.get(STEP) if isinstance(first, dict) else None
    for group in groups:
        for name, _ in group:
            path = os.path.join(universal_folder, "zero", name, f"{STEP}.pt")
            if os.path.isfile(path):
                return ptfile.load(path)
    return None


def _zero_stage(path, optimizer_state):
    """The stage of a saved `ZeroStageEnum` (an opaque stand-in built from its value) or plain int; 1 for
    BF16_Optimizer's state, which records none (DeepSpeed uses it with ZeRO-1 only)."""
    if isinstance(optimizer_state, dict) and C.ZERO_STAGE not in optimizer_state:
        return 1
    value = optimizer_state.get(C.ZERO_STAGE) if isinstance(optimizer_state, dict) else None
    args = getattr(value, "opaque_args", None)
    stage = args[0] if args else value
    if not isinstance(stage, int) or stage not in (1, 2, 3):
        raise CheckpointError(f"{path} records no ZeRO stage 1, 2 or 3 in `{C.ZERO_STAGE}`.")
    return stage


def optimized_groups(path: str, model_state: dict) -> list:
    """Per parameter group, [(name, shape)] of its trainable parameters in the optimizer's order."""
    shapes = model_state.get(C.PARAM_SHAPES) if isinstance(model_state, dict) else None
    if not isinstance(shapes, list) or not shapes:
        raise CheckpointError(f"{path} has no `{C.PARAM_SHAPES}`: it was not saved by a ZeRO optimizer.")
    return [[(name, tuple(int(d) for d in shape)) for name, shape in group.items()] for group in shapes]


def frozen_parameters(model_state: dict, groups: list) -> list:
    """[(name, shape)] of the module's parameters outside the optimizer (not buffers, not tied copies)."""
    trainable = {name for group in groups for name, _ in group}
    buffers = set(model_state.get(C.BUFFER_NAMES) or [])
    shared = set(model_state.get(SHARED_PARAMS) or {})
    frozen_shapes = model_state.get(C.FROZEN_PARAM_SHAPES) or {}
    frozen = []
    for name, value in model_state[MODULE].items():
        if name in trainable or name in buffers or name in shared:
            continue
        shape = frozen_shapes.get(name, getattr(value, "shape", None))
        frozen.append((name, tuple(int(d) for d in shape)))
    return frozen


def read_source(universal_folder: str) -> SourceModel:
    """Read the universal checkpoint's model states (the first file) and optimizer settings."""
    files = model_state_files(universal_folder)
    if not files:
        raise CheckpointError(f"{universal_folder} holds no model-states file (*{C.MODEL_FILE_SUFFIX}).")
    path = files[0]
    model_state = ptfile.load(path)
    if not isinstance(model_state, dict) or not isinstance(model_state.get(MODULE), dict):
        raise CheckpointError(f"{path} holds no `module` state dict.")
    groups = optimized_groups(path, model_state)
    optimizer_path = os.path.join(universal_folder, "zero", OPTIMIZER_STATE_FILE)
    optimizer_state = ptfile.load(optimizer_path)
    stage = _zero_stage(optimizer_path, optimizer_state)
    module = model_state[MODULE]
    frozen = frozen_parameters(model_state, groups)
    return SourceModel(
        universal_folder=universal_folder,
        model_state_path=path,
        model_state=model_state,
        optimizer_state=optimizer_state,
        stage=stage,
        dtype=_module_dtype(path, module, groups),
        groups=groups,
        frozen=frozen,
        step=_step(universal_folder, stage, groups, optimizer_state),
    )


def read_elements(tensor: TensorRef, start: int, count: int) -> np.ndarray:
    """Flat float32 elements [start, start + count) of a universal tensor (bf16/fp16 ones widened)."""
    array = tensor.read(start, count)
    if tensor.dtype == "bfloat16":
        return ptfile.bfloat16_bits_to_float32(array)
    return array.astype(np.float32, copy=False)
