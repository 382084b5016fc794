"""The Megatron-shaped demo GPT: real tensor parallelism, and the universal_checkpoint_info it saves.

The launching test starts DeepSpeed on CPU with one and then two processes (about 25 s in all).
"""

import json
import re

import pytest

from ucpflow import dsconst
from ucpflow.demo.megatron.config import GPTConfig
from ucpflow.demo.megatron.launch import build_checkpoint
from ucpflow.errors import UcpflowError

TINY_FP32 = dict(layers=2, hidden=32, heads=4, vocab=50, seq=8, steps=2, dtype="fp32", global_batch=4)


@pytest.mark.deepspeed
def test_tensor_parallel_training_matches_a_single_process(tmp_path):
    # Same global weights and data: the loss before the first update tests the forward, the loss
    # after it tests the gradients that went through the tensor-parallel collectives.
    losses = {}
    for tp in (1, 2):
        losses_out = tmp_path / f"tp{tp}.json"
        build_checkpoint(tmp_path / f"tp{tp}", tp=tp, pp=1, dp=1, losses_out=losses_out, **TINY_FP32)
        losses[tp] = json.loads(losses_out.read_text())

    assert losses[2] == pytest.approx(losses[1], rel=1e-5)
    assert losses[1][1] != losses[1][0]


@pytest.mark.parametrize("heads, kv_heads, tp, layout", [
    (4, 4, 2, "interleaved"),
    (4, 2, 2, "blocks"),
    (6, 3, 2, "blocks"),
    (6, 3, 2, "interleaved"),
    (8, 2, 1, "blocks"),
])
def test_qkv_shards_hold_every_row_once_and_whole_heads(heads, kv_heads, tp, layout):
    config = GPTConfig(hidden=8 * heads, heads=heads, kv_heads=kv_heads, qkv_layout=layout, tp=tp)
    rows = [row for rank in range(tp) for row in config.qkv_rows(rank)]
    columns = [column for rank in range(tp) for column in config.attention_output_columns(rank)]

    assert sorted(rows) == list(range(sum(config.qkv_sub_param_sizes())))
    assert columns == list(range(config.hidden))
    for rank in range(tp):
        assert len(config.qkv_rows(rank)) == sum(widths[rank] for widths in config.qkv_shard_widths())
        assert len(config.query_head_range(rank)) == len(config.kv_head_range(rank)) * config.group_size


def test_swiglu_shards_hold_their_gate_and_up_rows():
    config = GPTConfig(hidden=8, ffn_hidden=8, swiglu=True, heads=2, tp=2)

    assert config.mlp_rows(0) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert config.mlp_rows(1) == [4, 5, 6, 7, 12, 13, 14, 15]


def test_vocabulary_is_padded_to_a_multiple_of_divisor_times_tp():
    assert GPTConfig(vocab=100, tp=1).padded_vocab == 104
    assert GPTConfig(vocab=100, tp=2).padded_vocab == 112
    assert GPTConfig(vocab=100, tp=2).vocab_rows(1) == range(56, 112)


def test_config_refuses_more_tensor_parallel_ranks_than_key_value_heads():
    with pytest.raises(UcpflowError, match="2 key/value heads"):
        GPTConfig(heads=4, kv_heads=2, tp=4)


def parameter_names(config: GPTConfig, pipeline_layer_of_final_norm: int) -> list[str]:
    names = ["tied_modules.embed.word_embeddings.weight", "tied_modules.embed.position_embeddings.weight"]
    for layer in range(2, 2 + config.layers):
        for module in ("input_layernorm", "self_attention.query_key_value", "self_attention.dense",
                       "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
            names += [f"{layer}.{module}.weight", f"{layer}.{module}.bias"]
        if config.partial_output_scale:
            names.append(f"{layer}.mlp.partial_output_scale")
    return names + [f"{pipeline_layer_of_final_norm}.weight", f"{pipeline_layer_of_final_norm}.bias"]


@pytest.mark.parametrize("options", [
    dict(tp=2),
    dict(tp=2, swiglu=True, qkv_layout="blocks", kv_heads=2, partial_output_scale=True),
    dict(tp=1, qkv_layout="blocks"),
])
def test_every_pattern_matches_and_no_parameter_matches_two_patterns_of_a_kind(options):
    from ucpflow.demo.megatron.universal_info import universal_checkpoint_info

    config = GPTConfig(layers=2, **options)
    info = universal_checkpoint_info(config)
    names = parameter_names(config, pipeline_layer_of_final_norm=2 + config.layers)
    pattern_lists = [info.get(key, []) for key in (
        dsconst.TP_REPLICATED_PARAMETER_PATTERNS, dsconst.PARAMETER_TO_AVERAGE_PATTERNS,
        dsconst.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, dsconst.VOCABULARY_PARAMETER_PATTERNS,
        dsconst.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0)]
    pattern_lists += [shape["patterns"] for shape in info.get(dsconst.PARAMETER_WITH_SUB_PARAMS, [])]

    for patterns in pattern_lists:
        for pattern in patterns:
            assert any(re.match(pattern, name) for name in names), pattern
        for name in names:
            assert sum(bool(re.match(pattern, name)) for pattern in patterns) <= 1, name
    assert info[dsconst.ORIGINAL_VOCAB_SIZE] == config.vocab
    assert info[dsconst.UNIVERSAL_CHECKPOINT_VERSION_KEY] == dsconst.UNIVERSAL_CHECKPOINT_VERSION_VALUE


def test_fused_qkv_sub_params_record_their_shard_widths():
    from ucpflow.demo.megatron.universal_info import QKV_WEIGHT, universal_checkpoint_info

    config = GPTConfig(hidden=48, heads=6, kv_heads=3, qkv_layout="blocks", tp=2)
    info = universal_checkpoint_info(config)

    assert info[dsconst.PARAMETER_WITH_SUB_PARAMS][0] == {
        "patterns": [QKV_WEIGHT], "shape": ((48, 24, 24), 48), "partition_dim": 0}
    assert info[dsconst.SUB_PARAM_SHARD_WIDTHS][QKV_WEIGHT] == [[32, 16], [16, 8], [16, 8]]


def test_launch_rejects_a_reserved_or_unknown_option_before_launching(tmp_path):
    with pytest.raises(UcpflowError, match="resume_checkpoint, zero_stag"):
        build_checkpoint(tmp_path / "ckpt", tp=1, pp=1, dp=1, zero_stag=1, resume_checkpoint=tmp_path)
    assert not (tmp_path / "ckpt.log").exists()
