"""The demo stage: a DeepSpeed checkpoint of the demo GPT to convert."""

from pathlib import Path

from ..errors import CheckpointError
from ..fileio import atomic_directory
from .launch import build_checkpoint


def demo_checkpoint_job(spec: dict, latest_output: str, training_log: str) -> None:
    """Train the demo GPT with DeepSpeed and save it; the folder appears complete or not at all, and the
    launcher's output goes to `training_log` (in the work folder's logs, not beside the checkpoint)."""
    options = dict(spec)
    folder, num_procs = options.pop("folder"), options.pop("num_procs")
    with atomic_directory(folder) as staging:
        tag_folder = build_checkpoint(staging, num_procs=num_procs, log_path=training_log, **options)
    print(f"demo checkpoint {Path(folder) / tag_folder.name} built with {num_procs} processes")
    if not Path(latest_output).is_file():
        raise CheckpointError(f"DeepSpeed did not write {latest_output}.")
