"""Byte ranges of other files appended to an output: by the kernel where it can, through the process where it
cannot, refusing a source that ends early; and a safetensors file written from such ranges and arrays."""

import errno
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from ucpflow.errors import CheckpointError
from ucpflow.export.safetensors_out import write_safetensors
from ucpflow.fileio import FileRange, append_file_ranges


@pytest.fixture
def sources(tmp_path):
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    first.write_bytes(bytes(range(256)) * 64)
    second.write_bytes(os.urandom(3 * 2**20))
    return first, second


def appended(tmp_path, ranges):
    output = tmp_path / "out.bin"
    with open(output, "wb") as handle:
        handle.write(b"head")
        handle.flush()
        append_file_ranges(handle.fileno(), ranges)
        handle.write(b"tail")
    return output.read_bytes()


def expected(ranges):
    return b"head" + b"".join(open(path, "rb").read()[offset:offset + n] for path, offset, n in ranges) + b"tail"


def test_ranges_in_order_at_the_current_position(tmp_path, sources):
    first, second = sources
    ranges = [FileRange(str(second), 1000, 2 * 2**20 + 3), FileRange(str(first), 7, 100), FileRange(str(first), 0, 0)]
    assert appended(tmp_path, ranges) == expected(ranges)


@pytest.mark.parametrize("refusal", ["raises", "copies_nothing"])
def test_a_file_system_without_kernel_copy_gets_the_bytes_through_the_process(tmp_path, sources, monkeypatch, refusal):
    first, second = sources
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        if refusal == "raises":
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return 0

    monkeypatch.setattr(os, "copy_file_range", refuse)
    ranges = [FileRange(str(second), 5, 2**20 * 2 + 11), FileRange(str(first), 300, 4000)]
    assert appended(tmp_path, ranges) == expected(ranges)
    assert len(calls) == 1  # asked once, then no more


def test_a_source_that_ends_before_its_range_is_refused(tmp_path, sources):
    first, _ = sources
    with pytest.raises(CheckpointError, match="first.bin ends at byte 16384, before byte 17000: the file is truncated"):
        appended(tmp_path, [FileRange(str(first), 16000, 1000)])


def test_safetensors_from_ranges_and_arrays(tmp_path):
    weights = np.arange(12, dtype="<f4").reshape(3, 4)
    rank_file = tmp_path / "rank.bin"
    rank_file.write_bytes(b"x" * 100 + weights[:1].tobytes() + b"y" * 8 + weights[1:].tobytes())
    ranges = [FileRange(str(rank_file), 100, 16), FileRange(str(rank_file), 124, 32)]
    bias = np.array([1.5, -2.0], dtype=np.float32)
    sources = {"w": ranges, "b": bias}
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"w": ("float32", [3, 4]), "b": ("float16", [2])}, sources.__getitem__)
    loaded = load_file(path)
    np.testing.assert_array_equal(loaded["w"], weights)
    assert loaded["b"].dtype == np.float16 and loaded["b"].tolist() == [1.5, -2.0]
    with pytest.raises(ValueError, match="w: 32 bytes, not the 48 of float32"):
        write_safetensors(tmp_path / "short.safetensors", {"w": ("float32", [3, 4])}, lambda name: ranges[1:])
    assert not list(tmp_path.glob(".*partial*"))
