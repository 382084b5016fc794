"""The transformers model config of a DeepSpeed checkpoint, as the HF Trainer and Accelerate save it:
`checkpoint-N/config.json` beside the tag folder `checkpoint-N/global_stepN` (or in a folder above it),
or the folder (or config.json) that config key `hf_config` names."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UcpflowError

CONFIG_FILE = "config.json"
SEARCH_LEVELS = 3  # the tag folder, its parent (HF Trainer's checkpoint-N) and the run's output folder


def _is_model_config(path):
    try:
        return "model_type" in json.loads(Path(path).read_text())
    except (OSError, ValueError, TypeError):
        return False


def find_model_config(tag_folder: Path | str, explicit: Path | str | None = None) -> Path | None:
    """The folder holding the transformers config.json of the checkpoint in `tag_folder`, or None.

    `explicit` (config key hf_config: a folder or its config.json) wins and must hold a model config.
    """
    if explicit:
        path = Path(explicit)
        folder = path.parent if path.name == CONFIG_FILE and path.is_file() else path
        if not _is_model_config(folder / CONFIG_FILE):
            raise UcpflowError(f"Config key `hf_config`: {folder / CONFIG_FILE} is not a transformers model config "
                               "(a JSON file with `model_type`).")
        return folder.resolve()
    folder = Path(tag_folder).resolve()
    for _ in range(SEARCH_LEVELS):
        if _is_model_config(folder / CONFIG_FILE):
            return folder
        folder = folder.parent
    return None


def export_config_folder(tag_folder: Path | str, explicit: Path | str | None, megatron_model: bool) -> Path | None:
    """The folder of the transformers config.json that `snakemake hf` exports with, or None for a Megatron GPT
    model (its model states hold Megatron's `args`), whose export reads the universal output."""
    if explicit:
        return find_model_config(tag_folder, explicit)
    if megatron_model:
        return None
    return find_model_config(tag_folder)
