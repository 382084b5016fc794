"""What a reshard reads from its source checkpoint: the model states, the optimizer's global state and, per
parameter, flat elements of its fp32 weight and Adam moments, straight from the source's rank files.

A parameter's state is read the way the universal conversion's merge stage reads it (`stages.merge`), through
the index's fragment table and the extraction maps (`stages.extract.FragmentReader`): its fragments
concatenated over data-parallel ranks are the elements of its universal tensor (`zero/<param>/<state>.pt`),
flat for a ZeRO-3 source and shaped for a ZeRO-1/2 one, with no padding either way. Only the elements a
target rank needs are read, one range at a time, so no universal checkpoint is written first.
"""

import os
from dataclasses import dataclass, field

import numpy as np

from .. import dsconst as C
from .. import ptfile
from ..errors import CheckpointError, UcpflowError
from ..ptfile import ArrayTensor, TensorRef
from ..source.layout import natural_keys
from ..source.patterns import AFFINE
from ..stages.extract import FragmentReader
from ..stages.finalize import universal_optimizer_state
from ..stages.merge import source_name_of
from ..tables import (
    FORMAT_EXPERT,
    Fragment,
    IndexFiles,
    Parameter,
    read_extraction,
    read_fragments,
    read_index_record,
)

FP32 = "fp32"
STEP = "step"
MODULE = "module"
# Keys of DeepSpeed's model states that checkpoint/constants.py does not name (engine._common_checkpoint_state).
SHARED_PARAMS = "shared_params"
MOMENTS = ("exp_avg", "exp_avg_sq")
DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class FragmentedState:
    """One state of one parameter as its universal tensor holds it (flat, unpadded), read from the
    fragments the data-parallel ranks hold, in rank order: `read(start, count)` reads those elements only."""

    def __init__(self, reader: FragmentReader, fragments: list[Fragment], name: str, state: str):
        self.reader, self.name, self.state = reader, name, state
        self.parts, position = [], 0
        for fragment in sorted(fragments, key=lambda f: f.dp):
            self.parts.append((position, fragment))
            position += fragment.numel
        self.numel = position
        self.dtype = reader.locate(self.parts[0][1].file, self.parts[0][1].tensor)[0] if self.parts else "float32"

    def read(self, start: int, count: int) -> np.ndarray:
        """Flat elements [start, start + count), in the dtype of the rank files' flat tensors."""
        if start < 0 or start + count > self.numel:
            raise CheckpointError(f"Elements [{start}, {start + count}) of the {self.state} of {self.name} lie outside "
                                  f"its {self.numel} elements.")
        out = np.empty(count, dtype=ptfile.numpy_dtype(self.dtype))
        for position, fragment in self.parts:
            lo, hi = max(start, position), min(start + count, position + fragment.numel)
            if lo < hi:
                self.reader.read_into(out[lo - start : hi - start], fragment.file, fragment.tensor,
                                      fragment.offset + lo - position)
        return out


@dataclass
class SourceModel:
    """The source's model states and optimizer settings, and a reader of its parameters' states."""

    model_state_path: str
    model_state: dict
    optimizer_state: dict
    stage: int
    dtype: str  # bf16, fp16 or fp32: the training precision of the module weights
    groups: list  # per parameter group: [(name, shape), ...] of its trainable parameters, in order
    model_files: list  # the source's model-states files in data-parallel rank order
    frozen: list = field(default_factory=list)  # [(name, shape)] of frozen parameters
    step: object = None  # Adam's step as saved (a 0-d tensor or a number)
    states: dict = field(default_factory=dict)  # {(name, state): FragmentedState}
    reader: FragmentReader | None = None  # reads the states' fragments from the rank files

    @property
    def module(self) -> dict:
        return self.model_state[MODULE]

    def tensor(self, name: str, state: str) -> FragmentedState:
        """One parameter's state, as the elements of its universal tensor."""
        try:
            return self.states[name, state]
        except KeyError:
            raise CheckpointError(f"The index lists no {state} fragments of {name} in any rank file.") from None

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


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


