"""Which of Megatron-DeepSpeed's two fused-QKV layouts a checkpoint's model computes with.

Each tensor-parallel rank holds the rows of its key/value groups of `self_attention.query_key_value`:

    per_group   before Megatron-DeepSpeed PR #441 (Dec 2024): per key/value group, its query heads, key, value
                ([q..., k, v] for each group; [q, k, v] per head without grouped-query attention)
    per_slice   PR #441 and later: ParallelAttention.forward splits the rank's slice into [Q; K; V]

Both save checkpoint_version 3.0. The layouts hold the same rows when every rank has one key/value group;
otherwise the saved args tell them apart where they record the code version (Megatron-DeepSpeed saves its
whole args namespace): #441 added `ds_sequence_parallel_fpdt`; args with `ds_sequence_parallel_size` but
without it, or without `num_key_value_heads` at all, come from older code. Config key
`megatron_qkv_layout` (auto, per_group or per_slice) decides where they do not.
"""

from ..errors import UcpflowError

AUTO = "auto"
PER_GROUP = "per_group"
PER_SLICE = "per_slice"
LAYOUTS = (AUTO, PER_GROUP, PER_SLICE)
CONFIG_KEY = "megatron_qkv_layout"


def same_rows(kv_heads: int, tp: int) -> bool:
    """Whether both layouts give every rank the same rows: one key/value group per rank."""
    return kv_heads == tp


def detect(args: object) -> tuple[str | None, str]:
    """(layout or None, why) from the saved args."""
    if hasattr(args, "ds_sequence_parallel_fpdt"):
        return PER_SLICE, "the args have ds_sequence_parallel_fpdt (Megatron-DeepSpeed PR #441 or later)"
    if hasattr(args, "ds_sequence_parallel_size"):
        return PER_GROUP, "the args have ds_sequence_parallel_size but not ds_sequence_parallel_fpdt " \
                          "(Megatron-DeepSpeed before PR #441)"
    if not hasattr(args, "num_key_value_heads"):
        return PER_GROUP, "the args have no num_key_value_heads (Megatron-DeepSpeed before grouped-query attention)"
    return None, "the args record neither ds_sequence_parallel_size nor ds_sequence_parallel_fpdt, so the " \
                 "Megatron-DeepSpeed version (before or after PR #441) cannot be told"


def resolve(args: object, requested: str, kv_heads: int, tp: int, sub_params: bool = False) -> tuple[str, str]:
    """(layout, why): the layout to read and write the fused QKV with, or raise when it cannot be told.

    `sub_params`: the universal_checkpoint_info described the QKV as [Q; K; V] sub-parameters, which
    means each rank's slice is [Q; K; V]."""
    if requested not in LAYOUTS:
        raise UcpflowError(f"Config key `{CONFIG_KEY}`: {requested!r} is not one of {', '.join(LAYOUTS)}.")
    if requested != AUTO:
        return requested, f"config key {CONFIG_KEY}"
    if sub_params:
        return PER_SLICE, "universal_checkpoint_info describes it as [Q; K; V] sub-parameters"
    layout, why = detect(args)
    if layout is None and same_rows(kv_heads, tp):
        return PER_GROUP, f"both layouts hold the same rows with one key/value group per rank ({why})"
    if layout is None:
        raise UcpflowError(f"The fused QKV layout cannot be told: {why}, and with {kv_heads} key/value heads on "
                           f"{tp} tensor-parallel ranks the two differ; set config key `{CONFIG_KEY}` to per_group "
                           "(before PR #441) or per_slice (PR #441 and later).")
    return layout, why


def describe(args: object, kv_heads: int, tp: int, sub_params: bool = False) -> str:
    """One line for `inspect`: the layout auto-detection finds, or why it cannot."""
    try:
        layout, why = resolve(args, AUTO, kv_heads, tp, sub_params)
    except UcpflowError:
        return f"cannot be told ({detect(args)[1]}); exports need config key {CONFIG_KEY}=per_group or per_slice"
    return f"{layout} ({why})"
