"""AutoEP (DeepSpeed's automatic expert parallelism) checkpoints, converted as `ds_to_universal` does.

A ZeRO-1/2 AutoEP checkpoint records `ds_autoep_layers` in its model-state files: per MoE layer the
fused expert parameters `<expert_key_prefix>.w{1,2,3}` (shape [num_local_experts, ...] on each rank),
the expert count, the expert-parallel degree and which global experts each EP rank holds. Their
optimizer state lies in the ZeRO files like any other parameter's, but the data-parallel ranks hold
different experts rather than pieces of one tensor. DeepSpeed's `autoep_universal` concatenates each
EP rank's expert-data-parallel fragments into its num_local_experts experts, stacks the EP ranks
into one [num_experts, ...] tensor and saves it with `is_expert_param` and `ep_num_experts`. The
per-expert files `layer_{L}_expert_{E}_mp_rank_XX_model_states.pt` are checked, not converted.
ZeRO-3's partition-native format has no per-expert files: each rank's own `ds_autoep_layers` names
its EP rank, expert-data-parallel rank and the placement of the experts it holds.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .. import dsconst as C
from .. import ptfile
from ..errors import CheckpointError

if TYPE_CHECKING:
    from ..tables import Layout, Shape

EXPERT_WEIGHTS = ("w1", "w2", "w3")
# What ds_to_universal writes into the copied model-state files of a ZeRO-1/2 conversion.
UNIVERSAL_EXPERT_PATTERNS = [r"\.experts\.w[123]$"]
ZERO3_EXPERT_PATTERN = r".*\.experts\.w[123]$"
EXPERT_FILE = "layer_{layer}_expert_{expert}_mp_rank_*_model_states.pt"


# The fields of each layer that DeepSpeedCheckpoint keeps (its `_lightweight_autoep_metadata`), in its order.
LAYER_FIELDS = ("moe_layer_id", "module_path") + tuple(C.AUTOEP_ZERO12_REQUIRED_FIELDS)


def autoep_metadata(structure: object) -> Any:
    if not isinstance(structure, dict):
        return None
    found = structure.get(C.AUTOEP_LAYERS_KEY)
    return found if found is not None else structure.get(C.AUTOEP_LAYERS_KEY_LEGACY)


def _lightweight(layer):
    return {key: layer[key] for key in LAYER_FIELDS if key in layer} if isinstance(layer, dict) else None


def aggregate_metadata(model_meta: Iterable[tuple[str, dict]]) -> tuple[list[dict] | None, bool]:
    """(layers, use_data_before_expert_parallelism): every file's `ds_autoep_layers`, one entry per
    expert_key_prefix, as ds_to_universal's `_aggregate_autoep_zero12_metadata`; layers is None without AutoEP."""
    by_prefix, source, ordering = {}, {}, set()
    for path, meta in model_meta:
        layers = autoep_metadata(meta)
        if layers is not None:
            if not isinstance(layers, list):
                raise CheckpointError(f"AutoEP metadata must be a list in {path}.")
            for layer in map(_lightweight, layers):
                if layer is None:
                    raise CheckpointError(f"AutoEP layer metadata must contain dictionaries in {path}.")
                prefix = layer.get(C.AUTOEP_EXPERT_KEY_PREFIX)
                if not isinstance(prefix, str) or not prefix:
                    raise CheckpointError(f"AutoEP expert_key_prefix must be a non-empty string in {path}.")
                if prefix in by_prefix and by_prefix[prefix] != layer:
                    raise CheckpointError(
                        f"Conflicting AutoEP metadata for expert_key_prefix {prefix!r} in {source[prefix]} and {path}.")
                by_prefix.setdefault(prefix, layer)
                source.setdefault(prefix, path)
        config = meta.get("ds_config") or {}
        ordering.add(bool(config.get("use_data_before_expert_parallelism", False)))
    if len(ordering) > 1:
        raise CheckpointError("DeepSpeed checkpoint use_data_before_expert_parallelism disagrees across model-state files.")
    return (list(by_prefix.values()) or None), (ordering.pop() if ordering else False)


def _positive(layer, key, prefix):
    value = layer.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"AutoEP {key} must be a positive integer for {prefix}, got {value!r}.")
    return value


def experts_by_rank(layer: Mapping[str, Any], prefix: str) -> list[list[int]]:
    """The global expert ids each EP rank holds: contiguous blocks of num_local_experts (DeepSpeed's
    ZeRO-1/2 conversion reads no placement map)."""
    num_experts, ep_size = _positive(layer, C.AUTOEP_NUM_EXPERTS, prefix), _positive(layer, C.AUTOEP_EP_SIZE, prefix)
    local = layer.get(C.AUTOEP_NUM_LOCAL_EXPERTS)
    if isinstance(local, bool) or not isinstance(local, int) or local < 1:
        raise CheckpointError(f"AutoEP {C.AUTOEP_NUM_LOCAL_EXPERTS} must be a positive integer, got {local!r}.")
    if num_experts != local * ep_size:
        raise CheckpointError(f"AutoEP expert count mismatch for {prefix}: num_experts={num_experts}, "
                              f"num_local_experts={local}, ep_size={ep_size}.")
    return [list(range(rank * local, (rank + 1) * local)) for rank in range(ep_size)]


