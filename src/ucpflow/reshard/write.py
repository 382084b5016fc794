"""Writing the files DeepSpeed's `save_checkpoint` writes for M data-parallel ranks at ZeRO stage S.

Every flat tensor (a rank's fp32 partition, its Adam moments) is a `StreamTensor`: its bytes are read
from the source's rank files one parameter piece at a time (a chunk of at most `CHUNK_ELEMENTS`) while the
zip record is written, so a job's memory stays at one chunk however large the partition.
"""

import copy
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .. import dsconst as C
from .. import ptfile
from ..errors import CheckpointError
from ..ptfile import ArrayTensor, Size, StreamTensor, TensorRef, opaque_instance
from ..ptfile.opaque import (
    _opaque_class,  # a class stand-in to call, as a pickle's REDUCE does
)
from .plan import (
    FlatPartition,
    fragment_addresses,
    zero3_partition,
    zero3_slice,
    zero3_sub_groups,
    zero12_partition,
)
from .source import (
    FP32,
    MODULE,
    MOMENTS,
    SHARED_PARAMS,
    TORCH_DTYPES,
    FragmentedState,
    SourceModel,
    read_elements,
    step_copy,
)

CHUNK_ELEMENTS = 4 << 20  # elements read and written at a time
FRAGMENT_ADDRESS = ("deepspeed.utils.tensor_fragment", "fragment_address")
ZERO_STAGE_ENUM = ("deepspeed.runtime.zero.config", "ZeroStageEnum")
LOSS_SCALER = ("deepspeed.runtime.fp16.loss_scaler", "LossScaler")
BF16_PREFIX = "bf16_"
DS_CONFIG = "ds_config"
DP_WORLD_SIZE = "dp_world_size"


@dataclass(frozen=True)
class Target:
    """What to write: `dp` ranks at ZeRO `stage` with training precision `dtype` (bf16, fp16, fp32)."""

    dp: int
    stage: int
    dtype: str

    @property
    def torch_dtype(self) -> str:
        return TORCH_DTYPES[self.dtype]


def optim_file_name(target: Target, rank: int) -> str:
    """DeepSpeed's `_get_rank_zero_ckpt_name`: bf16_ for a bf16 engine, mp rank 00."""
    prefix = BF16_PREFIX if target.dtype == "bf16" else ""
    return f"{prefix}{C.ZERO_FILE_PREFIX}{rank}_{C.MODEL_FILE_PREFIX}00{C.OPTIM_FILE_SUFFIX}"


def model_file_name(target: Target, rank: int) -> str:
    """DeepSpeed's `_get_ckpt_name`: one file at ZeRO-1/2 (written by rank 0), one per rank at ZeRO-3."""
    if target.stage > 2:
        return f"{C.ZERO_FILE_PREFIX}{rank}_{C.MODEL_FILE_PREFIX}00{C.MODEL_FILE_SUFFIX}"
    return f"{C.MODEL_FILE_PREFIX}00{C.MODEL_FILE_SUFFIX}"


