"""The publish step on plain folders: hard links into the folder Snakemake made, fp32.pt last, stale files
removed, a republish of the same staging leaving nothing behind, a lost staged copy merged again."""

import os
from pathlib import Path

import pytest

from ucpflow.errors import CheckpointError
from ucpflow.stages.publish import publish_parameter

FILES = ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt", "step.pt"]


def staged(tmp_path: Path, name: str = "w") -> Path:
    bucket = tmp_path / "staging" / "b0000"
    (bucket / name).mkdir(parents=True)
    for file in FILES:
        (bucket / name / file).write_bytes(file.encode())
    return bucket


def never(folder):
    raise AssertionError("merged again although the staged copy is whole")


def test_links_into_the_folder_snakemake_made_keeping_it(tmp_path):
    bucket = staged(tmp_path)
    target = tmp_path / "out" / "zero" / "w"
    target.mkdir(parents=True)
    folder_inode = target.stat().st_ino
    publish_parameter(bucket, str(tmp_path / "out"), "w", FILES, never)
    assert target.stat().st_ino == folder_inode
    assert sorted(os.listdir(target)) == FILES
    for file in FILES:
        assert os.path.samefile(target / file, bucket / "w" / file)


def test_fp32_is_linked_last(tmp_path, monkeypatch):
    bucket = staged(tmp_path)
    order = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (order.append(Path(dst).name), real_replace(src, dst)))
    publish_parameter(bucket, str(tmp_path / "out"), "w", FILES, never)
    assert order[-1] == "fp32.pt" and sorted(order) == FILES


def test_republish_replaces_old_files_removes_stale_ones_and_leaves_no_temp(tmp_path):
    bucket = staged(tmp_path)
    target = tmp_path / "out" / "zero" / "w"
    target.mkdir(parents=True)
    (target / "exp_avg.pt").write_bytes(b"from an earlier input")
    (target / "extra.pt").write_bytes(b"not in the index")
    (target / ".fp32.pt.publishing").write_bytes(b"left by a killed job")
    publish_parameter(bucket, str(tmp_path / "out"), "w", FILES, never)
    publish_parameter(bucket, str(tmp_path / "out"), "w", FILES, never)  # the same links again
    assert sorted(os.listdir(target)) == FILES
    assert (target / "exp_avg.pt").read_bytes() == b"exp_avg.pt"


def test_incomplete_staging_is_merged_again(tmp_path):
    bucket = staged(tmp_path)
    (bucket / "w" / "exp_avg_sq.pt").unlink()

    def merge_again(folder):
        os.makedirs(folder)
        for file in FILES:
            Path(folder, file).write_bytes(b"again " + file.encode())

    publish_parameter(bucket, str(tmp_path / "out"), "w", FILES, merge_again)
    zero = tmp_path / "out" / "zero"
    assert sorted(os.listdir(zero)) == ["w"]
    assert (zero / "w" / "exp_avg_sq.pt").read_bytes() == b"again exp_avg_sq.pt"


def test_a_merge_again_that_writes_too_little_is_one_error(tmp_path):
    def merge_again(folder):
        os.makedirs(folder)
        Path(folder, "fp32.pt").write_bytes(b"x")

    with pytest.raises(CheckpointError, match="did not write exp_avg.pt"):
        publish_parameter(tmp_path / "nothing", str(tmp_path / "out"), "w", FILES, merge_again)
    assert not (tmp_path / "out" / "zero" / "w").exists()
