"""The finalize stage: the files of a universal checkpoint that are not merged (zero/optimizer_state.pt and
the model states), then rule `finalize`: check the checkpoint complete against the index and write
latest_universal.

Before the marker is written, the output folder is made to hold exactly what the current index makes:
parameter folders and model-states copies of an earlier input are removed, as are leftovers of
interrupted writers, and every expected file must be present.
"""

import json
import os
import shutil
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from .. import dsconst as C
from .. import ptfile
from ..console import human_size
from ..errors import CheckpointError
from ..fileio import copy_file, remove_leftovers, write_text
from ..markers import retract_latest_universal, write_marker
from ..source.autoep import universal_model_state
from ..tables import MODEL_STATES_SUFFIX, OPTIMIZER_STATE_FILE, STAGING, ZERO, IndexRecord, read_index_record
from .publish import missing_files, parameter_files


def universal_optimizer_state(record: IndexRecord) -> dict:
    """The dict DeepSpeed's converter saves as zero/optimizer_state.pt, from the first rank file:
    ZeRO-3 keeps its whole optimizer state; ZeRO-1/2 drop the sharded entries, as
    ZeROCheckpoint.get_state_for_rank clears the group paddings and sets the partition counts."""
    optim = ptfile.load(record.optimizer_state_source)[C.OPTIMIZER_STATE_DICT]
    if record.layout.zero_stage > 2:
        optim[C.PARAM_GROUPS] = optim[C.OPTIMIZER_STATE_DICT][C.PARAM_GROUPS]
        return optim
    sharded = {C.BASE_OPTIMIZER_STATE, C.PARAM_SLICE_MAPPINGS, C.SINGLE_PARTITION_OF_FP32_GROUPS}
    state = {k: v for k, v in optim.items() if k not in sharded}
    if state.get(C.GROUP_PADDINGS):
        state[C.GROUP_PADDINGS] = [0] * len(state[C.GROUP_PADDINGS])
    if state.get(C.PARTITION_COUNT):
        state[C.PARTITION_COUNT] = [record.layout.dp_degree] * len(state[C.PARTITION_COUNT])
    state[C.PARAM_GROUPS] = optim[C.BASE_OPTIMIZER_STATE][C.PARAM_GROUPS]
    return state


def optimizer_state_job(layout_path: str, output: str) -> None:
    """zero/optimizer_state.pt: the first rank's optimizer state without its sharded tensors (as DeepSpeed)."""
    record = read_index_record(layout_path)
    state = universal_optimizer_state(record)
    retract_latest_universal(record.output_folder)
    remove_leftovers(output)
    ptfile.save(state, output)


def copy_model_state_job(source: str, output: str, output_folder: str) -> None:
    """A model-state file as ds_to_universal writes it: copied, or for AutoEP rewritten with its expert patterns
    (either way read first through the restricted loader, so a file naming a disallowed global is refused)."""
    retract_latest_universal(output_folder)
    structure = universal_model_state(source)
    if structure is None:
        copy_file(source, output)
    else:
        remove_leftovers(output)
        ptfile.save(structure, output)


def remove_stale_entries(output_folder: Path | str, parameters: Collection[str], copy_names: Collection[str]) -> list[str]:
    """Remove what the current index does not make: other parameters, other model-states files, leftovers."""
    removed = []
    zero = Path(output_folder) / ZERO
    for entry in sorted(zero.iterdir()):
        if entry.name in parameters or entry.name == OPTIMIZER_STATE_FILE:
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        removed.append(f"{ZERO}/{entry.name}")
    for entry in sorted(Path(output_folder).iterdir()):
        if entry.name.endswith(MODEL_STATES_SUFFIX) and entry.name not in copy_names:
            entry.unlink()
            removed.append(entry.name)
    return removed


def check_complete(output_folder: Path | str, parameters: Mapping[str, Collection[str]], copy_names: Iterable[str]) -> None:
    missing = [f"{ZERO}/{name}/{file}" for name, files in parameters.items() for file in missing_files(
        Path(output_folder) / ZERO / name, files)]
    missing += [name for name in [f"{ZERO}/{OPTIMIZER_STATE_FILE}", *copy_names]
                if not (Path(output_folder) / name).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"The universal checkpoint {output_folder} lacks {shown}; run the same command again.")


def folder_bytes(folder: Path | str) -> int:
    return sum(entry.stat().st_size for entry in Path(folder).rglob("*") if entry.is_file())


def finalize_job(output_folder: str, params_path: str, copy_files: Iterable[str], summary_path: str,
                 keep_temp_folder: bool) -> dict[str, Any]:
    """Check `output_folder` complete for the index (removing what an earlier input left there), then write the
    summary last: the `latest_universal` rule names the folder only after that (write_latest_universal)."""
    parameters = parameter_files(params_path)
    copy_names = [os.path.basename(path) for path in copy_files]
    for entry in remove_stale_entries(output_folder, parameters, copy_names):
        print(f"removed {entry}: not part of the conversion of the current input")
    check_complete(output_folder, parameters, copy_names)
    staging = Path(output_folder) / STAGING
    if staging.is_dir() and not keep_temp_folder:
        shutil.rmtree(staging)
    summary = {
        "output_folder": str(output_folder),
        "parameters": len(parameters),
        "bytes": folder_bytes(Path(output_folder) / ZERO),
    }
    write_text(summary_path, json.dumps(summary), durable=True)
    return summary


def write_latest_universal(latest_path: str, output_folder: str) -> None:
    """`latest_universal`, naming `output_folder` (the newest save's universal checkpoint, complete)."""
    write_marker(latest_path, Path(os.path.normpath(output_folder)).name)


def summary_line(summary: Mapping[str, Any], seconds: float) -> str:
    folder = summary["output_folder"]
    return (
        f"ucpflow: wrote {folder} ({summary['parameters']} parameters, {human_size(summary['bytes'])}) "
        f"in {seconds:.1f} s. To resume training from it, add \"checkpoint\": {{\"load_universal\": true}} "
        f"to the DeepSpeed config and load the checkpoint from {os.path.dirname(os.path.abspath(folder))}."
    )
