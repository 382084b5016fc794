"""Rule `finalize`: check the universal checkpoint complete against the index, then write latest_universal.

Before the marker is written, the output folder is made to hold exactly what the current index makes:
parameter folders and model-states copies of an earlier input are removed, as are leftovers of
interrupted writers, and every expected file must be present.
"""

import json
import os
import shutil
from pathlib import Path

from .errors import CheckpointError
from .jobs import OPTIMIZER_STATE_FILE, STAGING, ZERO, MODEL_STATES_SUFFIX
from .console import human_size
from .fileio import write_text
from .markers import write_marker
from .publish import missing_files, parameter_files


def remove_stale_entries(output_folder, parameters, copy_names):
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


def check_complete(output_folder, parameters, copy_names):
    missing = [f"{ZERO}/{name}/{file}" for name, files in parameters.items() for file in missing_files(
        Path(output_folder) / ZERO / name, files)]
    missing += [name for name in [f"{ZERO}/{OPTIMIZER_STATE_FILE}", *copy_names]
                if not (Path(output_folder) / name).is_file()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"The universal checkpoint {output_folder} lacks {shown}; run the same command again.")


def folder_bytes(folder):
    return sum(entry.stat().st_size for entry in Path(folder).rglob("*") if entry.is_file())


def finalize_job(output_folder, latest_path, params_path, copy_files, summary_path, keep_temp_folder):
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
        "latest_universal": str(latest_path),
    }
    write_text(summary_path, json.dumps(summary))
    write_marker(latest_path, Path(os.path.normpath(output_folder)).name)
    return summary


def summary_line(summary, seconds):
    folder = summary["output_folder"]
    return (
        f"ucpflow: wrote {folder} ({summary['parameters']} parameters, {human_size(summary['bytes'])}) "
        f"in {seconds:.1f} s. To resume training from it, add \"checkpoint\": {{\"load_universal\": true}} "
        f"to the DeepSpeed config and load the checkpoint from {os.path.dirname(os.path.abspath(folder))}."
    )
