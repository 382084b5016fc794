"""The universal_checkpoint_info the toy GPT saves, built the way Megatron-DeepSpeed's GPTModelPipe builds it.

The patterns, including their unescaped dots, are those Megatron-DeepSpeed writes for GPTModelPipe
with tied embeddings, LayerNorm, linear biases and learned position embeddings. The options beyond
Megatron-DeepSpeed's GPT add what the converter also supports: fused QKV as sub-parameters
(universal checkpoint version 0.4 with shard widths) and a parameter to average.

Megatron-DeepSpeed writes the TP-replicated and row-parallel patterns only when tp > 1. Without
them ds_to_universal records row-parallel weights as concatenated on dim 0, and DeepSpeed then
restores them on tp > 1 by cutting the wrong dimension, silently. So they are written at tp 1 too,
unless `omit_tp_patterns_at_tp1` asks for Megatron-DeepSpeed's behaviour.
"""

from dataclasses import asdict

from deepspeed.checkpoint import SubparamShape
from deepspeed.checkpoint.constants import (
    ORIGINAL_VOCAB_SIZE, PADDED_VOCAB_SIZE, PARAMETER_TO_AVERAGE_PATTERNS, PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0,
    PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, PARAMETER_WITH_SUB_PARAMS, PIPELINE_REPLICATED_PARAMETER_PATTERNS,
    SUB_PARAM_SHARD_WIDTHS, TP_REPLICATED_PARAMETER_PATTERNS, UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE, VOCABULARY_PARAMETER_PATTERNS)

from ucpflow.demo.megatron.config import GPTConfig

WORD_EMBEDDINGS = r"tied_modules.embed.word_embeddings.weight"
POSITION_EMBEDDINGS = r"tied_modules.embed.position_embeddings.weight"
QKV_WEIGHT = r"\d+.self_attention.query_key_value.weight"
QKV_BIAS = r"\d+.self_attention.query_key_value.bias"
PARTIAL_OUTPUT_SCALE = r"\d+.mlp.partial_output_scale"


def universal_checkpoint_info(config: GPTConfig, unmatched_patterns=(), omit_tp_patterns_at_tp1=False,
                              qkv_sub_params=True) -> dict:
    """`unmatched_patterns` are added to the TP-replicated patterns, for tests of the converter's strict mode.

    A "blocks" QKV is described as [Q; K; V] sub-parameters unless `qkv_sub_params` is false, as
    Megatron-DeepSpeed (which never writes sub-parameters) saves it. A `llama` model gets the patterns
    Megatron-DeepSpeed writes for an untied, bias-free RMSNorm model without position embeddings.
    """
    if config.llama:
        return _llama_info(config, qkv_sub_params)
    info = {
        UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        ORIGINAL_VOCAB_SIZE: config.vocab,
        PADDED_VOCAB_SIZE: config.padded_vocab,
        VOCABULARY_PARAMETER_PATTERNS: [WORD_EMBEDDINGS],
        PIPELINE_REPLICATED_PARAMETER_PATTERNS: [WORD_EMBEDDINGS, POSITION_EMBEDDINGS],
        PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: [],
    }
    if config.tp > 1 or not omit_tp_patterns_at_tp1:
        info[TP_REPLICATED_PARAMETER_PATTERNS] = [
            r"\d+.input_layernorm.weight",
            r"\d+.post_attention_layernorm.weight",
            r"\d+.weight",  # final layernorm
            r"\d+.bias",
            POSITION_EMBEDDINGS,
            r"\d+.self_attention.dense.bias",
            r"\d+.mlp.dense_4h_to_h.bias",
            r"\d+.input_layernorm.bias",
            r"\d+.post_attention_layernorm.bias",
        ]
        info[PARAMETER_WITH_ROW_PARALLELISM_PATTERNS] = [
            r"\d+.mlp.dense_4h_to_h.weight",
            r"\d+.self_attention.dense.weight",
        ]
    if config.swiglu:
        info[PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0] = [r"\d+.mlp.dense_h_to_4h.weight", r"\d+.mlp.dense_h_to_4h.bias"]
    _add_qkv_sub_params(info, config, qkv_sub_params)
    if config.partial_output_scale:
        info[PARAMETER_TO_AVERAGE_PATTERNS] = [PARTIAL_OUTPUT_SCALE]
    if unmatched_patterns:
        info.setdefault(TP_REPLICATED_PARAMETER_PATTERNS, []).extend(unmatched_patterns)
    return info


def _llama_info(config: GPTConfig, qkv_sub_params) -> dict:
    """Megatron-DeepSpeed's UniversalCheckpointInfo for GPTModelPipe with --untie-embeddings-and-output-weights,
    --normalization rmsnorm, --disable-bias-linear, rotary positions and --swiglu."""
    info = {
        UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        ORIGINAL_VOCAB_SIZE: config.vocab,
        PADDED_VOCAB_SIZE: config.padded_vocab,
        VOCABULARY_PARAMETER_PATTERNS: [r"\d+.word_embeddings.weight", r"\d+.lm_head.weight"],
        PIPELINE_REPLICATED_PARAMETER_PATTERNS: [],
        PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: [r"\d+.mlp.dense_h_to_4h.weight"] if config.swiglu else [],
    }
    if config.tp > 1:
        info[TP_REPLICATED_PARAMETER_PATTERNS] = [r"\d+.input_layernorm.weight", r"\d+.post_attention_layernorm.weight",
                                                  r"\d+.weight"]
        info[PARAMETER_WITH_ROW_PARALLELISM_PATTERNS] = [r"\d+.mlp.dense_4h_to_h.weight",
                                                         r"\d+.self_attention.dense.weight"]
    _add_qkv_sub_params(info, config, qkv_sub_params)
    return info


def _add_qkv_sub_params(info, config: GPTConfig, qkv_sub_params):
    if config.qkv_layout == "blocks" and qkv_sub_params:
        sizes = config.qkv_sub_param_sizes()
        info[PARAMETER_WITH_SUB_PARAMS] = [
            asdict(SubparamShape(patterns=[QKV_WEIGHT], shape=(sizes, config.hidden), partition_dim=0)),
            asdict(SubparamShape(patterns=[QKV_BIAS], shape=(sizes, ), partition_dim=0)),
        ]
        widths = config.qkv_shard_widths()
        info[SUB_PARAM_SHARD_WIDTHS] = {QKV_WEIGHT: widths, QKV_BIAS: widths}
