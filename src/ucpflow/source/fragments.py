"""Where every piece of every parameter's optimizer state lies, found without reading tensor data.

A *fragment* is the part of one parameter's state (fp32 master weight, exp_avg, exp_avg_sq, step)
that one (pp, tp, dp) rank holds inside a flat optimizer tensor. `build_index` reads only the pickled
structures of the checkpoint files and returns the layout, the universal_checkpoint_info, the fragments
and one `Parameter` per output parameter folder (tables.py).
"""

import math
import re
import sys

from .. import dsconst as C
from ..errors import CheckpointError
from ..ptfile import TensorRef
from ..tables import (
    FORMAT_EXPERT,
    FORMAT_FLAT,
    FORMAT_MERGED,
    FORMAT_MODULE,
    FP32,
    OPTIMIZER_STATES,
    STEP,
    Fragment,
    Layout,
    Parameter,
    numel_of,
)
from .autoep import expert_params, zero3_expert_params
from .hfconfig import find_model_config
from .layout import ZERO_PARTITION_GROUPS, discover, load_structure
from .patterns import COLUMN_PARALLEL, classify, unused_patterns


def _tensor(path, value, what):
    if not isinstance(value, TensorRef):
        raise CheckpointError(f"{path}: {what} is not a tensor.")
    return value


def _step_value(value):
    step = value.read(0, 1).item() if isinstance(value, TensorRef) else value
    return int(step) if isinstance(step, float) and step.is_integer() else step


def _check_same_step(steps_by_file):
    """Every rank's Adam step of a parameter group must agree, or the files come from different saves."""
    seen = {}
    for path, steps in steps_by_file.items():
        for group, step in steps.items():
            if group in seen and seen[group][1] != step:
                raise CheckpointError(
                    f"{path} holds optimizer step {step} but {seen[group][0]} holds step {seen[group][1]}: "
                    "the folder mixes files from different checkpoints."
                )
            seen.setdefault(group, (path, step))


def _stage12_fragments(layout, info):
    pipeline_replicated = info.get(C.PIPELINE_REPLICATED_PARAMETER_PATTERNS, []) or []
    rows = []
    steps_by_file = {}
    for rank in layout.rank_files:
        structure = load_structure(rank.path)
        optim = structure.get(C.OPTIMIZER_STATE_DICT) or {}
        try:
            mappings = optim[C.PARAM_SLICE_MAPPINGS]
            groups = optim[C.BASE_OPTIMIZER_STATE]["state"]
            fp32_groups = optim[C.SINGLE_PARTITION_OF_FP32_GROUPS]
        except (KeyError, TypeError) as missing:
            raise CheckpointError(f"{rank.path} lacks the ZeRO optimizer key {missing} that a conversion needs.")
        paddings = optim.get(C.GROUP_PADDINGS) or [0] * len(groups)
        for group in range(len(groups)):
            if group not in groups or "exp_avg" not in groups[group]:
                raise CheckpointError(
                    f"{rank.path} has no Adam state for parameter group {group}: "
                    "the optimizer had not stepped when the checkpoint was saved."
                )
            flat = {
                "exp_avg": groups[group]["exp_avg"],
                "exp_avg_sq": groups[group]["exp_avg_sq"],
                "fp32": fp32_groups[group],
            }
            for state, tensor in flat.items():
                _tensor(rank.path, tensor, f"{state} of parameter group {group}")
            limit = {
                "fp32": flat["fp32"].numel,
                "exp_avg": flat["exp_avg"].numel - paddings[group],
                "exp_avg_sq": flat["exp_avg_sq"].numel - paddings[group],
            }
            states = list(OPTIMIZER_STATES) + ([STEP] if STEP in groups[group] else [])
            if STEP in groups[group]:
                steps_by_file.setdefault(rank.path, {})[group] = _step_value(groups[group][STEP])
            for name, address in mappings[group].items():
                if rank.pp > 0 and any(re.match(p, name) for p in pipeline_replicated):
                    continue
                start, numel = int(address.start), int(address.numel)
                for state in states:
                    if state != STEP and start + numel > limit[state]:
                        raise CheckpointError(
                            f"{rank.path}: the slice of {name} ({start}+{numel}) runs past the end of "
                            f"its {state} partition ({limit[state]} elements)."
                        )
                    rows.append((name, state, rank.tp, rank.pp, rank.dp, rank.path, f"{state}/{group}",
                                 0 if state == STEP else start, 1 if state == STEP else numel))
    _check_same_step(steps_by_file)
    return rows


def _zero3_param_shapes(layout):
    """Per tp rank, the ordered {name: shape} of each sub-group, from that rank's dp-0 model file."""
    by_tp = []
    for tp in range(layout.tp_degree):
        path = layout.model_files[tp * layout.dp_degree]
        shapes = load_structure(path).get(C.PARAM_SHAPES)
        if not isinstance(shapes, list):
            raise CheckpointError(f"{path} has no `{C.PARAM_SHAPES}` list of parameter shapes.")
        by_tp.append(shapes)
    return by_tp