def expert_dp_ranks(ep_rank: int, dp_degree: int, ep_size: int, use_data_before_expert_parallel: bool) -> list[int]:
    """The ZeRO data-parallel ranks whose partitions hold one EP rank's experts, in order."""
    if dp_degree % ep_size:
        raise CheckpointError(f"ZeRO DP degree {dp_degree} is not divisible by AutoEP size {ep_size}.")
    if use_data_before_expert_parallel:
        edp = dp_degree // ep_size
        return list(range(ep_rank * edp, (ep_rank + 1) * edp))
    return list(range(ep_rank, dp_degree, ep_size))


def expert_params(layout: Layout, model_meta: Iterable[tuple[str, dict]],
                  slice_shapes: Mapping[str, Sequence[Shape | None]]) -> dict[str, dict[str, Any]]:
    """{parameter name: plan} for every fused expert parameter of a ZeRO-1/2 AutoEP checkpoint (empty
    without AutoEP); each plan says how its universal tensor is put together from the dp fragments."""
    layers, data_first = aggregate_metadata(model_meta)
    if layers is None:
        return {}
    if layout.tp_degree != 1:
        raise CheckpointError("ZeRO-1/2 Universal Checkpoint conversion for AutoEP with tensor parallelism is not supported.")
    plans = {}
    for layer in layers:
        missing = [key for key in C.AUTOEP_ZERO12_REQUIRED_FIELDS if key not in layer]
        if missing:
            raise CheckpointError(f"AutoEP layer metadata is missing fields: {missing}")
        prefix = layer[C.AUTOEP_EXPERT_KEY_PREFIX]
        ranks = experts_by_rank(layer, prefix)
        check_expert_files(layout.folder, layer, prefix)
        for weight in EXPERT_WEIGHTS:
            name = f"{prefix}.{weight}"
            shapes = slice_shapes.get(name)
            if not shapes or shapes[0] is None:
                raise CheckpointError(f"AutoEP expert parameter {name} is missing from checkpoint parameter shapes.")
            rest = list(shapes[0][1:])
            plans[name] = dict(
                num_experts=layer[C.AUTOEP_NUM_EXPERTS],
                experts=ranks,
                dp_ranks=[expert_dp_ranks(r, layout.dp_degree, len(ranks), data_first) for r in range(len(ranks))],
                shape=rest,
                layer=layer.get("moe_layer_id"),
            )
    return plans


def is_partitioned(layers: object) -> bool:
    """Whether `ds_autoep_layers` describes DeepSpeed's ZeRO-3 partition-native expert format."""
    return isinstance(layers, list) and any(
        isinstance(layer, dict)
        and layer.get(C.AUTOEP_ZERO3_EXPERT_STATE_FORMAT_KEY) == C.AUTOEP_ZERO3_PARTITIONED_EXPERT_STATE_FORMAT
        for layer in layers
    )


def zero3_expert_params(layout: Layout, model_meta: Iterable[tuple[str, dict]]) -> dict[str, dict[str, Any]]:
    """{parameter name: plan} of a ZeRO-3 partition-native AutoEP checkpoint, as ds_to_universal's
    `_consolidate_zero3_autoep_expert_states`: each rank file's own layers say which EP rank and which
    expert-data-parallel rank its expert partitions belong to."""
    owners, layers_of = {}, {}
    for dp, (path, meta) in enumerate(model_meta):
        layers = autoep_metadata(meta)
        if not is_partitioned(layers):
            continue
        shapes = {name: tuple(shape) for group in meta.get(C.PARAM_SHAPES) or [] for name, shape in group.items()}
        names = [f"{layer[C.AUTOEP_EXPERT_KEY_PREFIX]}.{w}" for layer in layers if is_partitioned([layer])
                 for w in EXPERT_WEIGHTS]
        missing = sorted(name for name in names if name not in shapes)
        if missing:
            raise CheckpointError(f"AutoEP expert parameters are missing from rank {dp} ZeRO param_shapes: {missing}")
        frozen = sorted(set(names) & set(meta.get("frozen_param_shapes") or {}))
        if frozen:
            raise CheckpointError(
                f"AutoEP frozen expert parameters cannot be converted from the ZeRO-3 partition-native format yet: {frozen}")
        for layer in layers:
            if not is_partitioned([layer]):
                continue
            for weight in EXPERT_WEIGHTS:
                name = f"{layer[C.AUTOEP_EXPERT_KEY_PREFIX]}.{weight}"
                layers_of.setdefault(name, (layer, shapes[name]))
                owners.setdefault(name, []).append((layer["ep_rank"], layer["expert_data_parallel_rank"], dp, layer))
    plans = {}
    for name, (layer, shape) in layers_of.items():
        ranks = experts_by_placement(layer, name)
        dp_ranks = []
        for ep_rank in range(len(ranks)):
            held = sorted((edp, dp, entry) for rank, edp, dp, entry in owners[name] if rank == ep_rank)
            world = held[0][2]["expert_data_parallel_world_size"] if held else 0
            if ranks[ep_rank] and [edp for edp, _, _ in held] != list(range(world or 1)):
                raise CheckpointError(f"Incomplete AutoEP expert-DP fragments for {name} EP rank {ep_rank}: "
                                      f"got {sorted(edp for edp, _, _ in held)}, expected {list(range(world or 1))}")
            dp_ranks.append([dp for _, dp, _ in held])
        plans[name] = dict(num_experts=layer[C.AUTOEP_NUM_EXPERTS], experts=ranks, dp_ranks=dp_ranks,
                           shape=list(shape[1:]), layer=layer.get("moe_layer_id"), zero3=True)
    return plans


