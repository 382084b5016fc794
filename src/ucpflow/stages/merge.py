"""The merge stage: one parameter's fragments into its universal-checkpoint files, as DeepSpeed's converter
does, and the merge job, which writes a bucket of parameters into its staging folder.

Fragments are read straight from the rank files (`FragmentReader`), concatenated over data-parallel
ranks, reshaped to each tensor-parallel rank's shape and merged over tensor-parallel ranks by the
parameter's rule (`patterns.classify`). Every step reproduces `ds_to_universal.merge_tp_slices`,
`merge_zero3_slices` and its model-weight fallback, so the files written load equal to DeepSpeed's.
"""

import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from .. import dsconst as C
from .. import ptfile
from ..errors import CheckpointError
from ..fileio import FileRange, atomic_directory, remove_partial_folders
from ..markers import retract_latest_universal
from ..ptfile import ArrayTensor
from ..source.patterns import AFFINE, AVERAGE, REPLICATED, ROW_PARALLEL, SUB_PARAMS, TWO_SUB_PARAMS, MergeRule, classify
from ..tables import (
    FORMAT_EXPERT,
    FORMAT_FLAT,
    FORMAT_MODULE,
    FP32,
    OPTIMIZER_STATES,
    STEP,
    Fragment,
    IndexFiles,
    IndexRecord,
    Parameter,
    Shape,
    read_extraction,
    read_fragments,
    read_index_record,
    read_parameters,
    read_universal_info,
)
from .extract import FragmentReader
from .merge_experts import merge_expert_parameter

SUBPARAM_SHAPE_CLASS = ("deepspeed.checkpoint.universal_checkpoint", "SubparamShape")


class Slice:
    """An array plus the torch dtype name it carries (numpy has no bfloat16)."""

    def __init__(self, array, dtype):
        self.array, self.dtype = array, dtype


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


def tp_slices(reader: FragmentReader, frags_by_tp: Mapping[int, list[Fragment]], name: str, state: str,
              shapes: Sequence[Shape | None], tp_degree: int, reshape: bool = True) -> list[Slice]:
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


def subparam_shape(patterns: Sequence[str], shape: Sequence[Any], partition_dim: int) -> ptfile.Opaque:
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


def merge_state(name: str, rule: MergeRule, state: str, slices: list[Slice], info: Mapping[str, Any],
                tp_degree: int) -> dict[str, Any] | None:
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


def merge_parameter(reader: FragmentReader, row: Parameter, frags: list[Fragment], rule: MergeRule | None, info: dict,
                    tp_degree: int, folder: str) -> list[str]:
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


def merged_weight(reader: FragmentReader, row: Parameter, frags: list[Fragment], rule: MergeRule | None, info: dict,
                  tp_degree: int) -> tuple[np.ndarray, str]:
    """One parameter's fp32 weight as its universal fp32.pt holds it: (array, torch dtype name), merged over
    data- and tensor-parallel ranks; the array may view the mapped rank file until `reader.release()`."""
    found = {}
    merge_states(reader, row, frags, rule, info, tp_degree, found.__setitem__, states=(FP32,))
    if FP32 not in found:
        raise CheckpointError(f"Parameter {row.param} has no fp32 fragments in any rank file.")
    tensor = found[FP32][C.PARAM] if isinstance(found[FP32], dict) else found[FP32]
    return tensor.array, tensor.dtype


def weight_file_ranges(reader: FragmentReader, row: Parameter, frags: list[Fragment], rule: MergeRule | None,
                       tp_degree: int) -> tuple[list[FileRange], str] | None:
    """(the rank files' byte ranges whose concatenation is `merged_weight`'s array, its torch dtype name) where
    that array is only the fp32 fragments of the data-parallel ranks laid end to end (no tensor-parallel
    merge, no vocabulary trimming, no model-weight fallback); None where it is more."""
    fp32 = sorted((frag for frag in frags if frag.state == FP32 and frag.tp == 0), key=lambda frag: frag.dp)
    if row.format != FORMAT_FLAT:  # a flat (ZeRO-3) parameter is its rank-0 fragments as they are
        if row.format in (FORMAT_MODULE, FORMAT_EXPERT) or tp_degree != 1 or row.shapes[0] is None:
            return None
        if rule is None or rule.vocabulary or rule.kind in (AFFINE, AVERAGE, SUB_PARAMS):
            return None
        if sum(frag.numel for frag in fp32) != math.prod(row.shapes[0]):
            return None
    if not fp32:
        return None
    dtypes = {reader.locate(frag.file, frag.tensor).dtype for frag in fp32}
    if len(dtypes) != 1:
        return None
    return [reader.byte_range(frag.file, frag.tensor, frag.offset, frag.numel) for frag in fp32], dtypes.pop()


