"""Completion markers: `latest_universal` and the exports' last files say "this folder is complete".

A marker is the last word: every job that changes an output folder retracts its marker first, and the
marker is written (durably: file and folder fsynced) only by the job that checked the folder complete.
So a run that fails or is killed part-way leaves no marker behind, whatever it had changed.
"""

from __future__ import annotations

import os
from collections.abc import Container
from pathlib import Path

from .fileio import fsync_path, write_text
from .tables import LATEST_UNIVERSAL


def universal_folder_of(tag_folder: str) -> str:
    """Where ds_to_universal users put the universal checkpoint of `tag_folder`: beside it, `<tag>_universal`."""
    return f"{os.path.normpath(tag_folder)}_universal"


def folder_beside(output_folder: str, name: str) -> str:
    """A default output folder: `name` in the universal output's parent (hf, megatron, reshard)."""
    return os.path.join(os.path.dirname(os.path.normpath(output_folder)), name)


def save_folders(universal_root: str, hf_root: str, megatron_root: str, reshard_root: str, tag: str) -> dict[str, str]:
    """{target: folder} of one save of a run converted with `tags`: `<tag>_universal` in the universal root (as
    ds_to_universal users lay saves out), `<tag>` in each export's and the reshard's root."""
    return dict(
        universal=os.path.join(universal_root, f"{tag}_universal"),
        hf=os.path.join(hf_root, tag),
        megatron=os.path.join(megatron_root, tag),
        reshard=os.path.join(reshard_root, tag),
    )


def latest_universal_path(output_folder: str) -> str:
    return os.path.join(os.path.dirname(os.path.normpath(output_folder)), LATEST_UNIVERSAL)


def retract(marker: Path | str, names: Container[str] | None = None) -> None:
    """Remove `marker` before its folder changes; with `names`, only while it names one of them (the
    parent's `latest_universal` may name another conversion beside this one, which stays complete)."""
    marker = Path(marker)
    try:
        if names is not None and marker.read_text().strip() not in names:
            return
        marker.unlink()
    except FileNotFoundError:
        return
    fsync_path(marker.parent)


def retract_latest_universal(output_folder: str) -> None:
    retract(latest_universal_path(output_folder), names={Path(os.path.normpath(output_folder)).name})


def write_marker(marker: Path | str, text: str) -> None:
    write_text(marker, text, durable=True)
