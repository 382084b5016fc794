"""Export to a Megatron-LM checkpoint at target tensor and pipeline degrees.

The layout is the one Megatron-LM saves and Megatron-DeepSpeed's deepspeed_to_megatron writes:

    <folder>/latest_checkpointed_iteration.txt
    <folder>/iter_{iteration:07d}/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt

each file holding `model` (language_model → embedding on the first stage, encoder with the stage's
`layers.{local index}.*` and, on the last stage, `final_layernorm.*` and an untied model's
`output_layer`; a tied model's `word_embeddings_for_head` on the last stage when there are several
stages), `checkpoint_version` 3.0, `iteration` and the source `args` with the target degrees and
vocabulary padding. The fused QKV is written in the model's layout (qkv_layout): each rank gets whole
key/value groups, [q..., k, v] per group or its slice's [Q; K; V].
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import ptfile
from ..errors import UcpflowError
from ..fileio import write_text
from ..markers import retract, write_marker
from . import tensors as T
from .source import (
    FINAL_NORM,
    LAYER,
    OUTPUT_LAYER,
    POSITION_EMBEDDINGS,
    WORD_EMBEDDINGS,
    SourceModel,
    Weight,
    load_plan,
    load_source,
    read_full,
)

if TYPE_CHECKING:
    import numpy as np

CHECKPOINT_VERSION = 3.0
TRACKER_FILE = "latest_checkpointed_iteration.txt"
CHECKPOINT_FILE = "model_optim_rng.pt"

# Tensor-parallel splits of a transformer layer's weights, as Megatron's modules define them.
LAYER_SPLITS = {
    "input_layernorm.weight": T.REPLICATED,
    "input_layernorm.bias": T.REPLICATED,
    "self_attention.query_key_value.weight": T.QKV,
    "self_attention.query_key_value.bias": T.QKV,
    "self_attention.dense.weight": T.ROW,
    "self_attention.dense.bias": T.REPLICATED,
    "post_attention_layernorm.weight": T.REPLICATED,
    "post_attention_layernorm.bias": T.REPLICATED,
    "mlp.dense_h_to_4h.weight": T.COLUMN,
    "mlp.dense_h_to_4h.bias": T.COLUMN,
    "mlp.dense_4h_to_h.weight": T.ROW,
    "mlp.dense_4h_to_h.bias": T.REPLICATED,
}
# Parameters the universal conversion kept whole or averaged over ranks are replicated in Megatron too.
REPLICATED_MERGES = ("replicated", "average")


def iteration_folder(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rank_folder(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """Megatron gives every pipeline stage the same number of consecutive layers."""
    per_stage = num_layers // pp
    return range(stage * per_stage, (stage + 1) * per_stage)


def layer_split(source: SourceModel, weight: Weight) -> str:
    split = LAYER_SPLITS.get(weight.name)
    if split is None:
        if weight.merge in REPLICATED_MERGES:
            return T.REPLICATED
        raise UcpflowError(f"Parameter {weight.param} ({weight.name}) is not a weight of Megatron's GPT layer, "
                           "so its tensor-parallel split is unknown.")
    if split == T.COLUMN and weight.name.startswith("mlp.dense_h_to_4h") and source.arg("swiglu"):
        return T.GATE_UP
    return split


def check_degrees(source: SourceModel, tp: int, pp: int) -> None:
    """One sentence for target degrees that Megatron cannot run the model with."""
    if source.arg("untie_embeddings_and_output_weights") and not source.has_output_layer:
        raise UcpflowError("The args record an output layer separate from the word embeddings, but the universal "
                           "checkpoint holds none (lm_head or output_layer).")
    if source.num_layers % pp:
        raise UcpflowError(f"Config key `target_pp`: {source.num_layers} layers cannot be spread evenly over {pp} "
                           "pipeline stages.")
    for what, count in (("attention heads", source.heads), ("key/value heads", source.kv_heads),
                        ("hidden size", source.hidden)):
        if count % tp:
            raise UcpflowError(f"Config key `target_tp`: {tp} does not divide the model's {what} ({count}).")
    ffn_rows = source.weight(LAYER, "mlp.dense_h_to_4h.weight", 0).shape[0] // (2 if source.arg("swiglu") else 1)
    if ffn_rows % tp:
        raise UcpflowError(f"Config key `target_tp`: {tp} does not divide the model's MLP size ({ffn_rows}).")


def _entry(key, weight, split, qkv_order=None):
    return {"key": key, "param": weight.param, "shape": list(weight.shape), "split": split, "qkv_order": qkv_order}


def stage_entries(source: SourceModel, stage: int, pp: int) -> list[dict[str, Any]]:
    """Every tensor of one pipeline stage: its key path inside `model` and how it is cut."""
    entries = []
    if stage == 0:
        roles = [WORD_EMBEDDINGS] + [POSITION_EMBEDDINGS] * any(w.role == POSITION_EMBEDDINGS for w in source.weights)
        for role in roles:
            weight = source.weight(role)
            split = T.VOCAB if role == WORD_EMBEDDINGS else T.REPLICATED
            entries.append(_entry(["language_model", "embedding", role, "weight"], weight, split))
    layers = stage_layers(source.num_layers, pp, stage)
    for layer in layers:
        for weight in source.layer_weights(layer):
            key = ["language_model", "encoder", f"layers.{layer - layers.start}.{weight.name}"]
            split = layer_split(source, weight)
            entries.append(_entry(key, weight, split, source.qkv_order(weight) if split == T.QKV else None))
    if stage == pp - 1:
        for weight in (w for w in source.weights if w.role == FINAL_NORM):
            entries.append(_entry(["language_model", "encoder", f"final_layernorm.{weight.name}"], weight,
                                  T.REPLICATED))
        if source.has_output_layer:
            entries.append(_entry(["language_model", "output_layer", "weight"], source.weight(OUTPUT_LAYER), T.VOCAB))
        elif pp > 1:
            entries.append(_entry(["word_embeddings_for_head", "weight"], source.weight(WORD_EMBEDDINGS), T.VOCAB))
    return entries


def megatron_plan(source: SourceModel, universal_folder: Path | str, model_state_path: Path | str, tp: int,
                  pp: int) -> dict[str, Any]:
    """What every file of the Megatron checkpoint holds (a JSON-ready dict)."""
    check_degrees(source, tp, pp)
    ranks = {rank_folder(t, p, pp): [t, p] for p in range(pp) for t in range(tp)}
    layout = source.qkv_layout[0]
    return {
        "iteration": source.iteration,
        "iteration_folder": iteration_folder(source.iteration),
        "tp": tp,
        "pp": pp,
        "dtype": source.dtype,
        "padded_vocab": T.padded_vocab_size(source.vocab, source.arg("make_vocab_size_divisible_by"), tp),
        "heads": source.heads,
        "kv_heads": source.kv_heads,
        "head_dim": source.head_dim,
        "source_tp": source.source_tp,
        "qkv_layout": layout,  # qkv_layout.PER_GROUP and PER_SLICE name the tensors module's orders of the same rows
        "universal_folder": str(universal_folder),
        "model_state": str(model_state_path),
        "ranks": ranks,
        "stages": [stage_entries(source, stage, pp) for stage in range(pp)],
    }


def check_megatron_folder(folder: Path | str, plan: Mapping[str, Any]) -> None:
    """Refuse an iteration folder holding rank folders of another layout, which Megatron could load instead."""
    iteration = Path(folder) / plan["iteration_folder"]
    if not iteration.is_dir():
        return
    stale = sorted(entry.name for entry in iteration.iterdir() if entry.name not in plan["ranks"])
    if stale:
        raise UcpflowError(f"{iteration} already holds {', '.join(stale[:3])}, which is not part of a tp "
                           f"{plan['tp']} pp {plan['pp']} checkpoint; remove it or choose another megatron_folder.")


def megatron_plan_job(params_path: str, universal_folder: str, model_state_path: str, megatron_folder: Path | str,
                      tp: int, pp: int, output: str, qkv_layout: str = "") -> None:
    source = load_source(params_path, universal_folder, model_state_path, qkv_layout)
    plan = megatron_plan(source, universal_folder, model_state_path, tp, pp)
    check_megatron_folder(megatron_folder, plan)
    write_text(output, json.dumps(plan, indent=1))
    print(f"Megatron checkpoint of iteration {plan['iteration']}: tp {tp}, pp {pp}, {plan['dtype']}, "
          f"{source.num_layers // pp} layers per stage, padded vocabulary {plan['padded_vocab']}, fused QKV "
          f"{plan['qkv_layout']}")


def full_tensor(plan: Mapping[str, Any], entry: Mapping[str, Any]) -> np.ndarray:
    """A full fp32 weight in Megatron's form: QKV rows in the model's layout at the target degree (so that equal
    pieces are the ranks' slices), the vocabulary padded."""
    full = read_full(plan["universal_folder"], entry["param"], entry["shape"])
    if entry["split"] == T.QKV:
        shape = plan["heads"], plan["kv_heads"], plan["head_dim"]
        blocks = T.qkv_to_blocks(full, entry["qkv_order"], *shape, plan["source_tp"])
        full = T.qkv_from_blocks(blocks, plan["qkv_layout"], *shape, plan["tp"])
    if entry["split"] == T.VOCAB:
        full = T.pad_rows(full, plan["padded_vocab"])
    return full


def target_args(args: Any, plan: Mapping[str, Any]) -> Any:
    args = copy.deepcopy(args)
    args.tensor_model_parallel_size = plan["tp"]
    args.pipeline_model_parallel_size = plan["pp"]
    args.padded_vocab_size = plan["padded_vocab"]
    return args


def rank_checkpoint(plan: Mapping[str, Any], rank: str) -> dict[str, Any]:
    """The dict saved as one rank's model_optim_rng.pt."""
    tp_rank, pp_rank = plan["ranks"][rank]
    model = {"language_model": {}}
    for entry in plan["stages"][pp_rank]:
        piece = T.tensor_parallel_piece(full_tensor(plan, entry), entry["split"], tp_rank, plan["tp"])
        *parents, leaf = entry["key"]
        node = model
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = T.saved_tensor(piece, plan["dtype"])
    args = ptfile.load(plan["model_state"])["args"]
    return {"model": model, "checkpoint_version": CHECKPOINT_VERSION, "iteration": plan["iteration"],
            "args": target_args(args, plan)}


# Megatron-LM reads this file first; it is written last, once every rank file is in place.
MEGATRON_MARKER = "latest_checkpointed_iteration.txt"


def megatron_shard_job(plan_path: str, iteration_folder: str, rank: str, output: str) -> None:
    plan = load_plan(plan_path)
    if iteration_folder != plan["iteration_folder"] or rank not in plan["ranks"]:
        raise UcpflowError(f"{iteration_folder}/{rank} is not a file of the planned tp {plan['tp']} pp {plan['pp']} "
                           f"checkpoint of {plan['iteration_folder']}.")
    retract(Path(output).parents[2] / MEGATRON_MARKER)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    ptfile.save(rank_checkpoint(plan, rank), output)
    stage = plan["ranks"][rank][1]
    print(f"{output}: {len(plan['stages'][stage])} tensors of pipeline stage {stage}")


def megatron_finalize_job(plan_path: str, output: str) -> None:
    """latest_checkpointed_iteration.txt, written once every rank's file is in place."""
    write_marker(output, str(load_plan(plan_path)["iteration"]))
