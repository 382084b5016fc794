"""Writing a checkpoint: the zip layout of `torch.save` (records aligned to 64 bytes, CRC-32 checked,
zip64 when needed) and `save`, which writes a pickled object and its storages atomically."""

import hashlib
import os
import secrets
import struct

try:  # ISA-L's CRC32 is an order of magnitude faster than zlib's, with the same results
    from isal.isal_zlib import crc32
except ImportError:
    from zlib import crc32

from .pickler import _pickle_checkpoint

_ALIGNMENT = 64  # torch's default storage_alignment; every record's data starts on it
_U32_MAX = 0xFFFFFFFF

_FLAGS = 0x0808  # sizes and CRC follow the data (bit 3), names are UTF-8 (bit 11)
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")


def _zip64_extra(size, header_offset):
    """The zip64 extra field miniz adds when a size or an offset needs 64 bits, else b""."""
    fields = struct.pack("<QQ", size, size) if size >= _U32_MAX else b""
    fields += struct.pack("<Q", header_offset) if header_offset >= _U32_MAX else b""
    return struct.pack("<HH", 1, len(fields)) + fields if fields else b""


class _ZipWriter:
    """Writes records the way torch's PyTorchStreamWriter (miniz) does, so torch reads them back,
    including with mmap=True and with the storage offsets it computes without reading headers."""

    def __init__(self, file, archive_name):
        self.file = file
        self.prefix = archive_name + "/"
        self.offset = 0
        self.entries = []  # (name bytes, crc, size, local header offset)

    def write(self, data):
        self.file.write(data)
        self.offset += len(data)

    def add(self, name, size, chunks):
        full_name = (self.prefix + name).encode("utf-8")
        header_offset = self.offset
        zip64 = _zip64_extra(size, header_offset)
        # An extra field "FB" of 'Z' bytes pads the header so that the data starts aligned.
        data_start = header_offset + _LOCAL_HEADER.size + len(full_name) + len(zip64) + 4
        padding = -data_start % _ALIGNMENT
        extra = zip64 + b"FB" + struct.pack("<H", padding) + b"Z" * padding
        # Like miniz: version, method, time, date, CRC and sizes 0; the data descriptor has them.
        self.write(_LOCAL_HEADER.pack(0x04034B50, 0, _FLAGS, 0, 0, 0, 0, 0, 0, len(full_name), len(extra)))
        self.write(full_name + extra)
        crc, written = 0, 0
        for chunk in chunks:
            crc = crc32(chunk, crc)
            written += len(chunk)
            self.write(chunk)
        if written != size:
            raise RuntimeError(f"record {name} got {written} bytes instead of {size}")
        descriptor = "<IIQQ" if zip64 else "<IIII"
        self.write(struct.pack(descriptor, 0x08074B50, crc, size, size))
        self.entries.append((full_name, crc, size, header_offset))

    def finish(self):
        directory_offset = self.offset
        for full_name, crc, size, header_offset in self.entries:
            extra = _zip64_extra(size, header_offset)
            size32, offset32 = min(size, _U32_MAX), min(header_offset, _U32_MAX)
            self.write(
                _CENTRAL_HEADER.pack(
                    0x02014B50,
                    0,
                    0,
                    _FLAGS,
                    0,
                    0,
                    0,
                    crc,
                    size32,
                    size32,
                    len(full_name),
                    len(extra),
                    0,
                    0,
                    0,
                    0,
                    offset32,
                )
            )
            self.write(full_name + extra)
        size, count, zip64_end_offset = self.offset - directory_offset, len(self.entries), self.offset
        # miniz always ends with the zip64 end record and its locator, then the classic end record.
        self.write(
            struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x002D, 0, 0, count, count, size, directory_offset)
        )
        self.write(struct.pack("<IIQI", 0x07064B50, 0, zip64_end_offset, 1))
        count16, size32, offset32 = min(count, 0xFFFF), min(size, _U32_MAX), min(directory_offset, _U32_MAX)
        self.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count16, count16, size32, offset32, 0))

    def serialization_id(self):
        """40 digits identifying the contents, like torch's (a hash of the record names, one of the CRCs)."""
        names = hashlib.blake2b(b"\0".join(entry[0] for entry in self.entries), digest_size=8).digest()
        crcs = hashlib.blake2b(b"".join(struct.pack("<I", entry[1]) for entry in self.entries), digest_size=8).digest()
        return f"{int.from_bytes(names, 'little'):020d}{int.from_bytes(crcs, 'little'):020d}"


def _archive_name(path):
    """torch's archive folder name: the file name without its last extension."""
    name = os.path.basename(path)
    stem = name.rpartition(".")[0] if "." in name else name
    return stem or "archive"


def save(obj: object, path: str | os.PathLike[str], atomic: bool = True) -> None:
    """Write `obj` to `path` as a torch.save checkpoint that `torch.load` reads back equal.

    `obj` may hold plain Python containers and scalars, `Size`, `DType`, `Device`, `Opaque`,
    `TensorRef` (bytes copied from its file in chunks), `ArrayTensor` and numpy arrays. Every
    tensor gets its own contiguous storage holding exactly its elements. The file appears
    atomically: it is written under a temporary name in the same directory and renamed — unless
    `atomic` is False, for files inside a folder that itself appears atomically.
    """
    path = os.fspath(path)
    data_pkl, storages = _pickle_checkpoint(obj)
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp") if atomic else path
    try:
        with open(temporary, "xb" if atomic else "wb") as file:
            writer = _ZipWriter(file, _archive_name(path))
            writer.add("data.pkl", len(data_pkl), [data_pkl])
            writer.add(".format_version", 1, [b"1"])
            writer.add(".storage_alignment", len(str(_ALIGNMENT)), [str(_ALIGNMENT).encode()])
            writer.add("byteorder", 6, [b"little"])
            for storage in storages:
                writer.add(f"data/{storage.key}", storage.nbytes, storage.chunks())
            writer.add("version", 2, [b"3\n"])
            serialization_id = writer.serialization_id().encode()
            writer.add(".data/serialization_id", len(serialization_id), [serialization_id])
            writer.finish()
        if atomic:
            os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
