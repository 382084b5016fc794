"""Atomic file writing: every output appears under its final name only once it is complete."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, NamedTuple

from .errors import CheckpointError

# The temp names of _temp_path (mkstemp: 8 random characters) and of ptfile.save (pid and 8 hex digits).
_TEMP_NAME_TAIL = re.compile(r"[a-z0-9_]{8}\.partial.*|\d+\.[0-9a-f]{8}\.tmp")


def remove_leftovers(final: Path | str) -> None:
    """Remove the temp files that earlier writers of `final` left when they were killed (SIGKILL, node
    failure) before renaming: only one job at a time writes a given output, so no live writer owns them."""
    final = Path(final)
    prefix = f".{final.name}."
    if not final.parent.is_dir():
        return
    for entry in os.scandir(final.parent):
        if entry.name.startswith(prefix) and _TEMP_NAME_TAIL.fullmatch(entry.name[len(prefix) :]):
            Path(entry.path).unlink(missing_ok=True)


def _current_umask():
    """The process's umask, read without changing it where Linux tells it (os.umask would, for a moment)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _current_umask()
FILE_MODE = 0o666 & ~UMASK
FOLDER_MODE = 0o777 & ~UMASK


def _temp_path(final, suffix=""):
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final)
    handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".partial{suffix}", dir=final.parent)
    # mkstemp makes the file private (0600); outputs get the permissions of any file the user creates.
    os.fchmod(handle, FILE_MODE)
    os.close(handle)
    return Path(name)


def fsync_path(path: Path | str) -> None:
    """Flush a file's or folder's entry to disk (a folder: so that renames inside it survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _put_in_place(temp: Path, final: Path | str) -> None:
    """Every output's last step: the permissions of any file the user creates (whatever mode the writer
    gave the temp file: mkstemp's 0600, a copied file's, a library's own temp file), then one rename."""
    os.chmod(temp, FILE_MODE)
    os.replace(temp, final)


@contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """A temp path beside `final` for a writer that takes a path (and may create the file anew, with any
    mode); on success it is renamed into place with the user's permissions, on error removed."""
    temp = _temp_path(final)
    # The writer creates the file anew: ext4 writes out, when it is closed, a file that was truncated to
    # empty (its guard for rewrite-in-place), which would cost the job a disk write of the whole output.
    # The name stays unique (mkstemp's), and only one job writes a given output.
    temp.unlink()
    try:
        yield temp
        _put_in_place(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_writer(final: Path | str, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temp file beside `final`; on success rename it into place, on error remove it."""
    temp = _temp_path(final)
    try:
        # "r+", not "w": the temp file is new and empty, and truncating it would make ext4 write it out on
        # close (see atomic_path).
        with open(temp, mode.replace("w", "r+"), **({} if "b" in mode else {"newline": ""})) as handle:
            yield handle
        _put_in_place(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_text(final: Path | str, text: str, durable: bool = False) -> None:
    """Write `text` to `final` atomically; `durable` also fsyncs the file and then its folder."""
    with atomic_writer(final) as handle:
        handle.write(text)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    if durable:
        fsync_path(Path(final).parent)


@contextmanager
def atomic_directory(final: Path | str) -> Iterator[Path]:
    """Build a directory under a temp name beside `final`; rename it into place when complete."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    os.chmod(temp, FOLDER_MODE)
    try:
        yield temp
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


class FileRange(NamedTuple):
    """`nbytes` bytes of the file `path` from byte `offset`."""

    path: str
    offset: int
    nbytes: int


# copy_file_range(2) is refused between some file systems and by some (EXDEV, EOPNOTSUPP, ...): then the bytes
# go through this process instead.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.ETXTBSY, errno.EPERM}
_CHUNK_BYTES = 16 * 2**20


def append_file_ranges(output_fd: int, ranges: Sequence[FileRange]) -> None:
    """Append the bytes of `ranges`, in order, at the current position of `output_fd`.

    The kernel copies them (copy_file_range: from the page cache to the page cache, without passing through
    this process, so no memory is held); where it cannot, they are read and written in 16 MiB chunks.
    A file that ends before its range does is a CheckpointError.
    """
    kernel_copy = hasattr(os, "copy_file_range")
    for path, offset, nbytes in ranges:
        source = os.open(path, os.O_RDONLY)
        try:
            end = offset + nbytes
            while offset < end:
                count = 0
                if kernel_copy:
                    try:
                        count = os.copy_file_range(source, output_fd, end - offset, offset)
                    except OSError as error:
                        if error.errno not in _NO_KERNEL_COPY:
                            raise
                        kernel_copy = False
                    # Some file systems answer 0 for "not here" rather than at the end of the file.
                    if count == 0 and os.fstat(source).st_size > offset:
                        kernel_copy = False
                if not kernel_copy:
                    chunk = os.pread(source, min(end - offset, _CHUNK_BYTES), offset)
                    count = len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(output_fd, view):]
                if count == 0:
                    raise CheckpointError(f"{path} ends at byte {offset}, before byte {end}: the file is truncated.")
                offset += count
        finally:
            os.close(source)


def remove_partial_folders(final: Path | str) -> None:
    """Leftovers of an interrupted atomic_directory(final): `.<name>.*.partial` beside it."""
    final = Path(final)
    for leftover in final.parent.glob(f".{final.name}.*.partial"):
        shutil.rmtree(leftover, ignore_errors=True)


def copy_file(source: Path | str, final: Path | str) -> None:
    """Copy with its times (as shutil.copy2 does) through a temp name; the copy gets the user's permissions,
    not the source's."""
    with atomic_path(final) as temp:
        shutil.copy2(source, temp)