def _stage3_fragments(layout, shapes_by_tp):
    rows = []
    for rank in layout.rank_files:
        optim = (load_structure(rank.path).get(C.OPTIMIZER_STATE_DICT) or {})
        partitions = optim.get(ZERO_PARTITION_GROUPS) or []
        try:
            inner_state = optim[C.OPTIMIZER_STATE_DICT]["state"]
            fp32_groups = optim[C.FP32_FLAT_GROUPS]
        except (KeyError, TypeError) as missing:
            raise CheckpointError(f"{rank.path} lacks the ZeRO-3 optimizer key {missing} that a conversion needs.")
        for group, sub_group in enumerate(shapes_by_tp[rank.tp]):
            meta = partitions[group] if group < len(partitions) else {}
            count = int(meta.get("partition_count", layout.dp_degree))
            index = int(meta.get("partition_rank", rank.dp))
            if group not in inner_state or "exp_avg" not in inner_state[group]:
                raise CheckpointError(f"{rank.path} has no Adam state for sub-group {group}.")
            flat = {
                "exp_avg": inner_state[group]["exp_avg"],
                "exp_avg_sq": inner_state[group]["exp_avg_sq"],
                "fp32": fp32_groups[group],
            }
            offset = 0
            for name, shape in sub_group.items():
                full = numel_of(shape)
                per_rank = math.ceil(full / count)
                held = max(0, min(per_rank, full - index * per_rank))
                for state, tensor in flat.items():
                    _tensor(rank.path, tensor, f"{state} of sub-group {group}")
                    if offset + held > tensor.numel:
                        raise CheckpointError(
                            f"{rank.path}: the partition of {name} runs past the end of its {state} sub-group."
                        )
                    rows.append((name, state, rank.tp, 0, rank.dp, rank.path, f"{state}/{group}", offset, held))
                offset += per_rank
    return rows


def _stage12_shapes(layout):
    """DeepSpeed's per-tp shapes: each tp rank's param_shapes, unioned over its pipeline stages."""
    by_file = []
    for path in layout.model_files:
        groups = load_structure(path).get(C.PARAM_SHAPES)
        if not isinstance(groups, list):
            raise CheckpointError(f"{path} has no `{C.PARAM_SHAPES}` list of parameter shapes.")
        by_file.append({name: tuple(shape) for group in groups for name, shape in group.items()})
    per_tp = []
    for tp in range(layout.tp_degree):
        merged = {}
        for pp in range(layout.pp_degree):
            stage = by_file[pp * layout.tp_degree + tp]
            for name in merged.keys() & stage.keys():
                if merged[name] != stage[name]:
                    raise CheckpointError(
                        f"Pipeline replicas of {name} on tp rank {tp} disagree on shape: {merged[name]} vs {stage[name]}."
                    )
            merged.update(stage)
        per_tp.append(merged)
    names = []
    for shapes in per_tp:
        names.extend(n for n in shapes if n not in names)
    return {name: [shapes.get(name) for shapes in per_tp] for name in names}


def _module_fallback(layout, merged_names):
    """Model weights with no optimizer state (frozen parameters, buffers): DeepSpeed saves them as fp32.pt."""
    found = {}
    for path in layout.model_files:
        module = load_structure(path).get("module")
        if module is None:
            continue
        for name, tensor in module.items():
            if name in merged_names or name in found:
                continue
            found[name] = (path, _tensor(path, tensor, f"module weight {name}"))
    return found


