"""What `reshard` would write for M ranks at ZeRO stage S: every file of the target tag folder and the
bytes of tensor data it holds, computed from the source's parameter shapes alone (no tensor is read)."""

import math

from .plan import zero3_partition, zero3_slice, zero3_sub_groups, zero12_partition
from .write import Target, model_file_name, optim_file_name

ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
OPTIMIZER_TENSORS = 3  # fp32 master weights, exp_avg, exp_avg_sq: float32 each
STEP_BYTES = 4


def _numels(group) -> list[int]:
    return [math.prod(shape) for _, shape in group]


def optimizer_bytes(groups: list, target: Target, rank: int, sub_group_size: int) -> int:
    """Tensor bytes of rank `rank`'s optimizer-states file (partitions of fp32 weights and both moments, and
    Adam's step, one float32 the groups' states share)."""
    total = STEP_BYTES
    for group in groups:
        numels = _numels(group)
        if target.stage > 2:
            for indices in zero3_sub_groups(numels, target.dp, sub_group_size):
                total += OPTIMIZER_TENSORS * 4 * zero3_partition(numels, indices, target.dp, rank).numel
        else:
            partition = zero12_partition(numels, target.dp, rank)
            total += 4 * (3 * partition.numel - partition.padding)  # the fp32 partition is saved without padding
    return total


def model_bytes(groups: list, frozen: list, buffer_bytes: int, target: Target, rank: int) -> int:
    """Tensor bytes of a model-states file: the module's weights (placeholders at ZeRO-3; a tied weight
    once), buffers and the frozen parameters' fragments (whole at ZeRO-2, rank `rank`'s slice at ZeRO-3)."""
    itemsize = ITEMSIZE[target.dtype]
    frozen_numels = [math.prod(shape) for _, shape in frozen]
    if target.stage > 2:
        return buffer_bytes + itemsize * sum(zero3_slice(numel, target.dp, rank)[0] for numel in frozen_numels)
    weights = sum(sum(_numels(group)) for group in groups) + sum(frozen_numels)
    return buffer_bytes + itemsize * (weights + (sum(frozen_numels) if target.stage == 2 else 0))


def reshard_overview(groups: list, frozen: list, buffer_bytes: int, target: Target,
                     sub_group_size: int) -> list[dict]:
    """One row per file of the target tag folder: file, kind, rank, tensor bytes."""
    model_ranks = range(target.dp) if target.stage > 2 else range(1)
    rows = [{"file": model_file_name(target, rank), "kind": "model states", "rank": rank,
             "bytes": model_bytes(groups, frozen, buffer_bytes, target, rank)} for rank in model_ranks]
    rows += [{"file": optim_file_name(target, rank), "kind": "optimizer states", "rank": rank,
              "bytes": optimizer_bytes(groups, target, rank, sub_group_size)} for rank in range(target.dp)]
    return rows
