"""The workflow under test: its files, a hash of them, and a copy that the benchmark runs."""

import hashlib
import shutil
from pathlib import Path

# What the workflow consists of: copied before the runs, hashed to tell whether it changed.
WORKFLOW_PATHS = (
    "Snakefile",
    "config.yaml",
    "rules",
    "scripts",
    "schemas",
    "profiles",
    "envs",
    "report",
    "src/ucpflow",
)
IGNORED = ("__pycache__",)


def workflow_files(repo):
    for top in WORKFLOW_PATHS:
        path = Path(repo) / top
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and not set(IGNORED) & set(p.parts))


def workflow_fingerprint(repo):
    """A hash of the workflow's files as they are on disk, committed or not."""
    digest = hashlib.sha256()
    for file in workflow_files(repo):
        digest.update(str(file.relative_to(repo)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:12]


def snapshot_workflow(repo, destination):
    """Copy the workflow into `destination` and return its Snakefile: others may edit the working tree while
    the benchmark runs, and every run should measure the same workflow."""
    shutil.rmtree(destination, ignore_errors=True)
    for file in workflow_files(repo):
        target = Path(destination) / file.relative_to(repo)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target)
    return Path(destination) / "Snakefile"