def universal_info_for(layout: Layout, inject_missing_state: bool, model_config: str | None = None) -> dict:
    info = layout.universal_info
    if layout.zero_stage <= 2 and info is None:
        transformers_config = None if inject_missing_state else find_model_config(layout.folder, model_config)
        if transformers_config is not None:
            notice(f"ucpflow: {layout.model_files[0]} has no `{C.UNIVERSAL_CHECKPOINT_INFO}`; the transformers model of "
                   f"{transformers_config / 'config.json'} gets the default (data-parallel only), as with "
                   "inject_missing_state.")
        elif not inject_missing_state:
            raise CheckpointError(
                f"{layout.model_files[0]} has no `{C.UNIVERSAL_CHECKPOINT_INFO}`; the training script must save it, "
                "or set `inject_missing_state: true` to add the default (as ds_to_universal --inject_missing_state)."
            )
        info = {C.UNIVERSAL_CHECKPOINT_VERSION_KEY: C.UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    info = info or {}
    unsupported = info.get(C.AUTOTP_UNSUPPORTED_PARAMETER_PATTERNS, {})
    if unsupported:
        details = ", ".join(f"{p}: {reason}" for p, reason in sorted(unsupported.items()))
        raise CheckpointError(f"AutoTP universal checkpoint conversion is not supported for {details}.")
    return info


def notice(message: str) -> None:
    """One line in the job's log and, when that is not the terminal, on the terminal too."""
    print(message)
    if sys.stdout is not sys.__stdout__ and sys.__stderr__ is not None:
        print(message, file=sys.__stderr__)


def build_index(input_folder: str, *, strict: bool = True, inject_missing_state: bool = False,
                model_config: str | None = None) -> tuple[Layout, dict, list[Fragment], list[Parameter]]:
    """Index a checkpoint: returns (layout, universal_info, fragments, params) without reading tensor data.

    A checkpoint of a transformers model (its config.json beside or above the tag folder, or `model_config`)
    saved without universal_checkpoint_info is converted as with `inject_missing_state`.
    """
    layout = discover(input_folder)
    info = universal_info_for(layout, inject_missing_state, model_config)
    stage3_flat = layout.zero_stage > 2 and layout.tp_degree == 1
    if layout.zero_stage > 2:
        shapes_by_tp = _zero3_param_shapes(layout)
        rows = _stage3_fragments(layout, shapes_by_tp)
        first_names = [name for group in shapes_by_tp[0] for name in group]
        per_tp = [{n: tuple(s) for g in shapes for n, s in g.items()} for shapes in shapes_by_tp]
        slice_shapes = {name: [shapes.get(name) for shapes in per_tp] for name in first_names}
        for shapes in per_tp[1:]:
            slice_shapes.update({n: [s.get(n) for s in per_tp] for n in shapes if n not in slice_shapes})
        experts = zero3_expert_params(layout, [(path, load_structure(path)) for path in layout.model_files])
    else:
        slice_shapes = _stage12_shapes(layout)
        experts = expert_params(layout, [(path, load_structure(path)) for path in layout.model_files], slice_shapes)
        rows = _stage12_fragments(layout, info)

    fragments = [
        Fragment(*row, shape=(slice_shapes.get(row[0]) or [None] * (row[2] + 1))[row[2]] or ())
        for row in _drop_shadowed_pipeline_copies(rows)
    ]
    states_of = {}
    for fragment in fragments:
        states_of.setdefault(fragment.param, set()).add(fragment.state)

    params = []
    rules = []
    for name, shapes in slice_shapes.items():
        if name in experts:
            plan = experts[name]
            params.append(Parameter(
                param=name, format=FORMAT_EXPERT, merge="", vocabulary=False,
                shapes=[(plan["num_experts"], *plan["shape"])], states=tuple(sorted(states_of.get(name, ()))),
                numel=plan["num_experts"] * numel_of(plan["shape"]), experts=plan,
            ))
            continue
        if stage3_flat:
            rule_kind, vocab = COLUMN_PARALLEL, False
        else:
            rule = classify(info, name, has_slices=name in states_of)
            rules.append(rule)
            if name not in states_of and rule.kind != COLUMN_PARALLEL:
                raise CheckpointError(
                    f"Parameter {name} has no optimizer fragments, but its `{C.UNIVERSAL_CHECKPOINT_INFO}` "
                    f"pattern {rule.pattern!r} ({rule.kind}) needs its tensor-parallel slices."
                )
            rule_kind, vocab = rule.kind, rule.vocabulary
        if name not in states_of:
            continue
        params.append(Parameter(
            param=name, format=FORMAT_FLAT if stage3_flat else FORMAT_MERGED, merge=rule_kind, vocabulary=vocab,
            shapes=[tuple(s) if s is not None else None for s in shapes], states=tuple(sorted(states_of[name])),
            numel=sum(numel_of(s) for s in shapes if s is not None),
        ))
    if strict and not stage3_flat:
        unused = unused_patterns(info, rules)
        if unused:
            raise CheckpointError(
                f"`{C.UNIVERSAL_CHECKPOINT_INFO}` patterns {unused} match no parameter of the checkpoint "
                "(set `strict: false` to convert anyway, as ds_to_universal --no_strict)."
            )

    if layout.zero_stage <= 2:
        merged_names = {p.param for p in params}
        for name, (path, tensor) in _module_fallback(layout, merged_names).items():
            params.append(Parameter(
                param=name, format=FORMAT_MODULE, merge="", vocabulary=False, shapes=[tuple(tensor.shape)],
                states=(FP32,), numel=tensor.numel, source=path, tensor=f"module/{name}",
            ))
    return layout, info, fragments, params


def _drop_shadowed_pipeline_copies(rows):
    """A parameter held by several pipeline stages and not declared pipeline-replicated: DeepSpeed's
    extraction writes each stage's fragment to the same temp file, so the last stage wins. Rows are
    (param, state, tp, pp, dp, ...); the survivors keep their order."""
    last_stage = {}
    for position, row in enumerate(rows):
        key = (row[0], row[1], row[2], row[4])
        if key not in last_stage or row[3] >= rows[last_stage[key]][3]:
            last_stage[key] = position
    keep = set(last_stage.values())
    return [row for position, row in enumerate(rows) if position in keep]
