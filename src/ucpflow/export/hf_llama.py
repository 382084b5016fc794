"""Export of a Llama-family Megatron-DeepSpeed model (--swiglu, --normalization rmsnorm, rotary positions,
usually --untie-embeddings-and-output-weights, --disable-bias-linear and grouped-query attention) to a
transformers LlamaForCausalLM folder, named, ordered and sharded as save_pretrained writes it.

The fused QKV is read in the model's layout (qkv_layout) and cut into q_proj, k_proj and v_proj; SwiGLU's
dense_h_to_4h ([gate; up] in the universal checkpoint) into gate_proj and up_proj; the vocabulary padding is
already gone from the universal embeddings and output layer.
"""

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UcpflowError
from . import tensors as T
from .hf_common import TORCH_DTYPES, save_order
from .source import (
    FINAL_NORM,
    LAYER,
    OUTPUT_LAYER,
    POSITION_EMBEDDINGS,
    WORD_EMBEDDINGS,
    SourceModel,
    Weight,
    read_full,
)

FAMILY = "Llama"
COPY, Q, K, V, GATE, UP = "copy", "q", "k", "v", "gate", "up"

# LlamaDecoderLayer tensors, their Megatron layer weights and how they are cut from them.
LLAMA_LAYER = (
    ("input_layernorm.weight", "input_layernorm.weight", COPY),
    ("self_attn.q_proj.weight", "self_attention.query_key_value.weight", Q),
    ("self_attn.q_proj.bias", "self_attention.query_key_value.bias", Q),
    ("self_attn.k_proj.weight", "self_attention.query_key_value.weight", K),
    ("self_attn.k_proj.bias", "self_attention.query_key_value.bias", K),
    ("self_attn.v_proj.weight", "self_attention.query_key_value.weight", V),
    ("self_attn.v_proj.bias", "self_attention.query_key_value.bias", V),
    ("self_attn.o_proj.weight", "self_attention.dense.weight", COPY),
    ("self_attn.o_proj.bias", "self_attention.dense.bias", COPY),
    ("post_attention_layernorm.weight", "post_attention_layernorm.weight", COPY),
    ("mlp.gate_proj.weight", "mlp.dense_h_to_4h.weight", GATE),
    ("mlp.gate_proj.bias", "mlp.dense_h_to_4h.bias", GATE),
    ("mlp.up_proj.weight", "mlp.dense_h_to_4h.weight", UP),
    ("mlp.up_proj.bias", "mlp.dense_h_to_4h.bias", UP),
    ("mlp.down_proj.weight", "mlp.dense_4h_to_h.weight", COPY),
    ("mlp.down_proj.bias", "mlp.dense_4h_to_h.bias", COPY),
)


def llama_problem(source: SourceModel) -> str | None:
    """What keeps the model from being a transformers Llama model (a phrase), or None."""
    args = source.args
    rotary = getattr(args, "use_rotary_position_embeddings", False) \
        or getattr(args, "position_embedding_type", None) == "rope"
    kv_channels = getattr(args, "kv_channels", None)
    problems = [
        (not source.arg("swiglu"), "no gated (SwiGLU) MLP"),
        (getattr(args, "normalization", "layernorm") != "rmsnorm", f"{getattr(args, 'normalization', 'layernorm')} norms"),
        (not rotary or any(w.role == POSITION_EMBEDDINGS for w in source.weights), "no rotary positions"),
        (float(getattr(args, "rotary_percent", 1.0)) != 1.0,
         f"rotary positions on {getattr(args, 'rotary_percent', 1.0):g} of each head"),
        (getattr(args, "apply_residual_connection_post_layernorm", False), "residuals taken after the norm"),
        (kv_channels is not None and int(kv_channels) != source.head_dim, f"kv_channels {kv_channels} other than "
                                                                          "hidden size / heads"),
    ]
    return next((what for present, what in problems if present), None)