def _cast(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return ptfile.float32_to_bfloat16_bits(values)
    return values.astype(ptfile.numpy_dtype(dtype), copy=False)


def _zeros(count: int, dtype: str):
    while count > 0:
        step = min(count, CHUNK_ELEMENTS)
        yield np.zeros(step, dtype=ptfile.numpy_dtype(dtype)).view(np.uint8)
        count -= step


def _range(tensor: TensorRef | FragmentedState, start: int, count: int, dtype: str):
    for offset in range(start, start + count, CHUNK_ELEMENTS):
        step = min(CHUNK_ELEMENTS, start + count - offset)
        yield _cast(read_elements(tensor, offset, step), dtype).view(np.uint8)


def flat_stream(source: SourceModel, names: list, partition: FlatPartition, state: str, numel: int,
                dtype: str = "float32") -> StreamTensor:
    """`numel` elements of a rank's flat tensor of `state`: its parameters' pieces, zeros between."""

    def chunks():
        position = 0
        for piece in sorted(partition.pieces, key=lambda p: p.offset):
            if piece.offset >= numel:
                break
            yield from _zeros(piece.offset - position, dtype)
            count = min(piece.count, numel - piece.offset)
            yield from _range(source.tensor(names[piece.param], state), piece.start, count, dtype)
            position = piece.offset + count
        yield from _zeros(numel - position, dtype)

    return StreamTensor(dtype, (numel,), chunks)


def _whole_stream(tensor: TensorRef | FragmentedState, shape, dtype: str) -> StreamTensor:
    """A whole weight of `shape`, cast to `dtype` as it is written."""
    numel = int(np.prod(shape, dtype=np.int64))
    return StreamTensor(dtype, tuple(shape), lambda: _range(tensor, 0, numel, dtype))


def _slice_stream(tensor: TensorRef | FragmentedState, numel: int, dp: int, rank: int, dtype: str) -> StreamTensor:
    """Rank `rank`'s ZeRO-3 slice of a weight (`ds_tensor`), zero-padded to the partition size."""
    size, start, count = zero3_slice(numel, dp, rank)

    def chunks():
        yield from _range(tensor, start, count, dtype)
        yield from _zeros(size - count, dtype)

    return StreamTensor(dtype, (size,), chunks)


class _Fragments:
    """A frozen parameter of a ZeRO-3 source, read from the ranks' `frozen_param_fragments` in order."""

    def __init__(self, parts: list, numel: int):
        self.parts, self.numel = parts, numel
        self.dtype = parts[0].dtype

    def read(self, start: int, count: int) -> np.ndarray:
        pieces, position = [], 0
        for part in self.parts:
            lo, hi = max(start, position), min(start + count, position + part.numel)
            if lo < hi:
                pieces.append(part.read(lo - position, hi - lo))
            position += part.numel
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=ptfile.numpy_dtype(self.dtype))


def _zero_stage(stage: int):
    """`ZeroStageEnum(stage)`, pickled as DeepSpeed's enum is: the class called with the value."""
    return _opaque_class(*ZERO_STAGE_ENUM)(stage)


def _global_state(source: SourceModel) -> dict:
    """Loss scaler, its dynamic flag and the overflow flag as saved; a BF16_Optimizer source saves none, and
    gets what DeepSpeed's ZeRO optimizer saves for bf16 and fp32 (a static scaler of 1)."""
    saved = source.optimizer_state
    return {
        C.LOSS_SCALER: saved.get(C.LOSS_SCALER) or opaque_instance(*LOSS_SCALER, {"cur_scale": 1.0, "dynamic": False}),
        "dynamic_loss_scale": saved.get("dynamic_loss_scale", False),
        "overflow": saved.get("overflow", False),
    }


def _param_groups(source: SourceModel, params_of_group):
    groups = []
    for index, group in enumerate(source.optimizer_state[C.PARAM_GROUPS]):
        group = dict(group)
        group["params"] = params_of_group(index)
        groups.append(group)
    return groups


def _numels(group) -> list[int]:
    return [int(np.prod(shape, dtype=np.int64)) for _, shape in group]


def _has_moments(source: SourceModel) -> bool:
    return source.step is not None


def _step(source: SourceModel):
    """Adam's step for one flat group's state: a tensor of its own (torch increments it in place, so groups
    sharing one would count each step once per group), or the number an older torch saved."""
    return step_copy(source.step)


def zero12_optimizer_state(source: SourceModel, target: Target, rank: int) -> dict:
    """The `optimizer_state_dict` of DeepSpeedZeroOptimizer.state_dict() on `rank` (rigid, not elastic)."""
    states, flats, paddings, alignment, mappings = {}, [], [], [], []
    for index, group in enumerate(source.groups):
        names = [name for name, _ in group]
        partition = zero12_partition(_numels(group), target.dp, rank)
        if _has_moments(source):
            state = {"step": _step(source)}
            for moment in MOMENTS:
                state[moment] = flat_stream(source, names, partition, moment, partition.numel)
            states[index] = state
        flats.append(flat_stream(source, names, partition, FP32, partition.numel - partition.padding))
        paddings.append(partition.padding)
        alignment.append([0] * len(group))
        mappings.append(OrderedDict(
            (names[param], opaque_instance(*FRAGMENT_ADDRESS, {"numel": numel, "start": start}))
            for param, numel, start in fragment_addresses(partition)
        ))
    saved = source.optimizer_state
    return {
        **_global_state(source),
        C.CLIP_GRAD: saved.get(C.CLIP_GRAD, _ds_config(source).get("gradient_clipping", 1.0)),
        C.BASE_OPTIMIZER_STATE: {"state": states, C.PARAM_GROUPS: _param_groups(source, lambda i: [i])},
        C.SINGLE_PARTITION_OF_FP32_GROUPS: flats,
        C.ZERO_STAGE: _zero_stage(target.stage),
        C.GROUP_PADDINGS: paddings,
        C.PARAM_ALIGNMENT_PADDINGS: alignment,
        C.PARTITION_COUNT: [target.dp] * len(source.groups),
        C.DS_VERSION: saved.get(C.DS_VERSION, _ds_version(source)),
        C.PARAM_SLICE_MAPPINGS: mappings,
    }


