"""The HF Trainer's files beside the DeepSpeed tag folder (config, tokenizer, generation config,
trainer_state.json, scheduler.pt, rng states, ...), carried into the reshard folder so that
`Trainer.train(resume_from_checkpoint=<reshard_folder>)` resumes.

A pickle among them (.pt, .pth, .bin in torch's zip format) is carried only when every global it names is
on ucpflow's allowlist: it is read with ucpflow's loader first, and a file naming any other global (the
Trainer's `training_args.bin` names `transformers.TrainingArguments`) is left behind, with the reason.
"""

import os

from .. import dsconst as C
from ..errors import CheckpointError
from ..fileio import copy_file
from ..ptfile import load

# What DeepSpeed itself writes beside the tag folders: written anew by the reshard, never carried.
NOT_CARRIED = {C.LATEST_FILE, "zero_to_fp32.py", "zero_to_torch.py"}
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
ZIP_MAGIC = b"PK\x03\x04"


def _pickle_refusal(path: str):
    """None when `path` may be carried, else why not (a phrase)."""
    with open(path, "rb") as handle:
        if handle.read(4) != ZIP_MAGIC:
            return "it is not in torch's zip format, so ucpflow cannot check the globals it names"
    findings = []
    try:
        load(path, findings=findings)
    except CheckpointError as error:
        return str(error).rstrip(".")
    if findings:
        return "it names " + ", ".join(sorted({f"`{finding.name}`" for finding in findings})) + \
            ", outside ucpflow's allowlist"
    return None


def carried_files(side_folder: str | None, tag_folder: str, reshard_folder: str) -> dict:
    """{"copy": [file names], "left": {file name: reason}} for the files beside the tag folder; none when the
    checkpoint is not in the HF Trainer's layout (no transformers config beside or above the tag folder)."""
    result = {"folder": side_folder, "copy": [], "left": {}}
    if not side_folder or os.path.normpath(side_folder) != os.path.dirname(os.path.normpath(tag_folder)):
        return result
    for entry in sorted(os.scandir(side_folder), key=lambda e: e.name):
        if not entry.is_file() or entry.name in NOT_CARRIED or entry.name.startswith("."):
            continue
        reason = _pickle_refusal(entry.path) if entry.name.endswith(PICKLE_SUFFIXES) else None
        if reason:
            result["left"][entry.name] = reason
        else:
            result["copy"].append(entry.name)
    return result


def copy_side_files(carry: dict, reshard_folder: str) -> None:
    """Copy the carried files into the reshard folder, each atomically."""
    for name in carry["copy"]:
        copy_file(os.path.join(carry["folder"], name), os.path.join(reshard_folder, name))
