"""The Megatron GPT model behind a universal checkpoint: its `args`, iteration and checkpoint version
(from the copied model-states file) and the role of every universal parameter (from the index).

Parameter names are those of Megatron-DeepSpeed's GPTModelPipe (`tied_modules.embed.word_embeddings.weight`,
`{2..L+1}.self_attention.query_key_value.weight`, `{L+2}.weight` for the final layernorm) or of its GPTModel
without pipeline parallelism (`language_model.encoder.layers.{i}....`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import ptfile
from ..errors import CheckpointError
from ..tables import FP32_FILE, ZERO, read_parameters
from . import qkv_layout
from .tensors import QKV_BLOCKS, QKV_PER_GROUP, QKV_PER_SLICE

if TYPE_CHECKING:
    import numpy as np

WORD_EMBEDDINGS = "word_embeddings"
POSITION_EMBEDDINGS = "position_embeddings"
LAYER = "layer"
FINAL_NORM = "final_layernorm"
OUTPUT_LAYER = "output_layer"  # an untied LM head: GPTModelPipe's LMHeadPipe, GPTModel's output_layer

_EMBEDDING = re.compile(r"(?:tied_modules\.embed|\d+|language_model\.embedding)\.(word_embeddings|position_embeddings)"
                        r"\.weight")
_FINAL_NORM = re.compile(r"(?:(\d+)|language_model\.encoder\.final_layernorm)\.(weight|bias)")
_OUTPUT_LAYER = re.compile(r"(?:\d+\.lm_head|language_model\.output_layer)\.weight")
_LAYER = re.compile(r"(?:language_model\.encoder\.layers\.)?(\d+)\.(.+)")

# The universal merge rule of a fused QKV saved as [Q; K; V] sub-parameters (index params.tsv).
SUB_PARAMS_MERGE = "sub_params"

_MEGATRON_DEFAULTS = {"make_vocab_size_divisible_by": 128, "swiglu": False, "untie_embeddings_and_output_weights": False}


@dataclass(frozen=True)
class Weight:
    """One universal parameter and its place in the Megatron model."""

    param: str  # folder name under <universal>/zero/
    role: str  # WORD_EMBEDDINGS, POSITION_EMBEDDINGS, LAYER or FINAL_NORM
    layer: int  # 0-based transformer layer, -1 for the others
    name: str  # inside its layer ("mlp.dense_4h_to_h.weight") or final layernorm ("weight")
    merge: str  # how the universal conversion merged its tensor-parallel slices
    shape: tuple  # full shape in the universal checkpoint


@dataclass(frozen=True)
class SourceModel:
    args: object  # Megatron's argparse.Namespace, as saved
    iteration: int
    checkpoint_version: float
    weights: tuple
    requested_qkv_layout: str = qkv_layout.AUTO  # config key megatron_qkv_layout

    def arg(self, name: str) -> Any:
        if hasattr(self.args, name):
            return getattr(self.args, name)
        return _MEGATRON_DEFAULTS[name]

    @property
    def num_layers(self) -> int:
        return int(self.args.num_layers)

    @property
    def heads(self) -> int:
        return int(self.args.num_attention_heads)

    @property
    def kv_heads(self) -> int:
        return int(getattr(self.args, "num_key_value_heads", None) or self.heads)

    @property
    def hidden(self) -> int:
        return int(self.args.hidden_size)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def dtype(self) -> str:
        """The training dtype: bf16, fp16 or fp32."""
        if getattr(self.args, "bf16", False):
            return "bf16"
        return "fp16" if getattr(self.args, "fp16", False) else "fp32"

    def weight(self, role: str, name: str | None = None, layer: int = -1) -> Weight:
        for weight in self.weights:
            if weight.role == role and weight.layer == layer and (name is None or weight.name == name):
                return weight
        what = f"{role} {name}" if name else role
        raise CheckpointError(f"The universal checkpoint has no {what} parameter{f' in layer {layer}' if layer >= 0 else ''}.")

    @property
    def vocab(self) -> int:
        """Rows of the word embeddings without padding (the universal checkpoint drops it)."""
        return self.weight(WORD_EMBEDDINGS).shape[0]

    def layer_weights(self, layer: int) -> list[Weight]:
        return [weight for weight in self.weights if weight.role == LAYER and weight.layer == layer]

    @property
    def source_tp(self) -> int:
        return int(getattr(self.args, "tensor_model_parallel_size", 1) or 1)

    @property
    def qkv_sub_params(self) -> bool:
        return any(weight.merge == SUB_PARAMS_MERGE for weight in self.weights)

    @property
    def qkv_layout(self) -> tuple[str, str]:
        """(layout, why): how each tensor-parallel slice of the model's fused QKV is laid out (qkv_layout module)."""
        return qkv_layout.resolve(self.args, self.requested_qkv_layout, self.kv_heads, self.source_tp,
                                  self.qkv_sub_params)

    @property
    def has_output_layer(self) -> bool:
        return any(weight.role == OUTPUT_LAYER for weight in self.weights)

    def qkv_order(self, weight: Weight) -> str:
        """The row order of a fused QKV in the universal checkpoint (QKV_PER_SLICE: over source_tp slices)."""
        if weight.merge == SUB_PARAMS_MERGE:
            return QKV_BLOCKS
        if self.checkpoint_version < 2.0:
            raise CheckpointError(f"Parameter {weight.param}: the fused QKV order of Megatron checkpoint version "
                                  f"{self.checkpoint_version} is not supported (version 2.0 or later is).")
        return QKV_PER_SLICE if self.qkv_layout[0] == qkv_layout.PER_SLICE else QKV_PER_GROUP