def check_parameters(params: list[Parameter], folder: str) -> None:
    """Refuse parameters whose universal tensor is not their fragments side by side (AutoEP experts, AutoTP's
    affine maps, a vocabulary trimmed of its padding)."""
    for row in params:
        if row.format == FORMAT_EXPERT or row.merge == AFFINE or row.vocabulary:
            what = "an AutoEP expert" if row.format == FORMAT_EXPERT else (
                "declared an AutoTP affine map" if row.merge == AFFINE else "a vocabulary whose padding the universal "
                "checkpoint drops")
            raise UcpflowError(f"Parameter {row.param} of {folder} is {what}, which reshard does not write; convert the "
                               "checkpoint to the universal checkpoint with `snakemake` instead.")


def _step(reader, stage, groups, optimizer_state, fragments):
    """Adam's step as the universal checkpoint holds it: ZeRO-3's from zero/optimizer_state.pt; ZeRO-1/2's
    from step.pt of the first parameter that has one (its lowest data-parallel rank's fragment)."""
    if stage > 2:
        states = (optimizer_state.get(C.OPTIMIZER_STATE_DICT) or {}).get("state") or {}
        first = states.get(0) or next(iter(states.values()), {})
        return first.get(STEP) if isinstance(first, dict) else None
    for group in groups:
        for name, _ in group:
            steps = fragments.get((name, STEP))
            if steps:
                first = min(steps, key=lambda f: f.dp)
                return reader.value(first.file, first.tensor)
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


def _first_model_file(paths):
    """The model-states file ds_to_universal's copies list first (by name, in natural order)."""
    return min(paths, key=lambda path: natural_keys(os.path.basename(path)))


def read_source(index: IndexFiles, map_paths: list[str]) -> SourceModel:
    """The source checkpoint's model states (its first model-states file), optimizer settings and a reader of
    its parameters' states through the extraction maps `map_paths` of its rank files."""
    record = read_index_record(index.layout)
    layout = record.layout
    if not layout.model_files:
        raise CheckpointError(f"{layout.folder} holds no model-states file (*{C.MODEL_FILE_SUFFIX}).")
    path = _first_model_file(layout.copy_files or layout.model_files)
    model_state = ptfile.load(path)
    if not isinstance(model_state, dict) or not isinstance(model_state.get(MODULE), dict):
        raise CheckpointError(f"{path} holds no `module` state dict.")
    groups = optimized_groups(path, model_state)
    optimizer_state = universal_optimizer_state(record)
    stage = _zero_stage(record.optimizer_state_source, optimizer_state)
    trainable = {name for group in groups for name, _ in group}
    fragments = {}
    for fragment in read_fragments(index.fragments):
        if fragment.param in trainable:
            fragments.setdefault((fragment.param, fragment.state), []).append(fragment)
    reader = FragmentReader({record.source_path(source_name_of(p)): read_extraction(p) for p in map_paths})
    states = {key: FragmentedState(reader, found, *key) for key, found in fragments.items() if key[1] != STEP}
    return SourceModel(
        model_state_path=path,
        model_state=model_state,
        optimizer_state=optimizer_state,
        stage=stage,
        dtype=_module_dtype(path, model_state[MODULE], groups),
        groups=groups,
        model_files=list(layout.model_files),
        frozen=frozen_parameters(model_state, groups),
        step=_step(reader, stage, groups, optimizer_state, fragments),
        states=states,
        reader=reader,
    )


def read_elements(tensor: TensorRef | FragmentedState, start: int, count: int) -> np.ndarray:
    """Flat float32 elements [start, start + count) of a tensor (bf16/fp16 ones widened)."""
    array = tensor.read(start, count)
    if tensor.dtype == "bfloat16":
        return ptfile.bfloat16_bits_to_float32(array)
    return array.astype(np.float32, copy=False)


def step_copy(step: object) -> object:
    """A tensor step as a new tensor of its own, a plain number as is."""
    if isinstance(step, TensorRef):
        return ArrayTensor(step.read_array().copy(), step.dtype)
    if isinstance(step, ArrayTensor):
        return ArrayTensor(step.array.copy(), step.dtype, step.shape)
    return step
