"""The universal checkpoint's files beside the parameter folders: copied model-states files,
zero/optimizer_state.pt entry by entry, latest_universal, and nothing else."""

import hashlib
import os
from pathlib import Path

from .. import ptfile
from ..errors import CheckpointError
from ..source.autoep import universal_model_state_digest
from ..stages.finalize import universal_optimizer_state
from ..tables import LATEST_UNIVERSAL, OPTIMIZER_STATE_FILE, STAGING, ZERO, IndexRecord
from .digest import short_text, structure_text
from .report import MISSING, UNEXPECTED, UNREADABLE, WRONG_METADATA, row, status_of


def _file_digest(path):
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(16 << 20), b""):
            digest.update(block)
    return f"{os.path.getsize(path)}:{digest.hexdigest()}"


def verify_optimizer_state(record: IndexRecord, path: Path) -> list[dict]:
    """One row per entry of optimizer_state.pt (values compared as canonical text, tensors by checksum)."""
    name = OPTIMIZER_STATE_FILE
    expected = {key: structure_text(value) for key, value in universal_optimizer_state(record).items()}
    if not path.is_file():
        return [row(name, "file", "a dict", MISSING, MISSING)]
    try:
        structure = ptfile.load(path)
    except (CheckpointError, ValueError):
        return [row(name, "file", "a dict", UNREADABLE, UNREADABLE)]
    if not isinstance(structure, dict):
        return [row(name, "file", "a dict", type(structure).__name__, WRONG_METADATA)]
    actual = {key: structure_text(value) for key, value in structure.items()}
    rows = []
    for key, text in expected.items():
        found = actual.get(key, MISSING)
        shown = found if found == MISSING else short_text(found)
        rows.append(row(name, key, short_text(text), shown, status_of(text, found)))
    rows += [row(name, key, "", "present", UNEXPECTED) for key in actual if key not in expected]
    if [k for k in actual if k in expected] != [k for k in expected if k in actual]:
        rows.append(row(name, "key order", ",".join(map(str, expected)), ",".join(map(str, actual)), WRONG_METADATA))
    return rows


def verify_files(record: IndexRecord, output_folder: str, latest_path: str | None, param_names: set[str]) -> list[dict]:
    """The universal checkpoint's other files: copied model states, optimizer_state.pt, latest_universal (when
    `latest_path` is given: a run's older saves are not the one it names), and nothing else beside them."""
    output_folder = Path(output_folder)
    rows = []
    copies = {Path(path).name: path for path in record.layout.copy_files}
    for name, source in copies.items():
        target = output_folder / name
        actual = _file_digest(target) if target.is_file() else MISSING
        expected = universal_model_state_digest(source, _file_digest)  # AutoEP rewrites it
        rows.append(row(name, "copy", expected, actual, status_of(expected, actual)))
    rows += verify_optimizer_state(record, output_folder / ZERO / OPTIMIZER_STATE_FILE)
    if latest_path:
        tag = output_folder.name
        actual = Path(latest_path).read_text() if Path(latest_path).is_file() else MISSING
        rows.append(row(LATEST_UNIVERSAL, "tag", tag, actual, status_of(tag, actual)))
    for entry in sorted(output_folder.iterdir()) if output_folder.is_dir() else []:
        if entry.name not in copies and entry.name not in (ZERO, STAGING):
            rows.append(row(entry.name, "file", "", "present", UNEXPECTED))
    zero = output_folder / ZERO
    for entry in sorted(zero.iterdir()) if zero.is_dir() else []:
        if entry.name not in param_names and entry.name != OPTIMIZER_STATE_FILE:
            rows.append(row(entry.name, "folder" if entry.is_dir() else "file", "", "present", UNEXPECTED))
    return rows
