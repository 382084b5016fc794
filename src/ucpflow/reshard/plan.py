"""DeepSpeed's partition arithmetic for M data-parallel ranks at ZeRO stage S, without torch.

ZeRO-1/2 (`DeepSpeedZeroOptimizer`): each parameter group's trainable parameters are flattened in
order, the flat buffer is padded to a multiple of `nccl_start_alignment_factor` (2) x M, and rank r
owns elements [r x size, (r + 1) x size) of it, size = padded / M; the padding belongs to the last
ranks (`group_paddings`). ZeRO-3 (`DeepSpeedZeroOptimizer_Stage3`): every parameter is padded to a
multiple of M and rank r owns its r-th equal slice; a rank's flat fp32 group is the concatenation of
its slices of the parameters of one sub-group (parameters accumulated in order until their slices
reach `sub_group_size` elements). These mirror stage_1_and_2.py and stage3.py of DeepSpeed 0.19.
"""

import math
from dataclasses import dataclass

NCCL_START_ALIGNMENT_FACTOR = 2  # DeepSpeedZeroOptimizer.nccl_start_alignment_factor
DEFAULT_SUB_GROUP_SIZE = 1_000_000_000  # DeepSpeedZeroConfig.sub_group_size


@dataclass(frozen=True)
class Piece:
    """`count` elements of parameter `param` (index in its group) from element `start`, at `offset` of a flat tensor."""

    param: int
    start: int
    count: int
    offset: int


@dataclass(frozen=True)
class FlatPartition:
    """One rank's part of a flat tensor: `numel` elements, of which `pieces` hold parameter data and the
    last `padding` are zeros (ZeRO-1/2 padding, or ZeRO-3 per-parameter padding inside `pieces`' gaps)."""

    numel: int
    pieces: tuple
    padding: int


def zero12_partition(numels: list[int], dp: int, rank: int) -> FlatPartition:
    """Rank `rank`'s partition of a ZeRO-1/2 parameter group whose trainable parameters have `numels`."""
    total = sum(numels)
    alignment = NCCL_START_ALIGNMENT_FACTOR * dp
    size = math.ceil(total / alignment) * alignment // dp
    left, right = rank * size, (rank + 1) * size
    pieces, start = [], 0
    for index, numel in enumerate(numels):
        lo, hi = max(start, left), min(start + numel, right)
        if lo < hi:
            pieces.append(Piece(index, lo - start, hi - lo, lo - left))
        start += numel
    padding = size if total <= left else max(0, right - total)
    return FlatPartition(size, tuple(pieces), padding)


def zero3_slice(numel: int, dp: int, rank: int) -> tuple[int, int, int]:
    """(partition size, first element, element count) of rank `rank`'s slice of one ZeRO-3 parameter."""
    size = math.ceil(numel / dp)
    start = min(rank * size, numel)
    return size, start, min(size, numel - start)


def zero3_sub_groups(numels: list[int], dp: int, sub_group_size: int = DEFAULT_SUB_GROUP_SIZE) -> list[list[int]]:
    """Indices of a group's trainable parameters per sub-group (`_create_fp16_sub_groups`)."""
    sizes = [math.ceil(numel / dp) for numel in numels]
    if not numels or sub_group_size is None or sub_group_size >= sum(sizes):
        return [list(range(len(numels)))]
    groups, current, accumulated = [], [], 0
    for index, size in enumerate(sizes):
        current.append(index)
        accumulated += size
        if accumulated >= sub_group_size or index == len(sizes) - 1:
            groups.append(current)
            current, accumulated = [], 0
    return groups


def zero3_partition(numels: list[int], indices: list[int], dp: int, rank: int) -> FlatPartition:
    """Rank `rank`'s flat fp32 partition of one ZeRO-3 sub-group (parameters `indices` of a group)."""
    pieces, offset = [], 0
    for index in indices:
        size, start, count = zero3_slice(numels[index], dp, rank)
        if count > 0:
            pieces.append(Piece(index, start, count, offset))
        offset += size
    return FlatPartition(offset, tuple(pieces), 0)


def fragment_addresses(partition: FlatPartition) -> list[tuple[int, int, int]]:
    """(param index, numel, start) of each parameter fragment in a ZeRO-1/2 partition, as the
    optimizer's `param_slice_mappings` records them (start within the rank's partition)."""
    return [(piece.param, piece.count, piece.offset) for piece in partition.pieces]
