"""FragmentReader: zero-copy views of the rank files agree with positioned reads, and fail clearly."""

import mmap

import numpy as np
import pytest

from ucpflow.errors import CheckpointError
from ucpflow.stages.extract import FragmentReader

HEADER = 64


@pytest.fixture
def rank_file(tmp_path):
    values = np.arange(1000, dtype=np.float32)
    path = tmp_path / "rank.bin"
    path.write_bytes(b"\0" * HEADER + values.tobytes())
    maps = {str(path): {"flat": ("float32", HEADER, values.size, None)}}
    return str(path), maps, values


def test_view_equals_read_and_survives_release(rank_file):
    path, maps, values = rank_file
    reader = FragmentReader(maps)
    view, dtype = reader.view(path, "flat", 10, 300)
    read, _ = reader.read(path, "flat", 10, 300)
    assert dtype == "float32" and not view.flags.writeable
    np.testing.assert_array_equal(view, values[10:310])
    np.testing.assert_array_equal(read, values[10:310])
    reader.release()  # the pages leave the process, the data stays readable
    np.testing.assert_array_equal(view, values[10:310])
    del view
    reader.close()


def test_view_without_mmap_reads(rank_file, monkeypatch):
    path, maps, values = rank_file

    def no_mmap(*args, **kwargs):
        raise OSError("mmap not supported on this file system")

    monkeypatch.setattr(mmap, "mmap", no_mmap)
    reader = FragmentReader(maps)
    view, _ = reader.view(path, "flat", 0, values.size)
    assert view.flags.writeable
    np.testing.assert_array_equal(view, values)
    reader.close()


def test_view_of_a_file_cut_short(rank_file):
    path, maps, values = rank_file
    with open(path, "r+b") as handle:
        handle.truncate(HEADER + 400 * 4)
    reader = FragmentReader(maps)
    with pytest.raises(CheckpointError, match="truncated"):
        reader.view(path, "flat", 0, values.size)
    with pytest.raises(CheckpointError, match="past the end"):
        reader.view(path, "flat", 900, 200)
    reader.close()
