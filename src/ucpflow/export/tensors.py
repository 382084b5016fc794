"""Reordering, padding, tensor-parallel splitting and casting of full (unsharded) fp32 weights, in numpy."""

import numpy as np

from .. import ptfile

# How a Megatron weight is cut over tensor-parallel ranks.
REPLICATED = "replicated"
COLUMN = "column"  # output rows (dim 0)
ROW = "row"  # input columns (dim 1)
VOCAB = "vocab"  # rows of the padded vocabulary
QKV = "qkv"  # rows of the fused QKV, in Megatron's per-group order, so every rank gets whole heads
GATE_UP = "gate_up"  # SwiGLU's [gate; up]: each rank holds [its gate rows; its up rows]
SPLITS = (REPLICATED, COLUMN, ROW, VOCAB, QKV, GATE_UP)

# Orders of the fused QKV rows.
QKV_PER_GROUP = "per_group"  # Megatron's checkpoint version >= 2: per key/value head, its query heads, key, value
QKV_BLOCKS = "blocks"  # [Q; K; V]: all query heads, all key heads, all value heads
QKV_PER_SLICE = "per_slice"  # one [Q; K; V] per tensor-parallel slice (Megatron-DeepSpeed PR #441 and later)


def qkv_blocks_to_per_group(full: np.ndarray, heads: int, kv_heads: int, head_dim: int) -> np.ndarray:
    """[Q; K; V] rows of a fused QKV weight or bias in Megatron's per-group order.

    With as many key/value heads as heads this is checkpoint version 3's [heads, 3, head_dim] order.
    """
    group, rest = heads // kv_heads, full.shape[1:]
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    queries = full[:q_rows].reshape(kv_heads, group * head_dim, *rest)
    keys = full[q_rows:q_rows + kv_rows].reshape(kv_heads, head_dim, *rest)
    values = full[q_rows + kv_rows:].reshape(kv_heads, head_dim, *rest)
    return np.concatenate([queries, keys, values], axis=1).reshape(full.shape)


def qkv_per_group_to_blocks(full: np.ndarray, heads: int, kv_heads: int, head_dim: int) -> np.ndarray:
    """The inverse of qkv_blocks_to_per_group."""
    group, rest = heads // kv_heads, full.shape[1:]
    grouped = full.reshape(kv_heads, (group + 2) * head_dim, *rest)
    queries = grouped[:, :group * head_dim].reshape(heads * head_dim, *rest)
    keys = grouped[:, group * head_dim:(group + 1) * head_dim].reshape(kv_heads * head_dim, *rest)
    values = grouped[:, (group + 1) * head_dim:].reshape(kv_heads * head_dim, *rest)
    return np.concatenate([queries, keys, values])


def qkv_per_slice_to_blocks(full: np.ndarray, heads: int, kv_heads: int, head_dim: int, slices: int) -> np.ndarray:
    """[Q; K; V] rows from the concatenation of `slices` tensor-parallel slices, each its own [Q; K; V]."""
    q_rows, kv_rows = heads * head_dim // slices, kv_heads * head_dim // slices
    pieces = full.reshape(slices, q_rows + 2 * kv_rows, *full.shape[1:])
    return np.concatenate([pieces[:, :q_rows].reshape(-1, *full.shape[1:]),
                           pieces[:, q_rows:q_rows + kv_rows].reshape(-1, *full.shape[1:]),
                           pieces[:, q_rows + kv_rows:].reshape(-1, *full.shape[1:])])


def qkv_blocks_to_per_slice(full: np.ndarray, heads: int, kv_heads: int, head_dim: int, slices: int) -> np.ndarray:
    """The inverse of qkv_per_slice_to_blocks."""
    q_rows, kv_rows, rest = heads * head_dim, kv_heads * head_dim, full.shape[1:]
    queries = full[:q_rows].reshape(slices, -1, *rest)
    keys = full[q_rows:q_rows + kv_rows].reshape(slices, -1, *rest)
    values = full[q_rows + kv_rows:].reshape(slices, -1, *rest)
    return np.concatenate([queries, keys, values], axis=1).reshape(full.shape)


def qkv_to_blocks(full: np.ndarray, order: str, heads: int, kv_heads: int, head_dim: int,
                  slices: int = 1) -> np.ndarray:
    """[Q; K; V] rows of a fused QKV stored in `order` (QKV_PER_SLICE: over `slices` source slices)."""
    if order == QKV_PER_GROUP:
        return qkv_per_group_to_blocks(full, heads, kv_heads, head_dim)
    if order == QKV_PER_SLICE:
        return qkv_per_slice_to_blocks(full, heads, kv_heads, head_dim, slices)
    return full


def qkv_from_blocks(full: np.ndarray, order: str, heads: int, kv_heads: int, head_dim: int,
                    slices: int = 1) -> np.ndarray:
    """[Q; K; V] rows in `order`; for the two Megatron layouts, cut into `slices` equal pieces, each rank's."""
    if order == QKV_PER_GROUP:
        return qkv_blocks_to_per_group(full, heads, kv_heads, head_dim)
    if order == QKV_PER_SLICE:
        return qkv_blocks_to_per_slice(full, heads, kv_heads, head_dim, slices)
    return full


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by * tensor-parallel degree."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def pad_rows(full: np.ndarray, rows: int) -> np.ndarray:
    """`full` with zero rows appended up to `rows` rows (the vocabulary padding)."""
    if rows < full.shape[0]:
        raise ValueError(f"cannot pad {full.shape[0]} rows to {rows}")
    padding = np.zeros((rows - full.shape[0], *full.shape[1:]), dtype=full.dtype)
    return np.concatenate([full, padding])


def _equal_piece(full, axis, rank, tp):
    if full.shape[axis] % tp:
        raise ValueError(f"dimension {axis} of shape {full.shape} is not divisible by {tp} ranks")
    width = full.shape[axis] // tp
    return np.take(full, range(rank * width, (rank + 1) * width), axis=axis)


def tensor_parallel_piece(full: np.ndarray, split: str, rank: int, tp: int) -> np.ndarray:
    """The part of a full weight that tensor-parallel rank `rank` of `tp` holds (QKV in per-group order,
    vocabulary already padded)."""
    if split == REPLICATED:
        return full
    if split in (COLUMN, VOCAB, QKV):
        return _equal_piece(full, 0, rank, tp)
    if split == ROW:
        return _equal_piece(full, 1, rank, tp)
    if split == GATE_UP:
        gate, up = np.split(full, 2)
        return np.concatenate([_equal_piece(gate, 0, rank, tp), _equal_piece(up, 0, rank, tp)])
    raise ValueError(f"unknown tensor-parallel split {split!r}")


def saved_tensor(array: np.ndarray, dtype: str) -> ptfile.ArrayTensor:
    """A float32 array as a ptfile tensor of `dtype` (fp32, bf16, fp16), rounded as torch rounds."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if dtype == "bf16":
        return ptfile.ArrayTensor(ptfile.float32_to_bfloat16_bits(array), "bfloat16")
    if dtype == "fp16":
        with np.errstate(over="ignore"):  # beyond fp16's range becomes inf, as in torch
            return ptfile.ArrayTensor(array.astype(np.float16), "float16")
    return ptfile.ArrayTensor(array, "float32")
