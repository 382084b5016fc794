"""Export of a GPT-2-style Megatron model to a transformers model folder (and the `hf` jobs' entry points,
which hand a transformers model's checkpoint to transformers_source and a Llama-family one to hf_llama).

    config.json                      GPT2Config with the model's sizes and activation; written last
    generation_config.json
    model.safetensors                or model-0000i-of-0000n.safetensors + model.safetensors.index.json

Tensors are named, ordered and sharded as transformers 5 saves a GPT2LMHeadModel: Conv1D weights are the
transposed Megatron weights, the fused QKV rows are reordered to [Q; K; V], the vocabulary padding is
dropped and the LM head is left to be tied to the word embeddings.
"""

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UcpflowError
from ..fileio import atomic_path, write_text
from ..markers import retract, write_marker
from ..source.hfconfig import CONFIG_FILE
from ..tables import IndexFiles, read_index_record
from . import hf_llama as HL
from . import tensors as T
from . import transformers_source as TS
from .hf_common import (
    INDEX_FILE,
    ITEM_BYTES,
    TORCH_DTYPES,
    WEIGHT_FILE,
    parse_size,
    save_order,
    shard_stems,
    split_into_shards,
)
from .source import (
    FINAL_NORM,
    LAYER,
    POSITION_EMBEDDINGS,
    WORD_EMBEDDINGS,
    SourceModel,
    Weight,
    load_plan,
    load_source,
    read_full,
)

GPT2_EOS_TOKEN = 50256

COPY = "copy"
TRANSPOSE = "transpose"  # Megatron's Linear (out, in) -> transformers' Conv1D (in, out)
QKV = "qkv"  # [Q; K; V] rows, then transposed when it is the weight

# GPT-2 block tensors and their Megatron layer weights.
GPT2_LAYER = (
    ("ln_1.weight", "input_layernorm.weight", COPY),
    ("ln_1.bias", "input_layernorm.bias", COPY),
    ("attn.c_attn.weight", "self_attention.query_key_value.weight", QKV),
    ("attn.c_attn.bias", "self_attention.query_key_value.bias", QKV),
    ("attn.c_proj.weight", "self_attention.dense.weight", TRANSPOSE),
    ("attn.c_proj.bias", "self_attention.dense.bias", COPY),
    ("ln_2.weight", "post_attention_layernorm.weight", COPY),
    ("ln_2.bias", "post_attention_layernorm.bias", COPY),
    ("mlp.c_fc.weight", "mlp.dense_h_to_4h.weight", TRANSPOSE),
    ("mlp.c_fc.bias", "mlp.dense_h_to_4h.bias", COPY),
    ("mlp.c_proj.weight", "mlp.dense_4h_to_h.weight", TRANSPOSE),
    ("mlp.c_proj.bias", "mlp.dense_4h_to_h.bias", COPY),
)


def gpt2_activation(args: object) -> str:
    """transformers' name for the MLP activation Megatron uses with these args (Megatron's defaults when unset)."""
    if getattr(args, "openai_gelu", False):
        return "gelu_new"
    if getattr(args, "onnx_safe", False):
        return "gelu"
    # Megatron's fused bias-GeLU (on unless --no-bias-gelu-fusion or no linear biases) is the tanh approximation.
    if getattr(args, "bias_gelu_fusion", True) and getattr(args, "add_bias_linear", True):
        return "gelu_pytorch_tanh"
    return "gelu"


GPT2, LLAMA = "GPT-2", HL.FAMILY


def model_family(source: SourceModel) -> str:
    """GPT2 or LLAMA: the transformers model that can hold the Megatron model; else one sentence why none can."""
    gpt2 = gpt2_problem(source)
    if gpt2 is None:
        return GPT2
    llama = HL.llama_problem(source)
    if llama is None:
        return LLAMA
    raise UcpflowError(f"The model has {gpt2}, which a transformers GPT-2 model cannot hold, and {llama}, which a "
                       "Llama model cannot; the hf export supports GPT-2 and Llama-family Megatron models only.")


def gpt2_problem(source: SourceModel) -> str | None:
    """The first thing a GPT-2 model cannot express (a phrase), or None."""
    args = source.args
    problems = [
        (source.arg("swiglu") or getattr(args, "squared_relu", False), "a gated (SwiGLU) or squared-ReLU MLP"),
        (source.kv_heads != source.heads, f"grouped-query attention ({source.kv_heads} key/value heads)"),
        (getattr(args, "normalization", "layernorm") != "layernorm", f"{getattr(args, 'normalization', '')} norms"),
        (not getattr(args, "add_bias_linear", True), "linear layers without biases"),
        (not getattr(args, "add_position_embedding", True)
         or getattr(args, "position_embedding_type", "learned_absolute") != "learned_absolute",
         "no learned absolute position embeddings"),
        (source.arg("untie_embeddings_and_output_weights") or source.has_output_layer,
         "an output layer separate from the word embeddings"),
        (getattr(args, "apply_residual_connection_post_layernorm", False), "residuals taken after the layernorm"),
    ]
    return next((what for present, what in problems if present), None)


