"""Reading a checkpoint's zip container: checks on the file and its records, then `load`."""

from __future__ import annotations

import os
import zipfile
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from .unpickler import UntrustedGlobalError, _Reader

if TYPE_CHECKING:
    from .guard import Finding

_LEGACY_MAGIC = b"l\xfc\x9cF\xf9 j\xa8P\x19"  # pickled magic number that starts pre-1.6 files


def _open_error(path, exc):
    if isinstance(exc, FileNotFoundError):
        return CheckpointError(f"Checkpoint file {path} does not exist.")
    if isinstance(exc, IsADirectoryError):
        return CheckpointError(f"Checkpoint file {path} is a directory, not a file.")
    return CheckpointError(f"Checkpoint file {path} cannot be read: {exc.strerror or exc}.")


def load(path: str | os.PathLike[str], findings: list[Finding] | None = None) -> Any:
    """The object pickled in checkpoint `path`, with tensors as `TensorRef` (no tensor data is read).

    Raises CheckpointError when the file is missing, not a PyTorch zip checkpoint, truncated,
    in the legacy pre-1.6 format, inconsistent with its own records or beyond the resource limits,
    and UntrustedGlobalError when it names a global outside the allowlist — unless `findings` is a
    list, which then receives them (guard.Finding) while the stand-ins are returned.
    """
    path = os.fspath(path)
    with _opened(path) as (file, zip_file, records, file_size):
        byteorder = records.get("byteorder")
        if byteorder is not None and _read_record(path, zip_file, byteorder, file_size) != b"little":
            raise CheckpointError(f"Checkpoint file {path} was saved big-endian, which ucpflow cannot read.")
        data = _read_record(path, zip_file, records["data.pkl"], file_size)
        result, found = _Reader(path, file.fileno(), records).unpickle(data)
    if found and findings is None:
        raise UntrustedGlobalError(found)
    if findings is not None:
        findings.extend(found)
    return result


def check_container(path: str | os.PathLike[str]) -> None:
    """Raise the CheckpointError `load` would for a file that is missing, not a PyTorch zip checkpoint, in the
    legacy format, truncated (its zip central directory, at the file's end, is unreadable) or without data.pkl;
    only the file's head and its zip directory are read, nothing is unpickled."""
    path = os.fspath(path)
    with _opened(path) as (_, _, records, file_size):
        for info in records.values():
            if info.header_offset + info.compress_size > file_size:
                raise CheckpointError(
                    f"Checkpoint file {path} is truncated: its record {info.filename} ends beyond the file's "
                    f"{file_size} bytes."
                )


@contextmanager
def _opened(path: str):
    """(file, zip file, {record name: ZipInfo}, file size) of checkpoint `path`, open for the block."""
    try:
        file = open(path, "rb")
    except OSError as exc:
        raise _open_error(path, exc) from None
    with file:
        zip_file, records = _open_container(path, file)
        yield file, zip_file, records, os.fstat(file.fileno()).st_size


def _open_container(path, file):
    """(zip file, {record name without the archive's folder: ZipInfo}) of an open checkpoint file."""
    head = file.read(32)
    if not head.startswith(b"PK\x03\x04"):
        if head.startswith(b"\x80") and _LEGACY_MAGIC in head:
            raise CheckpointError(
                f"Checkpoint file {path} is in PyTorch's legacy pre-1.6 format; load and re-save it "
                f"with a current torch.save to convert it to the zip format."
            )
        raise CheckpointError(f"Checkpoint file {path} is not a PyTorch checkpoint (it is not a zip archive).")
    try:
        zip_file = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise CheckpointError(
            f"Checkpoint file {path} is truncated or corrupt: its zip central directory cannot be read."
        ) from None
    infos = zip_file.infolist()
    prefix = infos[0].filename.split("/")[0] + "/" if infos and "/" in infos[0].filename else ""
    records = {info.filename[len(prefix) :]: info for info in infos if info.filename.startswith(prefix)}
    if "data.pkl" not in records:
        raise CheckpointError(f"Checkpoint file {path} has no data.pkl record, so torch.save did not write it.")
    return zip_file, records


def _read_record(path, zip_file, info, file_size):
    """A small record's bytes, refusing what no torch.save writes: compressed records (a decompression bomb
    would expand without bound) and sizes beyond the file's."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(
            f"Checkpoint file {path} is refused: its record {info.filename} is compressed, which torch.save never does."
        )
    if info.file_size > file_size:
        raise CheckpointError(
            f"Checkpoint file {path} is refused: its record {info.filename} claims {info.file_size} bytes, "
            f"more than the file's {file_size}."
        )
    try:
        return zip_file.read(info)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"Checkpoint file {path} has a damaged {info.filename} record ({exc}).") from None
