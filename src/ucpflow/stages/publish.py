"""The publish stage: merged parameters staging/<bucket>/<param>/ → OUT/zero/<param>/, and what a complete
parameter folder holds.

A merge job writes a whole bucket of parameter folders into its staging folder; one `publish` job per
parameter then hard-links that parameter's files into place (the staging folder stays whole until
Snakemake removes it, so an interrupted run can publish from it again). A staged copy that lost files
(a partial deletion after a killed run) is merged again by the publish job itself.
"""

import os
import shutil
from collections.abc import Callable, Collection
from pathlib import Path

from ..errors import CheckpointError
from ..fileio import FOLDER_MODE
from ..markers import retract_latest_universal
from ..tables import FP32_FILE, ZERO, IndexFiles, read_parameters
from .merge import BucketMerger


def parameter_files(params_path: str) -> dict[str, list[str]]:
    """{parameter: sorted file names of its universal folder} from the index's parameter table."""
    return {row.param: row.files for row in read_parameters(params_path)}


def missing_files(folder: Path | str, expected: Collection[str]) -> list[str]:
    try:
        present = set(os.listdir(folder))
    except FileNotFoundError:
        return list(expected)
    return [name for name in expected if name not in present]


def incomplete_parameter_stamp(folder: Path | str, expected: Collection[str]) -> str:
    """A name for a published folder that lost one of its files (else ""): the time of its fp32.pt, so
    each loss asks for a fresh rerun. A missing folder or fp32.pt is Snakemake's own business."""
    try:
        stamp = os.stat(os.path.join(folder, FP32_FILE)).st_mtime_ns
    except FileNotFoundError:
        return ""
    return str(stamp) if missing_files(folder, expected) else ""


def _link_into(source: Path, target: Path, expected: Collection[str]) -> None:
    """Put source/<file> at target/<file> for each expected file, each by one rename of a hard link, fp32.pt
    last (so its presence says the others are there), and remove files not expected.

    The folder itself is kept: Snakemake made it for the output, and replacing it with a built one frees its
    block (a synchronous discard on some file systems, up to seconds on this one, under the lock of zero/)."""
    target.mkdir(FOLDER_MODE, exist_ok=True)
    for stale in set(os.listdir(target)) - set(expected):
        stale_path = target / stale
        shutil.rmtree(stale_path) if stale_path.is_dir() and not stale_path.is_symlink() else stale_path.unlink()
    for file in sorted(expected, key=lambda name: name == FP32_FILE):
        temp = target / f".{file}.publishing"  # a killed job's is gone: not expected, so removed above
        os.link(source / file, temp)
        os.replace(temp, target / file)
        # rename(2) does nothing when both names are already links of one file (published before).
        temp.unlink(missing_ok=True)


def publish_parameter(staged_bucket: Path | str, output_folder: str, name: str, expected: Collection[str],
                      merge_again: Callable[[str], object]) -> None:
    """Hard-link staged_bucket/<name>/<file> into OUT/zero/<name>/, or, when the staged copy is incomplete,
    call `merge_again(folder)` to write the parameter's files into a new folder first."""
    retract_latest_universal(output_folder)
    zero = Path(output_folder) / ZERO
    zero.mkdir(parents=True, exist_ok=True)
    source = Path(staged_bucket) / name
    if source.is_dir() and not missing_files(source, expected):
        _link_into(source, zero / name, expected)
        return
    built = zero / f".{name}.publishing"
    if built.exists():
        shutil.rmtree(built)
    merge_again(str(built))
    lost = missing_files(built, expected)
    if lost:
        raise CheckpointError(f"Merging {name} again did not write {', '.join(lost)}.")
    _link_into(built, zero / name, expected)
    shutil.rmtree(built)


def publish_job(name: str, staged_bucket: str, output_folder: str, files: list[str], bucket: str,
                index: IndexFiles, map_paths: list[str]) -> None:
    """Put one parameter's folder (holding `files`) into OUT/zero/, from its bucket's staging (or merged again
    from `bucket`'s index rows and extraction maps)."""

    def merge_again(folder):
        merger = BucketMerger(bucket, index, map_paths)
        try:
            merger.merge_one(name, folder)
        finally:
            merger.close()

    publish_parameter(staged_bucket, output_folder, name, files, merge_again)
