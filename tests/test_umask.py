"""Every file ucpflow writes gets the permissions of any file the user creates (issue 21, item 3): the
writers of fileio, whatever mode the code inside them gives its temp file, under a umask other than 022."""

import os
import stat
import subprocess
import sys
from pathlib import Path

from conftest import REPO

WRITERS = r"""
import os, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from ucpflow import ptfile
from ucpflow.fileio import atomic_directory, atomic_path, atomic_writer, copy_file, write_text

out = Path(sys.argv[1])
with atomic_path(out / "model.safetensors") as partial:  # safetensors creates its file 0600
    save_file({"w": torch.zeros(2)}, partial)
private = out / "private.txt"
private.write_text("a source file only its owner may read")
os.chmod(private, 0o600)
copy_file(private, out / "copied.txt")
with atomic_writer(out / "table.csv") as handle:
    handle.write("a,b\n")
write_text(out / "marker", "done\n", durable=True)
ptfile.save({"x": 1}, out / "state.pt")
with atomic_directory(out / "folder") as folder:
    (folder / "inside.txt").write_text("x")
"""


def test_every_fileio_writer_follows_the_umask(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-c", WRITERS, str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=120, preexec_fn=lambda: os.umask(0o027))
    assert result.returncode == 0, result.stderr[-3000:]
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.rglob("*") if path.name != "private.txt"}
    assert modes == {"model.safetensors": 0o640, "copied.txt": 0o640, "table.csv": 0o640, "marker": 0o640,
                     "state.pt": 0o640, "folder": 0o750, "inside.txt": 0o640}
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []


def modes_under(*roots: Path, skip=(".snakemake",)):
    """{mode: [paths]} of every file and folder under `roots` (Snakemake's own metadata left out)."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            if not any(part in skip for part in path.parts):
                found.setdefault(stat.S_IMODE(path.lstat().st_mode), []).append(path)
    return found
