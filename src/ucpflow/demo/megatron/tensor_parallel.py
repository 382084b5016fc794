"""Megatron-style tensor parallelism over a torch.distributed (gloo) group.

Column-parallel layers hold a slice of the output rows, row-parallel layers a slice of the input
columns and sum their partial outputs over the group, the vocabulary-parallel embedding holds a
slice of the vocabulary rows. Sharded parameters carry Megatron's attributes
(tensor_model_parallel, partition_dim, partition_stride), which DeepSpeed reads to compute
gradient norms over the model-parallel group.
"""

import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02


@dataclass(frozen=True)
class TensorParallel:
    rank: int
    world_size: int
    group: object  # None when world_size == 1

    @classmethod
    def from_topology(cls, topology):
        """This process's tensor-parallel group along the topology's "model" axis.

        Every rank must call this, in the same order, since creating a group is collective.
        """
        global_rank = dist.get_rank()
        own_group = None
        if topology.get_dim("model") > 1:
            for ranks in topology.get_axis_comm_lists("model"):
                group = dist.new_group(ranks=ranks)
                if global_rank in ranks:
                    own_group = group
        return cls(topology.get_coord(global_rank).model, topology.get_dim("model"), own_group)


def full_normal(shape, seed: int, name: str) -> torch.Tensor:
    """A full (unsharded) N(0, INIT_STD) tensor that depends only on the seed and the parameter's name."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator) * INIT_STD


def sharded_parameter(full: torch.Tensor, dim: int, indices) -> nn.Parameter:
    """The slice of `full` that this rank holds along `dim`, marked as tensor-parallel."""
    index = torch.as_tensor(list(indices), dtype=torch.long)
    param = nn.Parameter(full.index_select(dim, index).contiguous())
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1
    return param


def _all_reduce(tensor, tp: TensorParallel):
    if tp.world_size == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, group=tp.group)
    return tensor


class _CopyToTensorParallelRegion(torch.autograd.Function):
    """Identity forward; the gradient, partial on each rank, is summed over the group."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.tp), None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    """Partial outputs are summed over the group; the gradient passes through."""

    @staticmethod
    def forward(ctx, x, tp):
        return _all_reduce(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    """Equal slices along the last dimension are concatenated in rank order; the gradient is split back."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        if tp.world_size == 1:
            return x
        pieces = [torch.empty_like(x) for _ in range(tp.world_size)]
        dist.all_gather(pieces, x.contiguous(), group=tp.group)
        return torch.cat(pieces, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.tp.world_size, dim=-1)[ctx.tp.rank].contiguous(), None


def copy_to_tensor_parallel_region(x, tp: TensorParallel):
    return _CopyToTensorParallelRegion.apply(x, tp)


def reduce_from_tensor_parallel_region(x, tp: TensorParallel):
    return _ReduceFromTensorParallelRegion.apply(x, tp)


def gather_last_dim(x, tp: TensorParallel):
    return _GatherLastDim.apply(x, tp)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows (and b) split over the ranks; the output stays split."""

    def __init__(self, in_features: int, out_features: int, rows, tp: TensorParallel, seed: int, name: str,
                 bias: bool = True):
        super().__init__()
        self.tp = tp
        self.weight = sharded_parameter(full_normal((out_features, in_features), seed, name + ".weight"), 0, rows)
        self.bias = sharded_parameter(torch.zeros(out_features), 0, rows) if bias else None

    def forward(self, x):
        return F.linear(copy_to_tensor_parallel_region(x, self.tp), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split over the ranks, the partial outputs summed; b is replicated."""

    def __init__(self, in_features: int, out_features: int, columns, tp: TensorParallel, seed: int, name: str,
                 bias: bool = True):
        super().__init__()
        self.tp = tp
        self.weight = sharded_parameter(full_normal((out_features, in_features), seed, name + ".weight"), 1, columns)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x_split, partial_scale=None):
        partial = F.linear(x_split, self.weight)
        if partial_scale is not None:
            partial = partial * partial_scale
        output = reduce_from_tensor_parallel_region(partial, self.tp)
        return output if self.bias is None else output + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose (padded) vocabulary rows are split over the ranks; padding rows start at zero."""

    def __init__(self, vocab: int, padded_vocab: int, hidden: int, rows: range, tp: TensorParallel, seed: int,
                 name: str):
        super().__init__()
        self.tp = tp
        self.rows = rows
        full = torch.zeros(padded_vocab, hidden)
        full[:vocab] = full_normal((vocab, hidden), seed, name + ".weight")
        self.weight = sharded_parameter(full, 0, rows)

    def forward(self, tokens):
        outside = (tokens < self.rows.start) | (tokens >= self.rows.stop)
        local = (tokens - self.rows.start).masked_fill(outside, 0)
        embedded = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(embedded, self.tp)
