"""What `inspect` says about the exports of a checkpoint, from its args, parameter table and model config alone
(before any conversion): for a Megatron-DeepSpeed checkpoint the model family, the fused QKV layout and what `hf`
and `megatron` will do; for any other, which of them applies and why the others do not."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UcpflowError
from ..source.hfconfig import CONFIG_FILE
from . import qkv_layout
from .hf import GPT2, LLAMA, model_family
from .source import SourceModel, Weight, classify_parameters

if TYPE_CHECKING:
    from ..tables import Parameter


def _source(args, checkpoint_version, params):
    """A SourceModel of the index's parameter table, without shapes (the family and the layout need none)."""
    roles = classify_parameters([row.param for row in params])
    weights = tuple(Weight(row.param, *roles[row.param], row.merge, ()) for row in params)
    return SourceModel(args, 0, float(checkpoint_version or 0), weights)


def _features(source):
    args = source.args
    features = [f"{source.heads} heads", f"{source.kv_heads} key/value heads"]
    features.append("SwiGLU" if source.arg("swiglu") else "GeLU")
    features.append("RMSNorm" if getattr(args, "normalization", "layernorm") == "rmsnorm" else "LayerNorm")
    features.append("rotary positions" if getattr(args, "use_rotary_position_embeddings", False)
                    or not getattr(args, "add_position_embedding", True) else "learned positions")
    features.append("untied output layer" if source.has_output_layer else "tied output layer")
    if not getattr(args, "add_bias_linear", True):
        features.append("no linear biases")
    return features


def export_overview(args: object, checkpoint_version: float | None, params: Sequence[Parameter]) -> list[str]:
    """Lines for inspect's summary, or [] when the checkpoint is not a Megatron GPT model's."""
    if not hasattr(args, "num_layers"):
        return []
    try:
        source = _source(args, checkpoint_version, params)
    except UcpflowError as problem:
        return [f"Exports: not a Megatron GPT model ({problem})"]
    try:
        family = model_family(source)
    except UcpflowError as problem:
        family, refusal = None, str(problem)
    lines = [f"Model family: {family or 'neither GPT-2 nor Llama'} ({', '.join(_features(source))})"]
    lines.append("Fused QKV layout: " + qkv_layout.describe(args, source.kv_heads, source.source_tp,
                                                           source.qkv_sub_params))
    if family == LLAMA:
        lines.append("hf: LlamaForCausalLM; the fused QKV cut into q_proj, k_proj and v_proj, dense_h_to_4h into "
                     "gate_proj and up_proj, vocabulary padding dropped, "
                     + ("untied lm_head" if source.has_output_layer else "lm_head tied to the embeddings"))
    elif family == GPT2:
        lines.append("hf: GPT2LMHeadModel; Conv1D weights transposed, the fused QKV reordered to [Q; K; V], "
                     "vocabulary padding dropped, lm_head tied to the embeddings")
    else:
        lines.append(f"hf: refused: {refusal}")
    lines.append(f"megatron: any target_tp dividing {source.kv_heads} key/value heads (and the MLP size), any "
                 f"target_pp dividing {source.num_layers} layers; the fused QKV split by key/value groups, "
                 + ("SwiGLU gate and up halves split per rank, " if source.arg("swiglu") else "")
                 + "norms replicated, " + ("the output layer on the last stage" if source.has_output_layer
                                           else "the tied embeddings on the first and last stage"))
    return lines



def _architecture(config_folder):
    config = json.loads((Path(config_folder) / CONFIG_FILE).read_text())
    return ", ".join(config.get("architectures") or ()) or f"model_type {config.get('model_type')}"


def targets_overview(args: object, checkpoint_version: float | None, params: Sequence[Parameter],
                     model_config: Path | str | None) -> list[str]:
    """Lines for inspect's summary saying what `hf` and `megatron` do with the checkpoint, or why they do not
    apply; `model_config` is the folder of the transformers config.json found for it (or None)."""
    if hasattr(args, "num_layers"):
        return export_overview(args, checkpoint_version, params)
    megatron = ("megatron: does not apply: the checkpoint records no Megatron-LM args, and only Megatron-DeepSpeed "
                "GPT models can be written as Megatron-LM checkpoints")
    if model_config is not None:
        return [f"hf: applies: a transformers model ({_architecture(model_config)}, configured by "
                f"{Path(model_config) / CONFIG_FILE}), written as its save_pretrained writes it", megatron]
    return ["hf: does not apply: the checkpoint records no Megatron-LM args and no transformers config.json lies "
            "beside or above its tag folder, so it is neither model the export writes (config key hf_config names "
            "the config folder of a transformers model saved elsewhere)", megatron]
