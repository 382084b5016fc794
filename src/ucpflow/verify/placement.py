"""What the index implies for each universal tensor: its shape, its metadata keys, and for every element
of every tensor-parallel rank's slice the position it takes in the universal tensor.

This is derived from the index tables (per-rank shapes in params.tsv, merge rule from
universal_checkpoint_info) by DeepSpeed's rules in `ds_to_universal.merge_tp_slices`, independently of
`ucpflow.merge`: a rank's slice is its data-parallel fragments concatenated in dp order (row-major in
the rank's shape); column-parallel slices are concatenated along dim 0, row-parallel along dim 1; two
sub-parameters (SwiGLU) put each rank's first half, then each rank's second half; sub-parameters (fused
QKV) put, per sub-parameter, each rank's piece of it in rank order; replicated and averaged parameters
keep tp rank 0's layout; vocabulary parameters keep the first `original_vocab_size` rows; affine maps
(AutoTP) place each piece by its recorded offsets and strides.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import dsconst as C
from .. import ptfile
from ..errors import CheckpointError
from ..source.patterns import AFFINE, AVERAGE, REPLICATED, ROW_PARALLEL, SUB_PARAMS, TWO_SUB_PARAMS, MergeRule
from ..stages.merge import SUBPARAM_SHAPE_CLASS
from ..tables import FORMAT_FLAT, FORMAT_MODULE, Fragment, Parameter
from .digest import structure_text

DROPPED = -1  # target of elements the merge leaves out (a later rank's copy of a replicated piece)


class Runs:
    """Where the elements of one rank's flat slice go: local elements [starts[i], starts[i + 1]) land at
    universal positions targets[i], targets[i] + 1, ... (DROPPED: left out); `scales[i]` divides them."""

    def __init__(self, starts, targets, scales=None):
        order = np.argsort(starts, kind="stable")
        self.starts = np.asarray(starts, dtype=np.int64)[order]
        self.delta = np.asarray(targets, dtype=np.int64)[order] - self.starts
        self.dropped = np.asarray(targets, dtype=np.int64)[order] == DROPPED
        self.scales = None if scales is None else np.asarray(scales, dtype=np.float64)[order]

    @classmethod
    def identity(cls) -> Runs:
        return cls([0], [0])

    @property
    def scaled(self) -> bool:
        return self.scales is not None and bool(np.any(self.scales != 1.0))

    def positions(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(universal positions (DROPPED for elements left out), run index or None) of local elements
        [start, start + count); the run index is given only when runs are scaled."""
        local = np.arange(start, start + count, dtype=np.int64)
        if self.starts.size == 1:
            positions = np.full(count, DROPPED, dtype=np.int64) if self.dropped[0] else local + self.delta[0]
            return positions, (np.zeros(count, dtype=np.int64) if self.scaled else None)
        first = max(int(np.searchsorted(self.starts, start, side="right")) - 1, 0)
        stop = int(np.searchsorted(self.starts, start + count, side="left"))
        bounds = np.clip(self.starts[first:stop], start, start + count)
        lengths = np.diff(np.append(bounds, start + count))
        positions = local + np.repeat(self.delta[first:stop], lengths)
        if self.dropped[first:stop].any():
            positions[np.repeat(self.dropped[first:stop], lengths)] = DROPPED
        run = np.repeat(np.arange(first, stop), lengths) if self.scaled else None
        return positions, run


def axis_runs(shape: Sequence[int], axis: int, segments: Iterable[tuple[int, int, int]], universal_width: int) -> Runs:
    """Runs of a rank slice of `shape` whose `axis` is cut into segments (local start, length, universal
    start), placed along the same axis of a universal tensor `universal_width` wide there."""
    outer = math.prod(shape[:axis])
    inner = math.prod(shape[axis + 1 :])
    width = shape[axis]
    starts, targets = [], []
    for local, length, target in segments:
        if length == 0:
            continue
        rows = np.arange(outer, dtype=np.int64)
        starts.append(rows * width * inner + local * inner)
        targets.append(rows * universal_width * inner + target * inner)
    if not starts:
        return Runs([0], [DROPPED])
    return Runs(np.concatenate(starts), np.concatenate(targets))


@dataclass
class Geometry:
    """The universal tensor one state of a parameter becomes, as the index implies it."""

    kind: str  # merge rule kind, or "" (module fallback, ZeRO-3 flat)
    shape: tuple
    keys: tuple  # the file's keys in DeepSpeed's order as `key=value` text, "param" for the tensor; None: bare tensor
    runs: dict = field(default_factory=dict)  # tp rank -> Runs
    limit: int = None  # positions at or past it are left out (vocabulary padding)