def check_gpt2_layers(source: SourceModel) -> None:
    known = {megatron for _, megatron, _ in GPT2_LAYER}
    for weight in source.weights:
        if weight.role == LAYER and weight.name not in known:
            raise UcpflowError(f"Parameter {weight.param} ({weight.name}) has no counterpart in a GPT-2 block.")


def gpt2_tensors(source: SourceModel) -> dict[str, tuple[Weight, str]]:
    """{transformers name: (Weight, transform)} in GPT2LMHeadModel's state_dict order, without the tied lm_head."""
    tensors = {
        "transformer.wte.weight": (source.weight(WORD_EMBEDDINGS), COPY),
        "transformer.wpe.weight": (source.weight(POSITION_EMBEDDINGS), COPY),
    }
    for layer in range(source.num_layers):
        for name, megatron, transform in GPT2_LAYER:
            tensors[f"transformer.h.{layer}.{name}"] = (source.weight(LAYER, megatron, layer), transform)
    for name in ("weight", "bias"):
        tensors[f"transformer.ln_f.{name}"] = (source.weight(FINAL_NORM, name), COPY)
    return tensors


def gpt2_config(source: SourceModel) -> dict[str, Any]:
    """config.json: every GPT2Config field spelled out, so transformers' defaults cannot change the model."""
    args = source.args
    vocab = source.vocab
    eos = GPT2_EOS_TOKEN if getattr(args, "tokenizer_type", None) == "GPT2BPETokenizer" and vocab > GPT2_EOS_TOKEN \
        else None
    hidden_dropout = float(getattr(args, "hidden_dropout", 0.1))
    return {
        "activation_function": gpt2_activation(args),
        "add_cross_attention": False,
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": float(getattr(args, "attention_dropout", 0.1)),
        "bos_token_id": eos,
        "dtype": TORCH_DTYPES[source.dtype],
        "embd_pdrop": hidden_dropout,
        "eos_token_id": eos,
        "initializer_range": float(getattr(args, "init_method_std", 0.02)),
        "layer_norm_epsilon": float(getattr(args, "layernorm_epsilon", 1e-5)),
        "model_type": "gpt2",
        "n_embd": source.hidden,
        "n_head": source.heads,
        "n_inner": source.weight(LAYER, "mlp.dense_h_to_4h.weight", 0).shape[0],
        "n_layer": source.num_layers,
        "n_positions": source.weight(POSITION_EMBEDDINGS).shape[0],
        "pad_token_id": None,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": hidden_dropout,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": vocab,
    }


def generation_config(config: Mapping[str, Any]) -> dict[str, Any]:
    tokens = {key: config[key] for key in ("bos_token_id", "eos_token_id") if config.get(key) is not None}
    return {"_from_model_config": True, **tokens, "use_cache": True}


def gpt2_plan(source: SourceModel, universal_folder: Path | str, dtype: str) -> tuple[dict[str, Any], dict[str, int]]:
    """Everything of a GPT-2 plan but the sharding, and {tensor: numel}."""
    check_gpt2_layers(source)
    tensors = dict(sorted(gpt2_tensors(source).items(), key=lambda item: save_order(item[0])))
    config = {**gpt2_config(source), "dtype": TORCH_DTYPES[dtype]}
    plan = {
        "family": GPT2,
        "dtype": dtype,
        "heads": source.heads,
        "kv_heads": source.kv_heads,
        "head_dim": source.head_dim,
        "source_tp": source.source_tp,
        "universal_folder": str(universal_folder),
        "tensors": {name: {"param": weight.param, "shape": list(weight.shape), "transform": transform,
                           "qkv_order": source.qkv_order(weight) if transform == QKV else None}
                    for name, (weight, transform) in tensors.items()},
        "config": config,
    }
    return plan, {name: math.prod(weight.shape) for name, (weight, _) in tensors.items()}


def hf_plan(source: SourceModel, universal_folder: Path | str, max_shard_size: int | str,
            dtype: str | None = None) -> dict[str, Any]:
    dtype = dtype or source.dtype
    if model_family(source) == LLAMA:
        plan, numel, _ = HL.llama_plan(source, universal_folder, dtype)
    else:
        plan, numel = gpt2_plan(source, universal_folder, dtype)
    sizes = {name: count * ITEM_BYTES[dtype] for name, count in numel.items()}
    file_tensors = split_into_shards(sizes, parse_size(max_shard_size))
    shards = dict(zip(shard_stems(len(file_tensors)), file_tensors))
    index = None
    if len(shards) > 1:
        weight_map = {name: f"{stem}.safetensors" for stem, names in shards.items() for name in names}
        index = {"metadata": {"total_parameters": sum(numel.values()), "total_size": sum(sizes.values())},
                 "weight_map": weight_map}
    return {**plan, "shards": shards, "index": index, "generation_config": generation_config(plan["config"])}


