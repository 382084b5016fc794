"""The merge and publish stages: merging a bucket's parameters into staging, and publishing one parameter
folder into OUT/zero/ (merged again when its staging is gone)."""

import os
import shutil
from pathlib import Path

from ..errors import CheckpointError
from ..fileio import atomic_directory
from ..markers import retract_latest_universal
from .common import load_layout, load_universal_info, read_fragments, read_table


class BucketMerger:
    """What the merges of one bucket (or of the parameters `names`) read: their index rows, fragments and the
    extraction maps."""

    def __init__(self, bucket, layout_path, fragments_path, params_path, info_path, map_paths, names=None):
        from ..extract import read_extraction
        from ..merge import FragmentReader

        self.layout = load_layout(layout_path)
        self.info = load_universal_info(info_path)
        chosen = (lambda row: row["bucket"] == bucket) if names is None else (lambda row: row["param"] in names)
        self.rows = [row for row in read_table(params_path) if chosen(row)]
        names = {row["param"] for row in self.rows}
        self.fragments = {}
        for fragment in read_fragments(fragments_path):
            if fragment.param in names:
                self.fragments.setdefault(fragment.param, []).append(fragment)
        maps = {self.layout["sources"][source_name_of(p)]["path"]: read_extraction(p) for p in map_paths}
        self.reader = FragmentReader(maps)

    def _rule(self, row):
        from ..patterns import classify

        return classify(self.info, row["param"]) if row["merge"] else None

    def merge(self, row, folder):
        from ..merge import merge_parameter

        merge_parameter(
            self.reader, row, self.fragments.get(row["param"], []), self._rule(row), self.info,
            self.layout["tp_degree"], folder
        )

    def _row(self, name):
        rows = [row for row in self.rows if row["param"] == name]
        if not rows:
            raise CheckpointError(f"{name} is not a parameter of its merge job's index rows.")
        return rows[0]

    def merge_one(self, name, folder):
        self.merge(self._row(name), folder)

    def weight(self, name):
        """(array, dtype) of one parameter's fp32 weight as its universal fp32.pt holds it, without writing it;
        the array may view a rank file until `release()`."""
        from ..merge import merged_weight

        row = self._row(name)
        return merged_weight(
            self.reader, row, self.fragments.get(name, []), self._rule(row), self.info, self.layout["tp_degree"]
        )

    def release(self):
        self.reader.release()

    def close(self):
        self.reader.close()


def merge_job(bucket, layout_path, fragments_path, params_path, info_path, map_paths, staging, output_folder):
    """Merge one bucket's parameters into the folder `staging`/<param>/, which appears only once all are merged."""
    retract_latest_universal(output_folder)
    remove_partial_folders(staging)
    merger = BucketMerger(bucket, layout_path, fragments_path, params_path, info_path, map_paths)
    try:
        with atomic_directory(staging) as folder:
            for row in merger.rows:
                merger.merge(row, os.path.join(folder, row["param"]))
    finally:
        merger.close()
    return merger.rows


def publish_job(name, staged_bucket, output_folder, files, merge_inputs):
    """Put one parameter's folder (holding `files`) into OUT/zero/, from its bucket's staging (or merged again)."""
    from ..publish import publish_parameter

    def merge_again(folder):
        merger = BucketMerger(*merge_inputs)
        try:
            merger.merge_one(name, folder)
        finally:
            merger.close()

    publish_parameter(staged_bucket, output_folder, name, files, merge_again)


def remove_partial_folders(final):
    """Leftovers of an interrupted atomic_directory(final): `.<name>.*.partial` beside it."""
    final = Path(final)
    for leftover in final.parent.glob(f".{final.name}.*.partial"):
        shutil.rmtree(leftover, ignore_errors=True)


def source_name_of(map_path):
    return Path(map_path).name[: -len(".tsv")]