def load_plan(path: Path | str) -> dict[str, Any]:
    """An export plan written by the plan job (JSON)."""
    with open(path) as handle:
        return json.load(handle)


def universal_path(universal_folder: str, param: str) -> str:
    return os.path.join(universal_folder, ZERO, param, FP32_FILE)


def _stored_tensor(path):
    stored = ptfile.load(path)
    return stored["param"] if isinstance(stored, dict) else stored  # ZeRO-3 without TP: a bare flat tensor


def read_full(universal_folder: str, param: str, shape: Sequence[int]) -> np.ndarray:
    """The full fp32 weight of a universal parameter as a numpy array of its shape."""
    return _stored_tensor(universal_path(universal_folder, param)).read_array().reshape(shape)


def _full_shape(universal_folder, param, recorded_shapes):
    tensor = _stored_tensor(universal_path(universal_folder, param))
    if len(tensor.shape) == 1 and len(recorded_shapes) == 1 and len(recorded_shapes[0]) > 1:
        return tuple(recorded_shapes[0])  # a flat ZeRO-3 tensor of a one-rank parameter
    return tuple(tensor.shape)


def _role(param):
    """(role, pipeline index or layer number or -1, name) of a parameter name, or None."""
    if match := _EMBEDDING.fullmatch(param):
        return match.group(1), -1, "weight"
    if _OUTPUT_LAYER.fullmatch(param):
        return OUTPUT_LAYER, -1, "weight"
    if match := _FINAL_NORM.fullmatch(param):
        return FINAL_NORM, int(match.group(1) or -1), match.group(2)
    if match := _LAYER.fullmatch(param):
        return LAYER, int(match.group(1)), match.group(2)
    return None


def classify_parameters(names: Iterable[str]) -> dict[str, tuple[str, int, str]]:
    """{param: (role, 0-based layer, name)}: transformer layers are numbered in the order of their
    pipeline (or layer) indices; the final layernorm is the bare `{index}.weight` after the last layer."""
    roles = {}
    for param in names:
        role = _role(param)
        if role is None:
            raise CheckpointError(f"Parameter {param} is not part of a Megatron GPT model (GPTModelPipe or GPTModel).")
        roles[param] = role
    layer_indices = sorted({index for role, index, _ in roles.values() if role == LAYER})
    final_indices = {index for role, index, _ in roles.values() if role == FINAL_NORM}
    if len(final_indices) > 1:
        raise CheckpointError(f"Pipeline layers {sorted(final_indices)} all hold bare weights; only the final "
                              "layernorm should.")
    if any(index != -1 and layer_indices and index <= layer_indices[-1] for index in final_indices):
        raise CheckpointError(f"Pipeline layer {min(final_indices)} holds bare weights but is not after the last "
                              "transformer layer, so it is not the final layernorm.")
    number = {index: position for position, index in enumerate(layer_indices)}
    return {param: (role, number[index] if role == LAYER else -1, name) for param, (role, index, name) in roles.items()}


def load_source(params_path: str, universal_folder: str, model_state_path: str,
                requested_qkv_layout: str | None = qkv_layout.AUTO) -> SourceModel:
    """The SourceModel of a universal checkpoint, from its index table and its copied model-states file."""
    state = ptfile.load(model_state_path)
    args = state.get("args") if isinstance(state, dict) else None
    if args is None or not hasattr(args, "num_layers"):
        raise CheckpointError(f"{model_state_path} holds no Megatron `args` (num_layers, hidden_size, ...), so the "
                              "checkpoint is not from a Megatron GPT model, and no transformers config.json is beside or above it "
                              "(config key hf_config names one).")
    params = read_parameters(params_path)
    roles = classify_parameters([row.param for row in params])
    weights = []
    for row in params:
        role, layer, name = roles[row.param]
        shape = _full_shape(universal_folder, row.param, row.shapes)
        weights.append(Weight(row.param, role, layer, name, row.merge, shape))
    iteration = state.get("iteration", state.get("global_steps", 0))
    source = SourceModel(args, int(iteration), float(state.get("checkpoint_version", 0)), tuple(weights),
                         requested_qkv_layout or qkv_layout.AUTO)
    layers = {weight.layer for weight in weights if weight.role == LAYER}
    if layers != set(range(source.num_layers)):
        raise CheckpointError(f"The universal checkpoint holds {len(layers)} transformer layers but its args "
                              f"record num_layers={source.num_layers}.")
    return source