def merge_states(reader: FragmentReader, row: Parameter, frags: list[Fragment], rule: MergeRule | None, info: dict,
                 tp_degree: int, save: Callable[[str, Any], None],
                 states: Collection[str] = (STEP, *OPTIMIZER_STATES)) -> None:
    """save(state, object) for each of `states` that the universal checkpoint holds for this parameter, in
    the order merge_parameter writes them (as DeepSpeed saves each state file)."""
    shapes = row.shapes

    if row.format == FORMAT_MODULE:
        if FP32 in states:
            dtype, _, numel, _ = reader.locate(row.source, row.tensor)
            data, dtype = reader.view(row.source, row.tensor, 0, numel)
            save(FP32, {C.PARAM: ArrayTensor(_float32(data, dtype).reshape(shapes[0]), "float32")})
        return

    if row.format == FORMAT_EXPERT:
        merge_expert_parameter(reader, row, frags, save, states)
        return

    by_state_tp = {}
    for frag in frags:
        by_state_tp.setdefault(frag.state, {}).setdefault(frag.tp, []).append(frag)

    if row.format == FORMAT_FLAT:
        for state in (s for s in OPTIMIZER_STATES if s in states):
            piece = tp_slices(reader, by_state_tp.get(state, {}), row.param, state, shapes, 1, reshape=False)
            if not piece:
                raise CheckpointError(f"Parameter {row.param} has no {state} fragments in any rank file.")
            save(state, ArrayTensor(piece[0].array, piece[0].dtype))
        return

    steps = []
    for tp in sorted(by_state_tp.get(STEP, {})) if STEP in states else ():
        values = [reader.value(f.file, f.tensor) for f in sorted(by_state_tp[STEP][tp], key=lambda f: f.dp)]
        if not all(ptfile.same_value(v, values[0]) for v in values):
            raise CheckpointError(f"The data-parallel ranks disagree on the optimizer step of {row.param} (tp rank {tp}).")
        steps.append(values[0])
    if steps:
        save(STEP, steps[0])
    for state in (s for s in OPTIMIZER_STATES if s in states):
        slices = tp_slices(reader, by_state_tp.get(state, {}), row.param, state, shapes, tp_degree)
        entries = merge_state(row.param, rule, state, slices, info, tp_degree)
        if entries is not None:
            save(state, entries)


class BucketMerger:
    """What the merges of one bucket (or of the parameters `names`) read: their index rows, fragments and the
    extraction maps."""

    def __init__(self, bucket: str, index: IndexFiles, map_paths: list[str], names: set[str] | None = None):
        self.record: IndexRecord = read_index_record(index.layout)
        self.info = read_universal_info(index.info)
        chosen = (lambda row: row.bucket == bucket) if names is None else (lambda row: row.param in names)
        self.rows = [row for row in read_parameters(index.params) if chosen(row)]
        wanted = {row.param for row in self.rows}
        self.fragments: dict[str, list[Fragment]] = {}
        for fragment in read_fragments(index.fragments):
            if fragment.param in wanted:
                self.fragments.setdefault(fragment.param, []).append(fragment)
        self.reader = FragmentReader({self.record.source_path(source_name_of(p)): read_extraction(p) for p in map_paths})

    def _rule(self, row: Parameter) -> MergeRule | None:
        return classify(self.info, row.param) if row.merge else None

    def merge(self, row: Parameter, folder: str) -> None:
        merge_parameter(self.reader, row, self.fragments.get(row.param, []), self._rule(row), self.info,
                        self.record.layout.tp_degree, folder)

    def _row(self, name: str) -> Parameter:
        for row in self.rows:
            if row.param == name:
                return row
        raise CheckpointError(f"{name} is not a parameter of its merge job's index rows.")

    def merge_one(self, name: str, folder: str) -> None:
        self.merge(self._row(name), folder)

    def weight(self, name: str) -> tuple[np.ndarray, str]:
        """(array, dtype) of one parameter's fp32 weight as its universal fp32.pt holds it, without writing it;
        the array may view a rank file until `release()`."""
        row = self._row(name)
        return merged_weight(self.reader, row, self.fragments.get(name, []), self._rule(row), self.info,
                             self.record.layout.tp_degree)

    def weight_ranges(self, name: str) -> tuple[list[FileRange], str] | None:
        """weight(name)'s bytes as byte ranges of the rank files, where they are that (weight_file_ranges)."""
        row = self._row(name)
        return weight_file_ranges(self.reader, row, self.fragments.get(name, []), self._rule(row),
                                  self.record.layout.tp_degree)

    def release(self) -> None:
        self.reader.release()

    def close(self) -> None:
        self.reader.close()


def merge_job(bucket: str, index: IndexFiles, map_paths: list[str], staging: str, output_folder: str) -> list[Parameter]:
    """Merge one bucket's parameters into the folder `staging`/<param>/, which appears only once all are merged."""
    retract_latest_universal(output_folder)
    remove_partial_folders(staging)
    merger = BucketMerger(bucket, index, map_paths)
    try:
        with atomic_directory(staging) as folder:
            for row in merger.rows:
                merger.merge(row, os.path.join(folder, row.param))
    finally:
        merger.close()
    return merger.rows


def source_name_of(map_path: str) -> str:
    return os.path.basename(map_path)[: -len(".tsv")]