def check_hf_folder(folder: Path | str, plan: Mapping[str, Any]) -> None:
    """Refuse weight files of another export, which transformers could load instead of these."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    planned = {f"{stem}.safetensors" for stem in plan["shards"]} | ({INDEX_FILE} if plan["index"] else set())
    stale = sorted(p.name for p in folder.iterdir() if WEIGHT_FILE.fullmatch(p.name) and p.name not in planned)
    if stale:
        raise UcpflowError(f"{folder} already holds {', '.join(stale[:3])} from another export; remove it or "
                           "choose another hf_folder.")


def hf_plan_job(params_path: str, universal_folder: str, model_state_path: str | None, hf_folder: Path | str,
                max_shard_size: int | str, output: str, *, layout_path: str, hf_dtype: str = "",
                exclude_frozen: bool = False, qkv_layout: str = "") -> None:
    """The plan of a transformers model's export (the index found its config.json beside or above the tag
    folder, or it is given as hf_config), which reads only the index; else of a Megatron GPT model's, which reads
    the universal output and its copied model-states file `model_state_path`."""
    record = read_index_record(layout_path)
    if record.hf_config_folder is not None:
        plan = TS.plan_job(record.hf_config_folder, record.layout, params_path, hf_dtype, exclude_frozen, max_shard_size)
    else:
        source = load_source(params_path, universal_folder, model_state_path, qkv_layout)
        plan = hf_plan(source, universal_folder, max_shard_size, None if hf_dtype in ("", "auto") else hf_dtype)
        detail = plan["config"].get("activation_function") or f"{source.kv_heads} key/value heads, fused QKV " \
            f"{plan.get('qkv_layout')}"
        print(f"{plan['family']} model: {source.num_layers} layers, hidden {source.hidden}, vocabulary {source.vocab}, "
              f"{detail}, {plan['dtype']}, {len(plan['shards'])} safetensors file(s)")
    check_hf_folder(hf_folder, plan)
    write_text(output, json.dumps(plan, indent=1))


def gpt2_array(plan: Mapping[str, Any], spec: Mapping[str, Any]) -> np.ndarray:
    """A transformers tensor as a float32 numpy array."""
    if plan.get("family") == LLAMA:
        return HL.llama_array(plan, spec)
    full = read_full(plan["universal_folder"], spec["param"], spec["shape"])
    if spec["transform"] == QKV:
        full = T.qkv_to_blocks(full, spec["qkv_order"], plan["heads"], plan["kv_heads"], plan["head_dim"],
                               plan.get("source_tp", 1))
        return full.T if full.ndim == 2 else full
    return full.T if spec["transform"] == TRANSPOSE else full



def hf_shard_job(plan_path: str, stem: str, output: str, index: IndexFiles | None = None,
                 map_paths: list[str] = ()) -> None:
    """One safetensors file: a transformers model's merged from the rank files located by `index` and the
    extraction maps `map_paths`, a Megatron model's from the universal output."""
    plan = load_plan(plan_path)
    if stem not in plan["shards"]:
        raise UcpflowError(f"{stem}.safetensors is not a file of the planned export ({', '.join(plan['shards'])}).")
    retract(Path(output).parent / CONFIG_FILE)  # transformers finds a model by it: written last
    if TS.is_transformers_plan(plan):
        return TS.shard_job(plan, stem, output, index, list(map_paths))
    import torch  # a Megatron model's shards are written with safetensors' torch API
    from safetensors.torch import save_file

    dtype = getattr(torch, TORCH_DTYPES[plan["dtype"]])
    tensors = {name: torch.from_numpy(np.ascontiguousarray(gpt2_array(plan, plan["tensors"][name]))).to(dtype)
               for name in plan["shards"][stem]}
    with atomic_path(output) as partial:  # safetensors writes its files 0600
        save_file(tensors, partial, metadata={"format": "pt"})
    print(f"{output}: {len(tensors)} tensors")


def hf_index_job(plan_path: str, output: str) -> None:
    write_text(output, json.dumps(load_plan(plan_path)["index"], indent=2, sort_keys=True) + "\n")


def hf_finalize_job(plan_path: str, generation_config_output: str, config_output: str) -> None:
    """generation_config.json, then config.json last: transformers finds a model only once it is complete."""
    plan = load_plan(plan_path)
    if TS.is_transformers_plan(plan):
        return TS.finalize_job(plan, generation_config_output, config_output)
    write_text(generation_config_output, json.dumps(plan["generation_config"], indent=2, sort_keys=True) + "\n")
    write_marker(config_output, json.dumps(plan["config"], indent=2, sort_keys=True) + "\n")