def zero3_optimizer_state(source: SourceModel, target: Target, rank: int, sub_group_size: int) -> dict:
    """The `optimizer_state_dict` of DeepSpeedZeroOptimizer_Stage3._rigid_state_dict() on `rank`."""
    states, flats, members = {}, [], []
    for index, group in enumerate(source.groups):
        names, numels = [name for name, _ in group], _numels(group)
        members.append([])
        for indices in zero3_sub_groups(numels, target.dp, sub_group_size):
            partition = zero3_partition(numels, indices, target.dp, rank)
            sub_group = len(flats)
            members[index].append(sub_group)
            if _has_moments(source):
                state = {"step": _step(source)}
                for moment in MOMENTS:
                    state[moment] = flat_stream(source, names, partition, moment, partition.numel)
                states[sub_group] = state
            flats.append(flat_stream(source, names, partition, FP32, partition.numel))
    return {
        C.ZERO_STAGE: _zero_stage(3),
        **_global_state(source),
        C.PARTITION_COUNT: target.dp,
        C.OPTIMIZER_STATE_DICT: {"state": states, C.PARAM_GROUPS: _param_groups(source, lambda i: members[i])},
        C.FP32_FLAT_GROUPS: flats,
    }


def _ds_config(source: SourceModel) -> dict:
    value = source.model_state.get(DS_CONFIG)
    return value if isinstance(value, dict) else {}


def _ds_version(source: SourceModel):
    return source.model_state.get(C.DS_VERSION)


def target_ds_config(source: SourceModel, target: Target) -> dict:
    """The source's DeepSpeed config with the target's stage, precision and global batch size."""
    config = copy.deepcopy(_ds_config(source))
    zero = dict(config.get("zero_optimization") or {})
    zero["stage"] = target.stage
    config["zero_optimization"] = zero
    for key in ("bf16", "fp16"):
        if key in config or target.dtype == key:
            config[key] = {**(config.get(key) or {}), "enabled": target.dtype == key}
    micro, steps = config.get("train_micro_batch_size_per_gpu"), config.get("gradient_accumulation_steps")
    if isinstance(micro, int) and isinstance(steps, int) and "train_batch_size" in config:
        config["train_batch_size"] = micro * steps * target.dp
    return config


def write_optimizer_file(source: SourceModel, target: Target, rank: int, path: str, sub_group_size: int) -> None:
    """Write rank `rank`'s optimizer-states file (`_save_zero_checkpoint`) to `path`, atomically."""
    if target.stage > 2:
        state = zero3_optimizer_state(source, target, rank, sub_group_size)
    else:
        state = zero12_optimizer_state(source, target, rank)
    ptfile.save({C.OPTIMIZER_STATE_DICT: state, DS_CONFIG: target_ds_config(source, target),
                 C.DS_VERSION: _ds_version(source)}, path)


