"""Merging one parameter's fragments into its universal-checkpoint files, as DeepSpeed's converter does.

Fragments are read straight from the rank files (`FragmentReader`), concatenated over data-parallel
ranks, reshaped to each tensor-parallel rank's shape and merged over tensor-parallel ranks by the
parameter's rule (`patterns.classify`). Every step reproduces `ds_to_universal.merge_tp_slices`,
`merge_zero3_slices` and its model-weight fallback, so the files written load equal to DeepSpeed's.
"""

import json
import math
import mmap
import os

import numpy as np

from . import dsconst as C
from . import ptfile
from .errors import CheckpointError
from .index import FORMAT_EXPERT, FORMAT_FLAT, FORMAT_MODULE, OPTIMIZER_STATES, STEP
from .patterns import AFFINE, AVERAGE, REPLICATED, ROW_PARALLEL, SUB_PARAMS, TWO_SUB_PARAMS
from .ptfile import ArrayTensor

FP32 = "fp32"  # the state holding the weights themselves
SUBPARAM_SHAPE_CLASS = ("deepspeed.checkpoint.universal_checkpoint", "SubparamShape")


class FragmentReader:
    """Reads element ranges of flat tensors located by the extraction maps.

    A fragment that is used whole is a read-only view of the memory-mapped rank file: its bytes go
    from the page cache to the output file with one copy, instead of being read into a new array
    and written from it. `release()` unmaps the pages touched so far, so that the resident memory
    of a merge stays at about one tensor.
    """

    def __init__(self, maps):
        self.maps = maps
        self._handles = {}
        self._mappings = {}
        self._touched = []

    def _fd(self, path):
        if path not in self._handles:
            self._handles[path] = os.open(path, os.O_RDONLY)
        return self._handles[path]

    def locate(self, path, key):
        try:
            return self.maps[path][key]
        except KeyError:
            raise CheckpointError(f"{path} has no tensor {key} although the index lists fragments in it.")

    def read_into(self, target, path, key, offset):
        dtype, base, numel, _ = self.locate(path, key)
        if offset + target.size > numel:
            raise CheckpointError(f"{path}: a fragment of {key} runs past the end of the tensor.")
        view = memoryview(target.reshape(-1).view(np.uint8))
        position = base + offset * target.itemsize
        while len(view):
            count = os.preadv(self._fd(path), [view], position)
            if count == 0:
                raise CheckpointError(f"{path} ends before the data of {key}: the file is truncated.")
            view, position = view[count:], position + count

    def _mapping(self, path):
        if path not in self._mappings:
            try:
                self._mappings[path] = mmap.mmap(self._fd(path), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # a file system without mmap: read instead
                self._mappings[path] = None
        return self._mappings[path]

    def view(self, path, key, offset, numel):
        """(read-only array, dtype) of elements [offset, offset + numel) of a tensor, without copying."""
        dtype, base, total, _ = self.locate(path, key)
        if offset + numel > total:
            raise CheckpointError(f"{path}: a fragment of {key} runs past the end of the tensor.")
        mapping = self._mapping(path)
        if mapping is None:
            return self.read(path, key, offset, numel)
        array_dtype = ptfile.numpy_dtype(dtype)
        start = base + offset * array_dtype.itemsize
        if start + numel * array_dtype.itemsize > len(mapping):
            raise CheckpointError(f"{path} ends before the data of {key}: the file is truncated.")
        self._touched.append((mapping, start, numel * array_dtype.itemsize))
        return np.frombuffer(mapping, dtype=array_dtype, count=numel, offset=start), dtype

    def release(self):
        """Drop the mapped pages read so far from this process; they stay in the page cache."""
        for mapping, start, nbytes in self._touched:
            aligned = start - start % mmap.PAGESIZE
            mapping.madvise(mmap.MADV_DONTNEED, aligned, nbytes + start - aligned)
        self._touched.clear()

    def read(self, path, key, offset, numel):
        dtype = self.locate(path, key)[0]
        out = np.empty(numel, dtype=ptfile.numpy_dtype(dtype))
        self.read_into(out, path, key, offset)
        return out, dtype

    def value(self, path, key):
        """A scalar state such as Adam's step: a 0-d ArrayTensor, or the plain Python value DeepSpeed stored."""
        dtype, _, _, plain = self.locate(path, key)
        if dtype is None:
            return plain
        data, dtype = self.read(path, key, 0, 1)
        return ArrayTensor(data.reshape(()), dtype)

    def close(self):
        # A mapping closes itself once no array views it any more.
        self.release()
        self._mappings.clear()
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()


class Slice:
    """An array plus the torch dtype name it carries (numpy has no bfloat16)."""

    def __init__(self, array, dtype):
        self.array, self.dtype = array, dtype


def _same_value(a, b):
    if isinstance(a, ArrayTensor) and isinstance(b, ArrayTensor):
        return a.dtype == b.dtype and np.array_equal(a.array, b.array)
    return a == b


def _cat_over_dp(reader, frags, name, state, shape):
    frags = sorted(frags, key=lambda f: f.dp)
    total = sum(f.numel for f in frags)
    if len(frags) == 1:
        out, dtype = reader.view(frags[0].file, frags[0].tensor, frags[0].offset, total)
    else:
        dtype = reader.locate(frags[0].file, frags[0].tensor)[0]
        out = np.empty(total, dtype=ptfile.numpy_dtype(dtype))
        position = 0
        for frag in frags:
            reader.read_into(out[position : position + frag.numel], frag.file, frag.tensor, frag.offset)
            position += frag.numel
    if shape is None:
        return Slice(out, dtype)
    if math.prod(shape) != total:
        raise CheckpointError(
            f"The {state} fragments of {name} on tp rank {frags[0].tp} hold {total} elements, "
            f"but its recorded shape {tuple(shape)} needs {math.prod(shape)}."
        )
    return Slice(out.reshape(shape), dtype)


def tp_slices(reader, frags_by_tp, name, state, shapes, tp_degree, reshape=True):
    slices, empty = [], []
    for tp in range(tp_degree):
        frags = frags_by_tp.get(tp)
        if not frags:
            empty.append((tp, len(slices)))
            continue
        slices.append(_cat_over_dp(reader, frags, name, state, shapes[tp] if reshape else None))
    if empty and reshape and slices:
        for tp, position in reversed(empty):
            missing = shapes[tp]
            if missing is None or math.prod(missing) != 0:
                raise CheckpointError(f"Tensor-parallel rank {tp} holds no {state} fragment of {name}, whose shape there is {missing}.")
            slices.insert(position, Slice(np.empty(missing, dtype=slices[0].array.dtype), slices[0].dtype))
    return slices


def _chunk2(array):
    first = -(-array.shape[0] // 2)
    return array[:first], array[first:]


def _resolve_logical_shape(shape, total, name):
    placeholders = [i for i, d in enumerate(shape) if d is not None and d < 0]
    if not placeholders:
        return shape
    if len(placeholders) > 1:
        raise CheckpointError(f"Sub-parameter shape {shape} of {name} has more than one placeholder dimension.")
    known = math.prod(d for i, d in enumerate(shape) if i not in placeholders)
    if known <= 0 or total % known:
        raise CheckpointError(f"Sub-parameter shape {shape} of {name} cannot hold {total} elements.")
    resolved = list(shape)
    resolved[placeholders[0]] = total // known
    return resolved


def _field(entry, key):
    return entry[key] if isinstance(entry, dict) else getattr(entry, key)


def subparam_shape(patterns, shape, partition_dim):
    """DeepSpeed's SubparamShape dataclass, written as the real class without importing DeepSpeed."""
    return ptfile.opaque_instance(*SUBPARAM_SHAPE_CLASS, {"patterns": patterns, "shape": shape, "partition_dim": partition_dim})


def _merge_sub_params(name, rule, slices, info, tp_degree):
    entry = rule.sub_params
    patterns, shape, dim = _field(entry, "patterns"), _field(entry, "shape"), _field(entry, "partition_dim")
    spec = shape[dim]
    version = info.get(C.UNIVERSAL_CHECKPOINT_VERSION_KEY, 0.0)
    normalized = subparam_shape(patterns, shape, dim)
    if version >= 0.4:
        sizes = spec
        widths_by_pattern = info.get(C.SUB_PARAM_SHARD_WIDTHS, {})
        if rule.pattern not in widths_by_pattern:
            raise CheckpointError(
                f"Universal checkpoint version {version} records no {C.SUB_PARAM_SHARD_WIDTHS} for {name}, "
                f"whose pattern {rule.pattern} declares sub-parameters."
            )
        widths = widths_by_pattern[rule.pattern]
    else:
        if isinstance(spec, tuple):
            sizes = spec
        else:
            full = sum(s.array.shape[dim] for s in slices)
            if spec <= 0 or full % spec:
                raise CheckpointError(f"Legacy sub-parameter count {spec} of {name} does not divide its size {full}.")
            sizes = (full // spec,) * spec
            normalized_shape = list(shape)
            normalized_shape[dim] = sizes
            normalized = subparam_shape(patterns, tuple(normalized_shape), dim)
        uneven = [size for size in sizes if size % tp_degree]
        if uneven:
            raise CheckpointError(
                f"Sub-parameter sizes {uneven} of {name} are not divisible by tp degree {tp_degree}, and "
                f"universal checkpoint version {version} records no shard widths to undo an uneven split."
            )
        widths = [[size // tp_degree] * tp_degree for size in sizes]
    if len(widths) != len(sizes) or any(len(w) != tp_degree or sum(w) != s for s, w in zip(sizes, widths)):
        raise CheckpointError(f"The sub-parameter shard widths {widths} of {name} do not fit sizes {list(sizes)}.")
    logical = [sum(d) if isinstance(d, tuple) else d for d in shape]
    logical[dim] = sum(sizes)
    logical = _resolve_logical_shape(logical, sum(s.array.size for s in slices), name)
    views = []
    for tp, piece in enumerate(slices):
        rank_shape = list(logical)
        rank_shape[dim] = sum(w[tp] for w in widths)
        if math.prod(rank_shape) != piece.array.size:
            raise CheckpointError(f"tp rank {tp} of {name} holds {piece.array.size} elements, not the {tuple(rank_shape)} its shard widths describe.")
        views.append(piece.array.reshape(rank_shape))
    offsets = [0] * len(views)
    chunks = []
    for sub_widths in widths:
        pieces = []
        for tp, view in enumerate(views):
            pieces.append(np.take(view, range(offsets[tp], offsets[tp] + sub_widths[tp]), axis=dim))
            offsets[tp] += sub_widths[tp]
        chunks.append(np.concatenate(pieces, axis=dim))
    return np.concatenate(chunks, axis=dim), {C.SUB_PARAM_SHAPE: normalized}


def _average(name, slices):
    if slices[0].array.dtype not in (np.float32, np.float64):
        raise CheckpointError(f"Averaging {slices[0].dtype} slices of {name} is not supported; DeepSpeed averages fp32 states.")
    total = 0
    for piece in slices:
        total = total + piece.array
    return total / len(slices)


def _affine(name, rule, slices, info, state):
    import torch  # affine maps come from AutoTP/AutoEP; DeepSpeed's own rebuild keeps them exact
    from deepspeed.checkpoint.affine import SCALE_POWER_BY_STATE, ParamAffineMap

    params = info[C.AFFINE_MAP][C.AFFINE_MAP_PARAMS]
    affine_map = ParamAffineMap.from_dict(params[rule.pattern])
    pieces = {tp: torch.from_numpy(np.array(s.array)) for tp, s in enumerate(slices)}  # writable copies
    return affine_map.rebuild(pieces, SCALE_POWER_BY_STATE[state]).numpy()


def merge_state(name, rule, state, slices, info, tp_degree):
    """The dict DeepSpeed saves for one state of one parameter, or None when it writes no file."""
    entries = {}
    if rule.kind == AFFINE:
        param = _affine(name, rule, slices, info, state)
    elif rule.kind == REPLICATED:
        for tp, other in enumerate(slices[1:], start=1):
            if other.array.shape != slices[0].array.shape or not np.array_equal(other.array, slices[0].array):
                raise CheckpointError(
                    f"Parameter {name} is declared tensor-parallel replicated, but its {state} on tp rank {tp} differs from tp rank 0."
                )
        param = slices[0].array
    elif rule.kind == AVERAGE:
        param = _average(name, slices)
    elif rule.kind == TWO_SUB_PARAMS:
        halves = [_chunk2(s.array) for s in slices]
        param = np.concatenate([np.concatenate([h[0] for h in halves]), np.concatenate([h[1] for h in halves])])
        entries = {C.CAT_DIM: 0, C.PARAM_N_SUB_PARAMS: 2}
    elif rule.kind == SUB_PARAMS:
        param, entries = _merge_sub_params(name, rule, slices, info, tp_degree)
    else:
        if not slices:
            return None
        cat_dim = 1 if rule.kind == ROW_PARALLEL else 0
        param = np.concatenate([s.array for s in slices], axis=cat_dim) if len(slices) > 1 else slices[0].array
        entries = {C.CAT_DIM: cat_dim}
    if rule.vocabulary:
        if C.ORIGINAL_VOCAB_SIZE not in info:
            raise CheckpointError(f"`{C.UNIVERSAL_CHECKPOINT_INFO}` names vocabulary patterns but no `{C.ORIGINAL_VOCAB_SIZE}`.")
        param = param[: info[C.ORIGINAL_VOCAB_SIZE], :]
        entries[C.VOCAB_TENSOR] = True
    entries[C.PARAM] = ArrayTensor(np.ascontiguousarray(param), slices[0].dtype if slices else "float32")
    return entries


def _float32(array, dtype):
    if dtype == "bfloat16":
        return ptfile.bfloat16_bits_to_float32(array)
    return array.astype(np.float32)


def merge_parameter(reader, row, frags, rule, info, tp_degree, folder):
    """Write every state file of one parameter into `folder` (created); returns the file names written."""
    os.makedirs(folder, exist_ok=True)
    written = []

    def save(state, obj):
        # `folder` is inside the merge job's staging folder, which appears as a whole when complete.
        ptfile.save(obj, os.path.join(folder, f"{state}.pt"), atomic=False)
        written.append(f"{state}.pt")
        reader.release()

    merge_states(reader, row, frags, rule, info, tp_degree, save)
    return written


def merged_weight(reader, row, frags, rule, info, tp_degree):
    """One parameter's fp32 weight as its universal fp32.pt holds it: (array, torch dtype name), merged over
    data- and tensor-parallel ranks; the array may view the mapped rank file until `reader.release()`."""
    found = {}
    merge_states(reader, row, frags, rule, info, tp_degree, found.__setitem__, states=(FP32,))
    if FP32 not in found:
        raise CheckpointError(f"Parameter {row['param']} has no fp32 fragments in any rank file.")
    tensor = found[FP32][C.PARAM] if isinstance(found[FP32], dict) else found[FP32]
    return tensor.array, tensor.dtype


def merge_states(reader, row, frags, rule, info, tp_degree, save, states=(STEP, *OPTIMIZER_STATES)):
    """save(state, object) for each of `states` that the universal checkpoint holds for this parameter, in
    the order merge_parameter writes them (as DeepSpeed saves each state file)."""
    shapes = [tuple(s) if s is not None else None for s in json.loads(row["shapes"])]

    if row["format"] == FORMAT_MODULE:
        if FP32 in states:
            dtype, _, numel, _ = reader.locate(row["source"], row["tensor"])
            data, dtype = reader.view(row["source"], row["tensor"], 0, numel)
            save(FP32, {C.PARAM: ArrayTensor(_float32(data, dtype).reshape(shapes[0]), "float32")})
        return

    if row["format"] == FORMAT_EXPERT:
        from .autoep import merge_expert_parameter

        merge_expert_parameter(reader, row, frags, save, states)
        return

    by_state_tp = {}
    for frag in frags:
        by_state_tp.setdefault(frag.state, {}).setdefault(frag.tp, []).append(frag)

    if row["format"] == FORMAT_FLAT:
        for state in (s for s in OPTIMIZER_STATES if s in states):
            piece = tp_slices(reader, by_state_tp.get(state, {}), row["param"], state, shapes, 1, reshape=False)
            if not piece:
                raise CheckpointError(f"Parameter {row['param']} has no {state} fragments in any rank file.")
            save(state, ArrayTensor(piece[0].array, piece[0].dtype))
        return

    steps = []
    for tp in sorted(by_state_tp.get(STEP, {})) if STEP in states else ():
        values = [reader.value(f.file, f.tensor) for f in sorted(by_state_tp[STEP][tp], key=lambda f: f.dp)]
        if not all(_same_value(v, values[0]) for v in values):
            raise CheckpointError(f"The data-parallel ranks disagree on the optimizer step of {row['param']} (tp rank {tp}).")
        steps.append(values[0])
    if steps:
        save(STEP, steps[0])
    for state in (s for s in OPTIMIZER_STATES if s in states):
        slices = tp_slices(reader, by_state_tp.get(state, {}), row["param"], state, shapes, tp_degree)
        entries = merge_state(row["param"], rule, state, slices, info, tp_degree)
        if entries is not None:
            save(state, entries)