def llama_tensors(source: SourceModel) -> dict[str, tuple[Weight, str]]:
    """{transformers name: (Weight, transform)} of LlamaForCausalLM, without lm_head when it is tied."""
    tensors = {"model.embed_tokens.weight": (source.weight(WORD_EMBEDDINGS), COPY)}
    known = {megatron for _, megatron, _ in LLAMA_LAYER}
    for layer in range(source.num_layers):
        present = {weight.name: weight for weight in source.layer_weights(layer)}
        for name in sorted(set(present) - known):
            raise UcpflowError(f"Parameter {present[name].param} ({name}) has no counterpart in a Llama block.")
        for name, megatron, transform in LLAMA_LAYER:
            if megatron in present:
                tensors[f"model.layers.{layer}.{name}"] = (present[megatron], transform)
    tensors["model.norm.weight"] = (source.weight(FINAL_NORM, "weight"), COPY)
    if source.has_output_layer:
        tensors["lm_head.weight"] = (source.weight(OUTPUT_LAYER), COPY)
    return tensors


def output_shape(source: SourceModel, weight: Weight, transform: str) -> list[int]:
    rows = {Q: source.heads * source.head_dim, K: source.kv_heads * source.head_dim,
            V: source.kv_heads * source.head_dim}
    if transform in rows:
        return [rows[transform], *weight.shape[1:]]
    if transform in (GATE, UP):
        return [weight.shape[0] // 2, *weight.shape[1:]]
    return list(weight.shape)


def llama_config(source: SourceModel, dtype_name: str) -> dict[str, Any]:
    """config.json of LlamaForCausalLM, as transformers writes it (use_diff), from Megatron's args."""
    import transformers

    args = source.args
    bias = bool(getattr(args, "add_bias_linear", True))
    config = transformers.LlamaConfig(
        vocab_size=source.vocab, hidden_size=source.hidden,
        intermediate_size=source.weight(LAYER, "mlp.dense_h_to_4h.weight", 0).shape[0] // 2,
        num_hidden_layers=source.num_layers, num_attention_heads=source.heads, num_key_value_heads=source.kv_heads,
        head_dim=source.head_dim, hidden_act="silu",
        max_position_embeddings=int(getattr(args, "max_position_embeddings", None) or args.seq_length),
        initializer_range=float(getattr(args, "init_method_std", 0.02)),
        rms_norm_eps=float(getattr(args, "layernorm_epsilon", 1e-5)),
        rope_parameters={"rope_type": "default", "rope_theta": float(getattr(args, "rope_theta", 10000))},
        attention_bias=bias, mlp_bias=bias, attention_dropout=float(getattr(args, "attention_dropout", 0.0)),
        tie_word_embeddings=not source.has_output_layer, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        architectures=["LlamaForCausalLM"], dtype=dtype_name,
    )
    return json.loads(config.to_json_string(use_diff=True))


def llama_plan(source: SourceModel, universal_folder: Path | str, dtype: str) -> tuple[dict[str, Any], dict[str, int], str]:
    """Everything of the plan but the sharding: tensors (in save order) with their output shapes, and config."""
    layout, why = source.qkv_layout
    tensors = dict(sorted(llama_tensors(source).items(), key=lambda item: save_order(item[0])))
    specs = {name: {"param": weight.param, "shape": list(weight.shape), "out_shape": output_shape(source, weight, t),
                    "transform": t, "qkv_order": source.qkv_order(weight) if t in (Q, K, V) else None}
             for name, (weight, t) in tensors.items()}
    return {
        "family": FAMILY,
        "dtype": dtype,
        "heads": source.heads,
        "kv_heads": source.kv_heads,
        "head_dim": source.head_dim,
        "source_tp": source.source_tp,
        "qkv_layout": layout,
        "universal_folder": str(universal_folder),
        "tensors": specs,
        "config": llama_config(source, TORCH_DTYPES[dtype]),
    }, {name: math.prod(spec["out_shape"]) for name, spec in specs.items()}, why


def llama_array(plan: Mapping[str, Any], spec: Mapping[str, Any]) -> np.ndarray:
    """A LlamaForCausalLM tensor as a float32 numpy array."""
    full = read_full(plan["universal_folder"], spec["param"], spec["shape"])
    transform = spec["transform"]
    if transform in (Q, K, V):
        heads, kv_heads, head_dim = plan["heads"], plan["kv_heads"], plan["head_dim"]
        blocks = T.qkv_to_blocks(full, spec["qkv_order"], heads, kv_heads, head_dim, plan["source_tp"])
        q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
        return {Q: blocks[:q_rows], K: blocks[q_rows:q_rows + kv_rows], V: blocks[q_rows + kv_rows:]}[transform]
    if transform in (GATE, UP):
        gate, up = np.split(full, 2)
        return gate if transform == GATE else up
    return full