def _frozen_weight(source: SourceModel, name: str, shape):
    """A frozen (not optimized) parameter's weight: the module's own (ZeRO-1/2, whose universal fp32.pt is that
    weight widened to float32), else the ranks' `frozen_param_fragments` (ZeRO-3)."""
    value = source.module.get(name)
    if isinstance(value, TensorRef) and value.numel == int(np.prod(shape, dtype=np.int64)) and value.is_contiguous:
        return value
    parts = []
    for path in source.model_files:
        fragments = ptfile.load(path).get(C.FROZEN_PARAM_FRAGMENTS) or {}
        if not isinstance(fragments.get(name), TensorRef):
            raise CheckpointError(f"{path} holds no frozen_param_fragments entry for the frozen parameter {name}.")
        parts.append(fragments[name])
    return _Fragments(parts, int(np.prod(shape, dtype=np.int64)))


def _weight_of(source: SourceModel):
    """name -> the source tensor holding that parameter's weight (trainable, tied or frozen)."""
    trainable = {name for group in source.groups for name, _ in group}
    frozen = dict(source.frozen)
    shared = source.model_state.get(SHARED_PARAMS) or {}

    def weight(name):
        owner = shared.get(name, name)
        if owner in trainable:
            return source.tensor(owner, FP32)
        if owner in frozen:
            return _frozen_weight(source, owner, frozen[owner])
        raise CheckpointError(f"{source.model_state_path}: the module entry {name} is neither a parameter nor a buffer.")

    return weight


def _buffer(value, source: SourceModel, target: Target):
    """A buffer as saved, cast like the module when the training precision changes (floating buffers only)."""
    if isinstance(value, TensorRef) and value.dtype == source_torch_dtype(source) and value.dtype != target.torch_dtype:
        return _whole_stream(value, value.shape, target.torch_dtype)
    return value


def source_torch_dtype(source: SourceModel) -> str:
    return TORCH_DTYPES[source.dtype]


def model_state(source: SourceModel, target: Target, rank: int) -> dict:
    """The model-states dict `_save_checkpoint` writes on data-parallel rank `rank` (0 at ZeRO-1/2)."""
    saved = source.model_state
    buffers = set(saved.get(C.BUFFER_NAMES) or [])
    weight = _weight_of(source)
    shapes = {name: shape for group in source.groups for name, shape in group}
    shapes.update(source.frozen)
    shared = saved.get(SHARED_PARAMS) or {}
    dtype = target.torch_dtype
    module, streams = OrderedDict(), {}
    for name, value in source.module.items():
        owner = shared.get(name, name)
        if name in buffers:
            module[name] = _buffer(value, source, target)
        elif target.stage > 2:
            module[name] = ArrayTensor(np.empty(0, dtype=ptfile.numpy_dtype(dtype)), dtype)
        else:
            # A tied weight is the same tensor object as its owner's: written once, as torch.save shares it.
            if owner not in streams:
                streams[owner] = _whole_stream(weight(owner), shapes[owner], dtype)
            module[name] = streams[owner]
    state = dict(saved)
    state[MODULE] = module
    frozen_shapes = OrderedDict((name, Size(shape)) for name, shape in source.frozen)
    if target.stage == 1:
        state[C.FROZEN_PARAM_SHAPES] = state[C.FROZEN_PARAM_FRAGMENTS] = None
    elif target.stage == 2:
        state[C.FROZEN_PARAM_SHAPES] = frozen_shapes
        state[C.FROZEN_PARAM_FRAGMENTS] = OrderedDict(
            (name, _whole_stream(weight(name), shape, dtype)) for name, shape in source.frozen)
    else:
        state[C.FROZEN_PARAM_SHAPES] = frozen_shapes
        state[C.FROZEN_PARAM_FRAGMENTS] = OrderedDict(
            (name, _slice_stream(weight(name), int(np.prod(shape, dtype=np.int64)), target.dp, rank, dtype))
            for name, shape in source.frozen)
    state[C.PARAM_SHAPES] = [OrderedDict((name, Size(shape)) for name, shape in group) for group in source.groups]
    # DeepSpeed records the shared parameters on global rank 0 only (engine._get_shared_params).
    state[SHARED_PARAMS] = dict(shared) if rank == 0 else {}
    state[DP_WORLD_SIZE] = target.dp
    state[DS_CONFIG] = target_ds_config(source, target)
    return state


def write_model_file(source: SourceModel, target: Target, rank: int, path: str) -> None:
    """Write the model-states file of data-parallel rank `rank` to `path`, atomically."""
    ptfile.save(model_state(source, target, rank), path)
