"""Files a conversion writes outside its final output folder: how many, how many bytes, how many of them new on disk."""

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Footprint:
    files: int = 0
    bytes: int = 0
    # Bytes in files that are not hard links of a file of the final output (those cost no extra disk space).
    extra_bytes: int = 0

    def __add__(self, other):
        return Footprint(self.files + other.files, self.bytes + other.bytes, self.extra_bytes + other.extra_bytes)


def inodes(folder, skip=None):
    """The (device, inode) of every file under `folder`, except under its subfolder `skip`."""
    skipped = Path(folder) / skip if skip else None
    return {
        (s.st_dev, s.st_ino)
        for s in (
            p.stat() for p in Path(folder).rglob("*") if p.is_file() and not (skipped and p.is_relative_to(skipped))
        )
    }


def footprint(folder, shared_inodes=frozenset()):
    """Files and bytes under `folder` (nothing if it does not exist)."""
    total = Footprint()
    if os.path.isfile(folder):
        stat = os.lstat(folder)
        extra = 0 if (stat.st_dev, stat.st_ino) in shared_inodes else stat.st_size
        return Footprint(files=1, bytes=stat.st_size, extra_bytes=extra)
    for root, _, names in os.walk(folder):
        for name in names:
            stat = os.lstat(os.path.join(root, name))
            total.files += 1
            total.bytes += stat.st_size
            if (stat.st_dev, stat.st_ino) not in shared_inodes:
                total.extra_bytes += stat.st_size
    return total
