"""The files of a universal checkpoint that are not merged: zero/optimizer_state.pt and the model states."""

from .. import dsconst as C
from ..fileio import copy_file, remove_leftovers
from ..markers import retract_latest_universal
from .common import load_layout


def optimizer_state_job(layout_path, output):
    """zero/optimizer_state.pt: the first rank's optimizer state without its sharded tensors (as DeepSpeed)."""
    from .. import ptfile

    layout = load_layout(layout_path)
    source = layout["optimizer_state_source"]
    structure = ptfile.load(source)
    optim = structure[C.OPTIMIZER_STATE_DICT]
    if layout["zero_stage"] > 2:
        state = optim
        state[C.PARAM_GROUPS] = optim[C.OPTIMIZER_STATE_DICT][C.PARAM_GROUPS]
    else:
        sharded = {C.BASE_OPTIMIZER_STATE, C.PARAM_SLICE_MAPPINGS, C.SINGLE_PARTITION_OF_FP32_GROUPS}
        state = {k: v for k, v in optim.items() if k not in sharded}
        if state.get(C.GROUP_PADDINGS):
            state[C.GROUP_PADDINGS] = [0] * len(state[C.GROUP_PADDINGS])
        if state.get(C.PARTITION_COUNT):
            state[C.PARTITION_COUNT] = [layout["dp_degree"]] * len(state[C.PARTITION_COUNT])
        state[C.PARAM_GROUPS] = optim[C.BASE_OPTIMIZER_STATE][C.PARAM_GROUPS]
    retract_latest_universal(layout["output_folder"])
    remove_leftovers(output)
    ptfile.save(state, output)


def copy_model_state_job(source, output, output_folder):
    """A model-state file as ds_to_universal writes it: copied, or for AutoEP rewritten with its expert patterns
    (either way read first through the restricted loader, so a file naming a disallowed global is refused)."""
    from .. import ptfile
    from ..autoep import universal_model_state

    retract_latest_universal(output_folder)
    structure = universal_model_state(source)
    if structure is None:
        copy_file(source, output)
    else:
        remove_leftovers(output)
        ptfile.save(structure, output)
