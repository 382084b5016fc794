"""The publish stage: merged parameters staging/<bucket>/<param>/ → OUT/zero/<param>/, and what a complete
parameter folder holds.

A merge job writes a whole bucket of parameter folders into its staging folder; one `publish` job per
parameter then hard-links that parameter's files into place (the staging folder stays whole until
Snakemake removes it, so an interrupted run can publish from it again). A staged copy that lost files
(a partial deletion after a killed run) is merged again by the publish job itself.
"""

import errno
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


def _replace_folder(built, target):
    """Put the folder `built` at `target` in one rename (which replaces an empty folder, such as the one
    Snakemake makes for the output), moving an older, non-empty `target` aside first."""
    try:
        os.replace(built, target)
        return
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    old = target.with_name(f".{target.name}.old.partial")
    if old.exists():
        shutil.rmtree(old)
    os.rename(target, old)
    os.rename(built, target)
    shutil.rmtree(old)


def publish_parameter(staged_bucket: Path | str, output_folder: str, name: str, expected: Collection[str],
                      merge_again: Callable[[str], object]) -> None:
    """Hard-link staged_bucket/<name>/ into OUT/zero/<name>/, or, when the staged copy is incomplete,
    call `merge_again(folder)` to write the parameter's files into `folder` first."""
    retract_latest_universal(output_folder)
    zero = Path(output_folder) / ZERO
    zero.mkdir(parents=True, exist_ok=True)
    built = zero / f".{name}.publishing"
    if built.exists():
        shutil.rmtree(built)
    source = Path(staged_bucket) / name
    if source.is_dir() and not missing_files(source, expected):
        os.mkdir(built, FOLDER_MODE)
        for file in expected:
            os.link(source / file, built / file)
    else:
        merge_again(str(built))
        lost = missing_files(built, expected)
        if lost:
            raise CheckpointError(f"Merging {name} again did not write {', '.join(lost)}.")
    _replace_folder(built, zero / name)


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