def _concat(shapes, axis, name):
    """Runs and universal shape of slices concatenated along `axis`."""
    if any(s is None or len(s) <= axis for s in shapes):
        raise CheckpointError(f"The per-rank shapes {shapes} of {name} cannot be concatenated along dim {axis}.")
    width = sum(s[axis] for s in shapes)
    runs, offset = {}, 0
    for tp, shape in enumerate(shapes):
        runs[tp] = axis_runs(shape, axis, [(0, shape[axis], offset)], width)
        offset += shape[axis]
    universal = list(shapes[0])
    universal[axis] = width
    return runs, tuple(universal)


def _two_sub_params(shapes, name):
    """torch.chunk(slice, 2) on every rank; all first halves in rank order, then all second halves."""
    if any(s is None or not s for s in shapes):
        raise CheckpointError(f"The per-rank shapes {shapes} of {name} cannot hold two sub-parameters.")
    firsts = [-(-s[0] // 2) for s in shapes]
    width = sum(s[0] for s in shapes)
    runs, first_offset, second_offset = {}, 0, sum(firsts)
    for tp, shape in enumerate(shapes):
        half = firsts[tp]
        segments = [(0, half, first_offset), (half, shape[0] - half, second_offset)]
        runs[tp] = axis_runs(shape, 0, segments, width)
        first_offset += half
        second_offset += shape[0] - half
    return runs, (width, *shapes[0][1:])


def _field(entry, key):
    return entry[key] if isinstance(entry, dict) else getattr(entry, key)


def _sub_params(rule, info, shapes, tp_degree, name):
    """Runs, universal shape and the written SubparamShape of a parameter with sub-parameters."""
    entry = rule.sub_params
    patterns, shape, dim = _field(entry, "patterns"), _field(entry, "shape"), _field(entry, "partition_dim")
    spec = shape[dim]
    written = shape
    if info.get(C.UNIVERSAL_CHECKPOINT_VERSION_KEY, 0.0) >= 0.4:
        sizes = spec
        widths = (info.get(C.SUB_PARAM_SHARD_WIDTHS) or {}).get(rule.pattern)
        if widths is None:
            raise CheckpointError(f"universal_checkpoint_info records no {C.SUB_PARAM_SHARD_WIDTHS} for {name}.")
    else:
        if isinstance(spec, tuple):
            sizes = spec
        else:
            full = sum(s[dim] for s in shapes)
            sizes = (full // spec,) * spec
            written = tuple(sizes if i == dim else d for i, d in enumerate(shape))
        widths = [[size // tp_degree] * tp_degree for size in sizes]
    logical = [sum(d) if isinstance(d, tuple) else d for d in shape]
    logical[dim] = sum(sizes)
    placeholders = [i for i, d in enumerate(logical) if d is not None and d < 0]
    if placeholders:
        known = math.prod(d for i, d in enumerate(logical) if i != placeholders[0])
        logical[placeholders[0]] = sum(math.prod(s) for s in shapes) // known if known else 0
    runs, offsets = {}, [0] * tp_degree
    segments = {tp: [] for tp in range(tp_degree)}
    universal_offset = 0
    for size, sub_widths in zip(sizes, widths):
        rank_offset = universal_offset
        for tp in range(tp_degree):
            segments[tp].append((offsets[tp], sub_widths[tp], rank_offset))
            offsets[tp] += sub_widths[tp]
            rank_offset += sub_widths[tp]
        universal_offset += size
    for tp in range(tp_degree):
        rank_shape = list(logical)
        rank_shape[dim] = offsets[tp]
        if math.prod(rank_shape) != math.prod(shapes[tp] or (0,)):
            raise CheckpointError(
                f"tp rank {tp} of {name} has shape {shapes[tp]}, not the {tuple(rank_shape)} its sub-parameter widths give."
            )
        runs[tp] = axis_runs(rank_shape, dim, segments[tp], logical[dim])
    written = {"patterns": patterns, "shape": written, "partition_dim": dim}
    text = structure_text(ptfile.opaque_instance(*SUBPARAM_SHAPE_CLASS, written))
    return runs, tuple(logical), text


def _piece_runs(piece):
    """(shard starts, full-tensor starts) of the runs of one affine piece: one per row when both sides
    are contiguous along the last dimension, else one per element."""
    shape = tuple(piece["shape"])
    (source, source_strides), (dest, dest_strides) = piece["source"], piece["dest"]
    if shape and source_strides[-1] == 1 and dest_strides[-1] == 1:
        shape, source_strides, dest_strides = shape[:-1], source_strides[:-1], dest_strides[:-1]
    if not shape:
        return np.array([dest], dtype=np.int64), np.array([source], dtype=np.int64)
    grid = np.indices(shape, dtype=np.int64).reshape(len(shape), -1)
    local = dest + np.tensordot(np.asarray(dest_strides, dtype=np.int64), grid, axes=1)
    return local, source + np.tensordot(np.asarray(source_strides, dtype=np.int64), grid, axes=1)


def _affine(rule, info, state, name):
    """Runs and universal shape from an AutoTP affine map: each piece's elements, walked in the shard
    (dest offset and strides) and in the full tensor (source offset and strides), as
    ParamAffineMap.rebuild copies them (a replicated piece from the first rank that holds it)."""
    entry = info[C.AFFINE_MAP][C.AFFINE_MAP_PARAMS][rule.pattern]
    power = {"fp32": 1, "exp_avg": -1, "exp_avg_sq": -2}[state]  # affine.SCALE_POWER_BY_STATE
    runs, written = {}, set()
    for rank, value in entry["ranks"].items():
        starts, targets, scales = [], [], []
        for piece in value["pieces"]:
            if math.prod(piece["shape"]) == 0:
                continue
            local, target = _piece_runs(piece)
            source = piece["source"][0]
            if len(piece["locations"]) > 1 and source in written:
                target = np.full_like(target, DROPPED)
            written.add(source)
            starts.append(local)
            targets.append(target)
            scales.append(np.full(local.size, float(piece.get("scale", 1.0)) ** power))
        if starts:
            runs[int(rank)] = Runs(np.concatenate(starts), np.concatenate(targets), np.concatenate(scales))
    return runs, tuple(entry["logical_shape"])


def geometry(row: Parameter, rule: MergeRule | None, info: Mapping[str, Any], tp_degree: int, state: str) -> Geometry:
    """The Geometry of one state file (fp32, exp_avg, exp_avg_sq) of the parameter of params.tsv row `row`."""
    name, shapes = row.param, row.shapes
    if row.format == FORMAT_MODULE:
        return Geometry("", shapes[0], ("param",), {0: Runs.identity()})
    if row.format == FORMAT_FLAT:
        return Geometry("", (row.numel,), None, {0: Runs.identity()})
    keys = []
    if rule.kind == AFFINE:
        runs, shape = _affine(rule, info, state, name)
    elif rule.kind in (REPLICATED, AVERAGE):
        runs, shape = {0: Runs.identity()}, shapes[0]
    elif rule.kind == TWO_SUB_PARAMS:
        runs, shape = _two_sub_params(shapes, name)
        keys = [f"{C.CAT_DIM}=0", f"{C.PARAM_N_SUB_PARAMS}=2"]
    elif rule.kind == SUB_PARAMS:
        runs, shape, text = _sub_params(rule, info, shapes, tp_degree, name)
        keys = [f"{C.SUB_PARAM_SHAPE}={text}"]
    else:
        axis = 1 if rule.kind == ROW_PARALLEL else 0
        runs, shape = _concat(shapes, axis, name)
        keys = [f"{C.CAT_DIM}={axis}"]
    limit = None
    if rule.vocabulary:
        if C.ORIGINAL_VOCAB_SIZE not in info or len(shape) < 2:
            raise CheckpointError(f"Vocabulary parameter {name} needs `{C.ORIGINAL_VOCAB_SIZE}` and two dimensions.")
        rows = min(int(info[C.ORIGINAL_VOCAB_SIZE]), shape[0])
        limit = rows * math.prod(shape[1:])
        shape = (rows, *shape[1:])
        keys.append(f"{C.VOCAB_TENSOR}=True")
    return Geometry(rule.kind, tuple(shape), (*keys, "param"), runs, limit)


def expert_geometry(row: Parameter, fragments: Sequence[Fragment]) -> Geometry:
    """AutoEP fused experts: one [num_experts, ...] tensor per state, EP rank e's experts (plan `experts`[e])
    taken from the fragments of its dp ranks (plan `dp_ranks`[e]) in turn, each expert a block of elements."""
    plan = row.experts
    block = math.prod(plan["shape"])
    merge_start = {}  # fragment index -> (EP rank, element offset in that rank's stream), in the merge's order
    for ep_rank, dp_ranks in enumerate(plan["dp_ranks"]):
        offset = 0
        for dp in dp_ranks:
            for index, fragment in enumerate(fragments):
                if fragment.dp == dp:
                    merge_start[index] = (ep_rank, offset)
                    offset += fragment.numel
    starts, targets, local = [], [], 0
    for index in sorted(range(len(fragments)), key=lambda i: (fragments[i].tp, fragments[i].dp)):
        ep_rank, position = merge_start.get(index, (None, 0))
        remaining, start = fragments[index].numel, local
        while remaining > 0:
            expert, within = divmod(position, block)
            length = min(block - within, remaining)
            if ep_rank is None or expert >= len(plan["experts"][ep_rank]):
                raise CheckpointError(f"The AutoEP fragments of {row.param} hold more elements than its experts.")
            starts.append(start)
            targets.append(plan["experts"][ep_rank][expert] * block + within)
            start, position, remaining = start + length, position + length, remaining - length
        local += fragments[index].numel
    keys = (C.PARAM, f"{C.CAT_DIM}=0", f"{C.EP_IS_EXPERT_PARAM}=True", f"{C.EP_NUM_EXPERTS}={plan['num_experts']}")
    runs = {0: Runs(starts, targets)} if starts else {}
    return Geometry("expert", (plan["num_experts"], *plan["shape"]), keys, runs)
