"""Merging an AutoEP fused expert parameter: every EP rank's experts into one [num_experts, ...] tensor per state."""

import math
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from .. import dsconst as C
from .. import ptfile
from ..errors import CheckpointError
from ..tables import OPTIMIZER_STATES, STEP, Fragment, Parameter
from .extract import FragmentReader


def merge_expert_parameter(reader: FragmentReader, row: Parameter, frags: list[Fragment],
                           save: Callable[[str, Any], None], states: Collection[str] | None = None) -> None:
    """Write fp32/exp_avg/exp_avg_sq/step (or those of them in `states`) of one fused expert parameter, as
    `consolidate_autoep_zero12_expert_states`."""
    name, plan = row.param, row.experts
    num_experts, rest = plan["num_experts"], tuple(plan["shape"])
    by_state = {}
    for frag in frags:
        by_state.setdefault(frag.state, {}).setdefault(frag.dp, []).append(frag)
    steps = [reader.value(f.file, f.tensor) for dp in sorted(by_state.get(STEP, {})) for f in by_state[STEP][dp]]
    if not steps and not plan.get("zero3"):
        raise CheckpointError(f"Missing AutoEP optimizer step for {name}.")
    if not all(ptfile.same_value(step, steps[0]) for step in steps[1:]):
        raise CheckpointError(f"Inconsistent AutoEP optimizer steps for {name}.")
    states = (*OPTIMIZER_STATES, STEP) if states is None else states
    for state in (s for s in OPTIMIZER_STATES if s in states):
        full = np.empty((num_experts, *rest), dtype=np.float32)
        for ep_rank, (experts, dp_ranks) in enumerate(zip(plan["experts"], plan["dp_ranks"])):
            pieces = [f for dp in dp_ranks for f in by_state.get(state, {}).get(dp, [])]
            expected = len(experts) * math.prod(rest)
            if not pieces and expected:
                raise CheckpointError(f"Missing AutoEP {state} fragments for {name}, EP rank {ep_rank} "
                                      "(ucpflow does not rebuild them from the per-expert files).")
            local = []
            for frag in pieces:
                data, dtype = reader.view(frag.file, frag.tensor, frag.offset, frag.numel)
                if dtype != "float32":
                    raise CheckpointError(f"AutoEP {state} fragment must be FP32, got {dtype} in {frag.file}.")
                local.append(data)
            local = np.concatenate(local) if local else np.empty(0, dtype=np.float32)
            if local.size != expected:
                raise CheckpointError(f"AutoEP {state} fragment size mismatch for {name}, EP rank {ep_rank}: "
                                      f"got {local.size}, expected {expected}.")
            full[experts] = local.reshape((len(experts), *rest))
        save(state, {C.PARAM: ptfile.ArrayTensor(full, "float32"), C.CAT_DIM: 0, C.EP_IS_EXPERT_PARAM: True,
                     C.EP_NUM_EXPERTS: num_experts})
    if not plan.get("zero3") and STEP in states:
        save(STEP, steps[0])
