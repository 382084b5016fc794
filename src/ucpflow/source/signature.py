"""The identity of a checkpoint's input files, cheap enough to compute every time the workflow starts.

Every file under the tag folder contributes its relative name, size and modification time and, for
PyTorch (zip) files, the CRC-32 of every entry as the zip's central directory records it (read from the
end of the file; no tensor data is read). The index and everything derived from it live in a work folder
named by this signature, so any change to the input (a rewritten, added or removed file, a `latest`
naming another tag) re-derives the whole conversion instead of mixing old and new tables.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .layout import resolve_tag_folder

SIGNATURE_LENGTH = 12


def _tag_folder(input_folder):
    """(folder whose files are converted, its tag) as the index finds them; a folder it rejects still gets a
    signature of its own files, and the index says what is wrong."""
    try:
        folder = resolve_tag_folder(input_folder)
    except CheckpointError:
        return Path(input_folder), ""
    return folder, "" if folder == Path(input_folder) else folder.name


def _zip_entries(path):
    try:
        with zipfile.ZipFile(path) as archive:
            return ",".join(f"{info.filename}:{info.CRC:08x}" for info in archive.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return "not-a-zip"


def input_signature(input_folder: Path | str, *settings: object) -> str:
    """Hex digest of the input files' identities and of `settings` (index options that change its tables)."""
    digest = hashlib.sha1()
    folder, tag = _tag_folder(input_folder)
    digest.update(f"tag={tag}\0".encode())
    for value in settings:
        digest.update(f"{value!r}\0".encode())
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            try:
                stat = os.stat(path)
            except OSError:
                continue
            line = f"{os.path.relpath(path, folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\0"
            if name.endswith(".pt"):
                line += _zip_entries(path)
            digest.update(line.encode() + b"\n")
    return digest.hexdigest()[:SIGNATURE_LENGTH]


def is_signature(name: str) -> bool:
    return len(name) == SIGNATURE_LENGTH and all(c in "0123456789abcdef" for c in name)


def derived_folder(work_folder: Path | str) -> Path:
    """The folder of `work_folder` that holds the index and maps of the input last indexed there."""
    folders = [entry for entry in Path(work_folder).iterdir() if entry.is_dir() and is_signature(entry.name)]
    if len(folders) != 1:
        raise FileNotFoundError(f"{work_folder} holds {len(folders)} indexed inputs, not one.")
    return folders[0]


# The version of what the index writes: a ucpflow that writes other tables (or reads them otherwise)
# gets a new signature, so a work folder of an earlier version is indexed again instead of misread.
INDEX_FORMAT = 3
# Config keys that change what the index writes: a new value indexes the input again.
INDEX_KEYS = ("strict", "inject_missing_state", "hf_config", "allow_globals", "merge_job_bytes", "merge_min_jobs")


def workflow_signature(config: Mapping[str, Any], input_folder: Path | str, builds_demo: bool, *extra: object) -> str:
    """The signature of the workflow's input as configured (the demo's identity is its build settings); `extra`
    joins it (a run's save adds its path)."""
    settings = [INDEX_FORMAT, *(config[key] for key in INDEX_KEYS), *extra]
    if builds_demo:
        return input_signature(os.devnull, *settings, json.dumps(config["demo"], sort_keys=True))
    return input_signature(input_folder, *settings)