def experts_by_placement(layer: Mapping[str, Any], name: str) -> list[list[int]]:
    """The global experts of each EP rank in its local packed order, from the layer's `expert_placement`."""
    placement = layer.get(C.AUTOEP_EXPERT_PLACEMENT)
    if placement is None:
        return experts_by_rank(layer, name)
    entries = {entry.get(C.AUTOEP_PLACEMENT_RANK): entry.get(C.AUTOEP_PLACEMENT_EXPERTS)
               for entry in placement.get(C.AUTOEP_PLACEMENT_RANKS) or []}
    ranks = [entries.get(rank) for rank in range(placement.get(C.AUTOEP_PLACEMENT_EP_SIZE) or 0)]
    placed = sorted(e for experts in ranks if isinstance(experts, list) for e in experts)
    if any(not isinstance(experts, list) for experts in ranks) or placed != list(range(layer[C.AUTOEP_NUM_EXPERTS])):
        raise CheckpointError(f"Invalid AutoEP expert placement for {name}: every expert must lie on exactly one EP rank.")
    return ranks


def check_expert_files(folder: str, layer: Mapping[str, Any], prefix: str) -> None:
    """Each expert of the layer has exactly one per-expert file holding its w1/w2/w3, as DeepSpeed requires."""
    layer_id = layer.get("moe_layer_id")
    for expert in range(layer[C.AUTOEP_NUM_EXPERTS]):
        matches = glob.glob(os.path.join(folder, EXPERT_FILE.format(layer=layer_id, expert=expert)))
        if not matches:
            raise CheckpointError(f"Expert checkpoint file not found: layer_{layer_id} expert_{expert} in {folder}.")
        if len(matches) > 1:
            raise CheckpointError(f"Multiple expert checkpoint files found for layer_{layer_id} expert_{expert}: "
                                  f"{sorted(matches)}; multi-mp_rank expert files are not yet supported.")
        keys = ptfile.load(matches[0])
        for weight in EXPERT_WEIGHTS:
            if f"{prefix}.{weight}.{expert}" not in keys:
                raise CheckpointError(f"Expected key '{prefix}.{weight}.{expert}' not found in {matches[0]}.")


def universal_model_state(source: str) -> dict | None:
    """The model-state file ds_to_universal writes for `source` of a ZeRO-1/2 AutoEP checkpoint: its
    `universal_checkpoint_info` with the expert patterns and the layers of all model-state files; None
    for a checkpoint without AutoEP (the file is copied as it is)."""
    structure = ptfile.load(source)
    if autoep_metadata(structure) is None:
        return None
    if is_partitioned(autoep_metadata(structure)):  # ZeRO-3: the file's own layers, another pattern
        info = structure.setdefault(C.UNIVERSAL_CHECKPOINT_INFO, {})
        info[C.EXPERT_PARAMETER_PATTERNS] = [ZERO3_EXPERT_PATTERN]
        info[C.AUTOEP_LAYERS_KEY] = autoep_metadata(structure)
        return structure
    folder = os.path.dirname(source)
    siblings = sorted(f for f in os.listdir(folder) if re.fullmatch(r"mp_rank_\d+_model_states\.pt", f))
    layers, _ = aggregate_metadata([(name, ptfile.load(os.path.join(folder, name))) for name in siblings])
    info = structure.setdefault(C.UNIVERSAL_CHECKPOINT_INFO, {})
    info[C.EXPERT_PARAMETER_PATTERNS] = list(UNIVERSAL_EXPERT_PATTERNS)
    info[C.AUTOEP_LAYERS_KEY] = layers
    return structure


def universal_model_state_digest(source: str, digest: Callable[[str], str]) -> str:
    """digest(path) of the model-state file a conversion writes for `source` (for `verify`)."""
    structure = universal_model_state(source)
    if structure is None:
        return digest(source)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, os.path.basename(source))
        ptfile.save(structure, path)
        return digest(path)
